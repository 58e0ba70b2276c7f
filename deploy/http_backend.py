"""A ``lipdet serve`` endpoint as a deploy backend (``name = "http"``), so eval scores the live server.

``HttpBackend("http://HOST:PORT")(images)`` posts ``(N, 3, S, S)`` float32 images to the server's
``POST /v1/infer`` (in chunks that fit its body limit) and returns the engine's raw
``(loc (N, P, 4), logits (N, P, C))``: the same protocol as the file backends, so clean mAP, the
Square attack (queries only) and the replay of PGD images all go through the served replicas.

``card``, ``input_size``, ``priors`` and ``precision`` come from ``GET /v1/model``. The
differentiable twin (:attr:`HttpBackend.twin`, for ``--pgd``) is the served model's ONNX, either
fetched from ``GET /v1/model/onnx`` or given as a file, and refused unless its sha256 is the one
the server reports.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lipdet.artifacts import ModelCard
from lipdet.deploy.backends import Backend
from lipdet.deploy.http_api import NPY_TYPE, read_outputs
from lipdet.deploy.images import MAX_BODY_BYTES
from lipdet.errors import LipdetError
from lipdet.io import sha256_file

RETRIES = 3
"""Attempts per request when the server answers 5xx or drops the connection (a replica being replaced)."""


def is_url(model: Any) -> bool:
    """Whether a MODEL argument names a server (``http://`` / ``https://``) rather than a file."""
    return isinstance(model, str) and model.startswith(("http://", "https://"))


def http_request(url: str, data: bytes | None = None, content_type: str | None = None,
                 timeout: float = 60.0, retries: int = RETRIES) -> bytes:
    """GET (or POST ``data``) ``url``; the body of a 2xx answer. One-line LipdetError otherwise.

    A 4xx is the server's own one-line error; 5xx and connection failures are retried ``retries``
    times, one second apart.
    """
    headers = {"Content-Type": content_type} if content_type else {}
    last = ""
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {_error_text(e.read())}"
            if e.code < 500:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if attempt + 1 < retries:
            time.sleep(1.0)
    raise LipdetError(f"{url}: {last}")


def engine_counts(url: str, timeout: float = 30.0) -> tuple[int, int]:
    """``(calls, images)`` of the replica answering ``GET {url}/healthz``: its batched engine calls so far and
    the images they ran (``images / calls``: its mean batch)."""
    engine = json.loads(http_request(f"{url.rstrip('/')}/healthz", timeout=timeout))["replica"]["engine"]
    return engine["calls"], engine["images"]


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


class HttpBackend(Backend):
    """The model behind a ``lipdet serve`` URL, called like any other backend.

    Args:
        url: ``http://HOST:PORT`` of the server.
        twin_file: the served model's ONNX (checked against the server's sha256); None = fetch it.
        timeout: seconds per HTTP request.
    """

    name = "http"

    def __init__(self, url: str, twin_file: Path | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        try:
            self.info: dict[str, Any] = json.loads(http_request(f"{self.url}/v1/model", timeout=timeout))
        except ValueError:
            raise LipdetError(f"{self.url}/v1/model did not answer JSON: is this a lipdet server?") from None
        art = self.info.get("artifact") or {}
        card = ModelCard.from_dict(self.info["card"], source=f"{self.url}/v1/model") if self.info.get("card") else None
        super().__init__(Path(str(art.get("file", "served"))), card, int(art["input_size"]),
                         str(art.get("precision", "fp32")), f"{art.get('backend')} at {self.url}")
        self.path = self.url  # type: ignore[assignment]  # results name the server, not a file
        self.twin_file = twin_file
        self._twin: nn.Module | None = None
        per_image = 3 * self.input_size ** 2 * 4
        server_batch = int((self.info.get("server") or {}).get("max_batch", 64))
        self.chunk = max(1, min(server_batch, (MAX_BODY_BYTES - 1024) // per_image))

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        locs, logits = [], []
        for part in images.split(self.chunk):
            buf = io.BytesIO()
            np.save(buf, part.numpy().astype(np.float32), allow_pickle=False)
            lo, lg = read_outputs(http_request(f"{self.url}/v1/infer", buf.getvalue(), NPY_TYPE, self.timeout))
            locs.append(lo)
            logits.append(lg)
        return torch.cat(locs), torch.cat(logits)

    @property
    def twin(self) -> nn.Module:
        """The differentiable twin of the served model (its ONNX, sha256-checked against the server)."""
        if self._twin is None:
            self._twin = self._load_twin()
        return self._twin

    def _load_twin(self) -> nn.Module:
        from lipdet.deploy.twin import load_twin

        want = (self.info.get("twin") or {}).get("sha256")
        if not want:
            raise LipdetError(f"{self.url} serves a model without an ONNX twin: gradient attacks cannot run")
        if self.twin_file is not None:
            got = sha256_file(self.twin_file)
            if got != want:
                raise LipdetError(f"twin_file {self.twin_file}: sha256 {got[:12]}... is not the served model's "
                                  f"({want[:12]}..., from {self.url}/v1/model); refusing to attack with another model")
            return load_twin(self.twin_file)
        with tempfile.TemporaryDirectory(prefix="lipdet-twin-") as tmp:
            path = Path(tmp) / "served.onnx"
            path.write_bytes(http_request(f"{self.url}/v1/model/onnx", timeout=self.timeout))
            got = sha256_file(path)
            if got != want:
                raise LipdetError(f"{self.url}/v1/model/onnx: sha256 {got[:12]}... differs from the one the "
                                  f"server reports ({want[:12]}...); refusing to attack")
            return load_twin(path)
