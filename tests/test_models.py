import math

import pytest
import torch
from torch import nn

from rso.models import MODELS, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_maps_mnist_to_ten_logits(name):
    model = build_model(name, torch.Generator().manual_seed(0))
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_he_initialization_statistics():
    model = build_model("paper6", torch.Generator().manual_seed(1))
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.numel() >= 1000:
            expected = math.sqrt(2.0 / module.weight[0].numel())
            assert abs(module.weight.std().item() / expected - 1) < 0.06
            assert abs(module.weight.mean().item()) < 0.1 * expected
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_init_is_seeded_by_the_generator_only():
    a = build_model("oneconv", torch.Generator().manual_seed(3))
    torch.manual_seed(12345)  # the global RNG must not matter
    b = build_model("oneconv", torch.Generator().manual_seed(3))
    c = build_model("oneconv", torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_model_options_and_errors():
    assert build_model("mlp", widths=(32, 16))[1].out_features == 32
    assert sum(isinstance(m, nn.Conv2d) for m in build_model("convnet", depth=3, channels=4)) == 3
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="depth must be in 1..6"):
        build_model("convnet", depth=7)
