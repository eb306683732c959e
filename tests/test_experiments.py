"""Each experiment's --quick variant runs end to end on MNIST slices and writes its CSV, PNG and Markdown,
so the scripts cannot rot; the README section is generated from those files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from experiments import ablations, batch_size, compare, depth, paper, readme_section
from rso import provenance

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def mnist_available(data_dir):
    """The experiments read MNIST from $RSO_DATA_DIR; conftest's data_dir fails (never skips) without it."""
    saved = os.environ.get("RSO_DATA_DIR")
    os.environ["RSO_DATA_DIR"] = str(data_dir)
    yield
    if saved is None:
        os.environ.pop("RSO_DATA_DIR")
    else:
        os.environ["RSO_DATA_DIR"] = saved


def this_code() -> str:
    return provenance.code_label(provenance.git_state())


def quick(module, tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / "results" / name
    assert module.main(["--quick", "--threads", "1", "--no-progress", "--out", str(out),
                        "--run-dir", str(tmp_path / "runs" / name), *extra]) == 0
    return out


def rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def check_outputs(out: Path, pngs: list[str]) -> None:
    for name in ["table.md", "summary.md", "provenance.json", *pngs]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "- command: `python -m experiments." in table and "- git commit at start:" in table and "- machine:" in table
    record = json.loads((out / "provenance.json").read_text())
    assert {"command", "git_commit", "machine", "what_ran", "started", "commit"} <= set(record)
    assert record["code"] == this_code() and record["commit"].startswith(this_code().removesuffix("-dirty"))
    # every row names the code that produced it, and the table says so
    finals = rows(out / "runs.csv") if (out / "runs.csv").is_file() else rows(out / "per_cycle.csv")
    assert finals and {row["code"] for row in finals} == {this_code()}
    assert record["row_codes"] == [row["code"] for row in finals]
    assert f"Code: every row at {this_code()}" in (out / "summary.md").read_text()


def table_cells(out: Path) -> set[str]:
    """Every cell of the Markdown tables in summary.md."""
    cells = set()
    for line in (out / "summary.md").read_text().splitlines():
        if line.startswith("|"):
            cells |= {cell.strip() for cell in line.strip("|").split("|")}
    return cells


def test_compare_quick(tmp_path):
    out = quick(compare, tmp_path, "compare")
    check_outputs(out, ["accuracy_curves.png"])
    finals = rows(out / "runs.csv")
    assert [r["optimizer"] for r in finals] == ["rso", "sgd", "adam"]
    rso, sgd = finals[0], finals[1]
    # the fair-comparison counters: RSO visits every weight once a cycle, backprop updates all of them each step
    assert int(rso["weight_updates"]) == int(rso["weights"])
    assert int(sgd["weight_updates"]) == int(sgd["weights"]) * (1000 // 50)
    assert int(rso["forward_samples"]) == 3 * 100 * int(rso["weights"])
    history = rows(out / "history.csv")
    assert {r["optimizer"] for r in history} == {"rso", "sgd", "adam"}
    # the table quotes the CSV: each run's final accuracy, and what it paid to reach RSO's
    cells = table_cells(out)
    assert {f"{float(r['test_accuracy']):.4f}" for r in finals} <= cells
    assert "Cost to first reach" in (out / "table.md").read_text()
    assert (tmp_path / "runs" / "compare").is_dir() and any((tmp_path / "runs" / "compare").rglob("events.out.tfevents*"))


def test_batch_size_quick_puts_the_course_project_beside_ours(tmp_path):
    out = quick(batch_size, tmp_path, "batch_size")
    check_outputs(out, ["batch_size.png"])
    finals = rows(out / "runs.csv")
    assert [int(r["batch_size"]) for r in finals] == [32, 100]
    # forward samples follow the batch: 3 candidates x batch per visit, the same visits for both batches
    assert [int(r["forward_samples"]) for r in finals] == [3 * b * int(finals[0]["weight_updates"]) for b in (32, 100)]
    assert {f"{float(r['test_accuracy']):.4f}" for r in finals} <= table_cells(out)
    summary = (out / "summary.md").read_text()
    assert "course project (reference.md)" in summary and "0.8075" in summary and "36464 s" in summary


def test_depth_quick(tmp_path):
    out = quick(depth, tmp_path, "depth")
    check_outputs(out, ["depth.png"])
    finals = rows(out / "runs.csv")
    assert sorted({int(r["depth"]) for r in finals}) == [1, 2]
    rso_weights = {int(r["depth"]): int(r["weights"]) for r in finals if r["optimizer"] == "rso"}
    assert rso_weights == {1: 9 * 2 + 4 + 2 * 10, 2: 9 * 2 + 4 + 9 * 2 * 2 + 4 + 2 * 10}  # conv, BN, dense per depth
    assert {f"{float(r['test_accuracy']):.4f}" for r in finals if r["optimizer"] == "rso"} <= table_cells(out)


def test_ablations_quick(tmp_path):
    out = quick(ablations, tmp_path, "ablations", "--seeds", "1")
    check_outputs(out, ["ablations.png", "ablation_curves.png"])
    finals = rows(out / "runs.csv")
    assert len(finals) == len(ablations.VARIANTS)
    # the variants really differ: not every run ends with the same accuracy and acceptance
    assert len({(r["test_accuracy"], r["test_loss"]) for r in finals}) > 1
    assert {f"{float(r['test_accuracy']):.4f}" for r in finals} <= table_cells(out)


def test_paper_quick_resumes_and_reports_every_cycle(tmp_path):
    out = quick(paper, tmp_path, "paper", "--cycles", "1")
    assert [r["cycle"] for r in rows(out / "per_cycle.csv")] == ["1.0"]
    out = quick(paper, tmp_path, "paper", "--cycles", "2")      # continues the same run folder
    check_outputs(out, ["accuracy_per_cycle.png"])
    per_cycle = rows(out / "per_cycle.csv")
    assert [r["cycle"] for r in per_cycle] == ["1.0", "2.0"]
    assert int(per_cycle[1]["weight_visits"]) == 2 * int(per_cycle[0]["weight_visits"])
    assert len(list((tmp_path / "runs" / "paper").iterdir())) == 1
    assert "2 complete cycle(s) of 2 planned" in (out / "summary.md").read_text()
    # harvesting reads the checkpoint without training
    assert paper.main(["--quick", "--harvest", "--out", str(out), "--run-dir", str(tmp_path / "runs" / "paper")]) == 0
    assert "harvested from" in (out / "summary.md").read_text()


def test_paper_quick_continues_with_two_workers(tmp_path):
    """``--workers 2`` hands the experiment's whole config to rso.train's launcher: it continues the
    1-process run's folder and the report gains the second cycle."""
    quick(paper, tmp_path, "paper", "--cycles", "1")
    out = quick(paper, tmp_path, "paper", "--cycles", "2", "--workers", "2")
    assert [r["cycle"] for r in rows(out / "per_cycle.csv")] == ["1.0", "2.0"]
    assert "2 complete cycle(s) of 2 planned" in (out / "summary.md").read_text()
    (folder,) = (tmp_path / "runs" / "paper").iterdir()
    assert "2 workers (gloo)" in (folder / "log.txt").read_text()


def test_paper_run_continues_on_another_machine_from_its_saved_copy(tmp_path, capsys):
    """--save-run keeps the checkpoint beside the results; a run folder that does not exist (a new machine)
    is seeded from it and continues to exactly the weights of the run continued where it started."""
    import torch

    out = quick(paper, tmp_path, "paper", "--cycles", "1", "--save-run")
    saved = out / paper.SAVED_RUN
    assert sorted(p.name for p in saved.iterdir()) == ["checkpoint.pt", "config.json", "log.txt", "meta.json"]
    quick(paper, tmp_path, "paper", "--cycles", "2")                                 # the same machine
    elsewhere = tmp_path / "elsewhere"
    assert paper.main(["--quick", "--threads", "1", "--no-progress", "--out", str(out), "--cycles", "2",
                       "--run-dir", str(elsewhere)]) == 0                                # a machine without the run
    assert "seeded" in capsys.readouterr().out
    here = torch.load(next((tmp_path / "runs" / "paper").iterdir()) / "checkpoint.pt", weights_only=True)
    there = torch.load(next(elsewhere.iterdir()) / "checkpoint.pt", weights_only=True)
    assert here["progress"]["cycle"] == there["progress"]["cycle"] == 2
    assert all(torch.equal(here["model"][key], there["model"][key]) for key in here["model"])


def test_readme_section_is_generated_from_the_results(tmp_path):
    results = tmp_path / "results"
    quick(batch_size, tmp_path, "batch_size")
    output = tmp_path / "README_RESULTS.md"
    assert readme_section.main(["--results", str(results), "--output", str(output), "--link-root", "results"]) == 0
    text = output.read_text()
    assert text.startswith(readme_section.BEGIN)
    assert "](results/batch_size/batch_size.png)" in text
    assert "python -m experiments.batch_size --quick" in text
    assert "Not produced yet: run `make paper`" in text


def test_paper_quick_stopped_mid_cycle_reports_the_saved_weights(tmp_path):
    # the time cap stops the run after its first layer sweep, before the end-of-cycle evaluation
    out = quick(paper, tmp_path, "paper", "--cycles", "1", "--max-minutes", "0.00001")
    per_cycle = rows(out / "per_cycle.csv")
    assert len(per_cycle) == 1 and per_cycle[0]["complete_cycle"] == "False"
    assert "evaluated at harvest" in per_cycle[0]["last_sweep"] and "layer sweeps of cycle 1 done" in per_cycle[0]["last_sweep"]
    # the row is the saved checkpoint's weights, evaluated again here independently of the harvest
    from rso.checkpoint import input_transform_of, load_checkpoint
    from rso.data import load_mnist
    from rso.evaluate import evaluate_checkpoint

    (folder,) = (tmp_path / "runs" / "paper").iterdir()
    state = load_checkpoint(folder)
    assert int(per_cycle[0]["weight_visits"]) == state["progress"]["visits"] > 0
    again = evaluate_checkpoint({**state, "bn_statistics_step": None}, load_mnist(None, 1000, 500, transform=input_transform_of(state)), 1000)
    assert float(per_cycle[0]["test_accuracy"]) == again["test_accuracy"]
    assert per_cycle[0]["code"] == this_code()
    assert "0 complete cycle(s) of 1 planned" in (out / "summary.md").read_text()


def test_readme_update_replaces_only_the_generated_region(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nkept above\n\n{readme_section.BEGIN}\nold text\n{readme_section.END}\n\nkept below\n")
    assert readme_section.main(["--results", str(tmp_path / "none"), "--output", "-",
                                "--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old text" not in text and "kept above" in text and "kept below" in text
    assert text.count(readme_section.BEGIN) == 1 and text.count(readme_section.END) == 1
    assert "Not recorded yet: run `make mnist-rso`" in text and "Not produced yet: run `make bench`" in text


def test_each_paper_row_names_the_code_that_trained_its_cycle():
    """A row's code: the sessions that trained the visits since the row before, not only the one that
    evaluated it (a cycle begun at one commit and finished at another names both)."""
    sessions = [{"code": "aaa", "at_step": 9504}, {"code": "bbb", "at_step": 9504}, {"code": "ccc", "at_step": 10000}]
    assert paper.code_between(sessions, 0, 12016) == "unrecorded+aaa+bbb+ccc"   # visits 0..9504 predate them
    assert paper.code_between(sessions, 12016, 24032) == "ccc"
    assert paper.code_between([{"code": "x", "at_step": 0}, {"code": "y", "at_step": 30000}], 24032, 36048) == "x+y"
    assert paper.code_between([], 0, 10) is None
