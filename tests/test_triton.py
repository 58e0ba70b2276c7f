"""lipdet export --triton: the Triton model repository parses into Triton's own ModelConfig message
(tritonclient's protobuf classes) and agrees with the exported ONNX graph. No Triton server runs here."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

from lipdet.artifacts import save_checkpoint
from lipdet.errors import LipdetError
from lipdet.export.triton import TensorSpec, config_text, model_name, write_repository
from lipdet.models import build_model

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
SIZE = 32


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_svhn) -> Path:
    torch.manual_seed(0)
    model = build_model("sll-l2", width=0.125, input_size=SIZE).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, SIZE, SIZE))
    return save_checkpoint(tmp_path_factory.mktemp("run") / "model.pt", model,
                           meta={"data": {"root": str(tiny_svhn), "synthetic": True}})


def test_export_triton_repo_matches_the_onnx_graph(ckpt, tmp_path, capsys):
    from lipdet.cli import main

    out, repo = tmp_path / "model.onnx", tmp_path / "triton"
    with pytest.raises(SystemExit) as info:
        main(["export", str(ckpt), "--out", str(out), "--triton", str(repo), "--max-batch", "32", "--val-n", "4"])
    assert info.value.code == 0, capsys.readouterr().err
    config = parse((repo / "model" / "config.pbtxt").read_text())
    assert (repo / "model" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert config.name == "model" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for declared, actual in [(config.input, session.get_inputs()), (config.output, session.get_outputs())]:
        assert [t.name for t in declared] == [t.name for t in actual]
        for t, a in zip(declared, actual):
            assert list(t.dims) == list(a.shape[1:]) and isinstance(a.shape[0], str)  # batch dim is Triton's
            assert model_config_pb2.DataType.Name(t.data_type) == "TYPE_FP32" and a.type == "tensor(float)"
    assert [list(t.dims) for t in config.input] == [[3, SIZE, SIZE]]


def test_plan_config_and_names_parse():
    specs = [TensorSpec("images", "TYPE_FP32", (3, 74, 74))], [TensorSpec("loc", "TYPE_FP32", (1700, 4)),
                                                               TensorSpec("logits", "TYPE_FP32", (1700, 11))]
    config = parse(config_text("m", "tensorrt_plan", 64, *specs))
    assert config.platform == "tensorrt_plan" and [list(o.dims) for o in config.output] == [[1700, 4], [1700, 11]]
    assert model_name(Path("runs/x/model.int8.onnx")) == "model_int8"


def test_refusals(tmp_path):
    file_repo = tmp_path / "repo"
    file_repo.write_text("not a folder")
    with pytest.raises(LipdetError, match="not a folder"):
        write_repository(file_repo, tmp_path / "model.onnx", 8)
    with pytest.raises(LipdetError, match=".onnx or .plan"):
        write_repository(tmp_path / "ok", tmp_path / "model.pt", 8)
