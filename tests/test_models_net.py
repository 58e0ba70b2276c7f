"""Whole-network structure: parameter counts, prior layout, shapes, rebuild from config."""

from __future__ import annotations

import pytest
import torch

from lipdet.boxes import feature_sizes_for, make_priors
from lipdet.errors import LipdetError
from lipdet.models import (
    ARCHS,
    ModelConfig,
    build_from_config,
    build_model,
    count_parameters,
)
from lipdet.models.layers import SLLConv2d


def test_naive_parameter_count_is_the_reference():
    assert count_parameters(build_model("naive")) == 337_968


def test_lipschitz_width_for_the_seed_7m_parameters():
    n = count_parameters(build_model("sll-l2", width=4.5))
    assert 6.8e6 < n < 7.3e6


@pytest.mark.parametrize("arch", ARCHS)
def test_1700_priors_and_forward_shapes_at_74(arch):
    torch.manual_seed(0)
    width = 1.0 if arch == "naive" else 0.125
    model = build_model(arch, width=width).eval()
    assert model.prior_spec.feature_sizes == (18, 9, 4, 2)
    assert model.priors.shape == (1700, 4)
    assert torch.equal(model.priors, make_priors(model.prior_spec))
    assert "priors" not in model.state_dict()
    loc, cls = model(torch.rand(2, 3, 74, 74))
    assert loc.shape == (2, 1700, 4) and cls.shape == (2, 1700, 11)
    maps = [f.shape[-1] for f in model.features(torch.rand(1, 3, 74, 74))]
    assert maps == [18, 9, 4, 2]
    assert model.config.arch == arch


@pytest.mark.parametrize("size", [32, 33, 36, 48, 75, 80])
@pytest.mark.parametrize("arch", ["naive", "sll-l2"])
def test_map_sizes_follow_feature_sizes_for(arch, size):
    model = build_model(arch, width=0.0625, input_size=size).eval()
    feats = model.features(torch.rand(1, 3, size, size))
    assert tuple(f.shape[-1] for f in feats) == feature_sizes_for(size)
    loc, _ = model(torch.rand(1, 3, size, size))
    assert loc.shape[1] == model.prior_spec.num_priors == model.priors.shape[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuild_from_config_alone(arch):
    torch.manual_seed(0)
    model = build_model(arch, width=0.125, input_size=34, num_classes=5).eval()
    clone = build_from_config(ModelConfig.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict(), strict=True)
    clone.eval()
    x = torch.rand(2, 3, 34, 34)
    for a, b in zip(model(x), clone(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert model(x)[1].shape[-1] == 5


def test_arch_options_go_into_config_and_are_validated():
    model = build_model("sll-spectral", width=0.125, input_size=34, sll_inner_ratio=2.0, sll_blocks=2)
    assert model.config.options == {"sll_inner_ratio": 2.0, "sll_blocks": 2}
    blocks = [m for m in model.trunk.values() if isinstance(m, SLLConv2d)]
    assert len(blocks) == 2 * 11
    assert all(b.inner_channels == 2 * b.channels for b in blocks)
    assert "fire8" in model.trunk and "fire8_0" in model.trunk
    with pytest.raises(LipdetError):
        build_model("naive", sll_blocks=2)
    with pytest.raises(LipdetError):
        build_model("sll-l2", bogus=1)
    with pytest.raises(LipdetError):
        build_model("sll-l2", sll_blocks=0)
    with pytest.raises(LipdetError):
        build_model("resnet")


def test_lipschitz_archs_have_no_batchnorm_and_naive_has_its_pools():
    for arch in ARCHS[1:]:
        model = build_model(arch, width=0.125)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
        assert all(p.kernel_size == p.stride == 2 for p in pools)
    pools = [m for m in build_model("naive").modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert sorted(int(p.kernel_size) for p in pools) == [2, 2, 2, 3, 3]


def test_model_input_is_shifted_not_scaled():
    torch.manual_seed(0)
    model = build_model("sll-standard", width=0.125, input_size=34).eval()
    x = torch.rand(1, 3, 34, 34)
    h = x - 0.5
    with torch.no_grad():
        manual = []
        for name, layer in model.trunk.items():
            h = layer(h)
            if name in model.taps:
                manual.append(h)
        for a, b in zip(model.features(x), manual):
            torch.testing.assert_close(a, b)
