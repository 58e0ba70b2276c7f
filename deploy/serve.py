"""``lipdet serve`` on Ray Serve: one deployment of N replicas, each an engine behind dynamic batching.

Each replica (:class:`DetectorServer`) loads the artifact through :mod:`lipdet.deploy.backends`
(ONNX Runtime with one intra-op thread per CPU replica, or TensorRT), computes the per-anchor
certificate bounds once from the artifact's twin (:func:`lipdet.deploy.http_api.certificate_bounds`),
answers one warm-up batch of ``max_batch`` images, then serves the API of :mod:`lipdet.deploy.http_api`.
Requests from any number of clients are merged into engine batches by its
:class:`~lipdet.deploy.batching.EngineBatcher` (up to ``max_batch`` images, formed when the engine is free,
waiting at most ``batch_wait_ms`` for a batch to fill). Ray Serve spreads the replicas over the cluster, one
CPU (``--device cpu``) or one GPU (``--device cuda``) each, and replaces a replica that dies.

Ray and FastAPI are imported by this module: import it only to serve (the CLI does so lazily).
"""

# No "from __future__ import annotations": FastAPI reads the route parameters' annotations (Request) at
# class decoration time, and Ray Serve's ingress re-wraps the methods where string annotations do not resolve.

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipdet.artifacts import artifact_kind
from lipdet.deploy.backends import Backend, OrtBackend, load_backend
from lipdet.deploy.batching import EngineBatcher
from lipdet.deploy.http_api import (
    ENDPOINTS,
    NPZ_TYPE,
    ModelService,
    error_body,
    read_tensor_body,
    twin_onnx_path,
    write_outputs,
)
from lipdet.deploy.images import MAX_BODY_BYTES, ImageError, check_body_size, decode_image, prepare
from lipdet.errors import LipdetError

APP_NAME = "lipdet"
DRAIN_LIMIT = 8 * MAX_BODY_BYTES
"""Most bytes of an oversized body read before answering 413 (see :func:`read_body`)."""
log = logging.getLogger("lipdet.serve")


@dataclass(frozen=True)
class ServeOptions:
    """What ``lipdet serve`` was asked for (``GET /v1/model`` reports it under ``server``).

    Attributes:
        model: the ``.onnx`` / ``.plan`` file served.
        replicas: Ray Serve replicas, each with one CPU (or one GPU with ``device="cuda"``).
        max_batch: most images per engine call; ``batch_wait_ms``: longest wait for a batch to fill (ms).
        host, port: where the HTTP proxy listens.
        device: ``cpu`` or ``cuda``.
        log_requests: Ray Serve's per-request access log (off by default).
    """

    model: Path
    replicas: int = 1
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    log_requests: bool = False

    def validate(self) -> "ServeOptions":
        """Check every value (one-line LipdetError); returns self."""
        if self.replicas < 1:
            raise LipdetError(f"--replicas must be >= 1, got {self.replicas}")
        if not 1 <= self.max_batch <= 4096:
            raise LipdetError(f"--max-batch must be in 1..4096, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise LipdetError(f"--batch-wait-ms must be in 0..10000, got {self.batch_wait_ms}")
        if not 1 <= self.port <= 65535:
            raise LipdetError(f"--port must be in 1..65535, got {self.port}")
        if self.device not in ("cpu", "cuda"):
            raise LipdetError(f"--device must be cpu or cuda, got {self.device!r}")
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def settings(self) -> dict[str, Any]:
        """The server settings as reported by ``GET /v1/model``."""
        return {"replicas": self.replicas, "max_batch": self.max_batch, "batch_wait_ms": self.batch_wait_ms,
                "device": self.device}

    def start_line(self, backend: Backend) -> str:
        """The one line ``lipdet serve`` prints once the deployment is up."""
        per = "GPU" if self.device == "cuda" else "CPU"
        cert = "on" if backend.card is not None else "off (no lipdet card)"
        return (f"lipdet serve: {self.url}  {backend.path.name} ({backend.name}, {backend.precision})  "
                f"replicas {self.replicas} (1 {per} each)  max batch {self.max_batch}, batch wait "
                f"{self.batch_wait_ms:g} ms  certified radius {cert}  request log "
                f"{'on' if self.log_requests else 'off'}  (Ctrl-C stops)")


def open_backend(model: Path, device: str) -> Backend:
    """The deploy backend for ``model`` as a replica runs it: ONNX Runtime on one thread per CPU replica."""
    if device == "cpu" and artifact_kind(model) == "onnx":
        return OrtBackend(model, "cpu", threads=1)
    return load_backend(model, device=device)


def check_port_free(host: str, port: int) -> None:
    """Refuse (one line) when ``host:port`` cannot be bound: in use, or not an address of this machine."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is in use" if e.errno == 98 else f"cannot be opened ({e.strerror})"
            raise LipdetError(f"port {port} on {host} {why}: choose another with --port") from None


# ------------------------------------------------------------------------------------------------
# the deployment

api = FastAPI(title="lipdet serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 / 405 as lipdet's one-line JSON errors, naming the endpoints."""
    if exc.status_code == 404:
        msg = f"no endpoint {request.url.path}; endpoints: {', '.join(ENDPOINTS)}"
    elif exc.status_code == 405:
        allowed = [e for e in ENDPOINTS if e.split()[1] == request.url.path]
        msg = f"{request.method} is not allowed on {request.url.path}; use {' or '.join(allowed) or 'another method'}"
    else:
        msg = str(exc.detail)
    return JSONResponse(error_body(msg), status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = (exc.errors() or [{}])[0]
    return JSONResponse(error_body(f"bad request to {request.url.path}: {first.get('msg', 'invalid')}"), status_code=400)


async def read_body(request: Request) -> bytes:
    """The request body; 413 when it exceeds :data:`MAX_BODY_BYTES`.

    An oversized body is still read (and dropped) up to :data:`DRAIN_LIMIT` bytes before the
    answer, so that the client, still sending, gets the 413 rather than a reset connection.
    """
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= MAX_BODY_BYTES:
            chunks.append(chunk)
        elif total > DRAIN_LIMIT:
            break
    check_body_size(total)
    return b"".join(chunks)


def _failure(e: Exception) -> JSONResponse:
    if isinstance(e, ImageError):
        return JSONResponse(error_body(e.message), status_code=e.status)
    log.exception("lipdet serve: request failed")
    text = e.message if isinstance(e, LipdetError) else f"{type(e).__name__}: {e}"
    return JSONResponse(error_body(f"server error: {text}"), status_code=500)


@serve.deployment(name="DetectorServer", max_ongoing_requests=256, health_check_period_s=2.0)
@serve.ingress(api)
class DetectorServer:
    """One replica: the engine, its warm-up, and the routes of :mod:`lipdet.deploy.http_api`."""

    def __init__(self, options: ServeOptions) -> None:
        torch.set_num_threads(1)
        self.options = options
        self.ready = False
        self.service = ModelService.create(open_backend(options.model, options.device), options.settings())
        self.engine = EngineBatcher(self.service.run, options.max_batch, options.batch_wait_ms / 1000.0)
        self.service.warm_up(options.max_batch)
        self.ready = True

    async def infer_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 3, S, S)`` through the batcher in parts of at most ``max_batch`` images -> raw ``loc``, ``logits``."""
        outs = await asyncio.gather(*[self.engine(part) for part in images.split(self.options.max_batch)])
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def check_health(self) -> None:
        """Ray Serve's health check: a replica is healthy once warmed up."""
        if not self.ready:
            raise RuntimeError("engine not warmed up")

    @api.post("/v1/detect")
    async def detect(self, request: Request) -> Any:
        try:
            prepared = prepare(decode_image(await read_body(request)), self.service.backend.input_size)
            loc, logits = await self.engine(prepared.tensor[None])
            # post-processing and certified radii off the event loop: other requests keep flowing meanwhile
            return await asyncio.get_running_loop().run_in_executor(None, self.service.detections, loc[0], logits[0],
                                                                    prepared)
        except Exception as e:  # every failure is one JSON line; the replica keeps serving
            return _failure(e)

    @api.post("/v1/infer")
    async def infer(self, request: Request) -> Any:
        try:
            images = read_tensor_body(await read_body(request), self.service.backend.input_size)
            loc, logits = await self.infer_images(images)
            return Response(write_outputs(loc, logits), media_type=NPZ_TYPE)
        except Exception as e:
            return _failure(e)

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        return self.service.info

    @api.get("/v1/model/onnx")
    async def model_onnx(self) -> Any:
        path = twin_onnx_path(self.service.backend)
        if path is None:
            return JSONResponse(error_body("the served model has no ONNX twin"), status_code=404)
        return Response(path.read_bytes(), media_type="application/octet-stream")

    @api.get("/healthz")
    async def healthz(self) -> Any:
        replica = {"pid": os.getpid(), "host": socket.gethostname(),  # which replica answered (operations)
                   "engine": {"calls": self.engine.calls, "images": self.engine.rows}}
        if not self.ready:
            return JSONResponse({"status": "warming up", "replica": replica}, status_code=503)
        return {"status": "ready", "replica": replica}


def deploy(options: ServeOptions) -> str:
    """Start Ray Serve's HTTP proxy at ``host:port`` and the deployment on the attached Ray cluster.

    Returns the base URL once every replica has loaded its engine and answered its warm-up batch
    (``serve.run`` waits for the replicas' constructors). Ray must be initialised.
    """
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # lipdet prints its own start line
    logging_config = LoggingConfig(enable_access_log=options.log_requests, log_level="WARNING")
    serve.start(http_options=HTTPOptions(host=options.host, port=options.port), logging_config=logging_config)
    actor = {"num_gpus": 1, "num_cpus": 0} if options.device == "cuda" else {"num_cpus": 1}
    app = DetectorServer.options(
        num_replicas=options.replicas, ray_actor_options=actor, max_ongoing_requests=max(256, 4 * options.max_batch),
        logging_config=logging_config,
    ).bind(options)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return options.url
