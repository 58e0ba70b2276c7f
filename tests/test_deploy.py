"""lipdet.deploy: backends (.pt / .onnx / .plan), the differentiable twin, and plan sidecars.

ONNX files are real exports of a tiny model (in ONNX Runtime sessions); TensorRT itself is not
installed here, so plan tests cover everything around it: sidecar writing and validation, the
source-ONNX hash check, and the one-line refusal without TensorRT / GPU.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from lipdet.io import write_bytes_atomic
import torch

from lipdet.artifacts import PlanSidecar, SourceOnnx, make_card, save_checkpoint, sidecar_path
from lipdet.deploy.backends import OrtBackend, TorchBackend, load_backend
from lipdet.deploy.twin import check_twin, load_twin
from lipdet.errors import LipdetError
from lipdet.export.onnx_export import compare, export_onnx_model, set_card
from lipdet.export.precision import quantize_int8
from lipdet.export.tensorrt import check_sidecar, make_sidecar, network_flags, source_onnx, trt_missing
from lipdet.io import sha256_file
from lipdet.models import build_model, fold_model

SIZE = 32
PRIORS = 4 * (8 * 8 + 4 * 4 + 2 * 2 + 1)


def _save(model, path):
    """Write an ONNX model atomically; returns the path."""
    write_bytes_atomic(path, model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A checkpoint and its fp32 and int8 (ORT flavour) ONNX exports, with cards."""
    folder = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = build_model("sll-l2", width=0.125, input_size=SIZE).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, SIZE, SIZE))
    ckpt = save_checkpoint(folder / "model.pt", model, meta={"data": {"root": None, "synthetic": True}})
    folded = fold_model(model)
    fp32 = export_onnx_model(folded, SIZE)
    set_card(fp32, make_card(folded, precision="fp32", int8_flavour=None))
    gen = torch.Generator().manual_seed(5)
    calib = torch.rand(32, 3, SIZE, SIZE, generator=gen)  # same distribution as the test images
    int8 = quantize_int8(fp32, calib, target="ort")
    set_card(int8, make_card(folded, precision="int8", int8_flavour="u8s8-asymmetric"))
    return {
        "ckpt": ckpt,
        "model": model,
        "folded": folded,
        "fp32": _save(fp32, folder / "model.onnx"),
        "int8": _save(int8, folder / "model.int8.onnx"),
        "images": torch.rand(7, 3, SIZE, SIZE, generator=gen),
    }


# ----------------------------------------------------------------------------------------------
# backends


def test_torch_backend(artifacts):
    b = load_backend(artifacts["ckpt"])
    assert isinstance(b, TorchBackend) and b.name == "torch" and b.precision == "fp32"
    assert b.input_size == SIZE and tuple(b.priors.shape) == (PRIORS, 4) and b.card.model.arch == "sll-l2"
    loc, logits = b(artifacts["images"])
    with torch.no_grad():
        ref = artifacts["model"](artifacts["images"])
    assert loc.dtype == torch.float32 and loc.device.type == "cpu"
    torch.testing.assert_close((loc, logits), ref)


def test_ort_backend_fp32_and_batching(artifacts):
    b = load_backend(artifacts["fp32"])
    assert isinstance(b, OrtBackend) and b.name == "onnxruntime"
    assert b.provider == "CPUExecutionProvider" and b.precision == "fp32" and b.card.precision == "fp32"
    torch.testing.assert_close(b.priors, artifacts["folded"].priors)
    x = artifacts["images"]
    loc, logits = b(x)
    assert loc.shape == (7, PRIORS, 4) and logits.shape == (7, PRIORS, 11) and logits.dtype == torch.float32
    assert compare((loc, logits), artifacts["folded"](x))["rel"] < 1e-4
    b.max_batch = 3  # a backend with a maximum batch splits larger ones
    torch.testing.assert_close(b(x), (loc, logits))
    with pytest.raises(LipdetError, match="expects images of shape"):
        b(torch.rand(2, 3, SIZE + 1, SIZE + 1))


def test_ort_backend_without_card_needs_input_size(artifacts, tmp_path):
    bare = onnx.load(str(artifacts["fp32"]))
    del bare.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(bare, str(path))
    with pytest.raises(LipdetError, match="no lipdet model card"):
        load_backend(path)
    b = load_backend(path, input_size=SIZE)
    assert b.card is None and b.input_size == SIZE and tuple(b.priors.shape) == (PRIORS, 4)
    assert b(artifacts["images"][:2])[0].shape == (2, PRIORS, 4)
    with pytest.raises(LipdetError, match="no lipdet model card"):
        load_twin(path)
    with pytest.raises(LipdetError, match="model card says"):
        load_backend(artifacts["fp32"], input_size=SIZE + 8)


def test_load_backend_errors(tmp_path):
    with pytest.raises(LipdetError, match="model not found"):
        load_backend(tmp_path / "missing.onnx")
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"x")
    with pytest.raises(LipdetError, match="unknown model type"):
        load_backend(odd)
    with pytest.raises(LipdetError, match="unknown device"):
        load_backend(_touch(tmp_path / "x.onnx"), device="tpu")
    with pytest.raises(LipdetError, match="not a readable ONNX"):
        load_backend(_touch(tmp_path / "y.onnx", b"\x08\xff garbage"))


def _touch(p: Path, data: bytes = b"") -> Path:
    p.write_bytes(data)
    return p


# ----------------------------------------------------------------------------------------------
# twin


def test_twin_of_checkpoint_and_fp32_onnx(artifacts):
    x = artifacts["images"]
    twin_pt = load_twin(artifacts["ckpt"])
    twin_onnx = load_twin(artifacts["fp32"])
    for twin in (twin_pt, twin_onnx):
        assert twin.card.model.arch == "sll-l2" and twin.config.input_size == SIZE
        assert tuple(twin.priors.shape) == (PRIORS, 4) and not twin.training
    for (k, a), (k2, b) in zip(twin_onnx.state_dict().items(), artifacts["folded"].state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ort = load_backend(artifacts["fp32"])
    diff = check_twin(twin_onnx, ort, x)
    assert diff < 1e-4
    assert check_twin(twin_pt, load_backend(artifacts["ckpt"]), x) < 1e-4


def test_twin_is_differentiable(artifacts):
    twin = load_twin(artifacts["fp32"])
    x = artifacts["images"][:2].clone().requires_grad_(True)
    loc, logits = twin(x)
    (logits[..., 1:].sum() + loc.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_twin_of_int8_uses_the_dequantised_weights(artifacts):
    from lipdet.export.precision import onnx_constants

    twin8 = load_twin(artifacts["int8"])
    consts = onnx_constants(onnx.load(str(artifacts["int8"])))
    folded = artifacts["folded"].state_dict()
    changed = 0
    for k, v in twin8.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), consts[k])
        changed += int(not torch.equal(v, folded[k]))
        assert torch.allclose(v, folded[k], atol=float(folded[k].abs().max()) / 100 + 1e-6)
    assert changed > 0  # the int8 weights, not the checkpoint's
    ort8 = load_backend(artifacts["int8"])
    assert ort8.precision == "int8"
    x = artifacts["images"]
    diff = check_twin(twin8, ort8, x)  # default int8 tolerance: activations are rounded by the engine only
    stats = compare(twin8(x), ort8(x))
    assert stats["cosine"] > 0.99 and diff > 0
    with pytest.raises(LipdetError, match="twin disagrees"):
        check_twin(twin8, ort8, x, tol=1e-9)


# ----------------------------------------------------------------------------------------------
# TensorRT plans: sidecar, checks, refusal without TensorRT


ENV = {"tensorrt": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture()
def plan(artifacts, tmp_path):
    """A plan file (opaque bytes: never deserialised in these tests) with a real sidecar beside a copy of the ONNX."""
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(artifacts["fp32"].read_bytes())
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00serialized-engine")
    side = make_sidecar(env=ENV, precision="fp32", int8_flavour=None, input_name="images", input_size=SIZE,
                        min_batch=1, opt_batch=64, max_batch=64, onnx_path=onnx_path,
                        onnx_sha256=sha256_file(onnx_path), workspace_bytes=1 << 30, timing_cache=None)
    assert side.write(plan) == tmp_path / "model.plan.json"
    return plan


def test_sidecar_round_trip(plan):
    side = PlanSidecar.read(plan)
    assert side.tensorrt == ENV["tensorrt"] and side.gpu == ENV["gpu"] and side.compute_capability == "9.0"
    assert side.profile.to_dict() == {"input": "images", "min": [1, 3, SIZE, SIZE], "opt": [64, 3, SIZE, SIZE],
                                      "max": [64, 3, SIZE, SIZE]}
    assert side.precision == "fp32" and side.max_batch == 64
    assert Path(side.source_onnx.path).is_absolute()
    assert plan.read_bytes() == b"\x00serialized-engine"  # the plan stays bare: no header prepended
    check_sidecar(side, dict(ENV), plan)  # same TensorRT and GPU: accepted


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tensorrt": "10.8.0.43"}, "built with TensorRT 10.9.0.34 but this machine has TensorRT 10.8.0.43"),
        ({"tensorrt": "11.1.0"}, "plans only load on the version that built them"),
        ({"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "was built for NVIDIA H100"),
        ({"compute_capability": "8.9"}, "compute capability 9.0"),
    ],
)
def test_sidecar_refuses_other_tensorrt_or_gpu(plan, change, message):
    with pytest.raises(LipdetError, match=message):
        check_sidecar(PlanSidecar.read(plan), {**ENV, **change}, plan)


def test_sidecar_without_tensorrt_or_gpu(plan):
    if trt_missing() is None:
        pytest.skip("TensorRT and a GPU are available here")
    with pytest.raises(LipdetError, match="pip install 'lipdet\\[gpu\\]'") as e:
        check_sidecar(PlanSidecar.read(plan), None, plan)
    assert "\n" not in str(e.value)
    with pytest.raises(LipdetError, match="pip install 'lipdet\\[gpu\\]'"):
        load_backend(plan)  # the backend checks before TensorRT is asked to load anything


def test_bad_sidecars(plan):
    path = sidecar_path(plan)
    path.unlink()
    with pytest.raises(LipdetError, match="no sidecar model.plan.json"):
        PlanSidecar.read(plan)
    with pytest.raises(LipdetError, match="no sidecar"):
        load_backend(plan)
    path.write_text("{not json")
    with pytest.raises(LipdetError, match="not valid JSON"):
        PlanSidecar.read(plan)
    path.write_text(json.dumps({"format": "ultralytics"}))
    with pytest.raises(LipdetError, match="not a lipdet plan sidecar"):
        PlanSidecar.read(plan)
    path.write_text(json.dumps({"format": "lipdet-trt-plan", "tensorrt": "10"}))
    with pytest.raises(LipdetError, match="missing gpu"):
        PlanSidecar.read(plan)


def test_plan_twin_from_source_onnx_and_hash_check(plan, artifacts, tmp_path):
    twin = load_twin(plan)  # needs no GPU: the twin comes from the plan's source ONNX
    assert twin.card.tensorrt.tensorrt == ENV["tensorrt"]
    for a, b in zip(twin.state_dict().values(), artifacts["folded"].state_dict().values()):
        assert torch.equal(a, b)
    # a folder moved as a whole: the ONNX is found beside the plan
    side = PlanSidecar.read(plan)
    dataclasses.replace(side, source_onnx=SourceOnnx("/elsewhere/model.onnx", side.source_onnx.sha256)).write(plan)
    assert source_onnx(PlanSidecar.read(plan), plan) == tmp_path / "model.onnx"
    # the ONNX changed after the plan was built: refused
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(artifacts["int8"].read_bytes())
    with pytest.raises(LipdetError, match="has changed since the plan was built"):
        load_twin(plan)
    onnx_path.unlink()
    with pytest.raises(LipdetError, match="source ONNX .* is missing"):
        load_twin(plan)


def test_network_flags_by_tensorrt_version():
    """TensorRT 11: flags 0 (always strongly typed); 10: STRONGLY_TYPED (+ deprecated EXPLICIT_BATCH)."""
    flags10 = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt10 = types.SimpleNamespace(__version__="10.9.0.34", NetworkDefinitionCreationFlag=flags10)
    assert network_flags(trt10) == (1 << 0) | (1 << 1)
    trt10_no_eb = types.SimpleNamespace(__version__="10.13.0", NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    assert network_flags(trt10_no_eb) == 1 << 1
    trt11 = types.SimpleNamespace(__version__="11.1.0", NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0))
    assert network_flags(trt11) == 0


def test_trt_missing_message_is_one_actionable_line():
    msg = trt_missing()
    if msg is None:
        pytest.skip("TensorRT and a GPU are available here")
    assert "\n" not in msg and "pip install 'lipdet[gpu]'" in msg
    assert ("tensorrt" in msg) or ("CUDA" in msg)
