"""Where a run is logged: its folder, its self-description, its TensorBoard events and its text log.

``runs/<name>/`` holds ``config.json`` (the resolved config), ``meta.json`` (versions, threads, git revision,
machine, command line), ``log.txt`` (the summary lines), TensorBoard events, ``checkpoint.pt`` and, at the
end, ``final.json`` (the final metrics and counters).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


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
    ``unknown`` outside git."""
    try:
        root = root or Path(__file__).resolve().parent.parent
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return (revision + ("-dirty" if dirty else "")) if revision else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description(device: torch.device | str = "cpu") -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def versions() -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "rso": __import__("rso").__version__}
    for package in ("numpy", "numba", "tensorboard", "tqdm"):
        try:
            found[package] = __import__(package).__version__
        except Exception:
            found[package] = None
    return found


def thread_settings() -> dict:
    settings = {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
    try:
        import numba

        settings["numba_threads"] = numba.get_num_threads()
    except Exception:
        pass
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        settings[variable] = os.environ.get(variable)
    return settings


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

    def describe(self, config: dict, device: torch.device | str, argv: list[str] | None, resumed_at: int | None = None) -> None:
        """Write config.json and meta.json; a resumed run keeps the first meta.json and appends to its resumes."""
        entry = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, "-m", "rso.train", *(argv if argv is not None else sys.argv[1:])]),
            "git_revision": git_revision(), "versions": versions(), "threads": thread_settings(),
            "machine": machine_description(device)}
        meta_path = self.folder / "meta.json"
        meta = read_meta(meta_path) if resumed_at is not None else None
        if meta is not None:
            meta.setdefault("resumes", []).append({**entry, "at_step": resumed_at})
        else:   # a new run, or a resume whose meta.json was missing or damaged (it never blocks a resume)
            meta = entry if resumed_at is None else {**entry, "resumed_without_meta_at_step": resumed_at}
        write_json(self.folder / "config.json", config)
        write_json(meta_path, meta)

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
