"""The header every results table of the 2-D experiments carries: the command, the git commit when the
experiment started (this module is imported then) and the machine that produced it."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

from rso import provenance

START = provenance.git_state()   # taken at import, when the experiment starts


def git_commit(state: dict | None = None) -> str:
    """The short commit, marked when tracked files outside results/ had uncommitted changes (naming them)."""
    state = state or START
    if state["commit"] == "unknown":
        return "unknown (not a git checkout)"
    changed = state.get("changed") or []
    return state["short"] + (f" (with uncommitted changes: {', '.join(changed[:8])})" if state["dirty"] else "")


def header(title: str) -> str:
    command = "python -m " + os.path.basename(sys.argv[0]).removesuffix(".py") if sys.argv else "?"
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else command
    args = " ".join(sys.argv[1:])
    machine = (f"{provenance.machine_line(provenance.machine())}; {platform.system()} {platform.machine()}, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    now = provenance.git_state()
    written = "" if (now["commit"], now["dirty"]) == (START["commit"], START["dirty"]) else \
        f"- git commit when written: {git_commit(now)}\n"
    return (
        f"# {title}\n\n"
        f"- command: `python -m {module}{(' ' + args) if args else ''}`\n"
        f"- git commit at start (every row): {git_commit()}\n{written}"
        f"- machine: {machine}\n"
        f"- produced: {when}\n"
    )
