"""Which code, which command and which machine produced a result, recorded when the work STARTS.

A record is taken at the start of every session of a run (the first start and each resume) and of every
experiment, so a table can say which commit trained each of its rows even when the tree changed between
sessions. Its short form, :func:`code_label`, is ``<short commit>`` or ``<short commit>-dirty`` (tracked files
outside ``results/`` had uncommitted changes; the record lists them), and goes into every row of a results table.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNRECORDED = "unrecorded"     # the code label of rows written before provenance was recorded per row


def _git(root: Path, *args: str) -> str:
    """git's output without its trailing newline (leading spaces matter: ``status --porcelain`` columns)."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5).stdout.rstrip()


def git_state(root: Path | None = None) -> dict:
    """``{"commit", "short", "dirty", "changed"}`` of the checkout at ``root`` (this package's by default).

    Changes under ``results/`` do not count: an experiment rewrites its own outputs there. ``commit`` is
    ``"unknown"`` outside git (or without git).
    """
    root = root or ROOT
    try:
        commit = _git(root, "rev-parse", "HEAD")
        if not commit:
            return {"commit": "unknown", "short": "unknown", "dirty": False, "changed": []}
        changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return {"commit": commit, "short": _git(root, "rev-parse", "--short", "HEAD") or commit[:7],
                "dirty": bool(changed), "changed": [line[3:] for line in changed.splitlines()][:50]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "short": "unknown", "dirty": False, "changed": []}


def code_label(record: dict) -> str:
    """``abc1234`` or ``abc1234-dirty`` (``unknown`` outside git)."""
    return record["short"] + ("-dirty" if record.get("dirty") else "")


def versions() -> dict:
    import torch

    # plain str: torch's TorchVersion would not load from a checkpoint with weights_only=True
    found = {"python": sys.version.split()[0], "torch": str(torch.__version__), "rso": str(__import__("rso").__version__)}
    for package in ("numpy", "numba", "tensorboard", "tqdm"):
        try:
            found[package] = str(__import__(package).__version__)
        except Exception:
            found[package] = None
    return found


def machine(device: str = "cpu") -> dict:
    """Host, CPU model and count, OS, the device used (and the GPU's name on CUDA)."""
    import torch

    info = {"host": platform.node(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict) -> str:
    """One line for a table: CPU model, count, host."""
    return f"{info.get('cpu', info.get('processor', '?'))}, {info.get('cpu_count')} CPUs, host {info.get('host', '?')}"


def threads() -> dict:
    import torch

    settings = {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
    try:
        import numba

        settings["numba_threads"] = numba.get_num_threads()
    except Exception:
        pass
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        settings[variable] = os.environ.get(variable)
    return settings


def start_record(command: str, device: str = "cpu", root: Path | None = None) -> dict:
    """Everything a session records when it starts: time, command, commit (dirty or not), versions, machine."""
    state = git_state(root)
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "code": code_label(state), **state, "versions": versions(), "threads": threads(),
            "machine": machine(device)}


def describe_codes(codes: list[str]) -> str:
    """A sentence for a table: which code produced its rows (in order of first appearance, with counts),
    saying so plainly when a row came from a tree with uncommitted changes or predates per-row provenance."""
    if not codes:
        return "Code: no rows."
    counts: dict[str, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    parts = [f"{code} ({count} row{'s' if count > 1 else ''})" for code, count in counts.items()]
    text = ("Code: every row at " + next(iter(counts))) if len(counts) == 1 else ("Code: rows at " + ", ".join(parts))
    notes = []
    if any("-dirty" in code for code in counts):
        notes.append("'-dirty' rows ran from a tree with uncommitted changes (their run's meta.json lists the files)")
    if any(UNRECORDED in code for code in counts):
        notes.append(f"'{UNRECORDED}' rows were produced before provenance was recorded per row")
    return text + ("; " + "; ".join(notes) if notes else "") + "."
