import math

import pytest
import torch

from rso.engines import ReferenceEngine, batch_statistics, summed_cross_entropy
from rso.engines.base import ChunkPartition
from rso.models import build_model
from rso.search import annealed_sigma, candidate_values, select_candidate
from rso.search.candidates import fixed_steps, gaussian_steps, get_sampler, uniform_steps
from rso.search.loop import NonFiniteLossError, run_sweep
from rso.search.visit import visit_order


# ---- annealing -------------------------------------------------------------------------------------
def test_annealing_follows_the_authors_formula():
    """annealed_sigma against the authors' line sigma * (0.1 + 0.9 * (C - e) / C), written out here."""
    for cycles in (1, 3, 50):
        for cycle in range(cycles):
            authors = 2.0 * (0.1 + 0.9 * (cycles - cycle) / cycles)
            assert annealed_sigma(2.0, cycle, cycles) == pytest.approx(authors, rel=1e-15), (cycle, cycles)
    sigmas = [annealed_sigma(2.0, c, 50) for c in range(50)]
    assert sigmas[0] == 2.0                                          # the first cycle uses the full sigma
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))            # never grows (a known bug elsewhere)
    steps = {round(a - b, 12) for a, b in zip(sigmas, sigmas[1:])}
    assert steps == {round(2.0 * 0.9 / 50, 12)}                      # linear: the same decrement every cycle
    # another final fraction moves the end of the line, not its start
    assert annealed_sigma(2.0, 0, 4, final_fraction=0.5) == 2.0
    assert annealed_sigma(2.0, 3, 4, final_fraction=0.5) == pytest.approx(2.0 * (0.5 + 0.5 / 4))


def test_annealing_off_and_bad_arguments():
    assert annealed_sigma(0.3, 7, 10, anneal=False) == 0.3
    with pytest.raises(ValueError, match="cycle must be in"):
        annealed_sigma(1.0, 10, 10)
    with pytest.raises(ValueError, match="cycles must be positive"):
        annealed_sigma(1.0, 0, 0)


# ---- candidates --------------------------------------------------------------------------------------
def test_candidates_are_current_plus_minus_with_weight_decay():
    assert candidate_values(1.0, 0.25).tolist() == [1.0, 1.25, 0.75]
    assert candidate_values(2.0, 0.5, weight_decay=0.1).tolist() == pytest.approx([1.8, 2.3, 1.3])


@pytest.mark.parametrize("losses, expected", [
    ([1.0, 2.0, 3.0], 0), ([2.0, 1.0, 3.0], 1), ([2.0, 3.0, 1.0], 2),
    ([1.0, 1.0, 1.0], 0),           # ties keep the current weight
    ([2.0, 1.0, 1.0], 1),           # a tie between the two steps keeps +dw
    ([float("nan"), 5.0, 4.0], 2),  # NaN never wins
    ([float("inf"), 5.0, float("nan")], 1),
    ([float("nan")] * 3, -1),
])
def test_select_candidate(losses, expected):
    assert select_candidate(torch.tensor(losses, dtype=torch.float64)) == expected


def test_samplers_have_the_right_scale():
    g = torch.Generator().manual_seed(0)
    assert gaussian_steps(0.5, 20000, g).std().item() == pytest.approx(0.5, rel=0.03)
    u = uniform_steps(0.5, 20000, g)
    assert u.min() >= -1.0 and u.max() <= 1.0 and u.std().item() == pytest.approx(2 * 0.5 / math.sqrt(3), rel=0.03)
    assert torch.all(fixed_steps(0.5, 4, g) == 0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("cauchy")


# ---- visiting order --------------------------------------------------------------------------------------
def test_paper6_visits_dense_then_each_conv_with_its_beta_and_gamma():
    model = build_model("paper6")
    order = [(t.name, t.kind) for t in visit_order(model)]
    assert order[0] == ("21.weight", "weight")
    assert order[1:4] == [("17.weight", "weight"), ("18.bias", "bn_beta"), ("18.weight", "bn_gamma")]
    assert order[-3:] == [("0.weight", "weight"), ("1.bias", "bn_beta"), ("1.weight", "bn_gamma")]
    assert len(order) == 1 + 6 * 3
    reverse = visit_order(model, order="input-first")
    assert reverse[0].name == "0.weight" and reverse[-1].name == "21.weight"


def test_sigmas_are_he_std_and_fixed_for_batchnorm():
    targets = {t.name: t for t in visit_order(build_model("paper6"))}
    assert targets["21.weight"].sigma == pytest.approx(math.sqrt(2 / 16))
    assert targets["0.weight"].sigma == pytest.approx(math.sqrt(2 / 9))
    assert targets["3.weight"].sigma == pytest.approx(math.sqrt(2 / 144))
    assert targets["1.weight"].sigma == 0.167


class RecordingEngine(ReferenceEngine):
    def __init__(self):
        self.calls = []

    def score(self, index, values, chunk):
        self.calls.append((index, chunk))
        return super().score(index, values, chunk)


def test_a_sweep_visits_row_major_and_takes_the_next_chunk_each_visit(mnist_small):
    model = build_model("convnet", torch.Generator().manual_seed(0), depth=1, channels=2)
    target = visit_order(model)[1]  # the conv weight (2, 1, 3, 3)
    engine = RecordingEngine()
    run_sweep(model, target, mnist_small.train_images, mnist_small.train_labels, engine, sigma=0.1,
              batch_size=300, sampler=gaussian_steps, generator=torch.Generator().manual_seed(0))
    n_chunks = 2000 // 300
    assert engine.calls == [(j, j % n_chunks) for j in range(18)]


def test_scoring_leaves_no_trace_in_the_model(mnist_small):
    model = build_model("paper6", torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = visit_order(model)[1]
    engine = ReferenceEngine()
    partition = ChunkPartition(torch.arange(2000), 100)
    engine.begin_sweep(model, target, mnist_small.train_images, mnist_small.train_labels, partition)
    losses = engine.score(5, torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), 0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, BN running stats, counters
    assert losses[1] != losses[2]
    # the reference loss is the plain batch-statistics forward pass
    flat = target.parameter.data.view(-1)
    flat[5] = 1.0
    with torch.no_grad(), batch_statistics(model):
        direct = summed_cross_entropy(model(mnist_small.train_images[:100]), mnist_small.train_labels[:100])
    assert losses[1].item() == pytest.approx(direct.item(), rel=1e-12)


def test_a_few_hundred_visits_lower_the_loss_on_real_mnist(mnist_small):
    generator = torch.Generator().manual_seed(0)
    model = build_model("convnet", generator, depth=2, channels=4)
    x, y = mnist_small.train_images, mnist_small.train_labels

    def loss():
        with torch.no_grad(), batch_statistics(model):
            return summed_cross_entropy(model(x), y).item() / len(y)

    start = loss()
    visits = accepted = 0
    for target in visit_order(model):
        stats = run_sweep(model, target, x, y, ReferenceEngine(), sigma=target.sigma, batch_size=250,
                          sampler=gaussian_steps, generator=generator)
        visits += stats.visits
        accepted += stats.accepted
    assert visits == 236 and 0 < accepted < visits
    assert loss() < start - 0.05  # measured: 2.384 -> 2.254 on this slice


def test_all_nan_losses_raise_a_clear_error(mnist_small):
    class NaNEngine(ReferenceEngine):
        def score(self, index, values, chunk):
            return torch.full((3,), float("nan"), dtype=torch.float64)

    model = build_model("convnet", depth=1, channels=2)
    target = visit_order(model)[0]
    before = target.parameter.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"every candidate loss is non-finite at 5.weight\[0\]"):
        run_sweep(model, target, mnist_small.train_images, mnist_small.train_labels, NaNEngine(), sigma=0.1,
                  batch_size=100, sampler=gaussian_steps, generator=torch.Generator())
    assert torch.equal(before, target.parameter.detach())


def test_partition_checks_the_batch_size():
    with pytest.raises(ValueError, match="batch_size must be in 1..10"):
        ChunkPartition(torch.arange(10), 11)
