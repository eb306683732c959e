"""End-to-end runs of ``python -m rso.train`` on small slices of real MNIST."""

import json

import pytest
from conftest import start_scratch_repo
import torch

import rso.train as train_module
from rso.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from rso.evaluate import evaluate
from rso.evaluate import main as evaluate_main
from rso.train import main

TINY = ["--model", "convnet", "--depth", "2", "--channels", "3", "--train-subset", "1200", "--test-subset", "500",
        "--batch-size", "200", "--bn-samples", "1200", "--no-progress", "--no-download"]


def run(tmp_path, *flags, name="run"):
    return main([*TINY, "--run-dir", str(tmp_path), "--name", name, *flags])


def test_rso_run_writes_events_config_checkpoint_and_final_metrics(tmp_path, data_dir, capsys):
    assert run(tmp_path, "--cycles", "2", "--data-dir", str(data_dir)) == 0
    folder = tmp_path / "run"
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "meta.json", "log.txt", "checkpoint.pt", "final.json"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    config = json.loads((folder / "config.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())
    assert config["model"] == "convnet" and config["batch_size"] == 200
    assert meta["versions"]["torch"] == torch.__version__ and "torch_threads" in meta["threads"]
    final = json.loads((folder / "final.json").read_text())
    assert final["cycles_done"] == 2 and final["visits"] == 2 * 150  # per cycle: conv 27 + BN 6 + conv 81 + BN 6 + dense 30
    assert final["forward_samples"] == 3 * 200 * final["visits"]
    assert 0 < final["accepted"] < final["visits"]
    # the checkpoint loads with weights_only=True, and an independent evaluation agrees with the run
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "config", "progress", "generator"}
    # each tensor's last sweep time, which a resumed run's ETA starts from
    swept = {name for name, _ in model_from_checkpoint(state).named_parameters()}
    assert len(swept) == 7 and set(state["progress"]["sweep_seconds"]) == swept
    # every sweep line but the run's last ends with the ETA then (experiments.eta_check --log reads it)
    sweeps = [line for line in (folder / "log.txt").read_text().splitlines() if "s total)" in line]
    assert len(sweeps) == 2 * 7
    assert all(" s total) eta " in line for line in sweeps[:-1]) and "eta" not in sweeps[-1]
    assert evaluate_main([str(folder), "--data-dir", str(data_dir), "--test-subset", "500"]) == 0
    assert f"test accuracy {final['test_accuracy']:.4f}" in capsys.readouterr().out
    # TensorBoard events hold the documented tags, steps in weight visits
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "accuracy/test", "loss/test", "rso/accept_rate/8.weight", "rso/sigma/0.weight",
            "samples/test_accuracy", "summary/test_accuracy", "progress/done_fraction"} <= tags
    accuracy = events.Scalars("accuracy/test")
    assert accuracy[0].step == 0 and accuracy[-1].step == final["visits"]
    assert len(accuracy) == 1 + 2 * 7  # the initial weights, then every sweep (7 tensors, 2 cycles)
    assert [point.step for point in events.Scalars("samples/test_accuracy")][-1] == final["forward_samples"]
    assert events.Scalars("summary/test_accuracy")[-1].value == pytest.approx(final["test_accuracy"])
    assert events.Scalars("progress/done_fraction")[-1].value == pytest.approx(1.0)
    # the train-loss curve starts at step 0 and has a point at least at the end of every sweep
    assert events.Scalars("loss/train")[0].step == 0 and len(events.Scalars("loss/train")) >= 1 + 2 * 7
    assert {"weights/0.weight", "weights/8.weight"} <= set(events.Tags()["histograms"])


def test_rso_learns_above_chance(tmp_path, data_dir):
    result = train_module.train(train_module.TrainConfig(
        model="mlp", widths=(8,), train_subset=2000, test_subset=500, batch_size=200, cycles=1,
        data_dir=str(data_dir), run_dir=str(tmp_path), name="learn", progress=False, eval_every="cycle"))
    assert result["visits"] == 784 * 8 + 8 + 8 * 10 + 10
    assert result["test_accuracy"] > 0.5  # chance is 0.1


def test_interrupt_and_resume_ends_with_the_same_weights(tmp_path, data_dir, monkeypatch, capsys):
    flags = ["--cycles", "2", "--data-dir", str(data_dir), "--eval-every", "cycle"]
    assert run(tmp_path, *flags, name="straight") == 0

    real_sweep = train_module.run_sweep
    calls = {"n": 0}

    def interrupting_sweep(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # 7 tensors a cycle: the second sweep of the second cycle
            raise KeyboardInterrupt
        return real_sweep(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_sweep", interrupting_sweep)
    assert run(tmp_path, *flags, name="interrupted") == 130
    assert "--resume" in capsys.readouterr().err
    partial = load_checkpoint(tmp_path / "interrupted")
    assert partial["progress"]["cycle"] == 1 and partial["progress"]["target_index"] == 1
    monkeypatch.setattr(train_module, "run_sweep", real_sweep)
    assert main(["--resume", str(tmp_path / "interrupted"), "--no-progress"]) == 0

    meta = json.loads((tmp_path / "interrupted" / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and meta["resumes"][0]["at_step"] == partial["progress"]["visits"]
    straight = load_checkpoint(tmp_path / "straight")
    resumed = load_checkpoint(tmp_path / "interrupted")
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert straight["progress"]["visits"] == resumed["progress"]["visits"]
    assert straight["progress"]["accepted"] == resumed["progress"]["accepted"]


def test_resume_refuses_to_change_the_model(tmp_path, data_dir, capsys):
    assert run(tmp_path, "--cycles", "1", "--data-dir", str(data_dir)) == 0
    assert main(["--resume", str(tmp_path / "run"), "--batch-size", "100", "--no-progress"]) == 2
    assert "cannot change --batch-size when resuming" in capsys.readouterr().err


def test_sgd_baseline_passes_90_percent(tmp_path, data_dir):
    result = train_module.train(train_module.TrainConfig(
        model="mlp", optimizer="sgd", epochs=2, batch_size=50, lr=0.05, train_subset=10000, test_subset=2000,
        data_dir=str(data_dir), run_dir=str(tmp_path), name="sgd", progress=False))
    assert result["test_accuracy"] >= 0.90
    assert result["optimizer_steps"] == 2 * 200 and result["forward_samples"] == 2 * 2 * 200 * 50


def test_a_run_name_in_use_gets_a_suffix(tmp_path, data_dir):
    for _ in range(2):
        assert run(tmp_path, "--cycles", "1", "--optimizer", "sgd", "--epochs", "1", "--data-dir", str(data_dir)) == 0
    assert (tmp_path / "run").is_dir() and (tmp_path / "run-1").is_dir()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch size must be positive, got 0"),
    (["--batch-size", "5000"], "batch size 5000 is larger than the training set (1200 examples)"),
    (["--cycles", "-3"], "cycles must be positive, got -3"),
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--engine", "warp"], "unknown engine 'warp'"),
    (["--train-subset", "0"], "must be a positive integer, got 0"),
    (["--resume-if-exists", "--name", ""], "--resume-if-exists needs --name"),
])
def test_bad_flags_are_argparse_errors(tmp_path, data_dir, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--data-dir", str(data_dir), *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluating_a_mid_run_checkpoint_recomputes_stale_bn_statistics(tmp_path, data_dir, capsys):
    # evaluation once a cycle: the checkpoint after the first sweep holds the initial BN statistics
    flags = ["--cycles", "1", "--data-dir", str(data_dir), "--eval-every", "cycle"]
    calls = {"n": 0}
    real_sweep = train_module.run_sweep

    def interrupting_sweep(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_sweep(*args, **kwargs)

    train_module.run_sweep = interrupting_sweep
    try:
        assert run(tmp_path, *flags) == 130
    finally:
        train_module.run_sweep = real_sweep
    state = load_checkpoint(tmp_path / "run")
    # the saved BN statistics are the initial weights' (the step-0 evaluation), stale after the first sweep
    assert state["bn_statistics_step"] == 0 and state["progress"]["visits"] > 0
    assert evaluate_main([str(tmp_path / "run"), "--data-dir", str(data_dir), "--bn-samples", "1200"]) == 0
    assert "BN statistics recomputed from 1200 training examples" in capsys.readouterr().out


def test_unwritable_run_dir_is_a_one_line_error(tmp_path, data_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run(blocker, "--data-dir", str(data_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_resume_if_exists_reuses_a_folder_without_checkpoint(tmp_path, data_dir):
    (tmp_path / "run").mkdir()
    assert run(tmp_path, "--data-dir", str(data_dir), "--cycles", "1", "--resume-if-exists") == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run-1").exists()


def test_reduced_precision_needs_the_fast_engine(tmp_path, data_dir, capsys):
    assert run(tmp_path, "--data-dir", str(data_dir), "--engine", "reference", "--suffix-precision", "bfloat16") == 2
    assert "the reference engine takes no option suffix_precision" in capsys.readouterr().err


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    assert run(tmp_path, "--data-dir", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MNIST not found in") and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["truncated", "foreign", "garbage"])
def test_bad_checkpoints_are_clear_errors(tmp_path, data_dir, damage, capsys):
    assert run(tmp_path, "--cycles", "1", "--data-dir", str(data_dir)) == 0
    path = tmp_path / "run" / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert main(["--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Traceback" not in err
    assert evaluate_main([str(path), "--data-dir", str(data_dir)]) == 2


def test_checkpoint_model_matches_the_run(tmp_path, data_dir, mnist_small):
    """The checkpoint's oneconv weights, run through a forward pass written here in plain functional ops
    (conv 3x3 + bias, ReLU, 2x2 max pool, dense), give the test accuracy and loss the run reported."""
    import torch.nn.functional as F

    result = train_module.train(train_module.TrainConfig(
        model="oneconv", train_subset=1200, test_subset=1000, batch_size=200, cycles=1,
        data_dir=str(data_dir), run_dir=str(tmp_path), name="m", progress=False))
    weights = load_checkpoint(tmp_path / "m")["model"]
    assert set(weights) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    images, labels = mnist_small.test_images.double(), mnist_small.test_labels
    hidden = F.max_pool2d(F.conv2d(images, weights["0.weight"].double(), weights["0.bias"].double(), padding=1).clamp(min=0), 2)
    logits = hidden.flatten(1) @ weights["4.weight"].double().T + weights["4.bias"].double()
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    loss = -(logits.log_softmax(1).gather(1, labels[:, None])).mean().item()
    assert accuracy == result["test_accuracy"]
    assert loss == pytest.approx(result["test_loss"], rel=1e-5)     # the run computes its logits in float32
    assert accuracy > 0.5                                            # trained: one cycle of RSO beats chance


def test_batchnorm_recalibration_matches_an_independent_computation():
    """recalibrate_batchnorm's running statistics against per-batch statistics computed here: the forward in
    train mode (each BN normalizes with its batch's biased statistics), and the running values the average of
    the batches' means and unbiased variances (equal batches), for both BN layers."""
    import torch.nn.functional as F
    from torch import nn

    from rso.evaluate import recalibrate_batchnorm

    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    model.eval()
    images = torch.randn(300, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 + 1
    recalibrate_batchnorm(model, images, batch_size=100)
    conv1, bn1, _, conv2, bn2 = model
    expected = {1: [], 2: []}
    for batch in images.split(100):
        a = F.conv2d(batch, conv1.weight, conv1.bias)
        expected[1].append((a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=True)))
        mean, var = a.mean((0, 2, 3), keepdim=True), a.var((0, 2, 3), unbiased=False, keepdim=True)
        h = ((a - mean) / (var + bn1.eps).sqrt() * bn1.weight[None, :, None, None] + bn1.bias[None, :, None, None]).clamp(min=0)
        b = F.conv2d(h, conv2.weight, conv2.bias)
        expected[2].append((b.mean((0, 2, 3)), b.var((0, 2, 3), unbiased=True)))
    for layer, norm in ((1, bn1), (2, bn2)):
        means, variances = zip(*expected[layer])
        assert torch.allclose(norm.running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12), layer
        assert torch.allclose(norm.running_var, torch.stack(variances).mean(0), rtol=1e-12, atol=1e-12), layer
        assert norm.momentum == 0.1 and norm.track_running_stats and not norm.training   # settings restored
    assert not torch.allclose(bn2.running_var, torch.ones(2, dtype=torch.float64))   # statistics were recomputed


def test_weight_decay_reaches_every_visit_of_a_run(tmp_path):
    """--weight-decay end to end: the trainer's weights equal a cycle written here with the search pieces and the
    reference engine (float64), decaying the current weight on every visit; without decay they differ."""
    from rso.data.mnist import MNIST
    from rso.engines import ReferenceEngine
    from rso.models import build_model
    from rso.search.candidates import gaussian_steps
    from rso.search.loop import run_sweep
    from rso.search.schedule import annealed_sigma
    from rso.search.visit import visit_order

    generator = torch.Generator().manual_seed(1)
    data = MNIST(torch.randn(128, 1, 28, 28, generator=generator), torch.randint(0, 10, (128,), generator=generator),
                 torch.randn(32, 1, 28, 28, generator=generator), torch.randint(0, 10, (32,), generator=generator))

    def trained(weight_decay):
        config = train_module.TrainConfig(model="convnet", depth=1, channels=2, batch_size=64, cycles=2, dtype="float64",
                                          weight_decay=weight_decay, run_dir=str(tmp_path), name=f"wd{weight_decay}",
                                          progress=False)
        train_module.train(config, data=data)
        assert json.loads((tmp_path / f"wd{weight_decay}" / "config.json").read_text())["weight_decay"] == weight_decay
        return load_checkpoint(tmp_path / f"wd{weight_decay}")["model"]

    decayed, plain = trained(0.05), trained(0.0)
    seeded = torch.Generator().manual_seed(0)                      # the trainer's default seed
    model = build_model("convnet", seeded, depth=1, channels=2).double()
    for cycle in range(2):
        for target in visit_order(model):
            run_sweep(model, target, data.train_images.double(), data.train_labels, ReferenceEngine(),
                      sigma=annealed_sigma(target.sigma, cycle, 2), batch_size=64, sampler=gaussian_steps,
                      generator=seeded, weight_decay=0.05)
    for key, value in model.named_parameters():
        assert torch.equal(decayed[key], value.detach()), key
    assert not torch.equal(decayed["0.weight"], plain["0.weight"])


def test_exit_status_turns_failures_into_one_line(capsys):
    """What ``python -m rso.train`` and the experiment scripts do with an interrupt or bad input."""
    from rso.data import DataError
    from rso.train import RunInterrupted, exit_status

    def failing(error):
        def run():
            raise error
        return run

    assert exit_status(lambda: None) == 0
    assert exit_status(lambda: 3) == 3
    assert exit_status(failing(RunInterrupted("interrupted; the last checkpoint is x"))) == 130
    assert exit_status(failing(KeyboardInterrupt())) == 130
    assert exit_status(failing(DataError("train-images-idx3-ubyte is truncated"))) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["interrupted; the last checkpoint is x", "interrupted; checkpoints already written are kept",
                   "error: train-images-idx3-ubyte is truncated"]
    with pytest.raises(ValueError):     # a bug is not swallowed
        exit_status(failing(ValueError("bug")))


def test_git_revision_ignores_the_results_folder(tmp_path):
    """An experiment rewrites results/ before recording its provenance: that alone is not 'uncommitted'."""
    import shutil

    from rso.runs import git_revision

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert git_revision(tmp_path) == "unknown"

    start_scratch_repo(tmp_path)
    clean = git_revision(tmp_path)
    assert clean != "unknown" and not clean.endswith("-dirty")
    (tmp_path / "results" / "table.md").write_text("new\n")
    assert git_revision(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path) == clean + "-dirty"


def test_running_a_finished_run_again_says_so_and_trains_nothing(tmp_path, data_dir, capsys):
    """What make mnist-rso does the second time: --resume-if-exists continues the run, or says it is done."""
    flags = ["--cycles", "1", "--data-dir", str(data_dir), "--eval-every", "cycle", "--resume-if-exists"]
    assert run(tmp_path, *flags, name="again") == 0
    visits = json.loads((tmp_path / "again" / "final.json").read_text())["visits"]
    capsys.readouterr()
    assert run(tmp_path, *flags, name="again") == 0
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / 'again'} (1 of 1 cycles done" in out and "nothing to train" in out
    assert json.loads((tmp_path / "again" / "final.json").read_text())["visits"] == visits
    assert not (tmp_path / "again-1").exists()
