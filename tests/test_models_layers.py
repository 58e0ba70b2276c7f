"""Layer-level guarantees, measured: each module's reported bound survives attempts to break it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipdet.errors import LipdetError
from lipdet.models.layers import (
    ChannelPad,
    ConvBNAct,
    FoldedSLL,
    MaxPool,
    NormConv2d,
    NormPool,
    SLLConv2d,
    conv_operator_norm,
)
from lipdet.models.lipschitz import empirical_lipschitz

FEW = settings(max_examples=4, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOL = 1e-4


def _holds(bound: float, measured: float) -> bool:
    return measured <= bound * (1 + TOL) + 1e-6


def _randomise_sll(block: SLLConv2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.q_param.copy_(torch.randn(block.q_param.shape, generator=g))
        block.bias.copy_(0.3 * torch.randn(block.bias.shape, generator=g))


@FEW
@given(channels=st.integers(1, 6), inner=st.integers(1, 6), k=st.sampled_from([1, 3, 5]),
       hw=st.integers(3, 8), seed=st.integers(0, 1000))
def test_sll_block_is_1_lipschitz(channels, inner, k, hw, seed):
    torch.manual_seed(seed)
    block = SLLConv2d(channels, inner, kernel_size=k)
    _randomise_sll(block, seed)
    x = torch.randn(1, channels, hw, hw)
    measured = empirical_lipschitz(block, x, seed=seed)
    assert block.lipschitz_bound() == 1.0
    assert _holds(1.0, measured), measured
    # the folded block is bounded from its weights alone, and still measures <= 1
    folded = block.fold()
    assert folded.has_sll_structure()
    assert folded.lipschitz_bound((hw, hw)) == 1.0
    assert _holds(1.0, empirical_lipschitz(folded, x, seed=seed))


def test_sll_output_shape_and_even_kernel_rejected():
    block = SLLConv2d(4, 7)
    assert block(torch.randn(2, 4, 9, 11)).shape == (2, 4, 9, 11)
    with pytest.raises(LipdetError):
        SLLConv2d(4, 4, kernel_size=2)


def test_folded_sll_without_structure_uses_triangle_bound():
    torch.manual_seed(0)
    folded = SLLConv2d(3, 4).fold()
    with torch.no_grad():
        folded.conv2.weight.mul_(3.0)
    assert not folded.has_sll_structure()
    bound = folded.lipschitz_bound((6, 6))
    s1 = conv_operator_norm(folded.conv1.weight, (6, 6))
    s2 = conv_operator_norm(folded.conv2.weight, (6, 6))
    assert bound == pytest.approx(1 + s1 * s2)
    x = torch.randn(1, 3, 6, 6)
    assert _holds(bound, empirical_lipschitz(folded, x))
    # structure kept but conv1 scaled up: the symmetric bound 2 s^2 - 1 applies
    folded2 = SLLConv2d(3, 4).fold()
    grow = 1.5 / conv_operator_norm(folded2.conv1.weight, (6, 6))
    with torch.no_grad():
        folded2.conv1.weight.mul_(grow)
        folded2.conv2.weight.mul_(grow)
    assert folded2.has_sll_structure()
    b2 = folded2.lipschitz_bound((6, 6))
    assert b2 == pytest.approx(2 * 1.5**2 - 1, rel=1e-4)
    assert _holds(b2, empirical_lipschitz(folded2, x))


@FEW
@given(mode=st.sampled_from(["spectral", "standard", "l2"]), cin=st.integers(1, 4), cout=st.integers(1, 5),
       hw=st.integers(4, 9), stride=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_norm_conv_bound_holds(mode, cin, cout, hw, stride, seed):
    torch.manual_seed(seed)
    conv = NormConv2d(cin, cout, mode, (hw, hw), stride=stride).eval()
    bound = conv.lipschitz_bound()
    x = torch.randn(1, cin, hw, hw)
    measured = empirical_lipschitz(conv, x, seed=seed)
    assert _holds(bound, measured), (bound, measured)
    assert measured >= 0.9 * bound  # linear map: the Jacobian power iteration finds its norm
    if mode == "spectral":
        assert bound == pytest.approx(1.0, abs=TOL)
    if mode == "l2":
        assert bound <= 3 * cout ** 0.5 + TOL  # k sqrt(Cout)


@FEW
@given(cin=st.integers(1, 4), cout=st.integers(1, 4), hw=st.integers(3, 8), relu=st.booleans(),
       seed=st.integers(0, 1000))
def test_conv_bn_bound_holds(cin, cout, hw, relu, seed):
    torch.manual_seed(seed)
    layer = ConvBNAct(cin, cout, (hw, hw), relu=relu)
    with torch.no_grad():
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.1, 2.0)
        layer.bn.weight.normal_()
    layer.eval()
    bound = layer.lipschitz_bound()
    x = torch.randn(1, cin, hw, hw)
    assert _holds(bound, empirical_lipschitz(layer, x, seed=seed))


def _worst_pool_ratio(pool: torch.nn.Module, scales: tuple[float, ...] = (1.0,)) -> float:
    """Largest measured Lipschitz ratio of ``pool`` around 3 random 9x9 inputs, each times every scale."""
    worst = 0.0
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(1, 2, 9, 9)
        for scale in scales:
            worst = max(worst, empirical_lipschitz(pool, scale * x, seed=seed))
    return worst


@pytest.mark.parametrize("k,s,expected", [(2, 2, 1.0), (3, 2, 2.0), (3, 3, 1.0), (3, 1, 3.0)])
def test_maxpool_bound_holds(k, s, expected):
    pool = MaxPool(k, s)
    assert pool.lipschitz_bound() == expected
    assert _holds(expected, _worst_pool_ratio(pool))
    if k > s:
        # overlapping pools really exceed 1: a pixel that wins every window it belongs to
        x = torch.zeros(1, 1, 9, 9)
        x[0, 0, 2, 2] = 1.0
        assert pool(x).norm() > 1.0


@pytest.mark.parametrize("k,s,expected", [(2, 2, 1.0), (3, 2, 2.0)])
def test_norm_pool_bound_holds_and_keeps_the_window_norm(k, s, expected):
    pool = NormPool(k, s)
    assert pool.lipschitz_bound() == expected
    # near zero too, where sqrt is steepest (the smoothing keeps it 1-Lipschitz)
    assert _holds(expected, _worst_pool_ratio(pool, scales=(1.0, 1e-3)))
    if k == s:
        x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
        y = pool(x.float()).double()
        assert y.shape == (1, 3, 4, 4) and (y >= 0).all()
        # the whole map's norm survives (up to the smoothing), where a max-pool keeps ~1/2 of it
        assert float(y.norm()) == pytest.approx(float(x.norm()), rel=1e-3)
        assert float(MaxPool(k, s)(x).norm()) < 0.8 * float(x.norm())
        assert float(pool(torch.zeros(1, 1, 4, 4)).abs().max()) == 0.0
        g = torch.zeros(1, 1, 4, 4, requires_grad=True)
        pool(g).sum().backward()
        assert torch.isfinite(g.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pool(torch.randn(1, 2, 8, 8)).dtype == torch.float32


@pytest.mark.parametrize("cin,cout", [(3, 8), (8, 3), (4, 4)])
def test_channel_pad(cin, cout):
    pad = ChannelPad(cin, cout)
    x = torch.randn(2, cin, 5, 5)
    y = pad(x)
    assert y.shape == (2, cout, 5, 5)
    m = min(cin, cout)
    assert torch.equal(y[:, :m], x[:, :m])
    assert pad.lipschitz_bound() == 1.0
    assert _holds(1.0, empirical_lipschitz(pad, x[:1]))


def test_normalisations_run_in_fp32_under_autocast():
    torch.manual_seed(0)
    block = SLLConv2d(4, 4)
    conv = NormConv2d(3, 4, "spectral", (8, 8)).train()
    x = torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.t().dtype == torch.float32
        assert conv.effective_weight().dtype == torch.float32
        y = block(conv(x))
    assert torch.isfinite(y).all()
    assert conv.u.dtype == torch.float32


def test_spectral_training_forward_is_differentiable_and_updates_u():
    torch.manual_seed(0)
    conv = NormConv2d(2, 3, "spectral", (6, 6), train_iters=2).train()
    u0 = conv.u.clone()
    conv(torch.randn(1, 2, 6, 6)).sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert not torch.equal(conv.u, u0)


def test_bad_mode_rejected():
    with pytest.raises(LipdetError):
        NormConv2d(3, 3, "frobenius", (4, 4))


def test_folded_sll_needs_input_size():
    with pytest.raises(LipdetError):
        FoldedSLL(2, 2).lipschitz_bound()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sll_block_resists_adversarial_weights(seed):
    """Extreme q spreads, large biases and weights: the parametrised block still reports 1 (verified
    from its float64 weights), its fold too, and gradient attacks on both measure <= 1."""
    torch.manual_seed(seed)
    block = SLLConv2d(4, 6, kernel_size=3, input_hw=(7, 7))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.q_param.copy_(4.0 * torch.randn(6, generator=g))
        block.bias.copy_(2.0 * torch.randn(6, generator=g))
        block.weight.mul_(30.0)
    x = torch.randn(1, 4, 7, 7, generator=g)
    for module in (block, block.fold()):
        est = module.lipschitz_estimates()
        assert est.bound == 1.0 == module.lipschitz_bound()
        assert 0 < est.measured <= 1.0 + 1e-6
        assert _holds(1.0, empirical_lipschitz(module, x, seed=seed))


def test_folded_sll_with_conv1_scaled_by_1_01_is_bounded_above_1():
    """No slack: a folded block whose conv1 has norm exactly 1.01 gets 2 * 1.01^2 - 1 (structure kept),
    and scaling conv1 alone (structure broken) gets the triangle bound; both hold when attacked."""
    torch.manual_seed(0)
    folded = SLLConv2d(3, 4, input_hw=(5, 5)).fold()
    exact = float(torch.linalg.matrix_norm(_dense_matrix(folded.conv1.weight, (5, 5), 1), 2))
    with torch.no_grad():
        folded.conv1.weight.mul_(1.01 / exact)
        folded.conv2.weight.mul_(1.01 / exact)
    assert folded.has_sll_structure()
    bound = folded.lipschitz_bound()
    assert 2 * 1.01**2 - 1 <= bound <= (2 * 1.01**2 - 1) * (1 + 1e-6)
    x = torch.randn(1, 3, 5, 5)
    assert _holds(bound, empirical_lipschitz(folded, x))
    with torch.no_grad():
        folded.conv1.weight.mul_(1.01)
    assert not folded.has_sll_structure() and folded.lipschitz_bound() > 2.0
    # at norm exactly 1 (up to float rounding) the bound is 1 or a hair above: never below the truth
    unit = SLLConv2d(3, 4, input_hw=(5, 5)).fold()
    s = float(torch.linalg.matrix_norm(_dense_matrix(unit.conv1.weight, (5, 5), 1), 2))
    with torch.no_grad():
        unit.conv1.weight.div_(s)
        unit.conv2.weight.div_(s)
    assert 1.0 <= unit.lipschitz_bound() <= 1.0 + 1e-6


def _dense_matrix(weight: torch.Tensor, hw: tuple[int, int], padding: int) -> torch.Tensor:
    """The conv's explicit matrix ``(Cout Ho Wo, Cin H W)``, built from basis vectors."""
    w = weight.detach().double()
    n = w.shape[1] * hw[0] * hw[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, w.shape[1], *hw)
    return torch.nn.functional.conv2d(basis, w, padding=padding).reshape(n, -1).T


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_bn_bound_is_above_the_exact_folded_norm(seed):
    torch.manual_seed(seed)
    layer = ConvBNAct(3, 5, (6, 6))
    with torch.no_grad():
        layer.bn.running_var.uniform_(0.01, 2.0)
        layer.bn.weight.normal_(std=3.0)
    layer.eval()
    exact = float(torch.linalg.matrix_norm(_dense_matrix(layer.folded_weight_bias(torch.float64)[0], (6, 6), 1), 2))
    est = layer.lipschitz_estimates()
    assert est.measured <= exact <= est.bound <= exact * (1 + 1e-9)
