"""Provenance: recorded when a run starts and at every resume, carried per row into the results tables,
kept when results are copied into results/."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from conftest import start_scratch_repo
import torch

from experiments import common, record_run
from rso import provenance
from rso.config import TrainConfig
from rso.data.mnist import MNIST
from rso.train import run_code, train


def random_data(seed: int = 0, n_train: int = 256, n_test: int = 64) -> MNIST:
    """Provenance does not need real digits."""
    generator = torch.Generator().manual_seed(seed)
    return MNIST(torch.randn(n_train, 1, 28, 28, generator=generator), torch.randint(0, 10, (n_train,), generator=generator),
                 torch.randn(n_test, 1, 28, 28, generator=generator), torch.randint(0, 10, (n_test,), generator=generator))


@pytest.fixture
def commits(monkeypatch):
    """git_state answers 'aaaaaaa' until switched, then 'bbbbbbb' with a dirty file: a commit made mid-run."""
    current = {"state": {"commit": "a" * 40, "short": "aaaaaaa", "dirty": False, "changed": []}}
    monkeypatch.setattr(provenance, "git_state", lambda root=None: dict(current["state"]))

    def switch():
        current["state"] = {"commit": "b" * 40, "short": "bbbbbbb", "dirty": True, "changed": ["rso/train.py"]}
    return switch


def tiny(tmp_path, cycles: int, **extra) -> TrainConfig:
    return TrainConfig(model="convnet", depth=1, channels=2, batch_size=64, cycles=cycles, bn_samples=128,
                       run_dir=str(tmp_path), name="run", progress=False, **extra)


def test_a_run_records_its_code_at_start_and_at_every_resume(tmp_path, commits, monkeypatch):
    from rso import train as train_module

    data = random_data()
    # the tree changes while the first session trains: its rows still name the code it started with
    sweep = train_module.run_sweep
    calls = []

    def sweep_then_commit(*args, **kwargs):
        calls.append(1)
        result = sweep(*args, **kwargs)
        if len(calls) == 1:
            commits()
        return result
    monkeypatch.setattr(train_module, "run_sweep", sweep_then_commit)
    first = train(tiny(tmp_path, 1), data=data)
    assert first["code"] == "aaaaaaa" and {entry["code"] for entry in first["history"]} == {"aaaaaaa"}
    second = train(tiny(tmp_path, 2, resume_if_exists=True), given={"cycles": 2, "resume_if_exists": True}, data=data)
    assert second["code"] == "aaaaaaa+bbbbbbb-dirty"
    done = len(first["history"])
    assert [entry["code"] for entry in second["history"]] == ["aaaaaaa"] * done + ["bbbbbbb-dirty"] * done

    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["commit"] == "a" * 40 and meta["dirty"] is False and meta["code"] == "aaaaaaa"
    assert "rso.train" in meta["command"] and meta["machine"]["cpu_count"] and meta["versions"]["torch"]
    (resume,) = meta["resumes"]
    assert resume["code"] == "bbbbbbb-dirty" and resume["changed"] == ["rso/train.py"]
    assert resume["at_step"] == first["visits"] and resume["started"] >= meta["started"]

    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert [(s["code"], s["at_step"]) for s in state["provenance"]] == [("aaaaaaa", 0), ("bbbbbbb-dirty", first["visits"])]
    assert json.loads((tmp_path / "run" / "final.json").read_text())["code"] == "aaaaaaa+bbbbbbb-dirty"


def test_run_code_marks_sessions_without_a_record():
    assert run_code([{"code": "a", "at_step": 0}, {"code": "a", "at_step": 5}]) == "a"
    assert run_code([{"code": "b-dirty", "at_step": 40}]) == "unrecorded+b-dirty"   # resumed from an old checkpoint


def test_tables_say_which_code_made_their_rows_and_flag_dirty_trees(tmp_path, commits):
    args = argparse.Namespace(experiment="compare", engine="fast")
    args.start = common.start_provenance("compare", ["--quick"])
    commits()                                      # committed (and edited) while the experiment ran
    record = common.provenance(args, ["--quick"], "what ran", row_codes=["aaaaaaa", "aaaaaaa", "ccccccc-dirty"])
    assert record["code"] == "aaaaaaa" and record["git_commit"] == "aaaaaaa"
    assert record["code_when_written"] == "bbbbbbb-dirty"
    common.write_outputs(tmp_path, "title", record, "| a |\n|---|\n| 1 |\n")
    summary = (tmp_path / "summary.md").read_text()
    assert "aaaaaaa (2 rows), ccccccc-dirty (1 row)" in summary and "uncommitted changes" in summary
    assert "started at aaaaaaa and wrote its results at bbbbbbb-dirty" in summary
    saved = json.loads((tmp_path / "provenance.json").read_text())
    assert saved["row_codes"] == ["aaaaaaa", "aaaaaaa", "ccccccc-dirty"] and saved["started"] == args.start["started"]
    assert "unrecorded' rows were produced before" in provenance.describe_codes(["unrecorded", "aaaaaaa"])
    assert provenance.describe_codes(["aaaaaaa"] * 3) == "Code: every row at aaaaaaa."


def test_copying_results_keeps_their_provenance_and_records_each_copy(tmp_path):
    source = tmp_path / "scratch" / "compare"
    source.mkdir(parents=True)
    (source / "provenance.json").write_text(json.dumps({"command": "python -m experiments.compare", "code": "x"}))
    (source / "runs.csv").write_text("label,code\nRSO,x\n")
    first = tmp_path / "results" / "compare"
    assert record_run.main([str(source), str(first)]) == 0
    assert (first / "runs.csv").read_text() == "label,code\nRSO,x\n"
    assert json.loads((first / "provenance.json").read_text())["code"] == "x"
    again = tmp_path / "elsewhere"
    record_run.copy_results(first, again, ["results/compare", "elsewhere"])
    copies = json.loads((again / "recorded.json").read_text())["copies"]
    assert [copy["from"] for copy in copies] == [str(source.resolve()), str(first.resolve())]
    assert all(copy["code"] and copy["at"] and copy["command"].startswith("python -m experiments.record_run")
               for copy in copies)
    with pytest.raises(FileNotFoundError, match="no provenance.json"):
        record_run.copy_results(tmp_path / "results", tmp_path / "x")


def test_git_state_names_the_changed_files_outside_results(tmp_path):
    if shutil.which("git") is None:
        pytest.fail("git is needed to record provenance")

    assert provenance.git_state(tmp_path)["commit"] == "unknown"
    start_scratch_repo(tmp_path)
    state = provenance.git_state(tmp_path)
    assert len(state["commit"]) == 40 and state["commit"].startswith(state["short"]) and not state["dirty"]
    (tmp_path / "results" / "table.md").write_text("new\n")
    assert provenance.git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    dirty = provenance.git_state(tmp_path)
    assert dirty["dirty"] and dirty["changed"] == ["code.py"] and provenance.code_label(dirty) == state["short"] + "-dirty"
