"""Shared fixtures: real MNIST slices from ../shared/data (or $RSO_DATA_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("RSO_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is fastest and immune to a busy machine. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found in {DATA_DIR}/MNIST/raw; set RSO_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist_small(data_dir):
    """The first 2000 training and 1000 test examples of the real MNIST."""
    from rso.data import load_mnist

    return load_mnist(data_dir, train_subset=2000, test_subset=1000, download=False)


def start_scratch_repo(folder: Path) -> None:
    """A git repository in ``folder`` with one commit: ``results/table.md`` and ``code.py`` (provenance tests)."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                       capture_output=True)

    git("init", "-q")
    (folder / "results").mkdir()
    (folder / "results" / "table.md").write_text("old\n")
    (folder / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "start")

