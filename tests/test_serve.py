"""lipdet serve: real Ray Serve, real HTTP on 127.0.0.1, real ONNX Runtime sessions in the replicas.

One Ray Serve instance for the module (on the session's Ray cluster), serving a tiny untrained
model exported in the test (32 px input). Every client call has a timeout; the instance is shut
down at the end of the module.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipdet.artifacts import save_checkpoint
from lipdet.deploy.backends import load_backend
from lipdet.deploy.http_api import card_thresholds
from lipdet.deploy.images import to_image_boxes, prepare
from lipdet.io import sha256_file
from lipdet.postprocess import postprocess
import test_refusals
from test_refusals import _refused
from test_serve_images import bad_bodies, encode

SIZE = 32
TIMEOUT = 30
fresh = test_refusals.fresh  # empty cache/runs/cwd and a tripwire on ray.init, as for every command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, data: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
    """(status, body) of one HTTP request, 4xx/5xx included; never waits more than TIMEOUT seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_svhn) -> Path:
    """A tiny untrained sll-spectral model exported to ONNX by lipdet export's pipeline."""
    from lipdet.export.pipeline import export_model
    from lipdet.models import build_model

    torch.manual_seed(0)
    model = build_model("sll-spectral", width=0.125, input_size=SIZE).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, SIZE, SIZE))
    folder = tmp_path_factory.mktemp("served")
    ckpt = save_checkpoint(folder / "model.pt", model, meta={"data": {"root": str(tiny_svhn), "synthetic": True}})
    return export_model(ckpt, out=folder / "model.onnx", precision="fp32", val_n=8, echo=lambda *a: None).onnx


@pytest.fixture(scope="module")
def server(ray_cluster, exported):
    """The module's Ray Serve instance: 2 CPU replicas, batches of up to 16, 5 ms wait. Yields its URL."""
    from ray import serve

    from lipdet.deploy.serve import ServeOptions, deploy

    url = deploy(ServeOptions(model=exported, replicas=2, max_batch=16, port=free_port()).validate())
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def crops(tiny_svhn) -> list[np.ndarray]:
    """The test split's first 8 input crops as uint8 HWC arrays (exactly what PNG carries)."""
    from lipdet.data.dataset import SVHNDetection

    ds = SVHNDetection(tiny_svhn, "test", input_size=SIZE)
    return [(ds[i][0] * 255).round().byte().permute(1, 2, 0).numpy() for i in range(8)]


def in_process(model: Path, img: Image.Image) -> list[dict]:
    """What /v1/detect should answer, computed here: the file's backend and the shared post-processing."""
    backend = load_backend(model, device="cpu")
    p = prepare(img, SIZE)
    loc, logits = backend(p.tensor[None])
    dets = postprocess(loc, logits, backend.priors, SIZE, card_thresholds(backend.card))[0]
    boxes = to_image_boxes(dets["boxes"], p, SIZE)
    return [{"bbox": b, "category_id": int(c), "score": float(s)}
            for b, c, s in zip(boxes.tolist(), dets["labels"].tolist(), dets["scores"].tolist())]


def assert_same_detections(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["category_id"] == w["category_id"]
        assert abs(g["score"] - w["score"]) < 1e-5
        assert np.allclose(g["bbox"], w["bbox"], atol=2e-3)


def test_healthz_and_model_card(server, exported):
    status, body = call(f"{server}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = call(f"{server}/v1/model")
    info = json.loads(body)
    assert status == 200
    assert info["card"]["model"]["arch"] == "sll-spectral" and info["card"]["lipschitz"]
    assert info["artifact"]["sha256"] == sha256_file(exported) == info["twin"]["sha256"]
    assert info["server"]["max_batch"] == 16 and info["server"]["replicas"] == 2
    status, onnx = call(f"{server}/v1/model/onnx")
    assert status == 200 and onnx == exported.read_bytes()


def test_detect_answers_what_the_file_gives(server, exported, crops):
    """Dataset crops as PNG (input-sized: no resampling) and one wide JPEG-free letterboxed image,
    sent by 8 concurrent clients so that the replica batches them: the same detections as in process."""
    wide = Image.fromarray(np.concatenate([crops[0], crops[1], crops[2]], axis=1))  # 96 x 32
    images = [Image.fromarray(c) for c in crops] + [wide]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda im: call(f"{server}/v1/detect", encode(im)), images))
    for img, (status, body) in zip(images, answers):
        assert status == 200, body
        got = json.loads(body)
        assert got["image"] == {"width": img.width, "height": img.height}
        assert_same_detections(got["detections"], in_process(exported, img))
        for d in got["detections"]:
            x, y, w, h = d["bbox"]
            assert 0 <= x <= x + w <= img.width and 0 <= y <= y + h <= img.height


def test_every_bad_input_is_a_4xx_and_the_next_request_succeeds(server, crops):
    good = encode(Image.fromarray(crops[0]))
    npy = io.BytesIO()
    np.save(npy, np.zeros((2, 3, 8, 8), np.float32))
    cases = [(f"{server}/v1/detect", body, None, status, words) for body, status, words in bad_bodies().values()]
    cases += [
        (f"{server}/v1/infer", npy.getvalue(), None, 400, "(N, 3, 32, 32)"),
        (f"{server}/v1/infer", b"not numpy", None, 400, ".npy"),
        (f"{server}/v1/detect", None, "GET", 405, "use POST /v1/detect"),
        (f"{server}/v1/model", b"x", "DELETE", 405, "DELETE is not allowed"),
        (f"{server}/v2/detect", good, None, 404, "no endpoint /v2/detect"),
    ]
    for url, body, method, status, words in cases:
        got_status, got = call(url, body, method)
        assert got_status == status, (url, words, got)
        message = json.loads(got)["error"]
        assert words in message and "\n" not in message
        assert call(f"{server}/v1/detect", good)[0] == 200  # the replica keeps serving
    assert call(f"{server}/healthz")[0] == 200


def replica_pids(url: str, want: int, tries: int = 60) -> set[int]:
    """Replica pids seen answering GET /healthz, polling until ``want`` distinct ones (bounded)."""
    seen: set[int] = set()
    for _ in range(tries):
        status, body = call_or_fail(f"{url}/healthz")
        if status == 200:
            seen.add(int(json.loads(body)["replica"]["pid"]))
        if len(seen) >= want:
            break
    return seen


def call_or_fail(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    """:func:`call`, with a dropped connection or a timeout as status 0 (counted, never hanging)."""
    try:
        return call(url, data)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return 0, str(e).encode()


def test_a_killed_replica_is_replaced_and_no_request_hangs(server, crops):
    """SIGKILL one replica under load from 4 bounded client loops: Ray Serve starts a new one; every
    request ends within the client timeout; failures during the gap are 5xx, the rest succeed."""
    before = replica_pids(server, 2)
    assert len(before) == 2
    good = encode(Image.fromarray(crops[0]))
    victim = min(before)
    stop = time.monotonic() + 90
    statuses: list[int] = []

    def client() -> None:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            statuses.append(call_or_fail(f"{server}/v1/detect", good)[0])
            assert time.monotonic() - t0 <= TIMEOUT + 5

    with ThreadPoolExecutor(4) as pool:
        loops = [pool.submit(client) for _ in range(4)]
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        replaced: set[int] = set()
        while time.monotonic() < stop and not replaced:
            replaced = replica_pids(server, 3, tries=5) - before
            time.sleep(0.5)
        ok_before = statuses.count(200)
        while time.monotonic() < stop and statuses.count(200) < ok_before + 20:  # served again after the new one
            time.sleep(0.2)
        stop = time.monotonic()
        for f in loops:
            f.result()
    failed = [s for s in statuses if s != 200]
    print(f"replica {victim} killed: {len(statuses)} requests, {statuses.count(200)} ok, failures {Counter(failed)}")
    assert replaced, "Ray Serve did not replace the killed replica within 90 s"
    assert all(s >= 500 for s in failed), Counter(failed)
    assert statuses.count(200) > len(failed)


def test_eval_over_http_is_the_file_eval(server, exported, tiny_svhn):
    """Clean mAP and every detection through the endpoint equal the file's; Square runs on the endpoint."""
    from lipdet.eval.evaluate import EvalSettings, evaluate

    settings = EvalSettings(limit=12, batch_size=6, device="cpu")
    served = evaluate(server, data=tiny_svhn, settings=settings)
    local = evaluate(exported, data=tiny_svhn, settings=settings)
    assert served.summary["backend"]["name"] == "http" and served.summary["model"] == server
    assert served.clean_map50 == local.clean_map50
    assert served.summary["clean"]["map"] == local.summary["clean"]["map"]
    for a, b in zip(served.records, local.records):
        assert torch.allclose(a.clean["boxes"], b.clean["boxes"], atol=1e-4)
        assert torch.equal(a.clean["labels"], b.clean["labels"])
    square = evaluate(server, data=tiny_svhn, settings=EvalSettings(limit=4, batch_size=4, blackbox="square",
                                                                     queries=3, device="cpu"))
    assert square.summary["blackbox"]["method"] == "square" and square.summary["backend"]["name"] == "http"


def test_eval_cli_json_names_the_server(server, tiny_svhn, tmp_path, capsys):
    from lipdet.cli import main

    out = tmp_path / "served.json"
    with pytest.raises(SystemExit) as info:
        main(["eval", server, "--data", str(tiny_svhn), "--limit", "4", "--device", "cpu", "--no-progress",
              "--json", str(out)])
    assert info.value.code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["model"] == server and result["backend"]["name"] == "http" and result["backend"]["path"] == server
    assert 0 <= result["clean"]["map_50"] <= 1


def test_pgd_over_http_uses_the_served_twin_and_refuses_another(server, exported, tiny_svhn, tmp_path):
    from lipdet.errors import LipdetError
    from lipdet.eval.evaluate import EvalSettings, evaluate

    settings = EvalSettings(limit=4, batch_size=4, pgd=True, steps=2, attack_loss="cls", device="cpu")
    served = evaluate(server, data=tiny_svhn, settings=settings)
    local = evaluate(exported, data=tiny_svhn, settings=settings)
    assert served.summary["pgd"]["map_50"] == pytest.approx(local.summary["pgd"]["map_50"], abs=1e-6)
    given = evaluate(server, data=tiny_svhn, settings=EvalSettings(**{**vars(settings), "twin": str(exported)}))
    assert given.summary["pgd"]["map_50"] == served.summary["pgd"]["map_50"]
    other = tmp_path / "other.onnx"
    other.write_bytes(exported.read_bytes() + b"\0")
    with pytest.raises(LipdetError, match="not the served model"):
        evaluate(server, data=tiny_svhn, settings=EvalSettings(**{**vars(settings), "twin": str(other)}))


# ------------------------------------------------------------------------------------------------
# the commands' refusals


def test_cli_refuses_before_ray_or_files(exported, tmp_path, fresh, capsys):
    """A port in use, a missing / corrupt / checkpoint model, no run, a bad option, and eval of a URL
    where nothing listens: one line, exit 2, no file written, Ray not started (test_refusals' tripwire)."""
    import onnxruntime

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    no_cuda = ([([str(exported), "--device", "cuda"], "CUDAExecutionProvider")]
               if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() else [])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _refused(["serve", str(exported), "--port", str(port)], fresh, capsys)
    assert line == f"error: port {port} on 127.0.0.1 is in use: choose another with --port"
    for argv, words in [([str(tmp_path / "missing.onnx")], "model not found"), ([str(corrupt)], "corrupt.onnx"),
                        ([str(exported.with_suffix(".pt"))], "lipdet export"), ([], "no training run"),
                        ([str(exported), "--replicas", "0"], "--replicas")] + no_cuda:
        assert words in _refused(["serve", *argv, "--port", str(free_port())], fresh, capsys)
    nobody = f"http://127.0.0.1:{free_port()}"
    assert "Connection refused" in _refused(["eval", nobody, "--no-progress"], fresh, capsys)
    assert "--twin is for a served model" in _refused(["eval", str(exported), "--twin", str(exported)], fresh, capsys)
