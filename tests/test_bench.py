"""`python -m rso.bench` end to end on a small slice: the table, the JSON and the final line (not its speed)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rso import bench

DATA_DIR = os.environ.get("RSO_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(autouse=True)
def restore_threads():
    """The bench sets torch's thread count; put it back for the other tests."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_bench_quick_oneconv(tmp_path, monkeypatch, capsys):
    if not os.path.isdir(DATA_DIR):
        pytest.skip("MNIST not available")
    monkeypatch.setenv("RSO_DATA_DIR", os.path.abspath(DATA_DIR))
    report = bench.main(["--quick", "--models", "oneconv", "--train-subset", "2048", "--output", str(tmp_path)])
    (case,) = report["results"]
    assert case["model"] == "oneconv" and case["weights_per_cycle"] == 7890
    for name, row in case["rows"].items():
        assert row["fast_us"] > 0 and row["fast_sweep_s"] > 0, name
        # a sweep is its visits (plus the cache setup): never less than numel x the mean visit
        assert row["fast_sweep_s"] >= row["fast_us"] * 1e-6 * row["numel"] * (1 - 1e-9), name
    assert case["fast_cycle_s"] == pytest.approx(sum(row["fast_sweep_s"] for row in case["rows"].values()))
    assert case["speedup"] == pytest.approx(case["reference_cycle_s"] / case["fast_cycle_s"])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["summary"] == report["summary"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("oneconv batch 512 cpu: fast engine ") and last.endswith("x faster than reference per cycle")
    assert "tensor" in (tmp_path / "bench.txt").read_text()
