"""Where a run is logged: its folder, its self-description, its TensorBoard events and its text log.

``runs/<name>/`` holds ``config.json`` (the resolved config), ``meta.json`` (recorded when the run starts and
at every resume: versions, threads, git commit and whether the tree was dirty, machine, command line), ``log.txt`` (the summary lines), TensorBoard events, ``checkpoint.pt`` and, at the
end, ``final.json`` (the final metrics and counters).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from rso import provenance


def unique_run_dir(parent: str | os.PathLike, name: str) -> Path:
    """``parent/name``, or ``parent/name-1``, ``-2``... if taken: an earlier run is never overwritten."""
    parent = Path(parent)
    candidate, suffix = parent / name, 0
    while candidate.exists():
        suffix += 1
        candidate = parent / f"{name}-{suffix}"
    candidate.mkdir(parents=True)
    return candidate


def git_revision(root: Path | None = None) -> str:
    """The short commit of this checkout (or of ``root``), ``-dirty`` when tracked files other than
    ``results/`` changed (an experiment rewrites its own outputs there before it records its provenance);
    ``unknown`` outside git. See :mod:`rso.provenance`."""
    return provenance.code_label(provenance.git_state(root))


machine_description = provenance.machine
versions = provenance.versions
thread_settings = provenance.threads


def write_json(path: Path, data: dict) -> None:
    """Atomically (see :func:`rso.storage.atomic_write`: a full disk is one line and leaves no ``.tmp``)."""
    from rso.storage import atomic_write

    atomic_write(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def read_meta(path: Path) -> dict | None:
    """A run's meta.json, or None when it is missing or unreadable (then it is kept as meta.json.unreadable)."""
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict) and isinstance(meta.get("resumes", []), list):
            return meta
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    try:
        os.replace(path, path.with_name(path.name + ".unreadable"))
    except OSError:
        pass
    return None


class RunLogger:
    """TensorBoard scalars plus a plain-text log, both in the run folder."""

    def __init__(self, folder: Path, printer=print):
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is heavy: import when a run starts

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))
        self.printer = printer
        self._log = open(folder / "log.txt", "a", buffering=1)

    def describe(self, config: dict, device: torch.device | str, argv: list[str] | None,
                 resumed_at: int | None = None) -> dict:
        """Write config.json and meta.json, and return this session's start record (:mod:`rso.provenance`).

        meta.json holds the first start's record; every resume appends its own record to ``resumes``, so the
        file names each commit (dirty or not), command and machine that trained the run.
        """
        command = " ".join([sys.executable, "-m", "rso.train", *(argv if argv is not None else sys.argv[1:])])
        entry = provenance.start_record(command, str(device))
        entry["git_revision"] = entry["code"]  # the name older meta.json files used
        meta_path = self.folder / "meta.json"
        meta = read_meta(meta_path) if resumed_at is not None else None
        if meta is not None:
            meta.setdefault("resumes", []).append({**entry, "at_step": resumed_at})
        else:   # a new run, or a resume whose meta.json was missing or damaged (it never blocks a resume)
            meta = entry if resumed_at is None else {**entry, "resumed_without_meta_at_step": resumed_at}
        write_json(self.folder / "config.json", config)
        write_json(meta_path, meta)
        return entry

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().to("cpu", torch.float64), step)

    def start_dashboard(self, config: dict, has_batchnorm: bool) -> None:
        """The HPARAMS experiment and this run's session, and the custom-scalars layout (rso.dashboard)."""
        from rso.dashboard import custom_scalars_layout, hparams_summaries

        for summary in hparams_summaries(config, has_batchnorm):
            self.writer._get_file_writer().add_summary(summary)
        self.writer.add_custom_scalars(custom_scalars_layout())

    def line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self._log.write(f"{stamp} {text}\n")
        self.printer(text)

    def finish(self, metrics: dict) -> None:
        """Write final.json and end the HPARAMS session (its metrics are the runs' own scalar tags)."""
        from rso.dashboard import session_end_summary

        write_json(self.folder / "final.json", metrics)
        self.writer._get_file_writer().add_summary(session_end_summary())
        self.close()

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        if self._log.closed:
            return
        self.writer.flush()
        self.writer.close()
        self._log.close()
