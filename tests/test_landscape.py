"""The plot command writes valid PNG and GIF files, logs to TensorBoard, and refuses bad input clearly."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from rso.functions import get_function
from rso.landscape import eval_number, main, trajectory


def test_trajectory_records_every_step_and_descends():
    objective = get_function("booth")
    run = trajectory(objective, [-5.0, 5.0], "adam", steps=30, lr=0.5)
    assert run.points.shape == (31, 2)
    assert run.points[0].tolist() == [-5.0, 5.0]
    assert run.final_value < float(run.values[0])


def test_rso_trajectory_is_reproducible_by_seed():
    objective = get_function("six-hump-camel")
    a = trajectory(objective, [2.0, 2.0], "rso", steps=20, lr=0.5, seed=3)
    b = trajectory(objective, [2.0, 2.0], "rso", steps=20, lr=0.5, seed=3)
    c = trajectory(objective, [2.0, 2.0], "rso", steps=20, lr=0.5, seed=4)
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)


def test_pi_multiples_parse():
    assert eval_number("0.6pi") == pytest.approx(0.6 * 3.141592653589793)
    assert eval_number("-pi") == pytest.approx(-3.141592653589793)
    assert eval_number("2.5") == 2.5


def test_command_writes_valid_png_gif_and_tensorboard(tmp_path, capsys):
    out, board = tmp_path / "out", tmp_path / "board"
    code = main([
        "--function", "himmelblau", "--optimizers", "sgd,rso", "--start=-1,-1", "--steps", "8",
        "--lr", "sgd=0.01", "--lr", "rso=0.5", "--gif", "--frames", "4", "--dpi", "40",
        "--out", str(out), "--tensorboard", str(board),
    ])
    assert code == 0
    for name in ("himmelblau_contour.png", "himmelblau_surface.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    with Image.open(out / "himmelblau_race.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames >= 2
    assert (out / "himmelblau_trajectories.csv").read_text().count("\n") == 1 + 2 * 9
    assert any(board.iterdir())


def test_one_dimensional_curve(tmp_path):
    assert main(["--function", "qubic", "--optimizers", "adam", "--start", "0.96", "--steps", "5", "--dpi", "40", "--out", str(tmp_path)]) == 0
    with Image.open(tmp_path / "qubic_curve.png") as image:
        assert image.format == "PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--function", "nope"], "unknown function 'nope'"),
        (["--function", "branin", "--start", "0,-1"], "outside the domain of branin"),
        (["--function", "himmelblau", "--start", "1,2,3"], "dimension 2 only, got dimension 3"),
        (["--function", "ackley", "--dim", "3"], "can only draw dimension 1 or 2"),
        (["--optimizers", "sgd,lbfgs"], "unknown optimizer 'lbfgs'"),
        (["--lr", "sgd0.1"], "NAME=VALUE"),
    ],
)
def test_bad_input_gives_a_clear_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv + ["--steps", "1", "--out", str(tmp_path)])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rso.landscape", "--function", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown function 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_landscapes_experiment_quick(tmp_path):
    from experiments.landscapes import main as experiment

    assert experiment(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "- git commit at start (every row):" in table and "- machine:" in table and "- command:" in table
    assert table.count("| multimodal |") == 3
    with Image.open(tmp_path / "multimodal_race.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames >= 2
    assert (tmp_path / "multimodal_race.gif").stat().st_size < 2_000_000
