"""``python -m experiments.faults``: the fault-injection matrix (issue 14), counted.

Every case is a fault a run can meet: SIGKILL/SIGINT/SIGTERM at random moments (mid-sweep included) followed
by a resume, a second run on a locked folder, a full disk, damaged checkpoints (random bytes, bit flips,
truncations, configs with missing fields or wrong types, non-finite weights), a damaged meta.json,
non-finite and absurd option values, a gzip bomb. Each case ends in one of:

- ``ok``: the run finished, resumed, or stopped with one line and the right exit status;
- ``traceback``: a Python traceback (or an exception escaping to the caller) instead of one line;
- ``accepted``: damaged input taken as valid (a checkpoint loaded with weights other than those saved, a
  non-finite value accepted);
- ``lost``: work lost: a resumed run that does not end with the weights of an uninterrupted one (bit for
  bit), or a checkpoint older than ``--checkpoint-every`` (+ one visit and one evaluation) at a kill.

``tests/test_faults.py`` runs each group on a small budget in ``make test``; this command runs the matrix
and writes ``results/faults/summary.csv`` and ``summary.md`` (the README's Reliability table).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# A small run that still has sweeps of a few seconds under load: float64 so that the fast engine's rebuilt
# caches decide as the incremental ones do; one thread so every process computes the same bits.
RUN_FLAGS = ["--model", "convnet", "--depth", "2", "--channels", "3", "--train-subset", "600", "--test-subset",
             "200", "--batch-size", "200", "--bn-samples", "400", "--dtype", "float64", "--cycles", "1",
             "--eval-every", "cycle", "--threads", "1", "--no-progress", "--no-download"]
TIMEOUT = 1800   # seconds a launched run may take (a few on an idle machine; far more on a crowded one)
STATUS_SIGNALED = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class Tally:
    """Outcomes of one group of cases."""

    group: str
    outcomes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, outcome: str, note: str = "") -> None:
        assert outcome in ("ok", "traceback", "accepted", "lost"), outcome
        self.outcomes.append(outcome)
        if outcome != "ok" and note:
            self.notes.append(f"{outcome}: {note}")

    def count(self, outcome: str) -> int:
        return self.outcomes.count(outcome)

    @property
    def bad(self) -> int:
        return len(self.outcomes) - self.count("ok")


# ---- helpers -----------------------------------------------------------------------------------------------
def environment(data_dir: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RSO_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}


def launch(args: list[str], data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rso.train", *args], cwd=ROOT, env=environment(data_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        return -999, err + "\n(timed out)"
    return process.returncode, err


def error_lines(stderr: str) -> list[str]:
    """stderr without warnings and without argparse's usage lines (an argparse error is usage + one line)."""
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line
            and not line.startswith(("usage:", " "))]


def has_traceback(stderr: str) -> bool:
    return "Traceback" in stderr or "Exception in thread" in stderr


def weights(folder: Path) -> dict:
    from rso.checkpoint import load_checkpoint

    return load_checkpoint(folder)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def call_main(main, argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    """(exit status, stderr, escaped exception) of an in-process ``main(argv)``."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException as error:   # noqa: BLE001 - an escaping exception is what this counts
            return None, stderr.getvalue(), error
    return status, stderr.getvalue(), None


def one_line_error(tally: Tally, status, stderr: str, escaped, expect: str = "", code: int = 2,
                   label: str = "") -> bool:
    """Score a case that must end in exit status ``code`` and one stderr line containing ``expect``."""
    lines = error_lines(stderr)
    if escaped is not None or has_traceback(stderr):
        tally.add("traceback", f"{label}: {escaped!r} {stderr[-300:]}")
    elif status != code or len(lines) != 1 or expect not in lines[0]:
        tally.add("accepted", f"{label}: status {status}, stderr {stderr[-300:]!r}")
    else:
        tally.add("ok")
        return True
    return False


def reference_run(work: Path, data_dir: Path, cycles: int = 1) -> dict:
    """The uninterrupted run every interrupted one must match, bit for bit (cached per work folder)."""
    name = "straight" if cycles == 1 else f"straight-{cycles}"
    folder = work / name
    if not (folder / "final.json").is_file():
        status, err = finish(launch([*RUN_FLAGS, "--run-dir", str(work), "--name", name,
                                     "--checkpoint-every", "1000", "--cycles", str(cycles)], data_dir))
        if status != 0:
            raise RuntimeError(f"the uninterrupted reference run failed ({status}): {err[-500:]}")
    return weights(folder)


def checkpoint_mtime(folder: Path) -> float | None:
    path = folder / "checkpoint.pt"
    return path.stat().st_mtime if path.is_file() else None


def file_clock(work: Path) -> float:
    """Now, on the clock file timestamps use: the kernel stamps files with a coarse clock that can trail
    ``time.time()`` by a few milliseconds, so a checkpoint written just after ``time.time()`` may carry an
    earlier mtime. A marker file touched now gives the moment on the files' own clock."""
    marker = work / ".moment"
    marker.touch()
    return marker.stat().st_mtime


def checkpoint_age(folder: Path, moment: float) -> float | None:
    path = folder / "checkpoint.pt"
    return moment - path.stat().st_mtime if path.is_file() else None


# ---- groups ------------------------------------------------------------------------------------------------
def kills(work: Path, data_dir: Path, count: int = 4, seed: int = 0, every: float = 0.5) -> Tally:
    """SIGKILL at ``count`` random moments (start-up, mid-sweep, evaluation), each followed by a resume
    (``--resume-if-exists``); the run then finishes and must end with the reference run's weights."""
    tally = Tally("kill -9 at random moments, then resume")
    expected = reference_run(work, data_dir)
    rng = random.Random(seed)
    name = f"killed-{seed}"
    args = [*RUN_FLAGS, "--run-dir", str(work), "--name", name, "--resume-if-exists", "--checkpoint-every", str(every)]
    folder = work / name
    mid_sweep = 0
    for _ in range(count):
        before = checkpoint_mtime(folder)
        process = launch(args, data_dir)
        # wait until this process has written a checkpoint (so most kills land in the sweeps), or kill it
        # during start-up
        start = time.monotonic()
        if rng.random() < 0.75:
            while process.poll() is None and checkpoint_mtime(folder) == before and time.monotonic() - start < TIMEOUT:
                time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        moment = file_clock(work)
        status, err = finish(process)
        age = checkpoint_age(folder, moment)
        if has_traceback(err):
            tally.add("traceback", err[-300:])
        elif status == 0:
            tally.add("ok")   # it finished before the kill
        elif age is not None and age > every + 10.0:   # one visit and one evaluation of slack, under load
            tally.add("lost", f"checkpoint {age:.1f} s old at the kill")
        else:
            tally.add("ok")
        with contextlib.suppress(Exception):
            from rso.checkpoint import load_checkpoint

            mid_sweep += "sweep" in load_checkpoint(folder)
    status, err = finish(launch(args, data_dir))
    if status != 0 or has_traceback(err):
        tally.add("traceback" if has_traceback(err) else "lost", f"final resume: {status} {err[-300:]}")
    elif not same_weights(expected, weights(folder)):
        tally.add("lost", "the resumed run's weights differ from the uninterrupted run's")
    else:
        tally.add("ok")
    tally.notes.append(f"{mid_sweep} of {count} kills left a mid-sweep checkpoint")
    return tally


def signals(work: Path, data_dir: Path, seed: int = 0) -> Tally:
    """SIGINT and SIGTERM mid-sweep: exit 130/143 with one line, a checkpoint taken after the signal (no
    work lost), and the resumed run ends with the reference weights. Then each signal during start-up."""
    tally = Tally("SIGINT/SIGTERM mid-sweep and during start-up")
    rng = random.Random(seed)
    for signum in (signal.SIGINT, signal.SIGTERM):
        name = f"signaled-{signum}-{seed}"
        folder = work / name
        args = [*RUN_FLAGS, "--run-dir", str(work), "--name", name, "--resume-if-exists", "--checkpoint-every", "1000"]
        process = launch([*args, "--cycles", "2"], data_dir)     # long enough to be signaled mid-run
        while process.poll() is None and not (folder / "checkpoint.pt").is_file():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        moment = file_clock(work)
        process.send_signal(signum)
        status, err = finish(process)
        age = checkpoint_age(folder, moment)
        lines = error_lines(err)
        if has_traceback(err):
            tally.add("traceback", err[-300:])
        elif status == 0:
            tally.add("ok")   # it finished first
        elif status != STATUS_SIGNALED[signum] or len(lines) != 1 or "interrupted" not in lines[0]:
            tally.add("accepted", f"status {status}: {err[-300:]!r}")
        elif "--resume" in lines[0] and (age is None or age > 0):
            tally.add("lost", f"the last checkpoint predates the {signal.Signals(signum).name} by {age:.4f} s: {lines[0]}")
        else:
            tally.add("ok")
        status, err = finish(launch([*args, "--cycles", "2"], data_dir))
        if status != 0 or has_traceback(err):
            tally.add("traceback" if has_traceback(err) else "lost", f"resume: {status} {err[-300:]}")
        else:
            tally.add("ok" if same_weights(reference_run(work, data_dir, cycles=2), weights(folder)) else "lost",
                      "resumed weights differ")
    for signum in (signal.SIGINT, signal.SIGTERM):   # during start-up: imports, data loading
        name = f"startup-{signum}-{seed}"
        process = launch([*RUN_FLAGS, "--run-dir", str(work), "--name", name], data_dir)
        time.sleep(rng.uniform(0.05, 3.0))
        process.send_signal(signum)
        status, err = finish(process)
        lines = error_lines(err)
        if has_traceback(err):
            tally.add("traceback", err[-300:])
        elif status == 0 or (status == STATUS_SIGNALED[signum] and len(lines) == 1 and "interrupted" in lines[0]
                             and ("--resume" not in lines[0] or (work / name / "checkpoint.pt").is_file())):
            tally.add("ok")
        else:
            tally.add("accepted", f"start-up signal: status {status}: {err[-300:]!r}")
    return tally


def lock(work: Path, data_dir: Path) -> Tally:
    """A second run on a folder a live run holds fails at once, naming the holder's pid; the first finishes."""
    tally = Tally("second run on a locked run folder")
    name = "locked"
    args = [*RUN_FLAGS, "--run-dir", str(work), "--name", name, "--resume-if-exists"]
    first = launch([*args, "--cycles", "3"], data_dir)      # long enough to be running when the others start
    lock_file = work / name / "run.lock"
    while first.poll() is None and not (lock_file.is_file() and lock_file.read_text().strip()):
        time.sleep(0.05)
    for extra in (["--seed", "1"], []):
        second = launch([*args, *extra], data_dir)
        status, err = finish(second)
        if first.poll() is not None:
            tally.add("ok")     # the first run ended before the second tried: nothing to test
            continue
        lines = error_lines(err)
        if has_traceback(err):
            tally.add("traceback", err[-300:])
        elif status == 2 and len(lines) == 1 and f"pid {first.pid}" in lines[0]:
            tally.add("ok")
        else:
            tally.add("accepted", f"second run: status {status}: {err[-300:]!r}")
    status, err = finish(first)
    config = json.loads((work / name / "config.json").read_text())
    tally.add("ok" if status == 0 and config["seed"] == 0 else "lost", f"first run: {status} {err[-300:]}")
    return tally


def full_disk(work: Path, data_dir: Path) -> Tally:
    """A write that fails with ENOSPC while writing checkpoint.pt, config.json or meta.json (a patched
    ``os.write``): one line naming the folder and its free space, the previous file intact, no ``.tmp``."""
    import rso.storage
    from rso.train import main

    tally = Tally("full disk while writing checkpoint.pt / config.json / meta.json")
    base = [*RUN_FLAGS, "--run-dir", str(work), "--data-dir", str(data_dir), "--cycles", "1"]
    status, err, escaped = call_main(main, [*base, "--name", "disk"])
    folder = work / "disk"
    if status != 0:
        raise RuntimeError(f"the run to damage failed: {status} {err} {escaped!r}")
    real_write = os.write
    for victim in ("checkpoint.pt", "config.json", "meta.json"):
        before = {path.name: path.read_bytes() for path in folder.iterdir() if path.suffix in (".pt", ".json")}

        def failing_write(descriptor, data, victim=victim):
            target = os.readlink(f"/proc/self/fd/{descriptor}") if os.path.exists("/proc/self/fd") else ""
            if target.endswith(victim + ".tmp"):
                real_write(descriptor, bytes(data[: len(data) // 2]))   # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(descriptor, data)

        rso.storage.os.write = failing_write
        try:
            status, err, escaped = call_main(main, ["--resume", str(folder), "--cycles", "2", "--no-progress",
                                                    "--threads", "1"])
        finally:
            rso.storage.os.write = real_write
        leftovers = [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]
        after = {path.name: path.read_bytes() for path in folder.iterdir() if path.name in before}
        if one_line_error(tally, status, err, escaped, expect=f"cannot write {victim} in {folder}: disk full",
                          label=victim):
            if leftovers or (victim in before and after.get(victim) != before[victim]):
                tally.outcomes[-1] = "lost"
                tally.notes.append(f"lost: {victim}: leftovers {leftovers} or the previous file changed")
    return tally


def damaged_checkpoints(work: Path, data_dir: Path, count: int = 100, seed: int = 0) -> Tally:
    """``count`` each of: random bytes, one flipped bit, a truncation; every one must fail to load with a
    CheckpointError, or load with exactly the saved content (a flipped bit in zip metadata, say)."""
    from rso.checkpoint import CheckpointError, load_checkpoint

    tally = Tally("damaged checkpoints: random bytes, bit flips, truncations")
    reference_run(work, data_dir)
    original_path = work / "straight" / "checkpoint.pt"
    original = original_path.read_bytes()
    saved = load_checkpoint(original_path)
    rng = random.Random(seed)
    target = work / "fuzzed.pt"
    for kind in ("random bytes", "bit flip", "truncation"):
        for _ in range(count):
            data = bytearray(original)
            if kind == "random bytes":
                start = rng.randrange(len(data))
                length = rng.randint(1, 64)
                data[start:start + length] = bytes(rng.randrange(256) for _ in range(min(length, len(data) - start)))
            elif kind == "bit flip":
                position = rng.randrange(len(data) * 8)
                data[position // 8] ^= 1 << (position % 8)
            else:
                data = data[: rng.randrange(len(data))]
            target.write_bytes(bytes(data))
            try:
                loaded = load_checkpoint(target)
            except CheckpointError as error:
                tally.add("ok" if "\n" not in str(error) else "traceback", str(error))
                continue
            except BaseException as error:   # noqa: BLE001
                tally.add("traceback", f"{kind}: {error!r}")
                continue
            same = same_weights(saved["model"], loaded["model"]) and saved["progress"] == loaded["progress"] \
                and torch.equal(saved["generator"], loaded["generator"]) and saved["config"] == loaded["config"]
            tally.add("ok" if same else "accepted", f"{kind}: loaded with different content")
    return tally


def bad_checkpoint_contents(work: Path, data_dir: Path) -> Tally:
    """Well-formed checkpoints with bad content (re-checksummed, so only the content checks can catch them):
    a config of ``{}``, each required field missing or of a wrong type, a non-finite weight, an absurd model
    size; each refused by resume and by ``rso.evaluate`` in one line. A garbage meta.json does not block a
    resume."""
    from rso.checkpoint import load_checkpoint, save_checkpoint
    from rso.config import REQUIRED_IN_CHECKPOINT
    from rso.evaluate import main as evaluate_main
    from rso.train import main

    tally = Tally("checkpoints with bad configs or non-finite weights; garbage meta.json")
    reference_run(work, data_dir)
    good = load_checkpoint(work / "straight")
    wrong_type = {"model": 3, "widths": "8", "depth": "2", "channels": 2.5, "optimizer": None, "train_subset": "1200",
                  "test_subset": 1.5, "batch_size": "200", "cycles": True, "anneal": "yes", "final_sigma_fraction": "0.1",
                  "bn_sigma": None, "weight_decay": [0], "sampler": 1, "order": 0, "chunking": 2, "epochs": "5",
                  "lr": "0.1", "momentum": {}, "dtype": 64, "seed": 0.5}
    cases = [("config {}", {"config": {}}, "lacks field 'model'")]
    for name in REQUIRED_IN_CHECKPOINT:
        config = dict(good["config"])
        del config[name]
        cases.append((f"config without {name}", {"config": config}, f"lacks field {name!r}"))
        cases.append((f"config {name} of a wrong type", {"config": {**good["config"], name: wrong_type[name]}},
                      f"field {name!r}"))
    cases.append(("config channels 10**9", {"config": {**good["config"], "channels": 10 ** 9}}, ""))
    cases.append(("config bn_sigma inf", {"config": {**good["config"], "bn_sigma": float("inf")}}, "finite"))
    for value in (float("inf"), float("-inf"), float("nan")):
        model = {key: tensor.clone() for key, tensor in good["model"].items()}
        key = next(key for key in model if key.endswith("bias") or key.endswith("weight"))
        model[key].view(-1)[0] = value
        cases.append((f"a weight {value}", {"model": model}, "non-finite"))
    for label, change, expect in cases:
        folder = work / "bad-content"
        folder.mkdir(exist_ok=True)
        state = {key: value for key, value in good.items() if key not in ("format", "version", "checksum")}
        save_checkpoint({**state, **change}, folder / "checkpoint.pt")
        status, err, escaped = call_main(main, ["--resume", str(folder), "--no-progress"])
        one_line_error(tally, status, err, escaped, expect=expect, label=f"resume, {label}")
        status, err, escaped = call_main(evaluate_main, [str(folder), "--data-dir", str(data_dir), "--test-subset", "100"])
        one_line_error(tally, status, err, escaped, expect=expect, label=f"evaluate, {label}")
    # garbage meta.json: the resume goes on (and keeps the garbage aside)
    folder = work / "garbage-meta"
    status, err, escaped = call_main(main, [*RUN_FLAGS, "--run-dir", str(work), "--name", "garbage-meta",
                                            "--data-dir", str(data_dir), "--cycles", "1"])
    for garbage in (b"\x00\xff not json", b"[1, 2]", b'{"resumes": 5}'):
        (folder / "meta.json").write_bytes(garbage)
        status, err, escaped = call_main(main, ["--resume", str(folder), "--no-progress", "--cycles",
                                                str(2 + garbage.count(b"5"))])
        if escaped is not None or has_traceback(err):
            tally.add("traceback", f"garbage meta.json: {escaped!r} {err[-300:]}")
        else:
            tally.add("ok" if status == 0 else "lost", f"garbage meta.json blocked the resume: {err[-300:]}")
    return tally


def bad_options(work: Path, data_dir: Path) -> Tally:
    """Non-finite and absurd option values: exit 2 with one line, nothing built or allocated."""
    from rso.train import main

    tally = Tally("non-finite and absurd options")
    base = [*RUN_FLAGS, "--run-dir", str(work / "options"), "--data-dir", str(data_dir), "--cycles", "1"]
    cases = [(["--bn-sigma", value], "") for value in ("inf", "-inf", "nan")]
    cases += [([flag, value], "") for flag in ("--lr", "--final-sigma-fraction", "--weight-decay", "--max-seconds",
                                               "--target-accuracy", "--momentum", "--checkpoint-every")
              for value in ("inf", "nan")]
    cases += [(["--seed", "1e30"], ""), (["--seed", str(10 ** 30)], "seed"), (["--seed", "-1"], "seed"),
              (["--threads", "1e30"], ""), (["--threads", str(10 ** 30)], "threads"),
              (["--device", "cuda:abc"], "device"), (["--device", "tpu"], "device"),
              (["--channels", "1e6"], ""), (["--channels", "1000000"], "needs at least"),
              (["--model", "mlp", "--widths", "1e12"], ""), (["--model", "mlp", "--widths", str(10 ** 12)], "needs at least"),
              (["--batch-size", str(10 ** 30)], "batch size")]
    for flags, expect in cases:
        status, err, escaped = call_main(main, [*base, *flags])
        one_line_error(tally, status, err, escaped, expect=expect, label=" ".join(flags))
    return tally


def candidates_and_data(work: Path, data_dir: Path) -> Tally:
    """select_candidate never picks a non-finite loss or value; a gzip bomb is refused after reading at most
    one MNIST file's size."""
    from rso.data import DataError, read_idx
    from rso.search.candidates import select_candidate

    tally = Tally("non-finite candidates; a gzip bomb")
    inf, nan = float("inf"), float("nan")
    for losses, values, expected in [([1, -inf, 0], None, 2), ([nan, inf, -inf], None, -1), ([3, 2, 1], [0, 1, inf], 1),
                                     ([-inf, 5, 4], [0, nan, 1], 2), ([2, 2, 2], None, 0)]:
        got = select_candidate(torch.tensor(losses, dtype=torch.float64),
                               None if values is None else torch.tensor(values, dtype=torch.float64))
        tally.add("ok" if got == expected else "accepted", f"select_candidate({losses}, {values}) = {got}")
    bomb = work / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as handle:
        handle.write((2051).to_bytes(4, "big") + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        zeros = bytes(1 << 20)
        for _ in range(100):          # 100 MB of zeros after the 47 MB an MNIST file holds
            handle.write(zeros)
    start = time.perf_counter()
    try:
        read_idx(bomb, 2051, 60000, 28, 28)
        tally.add("accepted", "the gzip bomb was read")
    except DataError as error:
        tally.add("ok" if "trailing bytes" in str(error) else "accepted", str(error))
    tally.notes.append(f"gzip bomb refused in {time.perf_counter() - start:.2f} s")
    return tally


GROUPS = {"kills": kills, "signals": signals, "lock": lock, "full_disk": full_disk,
          "damaged_checkpoints": damaged_checkpoints, "bad_contents": bad_checkpoint_contents,
          "options": bad_options, "candidates_and_data": candidates_and_data}


def table(tallies: list[Tally]) -> str:
    rows = ["| faults | cases | tracebacks | accepted | lost |", "|---|---:|---:|---:|---:|"]
    for tally in tallies:
        rows.append(f"| {tally.group} | {len(tally.outcomes)} | {tally.count('traceback')} | "
                    f"{tally.count('accepted')} | {tally.count('lost')} |")
    total = sum(len(tally.outcomes) for tally in tallies)
    counts = {name: sum(tally.count(name) for tally in tallies) for name in ("traceback", "accepted", "lost")}
    rows.append(f"| **all** | **{total}** | **{counts['traceback']}** | **{counts['accepted']}** | **{counts['lost']}** |")
    return "\n".join(rows)


def summary_line(tallies: list[Tally]) -> str:
    total = sum(len(tally.outcomes) for tally in tallies)
    return (f"{total} cases, {sum(t.count('traceback') for t in tallies)} tracebacks, "
            f"{sum(t.count('accepted') for t in tallies)} accepted, {sum(t.count('lost') for t in tallies)} lost")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.faults", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--work", default="runs/faults", help="scratch folder for the runs (default runs/faults)")
    parser.add_argument("--out", default="results/faults", help="folder for summary.csv and summary.md")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default $RSO_DATA_DIR, else ./data)")
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs in the kill group (default 6)")
    parser.add_argument("--fuzz", type=int, default=300, help="cases of each checkpoint damage (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=list(GROUPS), action="append", help="run only these groups")
    args = parser.parse_args(argv)
    from rso.data import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir).resolve()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tallies = []
    for name, group in GROUPS.items():
        if args.only and name not in args.only:
            continue
        options = {"kills": {"count": args.kills, "seed": args.seed}, "damaged_checkpoints": {"count": args.fuzz, "seed": args.seed},
                   "signals": {"seed": args.seed}}.get(name, {})
        start = time.perf_counter()
        tally = group(work, data_dir, **options)
        tallies.append(tally)
        print(f"{tally.group}: {len(tally.outcomes)} cases, {tally.bad} bad ({time.perf_counter() - start:.0f} s)"
              + "".join(f"\n    {note}" for note in tally.notes[:10]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["faults", "cases", "tracebacks", "accepted", "lost", "notes"])
        for tally in tallies:
            writer.writerow([tally.group, len(tally.outcomes), tally.count("traceback"), tally.count("accepted"),
                             tally.count("lost"), "; ".join(tally.notes)])
    command = "python -m experiments.faults " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "summary.md").write_text(f"{table(tallies)}\n\n{summary_line(tallies)} (`{command.strip()}`)\n")
    print(table(tallies))
    print(summary_line(tallies))
    return 0 if all(tally.bad == 0 for tally in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
