"""Data-parallel exact scoring (rso.distributed): 2 gloo workers on localhost take the decisions of 1 process.

Multi-worker runs are subprocesses of ``python -m rso.train`` with a timeout, so a hung worker fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rso import distributed
from rso.checkpoint import load_checkpoint
from rso.train import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--train-subset", "128", "--test-subset", "50", "--batch-size", "32", "--dtype", "float64",
        "--eval-every", "cycle", "--bn-samples", "128", "--threads", "1", "--no-progress", "--no-download"]
NETS = {"bn": ["--model", "convnet", "--depth", "2", "--channels", "3"], "oneconv": ["--model", "oneconv"]}
TIMEOUT_S = 400


def run_workers(data_dir, folder: Path, name: str, *flags, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m rso.train`` in a subprocess (it starts the workers), from this checkout."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "RSO_DATA_DIR": str(data_dir), **(env or {})}
    environment.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "rso.train", *TINY, "--data-dir", str(data_dir), "--run-dir",
                           str(folder), "--name", name, *flags], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def run_here(data_dir, folder: Path, name: str, *flags) -> None:
    assert main([*TINY, "--data-dir", str(data_dir), "--run-dir", str(folder), "--name", name, *flags]) == 0


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The searched tensors of a run's checkpoint (BN running statistics are evaluation state)."""
    model = load_checkpoint(folder)["model"]
    return {key: value for key, value in model.items() if "running" not in key and "num_batches" not in key}


def sweep_lines(folder: Path) -> list[str]:
    """Each sweep's tensor, sigma, acceptance rate and mean loss (without times and test accuracy)."""
    lines = []
    for line in (folder / "log.txt").read_text().splitlines():
        if " cycle " in line and " accept " in line:
            lines.append(line.split(" (")[0].split(" test acc")[0].split(" ", 1)[1])
    return lines


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("net", list(NETS))
def test_two_workers_take_the_decisions_of_one(net, engine, tmp_path, data_dir):
    """float64, one full cycle: the same decisions (per-sweep acceptances, accepted count) and bit-identical
    final weights with 2 workers as with 1."""
    flags = [*NETS[net], "--engine", engine, "--cycles", "1"]
    run_here(data_dir, tmp_path, "one", *flags, "--workers", "1")
    two = run_workers(data_dir, tmp_path, "two", *flags, "--workers", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    one_final = json.loads((tmp_path / "one" / "final.json").read_text())
    two_final = json.loads((tmp_path / "two" / "final.json").read_text())
    assert two_final["accepted"] == one_final["accepted"] > 0
    assert two_final["visits"] == one_final["visits"]
    assert sweep_lines(tmp_path / "two") == sweep_lines(tmp_path / "one")
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "2 workers (gloo)" in log
    assert json.loads((tmp_path / "two" / "config.json").read_text())["workers"] == 2
    assert not list((tmp_path).glob("two-*")), "only rank 0 makes a run folder"


def test_a_two_worker_run_resumes_with_one_worker_exactly(tmp_path, data_dir):
    flags = [*NETS["bn"], "--engine", "fast"]
    run_here(data_dir, tmp_path, "straight", *flags, "--cycles", "2")
    first = run_workers(data_dir, tmp_path, "split", *flags, "--cycles", "1", "--workers", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "leaked" not in first.stderr, first.stderr[-3000:]     # no semaphore left to the resource tracker
    assert main(["--resume", str(tmp_path / "split"), "--cycles", "2", "--workers", "1", "--no-progress"]) == 0
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for key in straight:
        assert torch.equal(straight[key], split[key]), key


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_a_failing_worker_ends_the_run_in_one_line(mode, tmp_path, data_dir):
    """Rank 1 raises (or dies) in the middle of the second sweep: the run ends (no hung process: the
    subprocess returns within its timeout) with one line naming rank 1, and the checkpoint of the first
    sweep is intact."""
    flags = [*NETS["bn"], "--engine", "fast", "--cycles", "1", "--workers", "2", "--eval-every", "sweep"]
    # the first sweep (the 30 output weights) takes 30 loss reductions plus the chunks' BN statistics
    result = run_workers(data_dir, tmp_path, "failing", *flags,
                         env={"RSO_FAULT_RANK": "1", "RSO_FAULT_AFTER": "60", "RSO_FAULT_MODE": mode})
    assert result.returncode == 2
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "worker rank 1 of 2" in errors[0]
    if mode == "raise":
        assert "injected fault" in errors[0] and str(tmp_path / "failing" / "checkpoint.pt") in errors[0]
    else:
        assert "exited with status 3" in errors[0]
    assert "Traceback" not in result.stderr
    state = load_checkpoint(tmp_path / "failing")
    assert state["progress"]["target_index"] >= 1 and state["progress"]["cycle"] == 0


def test_workers_flag_errors(tmp_path, data_dir, capsys):
    for flags, message in ((["--optimizer", "sgd", "--workers", "2"], "backprop baselines run in one process"),
                           (["--batch-size", "1", "--workers", "2"], "smaller than --workers 2"),
                           (["--workers", "0"], "must be a positive integer")):
        with pytest.raises(SystemExit):
            main([*TINY, "--run-dir", str(tmp_path), *flags])
        assert message in capsys.readouterr().err


def test_reductions_of_a_world_of_one_are_the_identity():
    world = distributed.LOCAL
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert world.sum(losses) is losses
    mean, variance = torch.ones(3), torch.full((3,), 2.0)
    assert world.combine_moments(10, mean, variance) == (mean, variance)
    rows = torch.arange(10)
    assert world.share(rows) is rows


class _TwoRanksHere(distributed.World):
    """Rank 0 of 2 whose other rank holds a copy of its share: the reductions double the count and keep the
    moments, so the chunk's BN statistics are this share's own (the several-worker code path, in one process)."""

    def __init__(self):
        super().__init__(0, 2)

    def combine_moments(self, count, mean, variance):
        return mean, variance


@pytest.mark.parametrize("dtype, layout", [(torch.float64, "nchw"), (torch.float32, "channels_last"),
                                           (torch.float32, "2d"), (torch.bfloat16, "nchw")])
def test_a_workers_batch_norm_equals_one_process(dtype, layout):
    """World.batch_norm with several ranks (this rank's moments, combined, then inference-form BN) against
    F.batch_norm's training form, in float64, float32, channels-last, (N, C), and bfloat16 (autocast's suffix,
    whose BN parameters stay float32)."""
    generator = torch.Generator().manual_seed(4)
    shape = (6, 5) if layout == "2d" else (6, 5, 7, 7)
    x = (3.0 + torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    parameters = torch.float32 if dtype == torch.bfloat16 else dtype
    weight, bias = weight.to(parameters), bias.to(parameters)
    got = _TwoRanksHere().batch_norm(x, weight, bias, 1e-3)
    want = torch.nn.functional.batch_norm(x.to(parameters), None, None, weight, bias, True, 0.0, 1e-3)
    assert got.dtype == dtype and got.shape == x.shape
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.to(parameters), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("world", [distributed.LOCAL, _TwoRanksHere()], ids=["one", "several"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_norm_of_repeated_columns_equals_train_mode(world, dtype):
    """World.batch_norm_columns (a searched BN's candidates: one channel expanded, a weight and bias per
    column) against F.batch_norm's training form on the expanded tensor."""
    generator = torch.Generator().manual_seed(5)
    column = (2.0 + 3.0 * torch.randn(7, 1, 5, 5, generator=generator, dtype=torch.float64)).to(dtype)
    x = column.expand(-1, 3, -1, -1)
    weight = torch.tensor([0.5, 1.0, -2.0], dtype=dtype)
    bias = torch.tensor([0.1, -0.3, 0.0], dtype=dtype)
    got = world.batch_norm_columns(x, weight, bias, 1e-3)
    want = torch.nn.functional.batch_norm(x.contiguous(), None, None, weight, bias, True, 0.0, 1e-3)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_a_worker_without_examples_contributes_no_moments():
    mean, variance, count = distributed.local_moments(torch.empty(0, 4, 3, 3))
    assert count == 0 and not torch.as_tensor(mean).isnan().any() and not torch.as_tensor(variance).isnan().any()


def test_shares_cover_a_chunk_once():
    rows = torch.arange(17)
    for size in (1, 2, 3, 5):
        shares = [distributed.World(rank, size).share(rows) for rank in range(size)]
        assert torch.equal(torch.cat(shares), rows)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


WATCH_SCRIPT = """
import sys, torch
from rso import distributed

def work():
    world = distributed.init_world(torch.device("cpu"))
    box = {"flag": False}
    world.watch(lambda: box["flag"])
    seen = []
    for step in range(6):
        if world.rank == 1 and step == 2:
            box["flag"] = True      # as a signal handler would set it, between two gathers
        local = torch.full((2, 3), float(10 * world.rank + step))
        got = world.gather(local)
        want = torch.stack([torch.full((2, 3), float(step)), torch.full((2, 3), float(10 + step))]).double()
        assert torch.equal(got, want), (step, got)
        seen.append(world.flagged)
    assert seen == [False, False, True, True, True, True], (world.rank, seen)
    world.watch(None)
    world.gather(torch.zeros(1))    # unwatched: the element is gone again (both ranks agree on the size)
    assert not world.flagged
    distributed.close_world(world)

if __name__ == "__main__":
    sys.exit(distributed.launch(2, work))
"""


def test_a_watched_flag_rides_on_the_gathers_and_every_rank_sees_it_at_once(tmp_path):
    """World.watch: one rank's flag (a stop a signal asked for) reaches every rank in the next gather, with
    no collective of its own, and the gathered values are unchanged."""
    script = tmp_path / "watch.py"
    script.write_text(WATCH_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (a launcher's workers inherit its environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[-1].split()[0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def _start_workers(data_dir, folder: Path, name: str, marker: str, *flags) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "RSO_DATA_DIR": str(data_dir), "RSO_TEST_MARK": marker}
    environment.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-m", "rso.train", *TINY, "--data-dir", str(data_dir), "--run-dir",
                             str(folder), "--name", name, *flags], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


SIGNALED_FLAGS = [*NETS["bn"], "--engine", "fast", "--checkpoint-every", "1000"]


def _two_workers_under_way(data_dir, folder: Path, name: str, marker: str) -> subprocess.Popen:
    """A 2-worker run long enough to be stopped (40 cycles), once its first checkpoint is written."""
    process = _start_workers(data_dir, folder, name, marker, *SIGNALED_FLAGS, "--cycles", "40", "--workers", "2")
    checkpoint = folder / name / "checkpoint.pt"
    assert _wait_for(lambda: checkpoint.is_file() or process.poll() is not None, TIMEOUT_S)
    time.sleep(0.5)
    return process


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_worker_with_a_checkpoint(signum, tmp_path, data_dir):
    """``kill`` (or Ctrl-C) sent to the launcher of a 2-worker run: it passes the signal on, the workers stop
    together at the next visit, rank 0 checkpoints, the launcher exits 128 + signal with one line, no worker
    is left; the run resumes with 1 worker and ends with the weights of an uninterrupted run."""
    marker = f"signal-{signum}-{tmp_path.name}"
    process = _two_workers_under_way(data_dir, tmp_path, "split", marker)
    before = load_checkpoint(tmp_path / "split")["progress"]["visits"]
    process.send_signal(signum)
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 128 + signum, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.strip() and "Warning" not in line
             and "warnings.warn" not in line]
    assert len(lines) == 1 and f"interrupted ({signal.Signals(signum).name})" in lines[0], err[-3000:]
    assert "a checkpoint was saved at this visit" in lines[0] and "--resume" in lines[0], lines[0]
    assert "Traceback" not in err
    assert _wait_for(lambda: not _processes_with(marker), 30), "a worker outlived its launcher"
    state = load_checkpoint(tmp_path / "split")
    assert state["progress"]["visits"] + (state.get("sweep") or {}).get("visit", 0) > before   # saved after
    assert state["progress"]["cycle"] < 40
    # the stopped run continues exactly: its weights after 2 more cycles are an uninterrupted run's
    cycles = state["progress"]["cycle"] + 2
    assert main(["--resume", str(tmp_path / "split"), "--cycles", str(cycles), "--workers", "1", "--no-progress"]) == 0
    run_here(data_dir, tmp_path, "straight", *SIGNALED_FLAGS, "--cycles", str(cycles))
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for key in straight:
        assert torch.equal(straight[key], split[key]), key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_do_not_outlive_a_killed_launcher(tmp_path, data_dir):
    """SIGKILL to the launcher (it cannot pass anything on): the workers notice their parent died, stop at
    the next visit with a checkpoint and exit; the run folder resumes."""
    marker = f"killed-{tmp_path.name}"
    process = _two_workers_under_way(data_dir, tmp_path, "orphaned", marker)
    process.kill()
    process.communicate(timeout=TIMEOUT_S)
    assert _wait_for(lambda: not _processes_with(marker), 60), "workers outlived a killed launcher"
    state = load_checkpoint(tmp_path / "orphaned")
    assert state["progress"]["cycle"] < 40
    assert main(["--resume", str(tmp_path / "orphaned"), "--cycles", str(state["progress"]["cycle"] + 1),
                 "--workers", "1", "--no-progress"]) == 0


def test_a_bad_gloo_thread_count_is_named(monkeypatch):
    monkeypatch.setenv("RSO_GLOO_THREADS", "two")
    with pytest.raises(ValueError, match="RSO_GLOO_THREADS must be a whole number"):
        distributed._one_thread_gloo(0, 2, 10.0)
