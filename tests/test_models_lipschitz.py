"""Network-level Lipschitz analysis: operator norms against dense SVDs, whole-network bounds measured."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lipdet.errors import LipdetError
from lipdet.models import build_model, fold_model, opnorm
from lipdet.models.layers import NormConv2d
from lipdet.models.lipschitz import (
    LayerBound,
    conv_operator_norm,
    empirical_lipschitz,
    head_bounds,
    layer_table,
    plot_bounds,
)

FEW = settings(max_examples=4, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOL = 1e-4


def dense_conv_norm(weight: torch.Tensor, hw: int, stride: int, padding: int) -> float:
    """Largest singular value of the conv's explicit matrix, built column by column from basis vectors."""
    return dense_conv_norm_hw(weight, (hw, hw), stride, padding)


def dense_conv_norm_hw(weight: torch.Tensor, hw: tuple[int, int], stride: int, padding: int) -> float:
    """:func:`dense_conv_norm` on an ``(H, W)`` input."""
    w = weight.detach().double()
    n = w.shape[1] * hw[0] * hw[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, w.shape[1], *hw)
    cols = F.conv2d(basis, w, stride=stride, padding=padding).reshape(n, -1)  # row i = A e_i
    return float(torch.linalg.matrix_norm(cols.T, ord=2))


@FEW
@given(cin=st.integers(1, 4), cout=st.integers(1, 5), k=st.sampled_from([1, 3, 5]), hw=st.integers(3, 8),
       stride=st.sampled_from([1, 2]), seed=st.integers(0, 10_000))
def test_conv_operator_norm_matches_dense_svd(cin, cout, k, hw, stride, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, k, k, generator=g)
    pad = k // 2
    exact = dense_conv_norm(w, hw, stride, pad)
    assert conv_operator_norm(w, (hw, hw), stride, pad) == pytest.approx(exact, rel=1e-5)
    # the reshaped-kernel norm is a different number in general (what torch's spectral_norm uses)
    assert float(torch.linalg.matrix_norm(w.reshape(cout, -1).double(), 2)) >= 0.0


@pytest.mark.parametrize("stride", [1, 2])
def test_spectral_conv_and_its_fold_are_1_lipschitz_by_dense_svd(stride):
    torch.manual_seed(stride)
    conv = NormConv2d(3, 5, "spectral", (7, 7), stride=stride).eval()
    # the bound the layer reports equals an independent dense SVD of the normalised operator
    dense = dense_conv_norm(conv.effective_weight(), 7, stride, conv.padding)
    assert conv.lipschitz_bound() == pytest.approx(dense, rel=1e-5)
    assert dense == pytest.approx(1.0, abs=TOL)
    folded = conv.fold()
    dense_folded = dense_conv_norm(folded.conv.weight, 7, stride, int(folded.conv.padding[0]))
    assert dense_folded <= 1.0 + TOL
    assert folded.lipschitz_bound() == pytest.approx(dense_folded, rel=1e-5)
    # the reshaped-kernel norm would NOT give a 1-Lipschitz layer
    w = conv.weight.detach().double()
    naive = w / torch.linalg.matrix_norm(w.reshape(5, -1), 2)
    assert dense_conv_norm(naive, 7, stride, 1) > 1.0 + 1e-2


def _scale_fns(model):
    """Per-scale functions image -> that scale's loc / cls head output."""
    fns = []
    for i, size in enumerate(model.prior_spec.feature_sizes):
        fns.append((size, "loc", lambda x, i=i: model.head_maps(x)[0][i]))
        fns.append((size, "cls", lambda x, i=i: model.head_maps(x)[1][i]))
    return fns


def _temperatures(model, heads="cls_heads"):
    """Per-scale class-head temperatures (box-head scales with heads="loc_heads"), largest map first."""
    return [getattr(model, heads)[t].temperature() for t in model.taps]


@pytest.mark.parametrize("input_size,width", [(74, 0.125)])
def test_sll_spectral_network_is_1_lipschitz_per_head(input_size, width):
    """sll-spectral: at every scale k, input -> pre-scale box offsets and input -> pre-temperature
    class logits are 1-Lipschitz; the outputs are ``s_k``- resp. ``tau_k``-Lipschitz, and the reported
    loc / cls bounds count ``s_k`` / ``tau_k``, for the parametrised and the folded model alike."""
    torch.manual_seed(0)
    model = build_model("sll-spectral", width=width, input_size=input_size)
    with torch.no_grad():  # move away from the init so the blocks are not near-identity
        for name, p in model.named_parameters():
            if name.endswith("q_param"):
                p.normal_()
            elif name.endswith("bias"):
                p.normal_(std=0.3)
            elif name.endswith("log_temperature"):
                p.add_(0.5 * torch.randn(()))  # a different learnt tau / s per scale
    model.eval()
    taus, locs = _temperatures(model), _temperatures(model, "loc_heads")
    assert len(set(taus)) == 4 and all(t > 1.5 for t in taus + locs)
    table = layer_table(model)
    heads = head_bounds(model, table)
    for scale, tau, s in zip(heads["per_scale"], taus, locs):  # tau / s counted, not hidden
        assert tau * (1 - 1e-3) <= scale["cls"] <= tau * (1 + TOL)
        assert s * (1 - 1e-3) <= scale["loc"] <= s * (1 + TOL)
    assert heads["cls"] == pytest.approx(max(taus), rel=1e-3)
    assert heads["loc"] == pytest.approx(max(locs), rel=1e-3)
    x = torch.rand(1, 3, input_size, input_size)
    for (size, key, fn), scale in zip(_scale_fns(model), [p for p in heads["per_scale"] for _ in (0, 1)]):
        measured = empirical_lipschitz(fn, x, power_iters=6, ascent_steps=3, pairs=1)
        assert measured <= scale[key] * (1 + TOL), (size, key, measured)
        k = model.prior_spec.feature_sizes.index(size)
        factor = taus[k] if key == "cls" else locs[k]
        assert measured / factor <= 1 + TOL, (size, key, measured / factor)  # the pre-scale map is 1-Lipschitz
    folded = fold_model(model)
    fheads = head_bounds(folded)  # from the folded weights alone: tau and s are inside the kernels
    for a, b in zip(heads["per_scale"], fheads["per_scale"]):
        assert b["cls"] == pytest.approx(a["cls"], rel=1e-4) and b["loc"] == pytest.approx(a["loc"], rel=1e-4)
    for (size, key, fn), scale in list(zip(_scale_fns(folded), [p for p in fheads["per_scale"] for _ in (0, 1)]))[:2]:
        assert empirical_lipschitz(fn, x, power_iters=8, ascent_steps=0, pairs=2) <= scale[key] * (1 + TOL)


def test_temperature_scales_cls_bound_but_not_certified_radius():
    """Logits ``tau * z``: margins and the cls bound scale together, so radii are unchanged."""
    torch.manual_seed(0)
    model = build_model("sll-spectral", width=0.125, input_size=34).eval()
    x = torch.rand(2, 3, 34, 34)

    def radii(m):
        f = fold_model(m)
        with torch.no_grad():
            _, logits = f(x)
        top = logits.topk(2, dim=-1).values
        return (top[..., 0] - top[..., 1]) / (2 ** 0.5 * head_bounds(f)["cls"])

    r1 = radii(model)
    with torch.no_grad():
        for t in model.taps:
            model.cls_heads[t].log_temperature.add_(1.5)
    r2 = radii(model)
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-7)
    # no temperature / scale at all (the seed's heads): bounds 1 again
    seed = build_model("sll-spectral", width=0.125, input_size=34, cls_temperature=1.0,
                       learn_temperature=False, loc_scale=1.0, learn_loc_scale=False).eval()
    assert not any("temperature" in k for k in seed.state_dict())
    hb = head_bounds(seed)
    assert hb["cls"] <= 1 + TOL and hb["loc"] <= 1 + TOL


@pytest.mark.parametrize("arch", ["naive", "sll-l2", "sll-standard"])
def test_reported_bounds_hold_for_unconstrained_archs(arch):
    torch.manual_seed(1)
    model = build_model(arch, width=0.125, input_size=34)
    if arch == "naive":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.uniform_(0.2, 1.5)
                    m.running_mean.normal_(std=0.1)
    model.eval()
    heads = head_bounds(model)
    x = torch.rand(1, 3, 34, 34)
    for (size, key, fn), scale in zip(_scale_fns(model), [p for p in heads["per_scale"] for _ in (0, 1)]):
        measured = empirical_lipschitz(fn, x, power_iters=5, ascent_steps=2, pairs=1)
        assert measured <= scale[key] * (1 + TOL), (size, key, measured, scale[key])
    # per-scale bounds and the certificate bounds agree
    assert heads["cls"] == max(p["cls"] for p in heads["per_scale"])
    assert [p["feature_size"] for p in heads["per_scale"]] == [8, 4, 2, 1]


def test_table_is_in_forward_order_with_cumulative_products():
    model = build_model("sll-l2", width=0.125, input_size=34).eval()
    table = layer_table(model)
    assert [r.name for r in table] == list(model.trunk.keys())
    cum = 1.0
    for r in table:
        cum *= r.norm
        assert r.cumulative == pytest.approx(cum)
    kinds = {r.kind for r in table}
    assert {"conv-l2", "sll", "maxpool", "channel-pad"} <= kinds
    # folded model: same bounds from weights alone
    ftable = layer_table(fold_model(model))
    assert [r.name for r in ftable] == [r.name for r in table]
    for a, b in zip(table, ftable):
        assert b.norm == pytest.approx(a.norm, rel=1e-4)


def test_table_does_not_change_training_state():
    model = build_model("naive", width=0.125, input_size=34).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_table(model)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_spectral_bf16_training_still_folds_to_1_lipschitz():
    torch.manual_seed(0)
    model = build_model("sll-spectral", width=0.125, input_size=34).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    for step in range(4):
        x = torch.rand(4, 3, 34, 34)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loc, cls = model(x)
            loss = loc.float().pow(2).mean() - cls.float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    taus = _temperatures(model)
    init = build_model("sll-spectral", width=0.125, input_size=34)
    assert all(t != pytest.approx(i, rel=1e-6) for t, i in zip(taus, _temperatures(init)))  # tau is learnt
    folded = fold_model(model)
    heads = head_bounds(folded)
    locs = _temperatures(model, "loc_heads")
    assert heads["loc"] <= max(locs) * (1 + TOL) and heads["cls"] <= max(taus) * (1 + TOL)
    for tap, size, tau, s in list(zip(folded.taps, folded.prior_spec.feature_sizes, taus, locs))[1:]:  # dense SVD
        assert dense_conv_norm(folded.loc_heads[tap].conv.weight, size, 1, 1) <= s * (1 + TOL)
        assert dense_conv_norm(folded.cls_heads[tap].conv.weight, size, 1, 1) <= tau * (1 + TOL)


def test_plot_and_json(tmp_path):
    model = build_model("sll-standard", width=0.125, input_size=34).eval()
    table = layer_table(model)
    heads = head_bounds(model, table)
    out = plot_bounds(table, heads, tmp_path / "b.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps([r.to_dict() for r in table] + [heads])
    assert isinstance(table[0], LayerBound)


def test_cli_writes_table_png_and_json(tmp_path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from lipdet.lipschitz_command import lipschitz_command

    artifacts = pytest.importorskip("lipdet.artifacts")
    model = build_model("sll-l2", width=0.125, input_size=34).eval()
    ckpt = tmp_path / "model.pt"
    artifacts.save_checkpoint(ckpt, model)
    app = typer.Typer()
    app.command("lipschitz")(lipschitz_command)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["lipschitz", str(ckpt), "--out", str(tmp_path / "lip")])
    assert res.exit_code == 0, res.output
    assert "fire1" in res.output and "global bound" in res.output
    assert "measured" in res.output and "ratio" in res.output
    report = json.loads((tmp_path / "lip" / "lipschitz.json").read_text())
    assert report["heads"]["cls"] == pytest.approx(head_bounds(model)["cls"], rel=1e-4)
    assert (tmp_path / "lip" / "lipschitz.png").stat().st_size > 1000
    help_text = CliRunner().invoke(app, ["lipschitz", "--help"]).output
    assert "Example" in help_text


# --------------------------------------------------------------------------------------------
# Guaranteed upper bounds (lipdet.models.opnorm) against dense SVDs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def circulant_only(monkeypatch):
    """Send every operator through the circulant embedding (the dense path would be exact)."""
    monkeypatch.setattr(opnorm, "DENSE_MAX", 0)


@given(cin=st.integers(1, 4), cout=st.integers(1, 5), k=st.sampled_from([1, 3]), h=st.integers(2, 9),
       w=st.integers(2, 9), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]), seed=st.integers(0, 10_000))
@settings(max_examples=24, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_upper_bound_holds_against_dense_svd(circulant_only, cin, cout, k, h, w, stride, pad, seed):
    """Circulant bound >= the exact norm (dense SVD of the materialised operator), for every geometry;
    the Lanczos estimate and the measured value stay below it."""
    assume(min(h, w) + 2 * pad >= k)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, k, k, generator=g)
    exact = dense_conv_norm_hw(weight, (h, w), stride, pad)
    upper = opnorm.conv_operator_norm_upper(weight, (h, w), stride, pad)
    assert upper >= exact
    assert conv_operator_norm(weight, (h, w), stride, pad) <= exact * (1 + 1e-12)
    est = opnorm.conv_norm_estimates(weight, (h, w), stride, pad)
    assert est.bound == upper and est.measured <= exact * (1 + 1e-12)


@pytest.mark.parametrize("stride,pad,k", [(1, 1, 3), (2, 1, 3), (1, 0, 3), (2, 0, 1), (1, 1, 1)])
def test_dense_path_is_exact_to_the_margin(stride, pad, k):
    g = torch.Generator().manual_seed(stride * 10 + pad)
    weight = torch.randn(5, 3, k, k, generator=g)
    exact = dense_conv_norm_hw(weight, (7, 6), stride, pad)
    est = opnorm.conv_norm_estimates(weight, (7, 6), stride, pad)
    assert est.measured <= exact <= est.bound <= exact * (1 + 1e-9)  # both ends guaranteed, margin ~1e-12


# Ratios bound / converged Lanczos seen on random 3x3 kernels (Lanczos <= exact <= bound):
# 74x74: 1.0002, 37x37: 1.001, 18x18: 1.003, 9x9: 1.01-1.02 (min over the half-shifted grids).
@pytest.mark.parametrize("cin,cout,hw,within", [(3, 8, 74, 1.0006), (8, 8, 37, 1.003), (16, 16, 18, 1.01),
                                                (16, 24, 9, 1.03)])
def test_circulant_bound_is_tight_for_same_convs(circulant_only, cin, cout, hw, within):
    g = torch.Generator().manual_seed(hw)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    lower = conv_operator_norm(weight, (hw, hw), 1, 1)
    upper = opnorm.conv_operator_norm_upper(weight, (hw, hw), 1, 1)
    assert lower <= upper <= lower * within, upper / lower


def test_rounding_margin_is_tiny_and_zero_kernel_is_zero():
    weight = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    hi, lo = opnorm._gram_interval(2.0, r=128, m=128)
    assert 1.0 < hi / lo < 1.0 + 1e-9
    assert opnorm.conv_operator_norm_upper(torch.zeros(2, 3, 3, 3), (9, 9)) == 0.0
    with pytest.raises(LipdetError):
        opnorm.conv_operator_norm_upper(weight, (1, 1), 1, 0)  # a 3x3 kernel does not fit a 1x1 input


def test_head_bounds_carry_measured_values_below_the_bounds():
    torch.manual_seed(3)
    model = build_model("naive", width=0.125, input_size=34).eval()
    table = layer_table(model)
    heads = head_bounds(model, table)
    for r in table:
        assert 0 < r.measured <= r.norm and r.ratio >= 1
        assert r.to_dict()["ratio"] == r.ratio and LayerBound.from_dict(r.to_dict()) == r
    for p in heads["per_scale"]:
        for key in ("trunk", "loc_head", "cls_head", "loc", "cls"):
            assert 0 < p[f"{key}_measured"] <= p[key], key
    assert heads["cls_measured"] <= heads["cls"] and heads["loc_measured"] <= heads["loc"]
    assert LayerBound.from_dict({"name": "a", "kind": "conv", "norm": 2.0, "cumulative": 2.0}).ratio is None


def test_module_bound_of_plain_torch_modules():
    """nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, ReLU: bounds above (or equal to) the exact constants."""
    from lipdet.models.lipschitz import module_bound

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    kind, est = module_bound(conv, (7, 5))
    exact = dense_conv_norm_hw(conv.weight, (7, 5), 2, 1)
    assert kind == "conv" and est.measured <= exact <= est.bound <= exact * (1 + 1e-9)
    bn = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -3.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    kind, est = module_bound(bn, (5, 5))
    value = max(0.5 / (1 + bn.eps) ** 0.5, 3.0 / (4 + bn.eps) ** 0.5, 1.0 / (0.25 + bn.eps) ** 0.5)
    assert kind == "batchnorm" and est.measured == pytest.approx(value, rel=1e-15) and est.bound >= value
    _, est = module_bound(torch.nn.MaxPool2d(3, 2), (9, 9))
    assert est == (2.0, 2.0)
    _, est = module_bound(torch.nn.MaxPool2d(3, 2), (3, 3))  # one window: the constant is 1, the bound 2
    assert est == (2.0, 1.0)
    assert module_bound(torch.nn.ReLU(), (4, 4)) == ("relu", (1.0, 1.0))
    with pytest.raises(LipdetError):
        module_bound(torch.nn.Conv2d(2, 2, 3, groups=2), (4, 4))
