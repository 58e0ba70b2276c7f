"""lipdet serve: real Ray Serve, real HTTP on 127.0.0.1, real ONNX Runtime sessions in the replicas.

One Ray Serve instance for the module (on the session's Ray cluster), serving a tiny untrained
model exported in the test (32 px input). Every client call has a timeout; the instance is shut
down at the end of the module. The certified radius per detection is checked against the shared
core computed here (and against PGD on the twin); the models that need no server (an old artifact, a
naive model, a foreign ONNX) go through the replica's own ModelService in process.
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
from lipdet.boxes import decode
from lipdet.certificates import AnchorBounds, box_iou_exact, detection_anchors, detection_radii
from lipdet.deploy.backends import load_backend
from lipdet.deploy.http_api import ModelService, card_thresholds
from lipdet.deploy.images import to_image_boxes, prepare
from lipdet.io import sha256_file
from lipdet.postprocess import postprocess
import test_refusals
from test_eval_certify import MarginAttack
from test_refusals import _refused
from test_serve_images import bad_bodies, encode

SIZE = 32
TIMEOUT = 30
FIXTURES = Path(__file__).parent / "fixtures" / "v0.1-main"
RADIUS_KEYS = {"cls", "box", "radius", "binding"}
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


_BOUNDS: dict[Path, AnchorBounds] = {}


def core_bounds(model: Path) -> AnchorBounds:
    """The per-anchor bounds of ``model``, computed here with the shared core (once per file)."""
    from lipdet.deploy.twin import load_twin

    if model not in _BOUNDS:
        backend = load_backend(model)
        _BOUNDS[model] = AnchorBounds.of_model(load_twin(model), backend.priors.shape[0], backend.card.priors.feature_sizes)
    return _BOUNDS[model]


def replica_outputs(model: Path, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Raw outputs and detections of one image as a replica computes them (its ONNX Runtime session on one thread)."""
    from lipdet.deploy.serve import open_backend

    backend = open_backend(model, "cpu")
    loc, logits = backend(prepare(img, SIZE).tensor[None])
    return loc[0], logits[0], postprocess(loc, logits, backend.priors, SIZE, card_thresholds(backend.card))[0]


def core_radii(model: Path, img: Image.Image, bounds: AnchorBounds) -> dict:
    """:func:`lipdet.certificates.detection_radii` of one image, computed here."""
    loc, logits, dets = replica_outputs(model, img)
    return detection_radii(loc, logits, load_backend(model).priors, SIZE, dets, bounds)


def assert_core_radii(got: list[dict], want: dict) -> None:
    assert len(got) == len(want["radius"])
    for j, d in enumerate(got):
        r = d["certified_radius"]
        assert set(r) == RADIUS_KEYS and r["binding"] == want["binding"][j] and r["binding"] in ("cls", "box")
        for key in ("cls", "box", "radius"):
            assert r[key] == pytest.approx(float(want[key][j]), rel=1e-9, abs=1e-12)
        assert r["radius"] == min(r["cls"], r["box"]) and r["radius"] >= 0


def test_healthz_and_model_card(server, exported):
    status, body = call(f"{server}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = call(f"{server}/v1/model")
    info = json.loads(body)
    assert status == 200
    assert info["card"]["model"]["arch"] == "sll-spectral" and info["card"]["lipschitz"]
    assert info["artifact"]["sha256"] == sha256_file(exported) == info["twin"]["sha256"]
    assert info["server"]["max_batch"] == 16 and info["server"]["replicas"] == 2
    cert = info["certificate"]  # what certified_radius means, and the per-scale bounds behind it
    assert "IoU >= 0.5 with its clean box" in cert["definition"] and "letterboxed" in cert["definition"]
    assert set(cert["keys"]) == RADIUS_KEYS and cert["bisection_steps"] >= 1
    assert [s["feature_size"] for s in cert["per_scale"]] == list(load_backend(exported).card.priors.feature_sizes)
    assert all(s["trunk"] > 0 and s["cls_anchor_max"] <= s["cls"] * (1 + 1e-9) for s in cert["per_scale"])
    status, onnx = call(f"{server}/v1/model/onnx")
    assert status == 200 and onnx == exported.read_bytes()


def test_replicas_run_with_lipdet_serve_settings(server):
    """The replica that answers /healthz (its pid) runs with :data:`SERVE_ENV`: the Ray Serve settings reach
    the processes of the cluster, not only this one."""
    from lipdet.deploy.serve_env import SERVE_ENV

    status, body = call(f"{server}/healthz")
    pid = json.loads(body)["replica"]["pid"]
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    assert status == 200 and {k: environ.get(k) for k in SERVE_ENV} == SERVE_ENV


def test_detect_answers_what_the_file_gives(server, exported, crops):
    """Dataset crops as PNG (input-sized: no resampling) and one wide JPEG-free letterboxed image,
    sent by 8 concurrent clients so that the replica batches them: the same detections as in process."""
    wide = Image.fromarray(np.concatenate([crops[0], crops[1], crops[2]], axis=1))  # 96 x 32
    images = [Image.fromarray(c) for c in crops] + [wide]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda im: call(f"{server}/v1/detect", encode(im)), images))
    bounds = core_bounds(exported)
    for img, (status, body) in zip(images, answers):
        assert status == 200, body
        got = json.loads(body)
        assert got["image"] == {"width": img.width, "height": img.height}
        assert_same_detections(got["detections"], in_process(exported, img))
        assert_core_radii(got["detections"], core_radii(exported, img, bounds))
        for d in got["detections"]:
            x, y, w, h = d["bbox"]
            assert 0 <= x <= x + w <= img.width and 0 <= y <= y + h <= img.height


class BoxAttack:
    """Attack loss: push one anchor's decoded box away from its clean box (1 - IoU, clipped as post-processing)."""

    def __init__(self, anchor: int, priors: torch.Tensor, clean_box: torch.Tensor) -> None:
        self.anchor, self.prior, self.clean = anchor, priors[anchor : anchor + 1], clean_box  # (1, 4), (1, 4)

    def per_image(self, loc, logits, targets):
        return (1 - box_iou_exact(loc[:, self.anchor : self.anchor + 1], self.prior, self.clean))[:, 0].float()

    def batch(self, loc, logits, targets):
        return self.per_image(loc, logits, targets).sum()


def test_pgd_on_the_twin_inside_the_served_radii_changes_nothing(server, exported, crops):
    """Soundness of the served numbers: PGD on the twin with eps just inside a detection's class radius never
    changes its anchor's top class, and inside its box radius the anchor's box keeps IoU >= 0.5 with its clean box."""
    from lipdet.deploy.twin import load_twin
    from lipdet.eval.attacks import pgd_l2

    twin = load_twin(exported)
    priors = twin.priors.float()
    runs, gained = 0, 0.0
    for i, crop in enumerate(crops[:3]):
        img = Image.fromarray(crop)
        status, body = call(f"{server}/v1/detect", encode(img))
        assert status == 200, body
        loc, logits, dets = replica_outputs(exported, img)
        anchors = detection_anchors(loc, logits, priors, SIZE, dets).tolist()
        x, top = prepare(img, SIZE).tensor[None], logits.argmax(-1)[None]
        for d, a in list(zip(json.loads(body)["detections"], anchors))[:3]:
            r = d["certified_radius"]
            watched = torch.zeros(1, priors.shape[0], dtype=torch.bool)
            watched[0, a] = True
            own = decode(loc[a : a + 1], priors[a : a + 1]).clamp(0.0, 1.0)
            for attack, eps in ((MarginAttack(watched, top), r["cls"]), (BoxAttack(a, priors, own), r["box"])):
                if not eps or eps <= 0:
                    continue
                res = pgd_l2(twin, x, [{}], attack, 0.99 * eps, steps=20, seeds=[i])
                with torch.no_grad():
                    adv_loc, adv_logits = twin(res.adv)
                gained += float(res.loss.sum() - attack.per_image(*twin(x), None).sum())
                runs += 1
                if 0.99 * eps < r["cls"]:  # inside the class radius (either attack): the top class holds
                    assert int(adv_logits[0, a].argmax()) == int(top[0, a])
                if isinstance(attack, BoxAttack):
                    assert float(box_iou_exact(adv_loc[:, a : a + 1], priors[a : a + 1], own).min()) >= 0.5
    assert runs >= 6 and gained > 0  # the attacks ran, and moved their losses


def test_certified_radius_of_old_naive_and_foreign_models(tmp_path, crops):
    """The replica's ModelService in process: the v0.1-main ONNX (old artifacts certify in serve too) and a naive
    model (unbounded by design: still the field, from the same core; a trained naive's ~1e7 bounds make it ~0)
    answer the core's radii; a backend without a lipdet card (no twin, no bounds; lipdet serve itself refuses a
    foreign ONNX, whose input size it cannot know) answers without the field."""
    import onnx

    from lipdet.deploy.backends import OrtBackend
    from lipdet.deploy.serve import open_backend
    from lipdet.models import build_model

    torch.manual_seed(0)
    naive = build_model("naive", width=0.125, input_size=SIZE).eval()
    with torch.no_grad():
        for head in naive.cls_heads.values():
            head.bn.bias[4::11] += 8.0  # digit 3 (class 4 of 11, every anchor) well above the score threshold
    bare = onnx.load(str(FIXTURES / "model.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "foreign.onnx"))
    models = [FIXTURES / "model.onnx", save_checkpoint(tmp_path / "naive.pt", naive), tmp_path / "foreign.onnx"]
    for model in models:
        card = model.name != "foreign.onnx"
        service = ModelService.create(open_backend(model, "cpu") if card else OrtBackend(model, "cpu", SIZE, 1), {})
        answers = [service.detections(*(o[0] for o in service.run(prepare(Image.fromarray(c), SIZE).tensor[None])),
                                      prepare(Image.fromarray(c), SIZE)) for c in crops[:3]]
        dets = [d for a in answers for d in a["detections"]]
        assert dets, model
        if not card:
            assert service.info["certificate"] is None and not any("certified_radius" in d for d in dets)
            continue
        assert service.info["certificate"]["per_scale"]
        for c, a in zip(crops[:3], answers):
            assert_core_radii(a["detections"], core_radii(model, Image.fromarray(c), core_bounds(model)))


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
                        ([str(exported), "--replicas", "0"], "--replicas"), ([str(exported), "--max-batch", "0"], "--max-batch"),
                        ([str(exported), "--batch-wait-ms", "-1"], "--batch-wait-ms")] + no_cuda:
        assert words in _refused(["serve", *argv, "--port", str(free_port())], fresh, capsys)
    nobody = f"http://127.0.0.1:{free_port()}"
    assert "Connection refused" in _refused(["eval", nobody, "--no-progress"], fresh, capsys)
    assert "--twin is for a served model" in _refused(["eval", str(exported), "--twin", str(exported)], fresh, capsys)
