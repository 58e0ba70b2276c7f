"""The HTTP API of ``lipdet serve``, without Ray: what each endpoint reads, checks and answers.

Endpoints (the Ray Serve deployment in :mod:`lipdet.deploy.serve` routes them here):

* ``POST /v1/detect``: body = one PNG/JPEG image of any size -> ``{"image": {"width", "height"},
  "detections": [{"bbox": [x, y, w, h], "category_id": digit, "score": p, "certified_radius": {...}}, ...],
  "model": {...}}``, boxes in the image's own pixels (COCO results style). ``certified_radius``
  (``{"cls", "box", "radius", "binding"}``, :data:`lipdet.certificates.DETECTION_DEFINITION`) is there for
  every model with a lipdet card (its twin gives the bounds), absent for a foreign ONNX.
* ``POST /v1/infer``: body = a ``.npy`` array ``(N, 3, S, S)``, float32 in ``[0, 1]`` or uint8 pixels -> a ``.npz``
  with the engine's raw ``loc (N, P, 4)`` and ``logits (N, P, C)`` float32, before any
  post-processing. This is what ``lipdet eval http://...`` scores and attacks (the same numbers
  ``backend(images)`` gives in process).
* ``GET /v1/model``: the model card, the served file's sha256 and the twin's (see below), and
  ``certificate``: the per-detection radius's definition and per-scale bounds (None without a card).
* ``GET /v1/model/onnx``: the bytes of the served model's ONNX twin (the ``.onnx`` itself, or a
  plan's source ONNX), for gradient attacks through ``lipdet eval --pgd``.
* ``GET /healthz``: 200 ``{"status": "ready", "replica": {"pid", "host", "engine": {"calls", "images"}}}`` once
  the engine answered a warm-up batch, else 503 (``replica`` names the replica that answered; ``engine`` counts
  its batched engine calls and the images they ran since start: ``images / calls`` is its mean batch).

Errors are JSON ``{"error": "<one line>"}`` with a 4xx status for anything the client sent.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import lipdet
from lipdet.certificates import DETECTION_DEFINITION, SERVE_BISECTION, AnchorBounds, detection_radii
from lipdet.deploy.backends import Backend
from lipdet.deploy.images import MAX_BODY_BYTES, ImageError, Prepared, to_image_boxes
from lipdet.io import sha256_file
from lipdet.postprocess import PostprocessConfig, postprocess

ENDPOINTS = ("POST /v1/detect", "POST /v1/infer", "GET /v1/model", "GET /v1/model/onnx", "GET /healthz")
NPY_TYPE = "application/x-npy"
NPZ_TYPE = "application/x-npz"


# -- the two places that read the model card (lipdet.artifacts.ModelCard, or None for a foreign ONNX) --


def card_json(card: Any) -> dict[str, Any] | None:
    """The model card as plain JSON for ``GET /v1/model`` (None for a foreign ONNX without one)."""
    return None if card is None else card.to_dict()


def card_thresholds(card: Any) -> PostprocessConfig:
    """Detection thresholds recorded in the card, else the reference defaults."""
    return PostprocessConfig() if card is None else card.thresholds()


# ------------------------------------------------------------------------------------------------


def twin_onnx_path(backend: Backend) -> Path | None:
    """The ONNX file whose weights are the served model's differentiable twin (None for a checkpoint)."""
    if backend.path.suffix == ".onnx":
        return backend.path
    return getattr(backend, "onnx_path", None)


def certificate_bounds(backend: Backend) -> AnchorBounds | None:
    """The per-anchor bounds of the served model, computed once per replica (None without a lipdet card).

    The same computation as ``lipdet eval --certify`` (:meth:`AnchorBounds.of_model`): ``head_bounds`` and the
    head rows of the twin rebuilt from the served file's own weights (a plan's source ONNX).
    """
    if backend.card is None:
        return None
    from lipdet.deploy.twin import load_twin

    return AnchorBounds.of_model(load_twin(backend.path), backend.priors.shape[0], backend.card.priors.feature_sizes)


def certificate_json(bounds: AnchorBounds | None) -> dict[str, Any] | None:
    """The ``certificate`` entry of ``GET /v1/model``: what ``certified_radius`` means, and the bounds behind it."""
    if bounds is None:
        return None
    return {"definition": DETECTION_DEFINITION, "keys": ["cls", "box", "radius", "binding"],
            "units": "L2 norm over the 3xSxS model input in [0,1] pixel units (the letterboxed, resized image)",
            "iou": 0.5, "bisection_steps": SERVE_BISECTION, "per_scale": bounds.per_scale}


def _radius_json(r: float) -> float | None:
    """A radius for JSON: None stands for an unbounded one (a head whose constant is 0; JSON has no inf)."""
    return float(r) if math.isfinite(r) else None


@dataclass
class ModelService:
    """One replica's engine and everything the endpoints answer from it.

    Attributes:
        backend: the deploy backend (ONNX Runtime session or TensorRT engine).
        thresholds: post-processing thresholds from the card.
        info: the ``GET /v1/model`` object (card, hashes, server settings, certificate), computed once.
        bounds: the per-anchor bounds of :func:`certificate_bounds` (None: no ``certified_radius``).
    """

    backend: Backend
    thresholds: PostprocessConfig
    info: dict[str, Any]
    bounds: AnchorBounds | None = None

    @classmethod
    def create(cls, backend: Backend, settings: dict[str, Any]) -> "ModelService":
        """Wrap ``backend``; ``settings`` (replicas, batch settings) goes into ``GET /v1/model``."""
        twin = twin_onnx_path(backend)
        bounds = certificate_bounds(backend)
        info = {
            "card": card_json(backend.card),
            "artifact": {"file": backend.path.name, "sha256": sha256_file(backend.path), "backend": backend.name,
                         "precision": backend.precision, "provider": backend.provider,
                         "input_size": backend.input_size},
            "twin": {"file": twin.name, "sha256": sha256_file(twin), "url": "/v1/model/onnx"} if twin else None,
            "server": {**settings, "lipdet_version": lipdet.__version__},
            "certificate": certificate_json(bounds),
        }
        return cls(backend, card_thresholds(backend.card), info, bounds)

    def warm_up(self, batch: int) -> None:
        """Run one batch of ``batch`` black images through the engine (first-call allocations)."""
        s = self.backend.input_size
        self.backend(torch.zeros(batch, 3, s, s))

    def run(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The engine on ``(N, 3, S, S)`` float32 -> raw ``(loc (N, P, 4), logits (N, P, C))``."""
        return self.backend(images)

    def detections(self, loc: Tensor, logits: Tensor, prepared: Prepared) -> dict[str, Any]:
        """The ``POST /v1/detect`` answer for one image from its raw ``loc (P, 4)``, ``logits (P, C)``.

        With bounds, each detection also gets ``"certified_radius": {"cls", "box", "radius", "binding"}``
        (:func:`lipdet.certificates.detection_radii`, radii in input-pixel L2 units; None for an unbounded one).
        """
        size = self.backend.input_size
        dets = postprocess(loc[None], logits[None], self.backend.priors, size, self.thresholds)[0]
        boxes = to_image_boxes(dets["boxes"], prepared, size)
        entries = [{"bbox": [round(float(v), 3) for v in b], "category_id": int(c), "score": float(p)}
                   for b, c, p in zip(boxes.tolist(), dets["labels"].tolist(), dets["scores"].tolist())]
        if self.bounds is not None and entries:
            r = detection_radii(loc, logits, self.backend.priors, size, dets, self.bounds)
            for j, e in enumerate(entries):
                e["certified_radius"] = {"cls": _radius_json(float(r["cls"][j])), "box": _radius_json(float(r["box"][j])),
                                         "radius": _radius_json(float(r["radius"][j])), "binding": r["binding"][j]}
        return {"image": {"width": prepared.width, "height": prepared.height}, "detections": entries,
                "model": {"sha256": self.info["artifact"]["sha256"], "precision": self.backend.precision}}


def read_tensor_body(data: bytes, size: int) -> Tensor:
    """A ``POST /v1/infer`` body as a float32 ``(N, 3, size, size)`` tensor in ``[0, 1]``.

    The body is a ``.npy`` array of that shape: float32 in ``[0, 1]`` (model inputs, e.g. adversarial
    images), or uint8 pixels ``0..255`` (divided by 255 here; a quarter of the bytes, what a camera frame is).

    Raises:
        ImageError: 413 over :data:`MAX_BODY_BYTES`; 400 for anything but such an array.
    """
    if len(data) > MAX_BODY_BYTES:
        raise ImageError(f"request body of {len(data)} bytes is over the {MAX_BODY_BYTES} byte limit "
                         f"(MAX_BODY_BYTES): send fewer images per request", 413)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ImageError(f"body is not a .npy array ({str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    ok = isinstance(arr, np.ndarray) and arr.dtype in (np.float32, np.uint8) and arr.ndim == 4
    if not ok or arr.shape[1:] != (3, size, size):
        what = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ImageError(f"expected a float32 or uint8 array of shape (N, 3, {size}, {size}), got {what}")
    if len(arr) == 0:
        raise ImageError("the array holds no images (N = 0)")
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    if not (arr.min() >= 0 and arr.max() <= 1):  # NaN propagates through min/max and fails both tests; so do +-inf
        raise ImageError("pixel values must be finite and in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(arr))


def write_outputs(loc: Tensor, logits: Tensor) -> bytes:
    """The ``POST /v1/infer`` answer: ``.npz`` bytes with float32 ``loc`` and ``logits``."""
    buf = io.BytesIO()
    np.savez(buf, loc=np.asarray(loc.numpy(), dtype=np.float32), logits=np.asarray(logits.numpy(), dtype=np.float32))
    return buf.getvalue()


def read_outputs(data: bytes) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`write_outputs` (the client side of ``POST /v1/infer``)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return torch.from_numpy(z["loc"].copy()), torch.from_numpy(z["logits"].copy())


def error_body(message: str) -> dict[str, str]:
    """The JSON body of every error answer."""
    return {"error": message.strip().splitlines()[0] if message.strip() else "error"}
