"""lipdet serve's dynamic batching in a served replica (the batcher alone: ``test_engine_batcher.py``).

Real Ray Serve (one replica, on the session's Ray cluster), real HTTP on 127.0.0.1, the v0.1-main ONNX
fixture in ONNX Runtime. A request larger than ``--max-batch`` is split into parts of at most that many
images, concurrent requests' parts share engine calls (the batcher counts images against the limit),
and every request gets back exactly its own rows: the numbers the same file gives in process.
"""

from __future__ import annotations

import io
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lipdet.deploy.http_api import NPY_TYPE, read_outputs
from lipdet.deploy.http_backend import engine_counts
from test_serve import FIXTURES, TIMEOUT, free_port

MAX_BATCH = 4


@pytest.fixture(scope="module")
def batched_server(ray_cluster):
    """One replica serving the v0.1-main ONNX with batches of at most MAX_BATCH images and a 50 ms wait
    (long enough for concurrent requests to meet in one batch). Yields its URL."""
    from ray import serve

    from lipdet.deploy.serve import ServeOptions, deploy

    options = ServeOptions(model=FIXTURES / "model.onnx", replicas=1, max_batch=MAX_BATCH, batch_wait_ms=50,
                           port=free_port())
    yield deploy(options.validate())
    serve.shutdown()


def post_infer(url: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``POST /v1/infer`` with ``(N, 3, S, S)`` images (float32 or uint8) -> the server's raw ``loc``, ``logits``."""
    buf = io.BytesIO()
    np.save(buf, images.numpy())
    req = urllib.request.Request(f"{url}/v1/infer", data=buf.getvalue(), headers={"Content-Type": NPY_TYPE})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return read_outputs(r.read())


def test_large_and_concurrent_requests_get_their_own_rows(batched_server):
    """10 and 7 images (over MAX_BATCH: split), 3 + 1 (one batch together), 4 (exactly one batch), sent at
    once: each answer equals the in-process backend on that request's images."""
    from lipdet.deploy.serve import open_backend

    backend = open_backend(FIXTURES / "model.onnx", "cpu")
    s = backend.input_size
    gen = torch.Generator().manual_seed(0)
    parts = [torch.rand(n, 3, s, s, generator=gen) for n in (10, 3, 1, 4, 7)]
    before = engine_counts(batched_server)
    for _ in range(2):  # the second round meets a warm replica: other batch compositions
        with ThreadPoolExecutor(len(parts)) as pool:
            answers = list(pool.map(lambda x: post_infer(batched_server, x), parts))
        for x, (loc, logits) in zip(parts, answers):
            ref_loc, ref_logits = backend(x)
            assert loc.shape == ref_loc.shape and logits.shape == ref_logits.shape
            torch.testing.assert_close(loc, ref_loc, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    calls, images = (b - a for a, b in zip(before, engine_counts(batched_server)))
    assert images == 2 * 25  # every image ran once; no batch over MAX_BATCH, so at least 7 calls per round
    assert 2 * 7 <= calls <= 2 * 8  # 8 parts per round (10 -> 4 + 4 + 2, 7 -> 4 + 3)


def test_uint8_frames_are_pixels_over_255(batched_server):
    """A uint8 ``.npy`` (camera frames, a quarter of the bytes) answers exactly what the float32 images
    ``frames / 255`` give in process; a uint8 array of the wrong shape is a 400 naming both dtypes."""
    from lipdet.deploy.http_api import read_tensor_body
    from lipdet.deploy.images import ImageError
    from lipdet.deploy.serve import open_backend

    backend = open_backend(FIXTURES / "model.onnx", "cpu")
    s = backend.input_size
    frames = torch.randint(0, 256, (5, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loc, logits = post_infer(batched_server, frames)
    ref_loc, ref_logits = backend(frames.float() / 255.0)
    torch.testing.assert_close(loc, ref_loc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 3, s, s + 1), np.uint8))
    with pytest.raises(ImageError, match="float32 or uint8 array of shape"):
        read_tensor_body(buf.getvalue(), s)
