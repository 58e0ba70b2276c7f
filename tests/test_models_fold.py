"""Folding: plain-op models with the same outputs, and a structure rebuildable from the config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipdet.models import ARCHS, build_folded, build_model, fold_model
from lipdet.models.layers import (
    NormPool,
    ChannelPad,
    ConvBNAct,
    FoldedConv,
    FoldedSLL,
    MaxPool,
    NormConv2d,
    SLLConv2d,
)

PLAIN = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.ModuleDict, FoldedConv, FoldedSLL, ChannelPad, NormPool)


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = max(float(a.abs().max()), 1e-12)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, q and biases, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.3)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, SLLConv2d):
                m.q_param.copy_(torch.randn(m.q_param.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, NormConv2d) and m.kernel_size == 1:  # shrink projections start structured
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))


@pytest.mark.parametrize("make,shape", [
    (lambda: SLLConv2d(5, 3), (2, 5, 7, 7)),
    (lambda: SLLConv2d(3, 6, kernel_size=5), (2, 3, 6, 8)),
    (lambda: SLLConv2d(4, 4, kernel_size=1), (2, 4, 5, 5)),
    (lambda: ConvBNAct(3, 6, (7, 7)), (2, 3, 7, 7)),
    (lambda: ConvBNAct(3, 6, (7, 7), relu=False), (2, 3, 7, 7)),
    (lambda: NormConv2d(3, 4, "spectral", (7, 7)), (2, 3, 7, 7)),
    (lambda: NormConv2d(3, 4, "spectral", (8, 8), stride=2), (2, 3, 8, 8)),
    (lambda: NormConv2d(3, 4, "l2", (7, 7)), (2, 3, 7, 7)),
    (lambda: NormConv2d(3, 4, "standard", (7, 7)), (2, 3, 7, 7)),
    (lambda: MaxPool(3, 2, ceil_mode=True), (2, 3, 8, 8)),
    (lambda: ChannelPad(3, 5), (2, 3, 4, 4)),
])
def test_layer_fold_equivalence(make, shape):
    torch.manual_seed(0)
    layer = make()
    _randomise(layer)
    layer.eval()
    x = torch.randn(*shape)
    folded = layer.fold()
    with torch.no_grad():
        assert_rel_close(layer(x), folded(x))
    for m in folded.modules():
        assert isinstance(m, PLAIN), type(m)


def test_sll_fold_has_adjoint_second_conv():
    torch.manual_seed(0)
    block = SLLConv2d(4, 6)
    _randomise(block)
    f = block.fold()
    assert f.conv2.bias is None
    torch.testing.assert_close(f.conv2.weight, 2 * f.conv1.weight.transpose(0, 1).flip(2, 3))


@pytest.mark.parametrize("arch,options", [(a, {}) for a in ARCHS] + [("sll-spectral", {"pool": "l2", "shrink": "conv"}),
                                                        ("sll-l2", {"pool": "l2", "shrink": "conv"})])
def test_network_fold_equivalence_and_round_trip(arch, options):
    torch.manual_seed(0)
    model = build_model(arch, width=0.125 if arch != "naive" else 0.25, **options)
    _randomise(model)
    model.eval()
    x = torch.rand(3, 3, 74, 74)
    folded = fold_model(model)
    assert not folded.training and folded.folded
    with torch.no_grad():
        ref = model(x)
        out = folded(x)
    for a, b in zip(ref, out):
        assert_rel_close(a, b)
    # only plain ops, no parametrizations, config / priors carried over
    for m in folded.modules():
        assert isinstance(m, PLAIN + (type(folded),)), type(m)
        assert not hasattr(m, "parametrizations")
    assert folded.config == model.config and folded.priors.shape == (1700, 4)
    assert folded.prior_spec == model.prior_spec
    # the twin path: the same structure from the config alone accepts the folded weights
    twin = build_folded(model.config)
    assert list(twin.state_dict()) == list(folded.state_dict())
    twin.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(out, twin(x)):
            torch.testing.assert_close(a, b)
    # folding is idempotent
    again = fold_model(twin)
    with torch.no_grad():
        for a, b in zip(out, again(x)):
            torch.testing.assert_close(a, b)


def test_folded_state_dict_keys_are_clean():
    model = build_model("sll-spectral", width=0.125)
    keys = list(fold_model(model).state_dict())
    assert "trunk.fire1.conv.weight" in keys
    assert "trunk.fire2.conv1.weight" in keys and "trunk.fire2.conv2.weight" in keys
    assert "loc_heads.fire8.conv.weight" in keys and "cls_heads.conv12_2.conv.bias" in keys
    assert not any(k.endswith(("q_param", ".u", "running_mean")) for k in keys)
    naive_keys = list(fold_model(build_model("naive")).state_dict())
    assert "trunk.fire1.conv.weight" in naive_keys and not any("bn" in k for k in naive_keys)


def test_fold_does_not_modify_the_model():
    torch.manual_seed(0)
    model = build_model("sll-l2", width=0.125, input_size=34).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_model(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert folded.trunk["fire1"].conv.weight.data_ptr() != model.trunk["fire1"].weight.data_ptr()


def test_spectral_fold_uses_converged_norm_even_from_train_mode():
    torch.manual_seed(0)
    model = build_model("sll-spectral", width=0.125, input_size=34).train()
    x = torch.rand(2, 3, 34, 34)
    model(x)  # a training step's power iteration only
    folded = fold_model(model)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(x), folded(x)):
            assert_rel_close(a, b)


@pytest.mark.parametrize("arch,options", [("naive", {}), ("sll-spectral", {"pool": "l2", "shrink": "conv"}),
                                                ("sll-standard", {"pool": "l2", "shrink": "conv"})])
def test_folded_model_exports_to_onnx_with_dynamic_batch(arch, options):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from lipdet.export.onnx_export import graph_problems

    torch.manual_seed(0)
    model = build_model(arch, width=0.125, input_size=36, **options)  # naive: 3x3/2 pools on even sides: ceil mode
    _randomise(model)
    folded = fold_model(model.eval())
    prog = torch.onnx.export(folded, (torch.rand(2, 3, 36, 36),), input_names=["images"],
                             output_names=["loc", "logits"],
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False)
    proto = prog.model_proto
    assert graph_problems(proto) == []
    names = {i.name for i in proto.graph.initializer}
    assert set(folded.state_dict()) <= names
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 36, 36)
    loc, cls = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref_loc, ref_cls = folded(x)
    assert_rel_close(ref_loc, torch.from_numpy(loc), rel=1e-4)
    assert_rel_close(ref_cls, torch.from_numpy(cls), rel=1e-4)
