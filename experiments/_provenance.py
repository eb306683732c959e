"""The header every results table carries: the command, the git commit and the machine that produced it."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


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
