"""Every refusal comes first: on an empty cache, a bad request writes nothing, generates no data, starts no Ray.

Each case runs the real ``lipdet`` entry point in this process with an empty ``$LIPDET_CACHE``,
an empty ``$LIPDET_RUNS`` and an empty working folder, with Ray's start-up replaced by a tripwire.
It must end with exactly one ``error:`` line and exit 2, and every one of those folders must still
be empty afterwards (the synthetic SVHN, a crop cache, a run folder, a half-written file would all
show up there).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from lipdet.cli import main

NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the GPU refusals do not apply")


@pytest.fixture()
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty cache, runs and working folders for one command, and a tripwire on starting Ray."""
    import ray

    dirs = {name: tmp_path / name for name in ("cache", "runs", "cwd")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("LIPDET_CACHE", str(dirs["cache"]))
    monkeypatch.setenv("LIPDET_RUNS", str(dirs["runs"]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(dirs["cwd"])

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started before the request was validated")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", tripwire)
    return dirs


def _contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refused(args: list[str], dirs: dict[str, Path], capsys, keep: tuple[str, ...] = ()) -> str:
    """Run ``lipdet ARGS``; assert one error line, exit 2, and no new file anywhere."""
    before = {k: _contents(d) for k, d in dirs.items()}
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for key, d in dirs.items():
        assert _contents(d) == before[key], f"{' '.join(args)} wrote into {key}: {_contents(d)}"
    return lines[0]


def _onnx_without_card(path: Path) -> Path:
    """A valid ONNX file that no lipdet export wrote (no model card)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 74, 74])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 74, 74]) for n in ("loc", "logits")]
    nodes = [helper.make_node("Identity", ["images"], [n]) for n in ("loc", "logits")]
    graph = helper.make_graph(nodes, "foreign", [x], outs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--margin-eps", "0.5"], "margin_eps needs a Lipschitz arch"),
        (["--arch", "sll-spectral", "-O", "pool=avg"], "pool must be one of"),
        (["--arch", "resnet"], "Invalid value for '--arch'"),
        (["--resume", "no-such-run"], "no run named 'no-such-run'"),
        (["--precision", "fp8"], "Invalid value for '--precision'"),
        (["--data", "missing-folder"], "data folder not found"),
        (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
        (["--val-fraction", "1.5"], "fraction must be > 0 and < 1, got 1.5"),
        (["--val-count", "0"], "count must be >= 1, got 0"),
        (["--val-count", "1000000"], "holds out 1000000 images, but the train split has only"),
        (["--workers", "2..1"], "workers MIN..MAX needs MIN <= MAX, got 2..1"),
        (["--workers", "0..2"], "workers must be >= 1, got 0..2"),
        (["--workers", "1-2"], "workers must be N or MIN..MAX (for example 2 or 1..4), got '1-2'"),
        (["--workers", "1..2..3"], "workers must be N or MIN..MAX"),
        (["--workers", "1..2", "--resize-check", "0"], "resize_check_s must be > 0 seconds, got 0.0"),
    ],
)
def test_train_refuses_before_data_ray_or_files(args, message, fresh, capsys):
    assert message in _refused(["train", *args], fresh, capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no training run found"),
        (["missing.pt"], "checkpoint not found"),
        (["--precision", "fp8", "missing.pt"], "Invalid value for '--precision'"),
        (["--calib-n", "0", "missing.pt"], "--calib-n"),
        (["--target", "avx", "missing.pt"], "Invalid value for '--target'"),
        (["--precision", "int8", "--target", "ort-vnni", "--trt", "missing.pt"],
         "target 'ort-vnni' makes uint8 asymmetric activations, which TensorRT rejects"),
        pytest.param(["--trt", "missing.pt"], "TensorRT needs an NVIDIA GPU", marks=NEEDS_NO_GPU),
    ],
)
def test_export_refuses_before_data_or_files(args, message, fresh, capsys):
    assert message in _refused(["export", *args], fresh, capsys)


def test_export_of_a_corrupt_checkpoint_refuses_before_data(fresh, capsys):
    bad = fresh["cwd"] / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a readable torch checkpoint" in _refused(["export", str(bad)], fresh, capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx"], "model not found"),
        (["{card}", "--eps", "-1"], "eps must be"),
        (["{card}", "--attack-loss", "bogus", "--pgd"], "'bogus' is not one of 'ensemble', 'multibox'"),
        (["{card}", "--input-size", "74", "--pgd"], "needs the artifact's lipdet model card"),
        (["{card}", "--input-size", "74", "--certify"], "needs the artifact's lipdet model card"),
        (["{card}", "--json", "no-such-folder/r.json"], "does not exist"),
        (["{card}", "--workers", "2", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
        (["{card}", "--address", "127.0.0.1:1"], "address is for sharded evaluation: give workers >= 2"),
        pytest.param(["{card}", "--input-size", "74", "--device", "cuda"], "CUDA", marks=NEEDS_NO_GPU),
    ],
)
def test_eval_refuses_before_data_or_files(args, message, fresh, capsys, tmp_path):
    foreign = str(_onnx_without_card(tmp_path / "foreign.onnx"))
    args = [a.replace("{card}", foreign) for a in args]
    assert message in _refused(["eval", *args], fresh, capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--archs", "bogus"], "unknown --archs"),
        (["--precision", "fp8"], "unknown --precision"),
        (["--train-precision", "fp8"], "unknown --train-precision"),
        (["--data", "{not_svhn}"], "not an SVHN format-1 folder"),
        (["--out", "{a_file}"], "exists and is not a folder"),
        pytest.param(["--trt"], "TensorRT needs an NVIDIA GPU", marks=NEEDS_NO_GPU),
    ],
)
def test_experiment_refuses_before_training(args, message, fresh, capsys, tmp_path):
    (tmp_path / "not-svhn").mkdir()
    (tmp_path / "a-file").write_text("x")
    args = [a.replace("{not_svhn}", str(tmp_path / "not-svhn")).replace("{a_file}", str(tmp_path / "a-file"))
            for a in args]
    assert message in _refused(["experiment", *args], fresh, capsys)


def test_data_commands_refuse_before_writing(fresh, capsys, tiny_svhn):
    out = str(fresh["cwd"] / "synth")
    assert "nothing to generate" in _refused(["data", "synth", out, "--train", "0", "--test", "0"], fresh, capsys)
    assert "unknown SVHN split" in _refused(["data", "fetch", "svhn", out, "--splits", "bogus"], fresh, capsys)
    before = _contents(tiny_svhn)
    grid = str(fresh["cwd"] / "grid.png")
    assert "bogus: no digitStruct.mat" in _refused(["data", "show", str(tiny_svhn), "--split", "bogus", "--out", grid],
                                                  fresh, capsys)
    assert "does not exist" in _refused(["data", "show", str(tiny_svhn), "--out", "nowhere/grid.png"], fresh, capsys)
    assert _contents(tiny_svhn) == before  # no crop cache was written beside the data either


def test_export_triton_into_a_file_refuses_before_data_or_files(fresh, capsys):
    """``--triton REPO`` names a folder; a file there is refused in one line before anything is exported."""
    bad = fresh["cwd"] / "repo"
    bad.write_text("not a folder")
    message = _refused(["export", "missing.pt", "--triton", str(bad)], fresh, capsys)
    assert "exists and is not a folder" in message and "Triton repository" in message
