"""``lipdet serve``: the exported artifact behind an HTTP endpoint on Ray Serve.

Every refusal (bad option, missing or corrupt model, port in use) comes before Ray starts: the
model is loaded once here through the deploy backends, and the port is bound and released.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from lipdet.artifacts import artifact_kind
from lipdet.errors import LipdetError
from lipdet.runs import latest_run, runs_root

if TYPE_CHECKING:
    from lipdet.deploy.serve import ServeOptions


def resolve_served_model(spec: Optional[str]) -> Path:
    """The file to serve: ``spec`` as a ``.onnx`` / ``.plan`` path, a run name (its ``model.onnx``),
    or with no ``spec`` the latest run's ``model.onnx``. One-line LipdetError otherwise."""
    if spec is None:
        return _run_onnx(latest_run())
    path = Path(spec)
    if not path.exists() and path.parent == Path(".") and (runs_root() / spec).is_dir():
        return _run_onnx(runs_root() / spec)
    kind = artifact_kind(path)
    if kind == "checkpoint":
        raise LipdetError(f"{path} is a training checkpoint: serve its export (lipdet export {path}, then "
                          f"lipdet serve {path.with_suffix('.onnx')})")
    return path


def _run_onnx(run: Path) -> Path:
    onnx = run / "model.onnx"
    if not onnx.is_file():
        raise LipdetError(f"run {run.name} has no model.onnx yet: lipdet export {run / 'model.pt'}")
    return onnx


def command(
    model: Optional[str] = typer.Argument(
        None, help="model.onnx (fp32/fp16/int8), engine.plan, or a run name (its model.onnx). Default: the "
        "latest run's model.onnx.", show_default=False),
    replicas: int = typer.Option(1, "--replicas", help="Ray Serve replicas, one CPU (or GPU) each."),
    max_batch: int = typer.Option(64, "--max-batch", help="Most images per engine call (dynamic batching)."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="Longest wait of the oldest queued request "
                                        "for a batch to fill, while the engine is free (ms)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP proxy listens on (0.0.0.0: all)."),
    port: int = typer.Option(8000, "--port", help="HTTP port."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (HOST:6379, ray://HOST:10001; "
                                          "default $RAY_ADDRESS, else a local one).", show_default=False),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: what each replica runs on."),
    log_requests: bool = typer.Option(False, "--log-requests", help="Ray Serve's per-request access log."),
) -> None:
    """Serve a deployed model over HTTP on Ray Serve, with dynamic batching across requests.

    Endpoints: POST /v1/detect (PNG/JPEG of any size -> detections in its pixels, COCO bbox),
    POST /v1/infer (.npy float32 in [0,1] or uint8 N x 3 x S x S -> raw outputs, .npz), GET /v1/model (model card,
    sha256s), GET /v1/model/onnx (the ONNX twin), GET /healthz (ready after a warm-up batch).
    Ctrl-C stops the server.

    Examples:

      lipdet serve runs/latest/model.onnx

      lipdet serve model.int8.onnx --replicas 2 --max-batch 64 --batch-wait-ms 5 --port 8080

      lipdet serve engine.plan --device cuda --address HEAD:6379 --replicas 8 --host 0.0.0.0

      curl -s --data-binary @house.png http://127.0.0.1:8000/v1/detect
    """
    from lipdet.cluster import ray_session
    from lipdet.deploy.serve import ServeOptions, check_port_free, open_backend
    from lipdet.deploy.serve_env import serve_environment

    path = resolve_served_model(model)
    options = ServeOptions(model=path.resolve(), replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                           host=host, port=port, device=device, log_requests=log_requests).validate()
    check_port_free(host, port)
    backend = open_backend(options.model, device)  # a missing or corrupt model is refused before Ray starts
    serve_environment()
    with ray_session(address, num_cpus=replicas if device == "cpu" else 1):
        from ray import serve

        try:
            _deploy(options)
            typer.echo(options.start_line(backend))
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("lipdet serve: stopping", err=True)
        finally:
            serve.shutdown()


def _deploy(options: "ServeOptions") -> None:
    """:func:`lipdet.deploy.serve.deploy`, a deployment that cannot start (a replica failing on a node
    without the file or a GPU, the port taken meanwhile) as one line."""
    from lipdet.cluster import first_line
    from lipdet.deploy.serve import deploy

    try:
        deploy(options)
    except Exception as e:
        raise LipdetError(f"the deployment did not start: {first_line(e)[:300]}") from None
