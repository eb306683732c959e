"""The header every results table carries: the command, the git commit and the machine that produced it."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

from rso.runs import git_revision


def git_commit() -> str:
    """The short commit, marked when tracked files had uncommitted changes (rso.runs.git_revision)."""
    revision = git_revision()
    if revision == "unknown":
        return "unknown (not a git checkout)"
    return revision.replace("-dirty", " (with uncommitted changes)")


def header(title: str) -> str:
    command = "python -m " + os.path.basename(sys.argv[0]).removesuffix(".py") if sys.argv else "?"
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else command
    args = " ".join(sys.argv[1:])
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"# {title}\n\n"
        f"- command: `python -m {module}{(' ' + args) if args else ''}`\n"
        f"- git commit: {git_commit()}\n"
        f"- machine: {machine}\n"
        f"- produced: {when}\n"
    )
