"""Overparameterized optimization: the models, the fit phase, and the direct runs of the reference table."""

import pytest
import torch

from rso.overparam import MLP9, MLP17, OverparamConfig, run


def test_direct_adam_gets_stuck_on_ackley_like_the_reference():
    # Reference: x = 9.99495, f = 17.29193 after 500 Adam steps at lr 5e-4 from 10.
    result = run(OverparamConfig("ackley", (10.0,), "direct"))
    assert result.x[0] == pytest.approx(9.99495, abs=1e-4)
    assert result.f == pytest.approx(17.29193, abs=1e-4)
    assert result.epochs_run == 500 and "iteration cap 500" in result.stop_reason


def test_direct_adam_stays_in_the_qubic_trap():
    result = run(OverparamConfig("qubic", (0.96,), "direct"))
    assert result.x[0] == pytest.approx(0.96015, abs=1e-4)
    assert result.f == pytest.approx(-0.70585, abs=1e-5)


def test_rso_escapes_where_adam_is_stuck():
    result = run(OverparamConfig("qubic", (0.96,), "direct", optimizer="rso", lr=1.0, epochs=60))
    assert result.f < -1.3  # the global minimum -1.3054, not the trap -0.7059


def test_models_output_the_right_shape_and_fit_the_start():
    torch.manual_seed(0)
    assert MLP9(2, in_features=8, hidden=16)().shape == (2,)
    assert len(MLP9(2, 8, 16).layers) == 9
    mlp17 = MLP17(1, in_features=8, hidden=16)
    assert mlp17().shape == (1,)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp17.modules()) == 17
    result = run(OverparamConfig("six-hump-camel", (2.0, 2.0), "mlp9", in_features=8, hidden=32, epochs=5, fit_lr=1e-2, fit_seconds=20))
    assert result.fit_mse is not None and result.fit_mse < 1e-6
    assert result.epochs_run == 5


def test_global_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(OverparamConfig("qubic", (0.96,), "mlp9", in_features=4, hidden=8, epochs=2, fit_lr=1e-2))
    assert torch.equal(torch.rand(3), expected)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown model 'mlp3'"):
        OverparamConfig(model="mlp3")
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        OverparamConfig(epochs=0)
    with pytest.raises(ValueError, match="outside the domain of qubic"):
        run(OverparamConfig("qubic", (3.0,), "direct"))
    with pytest.raises(ValueError, match="dimension 2 only, got dimension 1"):
        run(OverparamConfig("six-hump-camel", (2.0,), "direct"))


def test_overparam_experiment_quick(tmp_path):
    from experiments.overparam import main as experiment

    assert experiment(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "- git commit at start (every row):" in table and "- machine:" in table
    assert table.count("| Ackley 1-D, x0 = 10 |") == 3 and table.count("| qubic, x0 = 0.96 |") == 3
    assert (tmp_path / "runs.csv").read_text().count("\n") == 10
