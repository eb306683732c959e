"""`python -m rso.bench` end to end on a small slice: the table, the JSON and the final lines (not its speed)."""

from __future__ import annotations

import json

import pytest
import torch

from rso import bench


@pytest.fixture(autouse=True)
def restore_threads():
    """The bench sets torch's thread count; put it back for the other tests."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_projection_counts_every_visit_once():
    # 10 visits, channels of 4, 2 chunks: fills 0-1, moves 4-5 and 8-9, the rest 2-3 and 6-7
    assert [bench.visit_class(j, 4, 2) for j in range(10)] == ["fill"] * 2 + ["rest"] * 2 + ["move"] * 2 + \
        ["rest"] * 2 + ["move"] * 2
    times = [5.0, 5.0, 1.0, 1.0, 3.0]
    assert bench.project(times, 10, 4, 2) == pytest.approx(2 * 5 + 4 * 1 + 4 * 3)
    assert bench.project(times, 5, 4, 2) == sum(times)       # a sample that covers the tensor is the sweep


def test_bench_quick_oneconv(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.setenv("RSO_DATA_DIR", str(data_dir))
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--output", "results/bench"])
    assert "never writes over" in capsys.readouterr().err
    report = bench.main(["--quick", "--models", "oneconv", "--train-subset", "1024", "--batch-size", "256",
                         "--output", str(tmp_path)])
    (case,) = report["results"]
    assert case["model"] == "oneconv" and case["weights_per_cycle"] == 7890 and case["workers"] == 2
    for key in ("fast_1", "fast_2", "prefix", "cycle_1", "cycle_2"):
        rows = case["configurations"][key]["rows"]
        assert set(rows) == set(case["tensors"]) and all(row["sweep_s"] > 0 for row in rows.values()), key
        assert case["cycle_s"][key] == pytest.approx(sum(row["sweep_s"] for row in rows.values()))
    assert all(row["whole"] for row in case["configurations"]["cycle_2"]["rows"].values())
    assert len(case["peak_memory_gb"]["fast_2"]) == 2 and len(case["peak_memory_gb"]["fast_1"]) == 1
    error = case["projection_vs_measured"]["cycle_1"]
    assert error == pytest.approx((case["cycle_s"]["fast_1"] - case["cycle_s"]["cycle_1"]) / case["cycle_s"]["cycle_1"])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["summary"] == report["summary"]
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last[0].startswith("oneconv batch 256 cpu: fast engine 1 worker ") and "x prefix-cache" in last[0]
    assert last[1].startswith("oneconv batch 256 cpu: fast engine 2 workers ") and last[1].endswith("x one worker")
    text = (tmp_path / "bench.txt").read_text()
    assert "load average" in text and "full cycle measured outright" in text and "convolution floor" in text
    assert case["conv_floor"]["cycle_s"] == 0.0      # oneconv: its conv's next layer is the dense head


def test_the_convolution_floor_counts_the_convs_after_the_next_layer():
    """paper6: a visit to conv k runs conv k+1 on one input channel and every conv after it in full, for each
    of 3 candidates (a conv before an average pooling folded with it); the layers next to the output need no
    convolution at all."""
    floor = bench.conv_floor("paper6", 100, torch.device("cpu"), torch.float32, repeats=1)
    per_tensor, conv = floor["per_tensor_s"], {int(k): v for k, v in floor["conv_s_per_example"].items()}
    assert sorted(conv) == [0, 3, 7, 10, 14, 17] and all(value > 0 for value in conv.values())
    assert per_tensor["21.weight"] == per_tensor["17.weight"] == per_tensor["18.bias"] == 0.0
    # conv3 and conv10 run folded with the average pooling after them (plan.PooledConv), as the engine does, in
    # full or as the next layer
    pooled = {int(k): v for k, v in floor["pooled_conv_s_per_example"].items()}
    assert sorted(pooled) == [3, 10] and all(value > 0 for value in pooled.values())
    assert per_tensor["3.weight"] == pytest.approx(2304 * 3 * 100 * (conv[7] / 16 + pooled[10] + conv[14] + conv[17]))
    assert per_tensor["1.bias"] == pytest.approx(16 * 3 * 100 * (pooled[3] / 16 + conv[7] + pooled[10] + conv[14] + conv[17]))
    assert per_tensor["0.weight"] == pytest.approx(144 * 3 * 100 * (pooled[3] / 16 + conv[7] + pooled[10] + conv[14] + conv[17]))
    assert per_tensor["7.weight"] == pytest.approx(2304 * 3 * 100 * (pooled[10] / 16 + conv[14] + conv[17]))
    assert floor["cycle_s"] == pytest.approx(sum(per_tensor.values()))


def test_repeated_runs_are_merged_by_their_mean_and_reported_pair_by_pair():
    """--repeats: each tensor's seconds are the runs' mean, every run's cycle is kept, memory is the highest;
    the table prints each alternated pair's cycles and ratio."""
    def run(a, b, memory):
        return {"rows": {"w": {"sweep_s": a, "visits": 4, "whole": False}, "b": {"sweep_s": b, "visits": 1,
                                                                              "whole": True}},
                "seconds": a + b, "peak_memory_gb": memory}
    merged = bench.merge_runs([run(10.0, 2.0, [1.0, 3.0]), run(14.0, 4.0, [2.0, 2.5])])
    assert merged["rows"]["w"]["sweep_s"] == 12.0 and merged["rows"]["w"]["runs_s"] == [10.0, 14.0]
    assert merged["rows"]["b"]["whole"] and merged["cycle_runs_s"] == [12.0, 18.0]
    assert merged["peak_memory_gb"] == [2.0, 3.0]
    many = bench.merge_runs([run(6.0, 1.0, [1.0]), run(8.0, 2.0, [1.0])])
    case = {"model": "m", "batch_size": 8, "weights_per_cycle": 5, "workers": 2, "tensors": ["w", "b"],
            "numel": {"w": 4, "b": 1}, "reference_per_visit_s": 1.0,
            "configurations": {"fast_1": merged, "fast_2": many, "prefix": run(20.0, 5.0, [1.0])},
            "cycle_s": {"fast_1": 15.0, "fast_2": 8.5, "prefix": 25.0, "reference": 100.0},
            "peak_memory_gb": {"fast_1": [3.0]}}
    text = bench.table(case)
    assert "run by run (alternated; the cycle above is their mean): 12.0 / 7.0 s (1.71x), 18.0 / 10.0 s (1.80x)" in text
