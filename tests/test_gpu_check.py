"""make gpu-check's script, its CPU path on tiny nets: every stage runs and reports (it gets one try on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_check(*args: str, data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RSO_DATA_DIR": str(data_dir)}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "-m", "rso.gpu_check", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_gpu_check_quick_on_cpu(tmp_path, data_dir):
    out = tmp_path / "gpu"
    done = run_check("--device", "cpu", "--quick", "--out", str(out), data_dir=data_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"environment", "exactness", "syncs", "bench", "paper"}      # rso-bench: not in --quick
    assert all(result["ok"] for result in summary.values())
    cases = summary["exactness"]["cases"]
    assert [case["reference"] for case in cases] == ["reference", "fast"]
    assert all(case["decisions_identical"] and case["sweeps_compared"] == case["sweeps"] for case in cases)
    assert summary["syncs"]["syncs_only_at_progress_reads"]
    repeat = summary["syncs"]["repeat"]
    assert repeat["bitwise_repeatable"] and repeat["graphs_equal_eager"] and repeat["changed_elements"] > 0
    assert all(row["host_reads"] == row["progress_reads"] > 0 for row in summary["syncs"]["rows"])
    assert summary["bench"]["projected_cycle_seconds"] > 0
    assert len(summary["paper"]["cycles"]) == 1 and 0 <= summary["paper"]["cycles"][0]["test_accuracy"] <= 1
    text = (out / "summary.md").read_text()
    assert "sweeps identical" in text and "FAILED" not in text
    for stage in summary:
        assert (out / f"{stage}.log").exists()


def test_gpu_check_without_data_is_one_clear_line(tmp_path):
    done = run_check("--device", "cpu", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "none"),
                     data_dir=tmp_path)
    assert done.returncode == 2
    assert f"no MNIST in {tmp_path / 'none'}/MNIST/raw" in done.stderr.strip().splitlines()[-1]


def test_paper_loop_where_the_trainer_cannot_be_imported(tmp_path, data_dir):
    """The paper stage's fallback (a machine without tqdm/tensorboard): the same search, cycle rows kept."""
    import argparse

    from rso import gpu_check

    args = argparse.Namespace(out=str(tmp_path), device="cpu", data_dir=str(data_dir), graphs="auto", quick=True,
                              threads=1, stage="paper")
    result = gpu_check._paper_loop(args, gpu_check._stage_options(args), 300)
    assert [row["cycle"] for row in result["cycles"]] == [1] and result["cycles"][0]["complete"]
    assert result["cycles"][0]["visits"] == 42 and 0 <= result["cycles"][0]["test_accuracy"] <= 1
    assert json.loads((tmp_path / "paper.partial.json").read_text())["cycles"] == result["cycles"]
