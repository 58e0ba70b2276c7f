"""int8 flavours for ONNX Runtime on CPUs that differ (issue #17): which graph each target writes, that the
default one cannot saturate AVX2's ``vpmaddubsw`` and stays int8 end to end in ONNX Runtime, how a flavour is
read back from a file, and the warning where a full-range u8s8 graph runs without VNNI/AMX."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lipdet.errors import LipdetError
from lipdet.export.onnx_export import export_onnx_model, ort_session, run_session
from lipdet.export.precision import INT8_FLAVOURS, INT8_SPECS, TARGETS, int8_flavour, quantize_int8, saturation_warning
from lipdet.hardware import Machine
from lipdet.models import build_model, fold_model
from lipdet.parity import compare

SIZE = 74
AVX2_EPYC = Machine("AMD EPYC (AVX2 only)", "AVX2", frozenset({"avx2", "fma"}), 2)
VNNI_EPYC = Machine("AMD EPYC (AVX512 + VNNI)", "AVX512", frozenset({"avx2", "avx512f", "avx512_vnni"}), 2)
AVX_VNNI = Machine("Intel Core (AVX-VNNI)", "AVX2", frozenset({"avx2", "avx_vnni"}), 2)


@pytest.fixture(scope="module")
def fp32_graph(tiny_svhn) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = build_model("naive", width=0.25).eval()
    return export_onnx_model(fold_model(model), SIZE)


@pytest.fixture(scope="module")
def images(tiny_svhn) -> torch.Tensor:
    from lipdet.data.dataset import SVHNDetection

    ds = SVHNDetection(tiny_svhn, "train", input_size=SIZE)
    return torch.stack([ds[i][0] for i in range(8)])


@pytest.fixture(scope="module")
def graphs(fp32_graph, images) -> dict[str, onnx.ModelProto]:
    """Every flavour lipdet writes or wrote, quantised from the same graph and calibration images."""
    return {name: quantize_int8(fp32_graph, images, flavour=name) for name in INT8_SPECS}


def _weights(q: onnx.ModelProto) -> list[np.ndarray]:
    """The quantised Conv kernels ``(Cout, Cin, k, k)`` of a QDQ graph."""
    return [numpy_helper.to_array(i) for i in q.graph.initializer if len(i.dims) == 4]


def test_each_target_writes_its_flavour_and_every_flavour_is_read_back(graphs):
    assert set(INT8_FLAVOURS) == set(TARGETS) and set(INT8_FLAVOURS.values()) <= set(INT8_SPECS)
    for name, q in graphs.items():
        assert int8_flavour(q) == name
        spec = INT8_SPECS[name]
        assert {w.dtype for w in _weights(q)} == {np.dtype(spec.weights)}
    assert INT8_FLAVOURS["ort"] == "u8s8-reduce-range" and INT8_FLAVOURS["ort-vnni"] == "u8s8-asymmetric"


def test_the_default_flavour_cannot_saturate_vpmaddubsw(graphs):
    """uint8 activations x int8 weights in [-64, 64]: a pair sums to at most 2 x 255 x 64 = 32640 < 2^15, so
    the int16 pair sums of AVX2's vpmaddubsw (ONNX Runtime's u8s8 kernel without VNNI) cannot saturate.
    The full-range flavour reaches 127 (2 x 255 x 127 > 2^15): only accurate with VNNI/AMX."""
    q = graphs[INT8_FLAVOURS["ort"]]
    acts = [numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("zero_point") and not i.dims]
    assert acts and all(a.dtype == np.uint8 for a in acts)
    widest = max(int(np.abs(w.astype(np.int32)).max()) for w in _weights(q))
    assert widest == 64 and 2 * 255 * widest <= np.iinfo(np.int16).max
    full = max(int(np.abs(w.astype(np.int32)).max()) for w in _weights(graphs["u8s8-asymmetric"]))
    assert full == 127 and 2 * 255 * full > np.iinfo(np.int16).max


def test_the_default_flavour_runs_int8_end_to_end_in_onnxruntime(fp32_graph, graphs, images, tmp_path):
    """ONNX Runtime's optimised graph: every Conv fused into a QLinearConv (nothing falls back to fp32 Conv),
    pools and concats on uint8, Q/DQ only at the graph's input and outputs; and it computes the fp32 network."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    q = graphs[INT8_FLAVOURS["ort"]]
    ort.InferenceSession(q.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    convs = sum(n.op_type == "Conv" for n in fp32_graph.graph.node)
    assert ops.count("QLinearConv") == convs and "Conv" not in ops and "MaxPool" not in ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2  # input; loc and logits
    stats = compare(run_session(ort_session(q), images), run_session(ort_session(fp32_graph), images))
    assert stats["cosine"] > 0.99 and 0 < stats["rel"] < 0.25


def test_saturation_warning_only_for_full_range_u8s8_without_vnni_or_amx():
    line = saturation_warning("u8s8-asymmetric", AVX2_EPYC)
    assert line is not None and line.startswith("warning: ") and "\n" not in line
    assert "AVX2" in line and "--target ort" in line
    for m in (VNNI_EPYC, AVX_VNNI):
        assert saturation_warning("u8s8-asymmetric", m) is None
    for flavour in ("u8s8-reduce-range", "u8u8-asymmetric", "s8s8-symmetric", None, "something-else"):
        assert saturation_warning(flavour, AVX2_EPYC) is None


@pytest.mark.parametrize("flavour, warns", [("u8s8-asymmetric", True), ("u8s8-reduce-range", False)])
def test_onnxruntime_backend_warns_at_load_on_a_cpu_without_vnni(graphs, images, tmp_path, monkeypatch, capsys,
                                                                   flavour, warns):
    import lipdet.hardware
    from lipdet.deploy.backends import load_backend

    path = tmp_path / f"{flavour}.onnx"
    onnx.save(graphs[flavour], str(path))
    monkeypatch.setattr(lipdet.hardware, "machine", lambda: AVX2_EPYC)
    backend = load_backend(path, device="cpu", input_size=SIZE)
    err = capsys.readouterr().err
    if warns:
        assert backend.warning == saturation_warning(flavour, AVX2_EPYC)
        assert err == f"{path}: {backend.warning}\n"
    else:
        assert backend.warning is None and err == ""
    loc, logits = backend(images[:2])  # it runs either way (the warning does not refuse)
    assert loc.shape[0] == logits.shape[0] == 2
    monkeypatch.setattr(lipdet.hardware, "machine", lambda: VNNI_EPYC)
    assert load_backend(path, device="cpu", input_size=SIZE).warning is None


def test_export_for_ort_vnni_records_its_flavour_and_warns_where_it_would_saturate(tmp_path, tiny_svhn, monkeypatch):
    import lipdet.export.pipeline as pipeline
    from lipdet.artifacts import save_checkpoint
    from lipdet.export.onnx_export import get_card

    torch.manual_seed(0)
    model = build_model("naive", width=0.25).eval()
    pt = save_checkpoint(tmp_path / "model.pt", model, meta={"data": {"root": str(tiny_svhn), "synthetic": False}})
    monkeypatch.setattr(pipeline, "machine", lambda: AVX2_EPYC)
    said: list[str] = []
    res = pipeline.export_model(pt, precision="int8", target="ort-vnni", val_n=8, calib_n=8, echo=said.append)
    assert get_card(res.onnx).int8_flavour == "u8s8-asymmetric" == int8_flavour(onnx.load(str(res.onnx)))
    assert saturation_warning("u8s8-asymmetric", AVX2_EPYC) in said


@pytest.mark.parametrize("target", ["ort", "ort-vnni"])
def test_uint8_targets_with_trt_are_refused_before_any_work(tmp_path, target):
    from lipdet.export.pipeline import validate_request

    with pytest.raises(LipdetError, match=f"target '{target}'.*TensorRT rejects"):
        validate_request(tmp_path / "missing.pt", precision="int8", trt=True, target=target)


def test_old_int8_files_load_run_and_say_what_they_are(graphs, images, tmp_path):
    """A u8u8 file (the previous default) and a u8s8 file (the one before) still load and run."""
    from lipdet.deploy.backends import load_backend

    for name in ("u8u8-asymmetric", "u8s8-asymmetric"):
        path = tmp_path / f"{name}.onnx"
        onnx.save(graphs[name], str(path))
        backend = load_backend(path, device="cpu", input_size=SIZE)
        assert backend.precision == "int8" and int8_flavour(onnx.load(str(path))) == name
        assert backend(images[:1])[1].shape[0] == 1


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


def test_inference_benchmark_names_the_machine_and_reports_every_flavour_per_arch(capsys, monkeypatch):
    from lipdet.hardware import machine

    out = subprocess.run([sys.executable, str(BENCH), "--archs", "naive", "--width", "0.25", "--batches", "2",
                          "--seconds", "0.01", "--rounds", "1", "--calib-n", "2", "--threads", "1", "--clock", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == machine().line()
    rows = [line.split() for line in lines if line.startswith("naive ") and len(line.split()) == 5]
    assert [r[1] for r in rows] == ["ort", "ort-vnni", "u8u8", "trt", "s-fp32"]
    assert all(r[2].endswith("x") and 0 < float(r[4]) <= 1.0 for r in rows)
    import importlib.util

    spec = importlib.util.spec_from_file_location("inference_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "inference_bench", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e:
        bench.main(["--clock", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--clock cpu needs --threads 1 (CPU time of several threads includes their spinning)")


def test_l2_pool_squares_stay_in_fp32(fp32_graph, images):
    """The L2-norm pool's squared activations (Mul(x, x) -> AveragePool -> Mul -> Add -> Sqrt) are not quantised
    (8-bit steps over x^2 cost sll-spectral 3.5 map_50 points); every other node is, and max-pool archs have none."""
    from lipdet.export.precision import squared_domain_nodes

    assert squared_domain_nodes(fp32_graph) == []  # naive: max-pools
    torch.manual_seed(0)
    model = build_model("sll-spectral", width=0.25, pool="l2", shrink="conv").eval()  # as lipdet train builds it
    with torch.no_grad():
        model(torch.rand(2, 3, SIZE, SIZE))
    fp32 = export_onnx_model(fold_model(model), SIZE)
    picked = squared_domain_nodes(fp32)
    pools = sum(n.op_type == "Sqrt" for n in fp32.graph.node)
    kinds = [n.op_type for n in fp32.graph.node if n.name in picked]
    assert pools > 0 and kinds.count("Sqrt") == kinds.count("AveragePool") == pools
    assert set(kinds) == {"Mul", "AveragePool", "Add", "Sqrt"}
    q = quantize_int8(fp32, images)
    producer = {o: n for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.name in picked and n.op_type != "Mul":  # inside the squared domain: float from end to end
            assert all(producer[i].op_type != "DequantizeLinear" for i in n.input if i in producer), n.name
    assert int8_flavour(q) == INT8_FLAVOURS["ort"] and sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > pools
