"""lipdet serve under closed-loop HTTP load on 127.0.0.1, beside the same backend called in process.

One run prints, side by side (images/s, and p50 / p99 latency per request in ms):

* ``in-process``: the ONNX Runtime backend exactly as a replica builds it (one intra-op thread),
  called back to back at batch ``--batch`` (latency = one call);
* ``serve, R replica(s)``: ``lipdet serve``'s deployment (``max_batch`` ``--batch``, ``--wait-ms``),
  loaded by ``--clients`` concurrent client threads, each sending its next request as soon as the
  previous one is answered: ``POST /v1/infer`` with ``--images`` images per request (what the
  batching target is about: clients x images fill one engine batch), one row per ``--dtypes`` body
  (uint8 pixels, as camera frames come, or float32 model inputs: four times the bytes), and ``POST /v1/detect`` with one
  PNG per request (decode, letterbox, post-processing and JSON included).

Load is bounded in time (``--seconds`` per row) and count (``--max-requests``); every request has a
30 s timeout. Target (issue #18, on a 2-core machine): 1 replica serves >= 70% of the in-process
throughput at batch 64 with p99 < 250 ms at 8 concurrent clients.

Usage::

    python benchmarks/serve.py                                  # naive, width 1, 74 px, random weights
    python benchmarks/serve.py --model runs/x/model.onnx --replicas 1 2 --seconds 15
"""

from __future__ import annotations

import argparse
import functools
import http.client
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


ROLES = ("replica", "proxy", "ray other", "client")
"""Where a served row's CPU goes: Ray Serve replicas, Ray Serve's HTTP proxy, every other process of the local
Ray cluster (raylet, GCS, controller, ...), and this process (the client threads)."""


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and its descendants, by :data:`ROLES` ({} without /proc)."""
    from lipdet.hardware import process_table

    tick = os.sysconf("SC_CLK_TCK")
    stats = {pid: (cmd, ppid, ticks / tick) for pid, (cmd, ppid, ticks) in process_table().items()}
    if not stats:
        return {}
    mine, grew = {os.getpid()}, True
    while grew:  # descendants: the local Ray cluster this process started
        new = {pid for pid, (_, ppid, _) in stats.items() if ppid in mine} - mine
        mine, grew = mine | new, bool(new)
    out = dict.fromkeys(ROLES, 0.0)
    for pid in mine & stats.keys():
        cmd, _, seconds = stats[pid]
        role = ("client" if pid == os.getpid() else "replica" if "ServeReplica" in cmd
                else "proxy" if "ProxyActor" in cmd else "ray other")
        out[role] += seconds
    return out


@dataclass
class Row:
    """One measured configuration: images/s, per-request latencies (seconds) and, for a served row, CPU
    milliseconds per image by :data:`ROLES`."""

    name: str
    images: int
    seconds: float
    latencies: list[float]
    failures: int = 0
    cpu_ms: dict[str, float] | None = None
    engine_batch: float | None = None
    """Mean images per engine call of the served replica (one-replica rows; from ``GET /healthz``)."""

    def line(self) -> str:
        lat = sorted(self.latencies) or [float("nan")]
        p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
        return (f"| {self.name:<38} | {self.images / self.seconds:>9.1f} | {1000 * statistics.median(lat):>8.1f} | "
                f"{1000 * p99:>8.1f} | {len(self.latencies):>8} | {self.failures:>5} |")


def export_model(arch: str, width: float, folder: Path) -> Path:
    """A randomly initialised ``arch`` exported to ONNX with its card (speed only)."""
    from lipdet.artifacts import make_card
    from lipdet.export.onnx_export import export_onnx_model, set_card
    from lipdet.io import write_bytes_atomic
    from lipdet.models import build_model, fold_model

    torch.manual_seed(0)
    model = build_model(arch, width=width).eval()
    s = model.config.input_size
    with torch.no_grad():
        model(torch.rand(2, 3, s, s))
    folded = fold_model(model)
    proto = export_onnx_model(folded, s)
    set_card(proto, make_card(folded, precision="fp32"))
    path = folder / "model.onnx"
    write_bytes_atomic(path, proto.SerializeToString())
    return path


def in_process(model: Path, batch: int, seconds: float) -> Row:
    from lipdet.deploy.serve import open_backend

    backend = open_backend(model, "cpu")
    x = torch.rand(batch, 3, backend.input_size, backend.input_size)
    backend(x)
    lat, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(lat) < 3:
        t0 = time.perf_counter()
        backend(x)
        lat.append(time.perf_counter() - t0)
    return Row(f"in-process ORT, batch {batch}", batch * len(lat), time.perf_counter() - start, lat)


def closed_loop(port: int, path: str, body: bytes, per_request: int, clients: int, seconds: float,
                max_requests: int, name: str) -> Row:
    """``clients`` threads POSTing ``body`` to ``path`` back to back (keep-alive), bounded in time and count."""
    lat: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < stop:
            with lock:
                if len(lat) + failures[0] >= max_requests:
                    return
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    failures[0] += 1
        conn.close()

    cpu0, start = cpu_by_role(), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu1, images = time.perf_counter() - start, cpu_by_role(), per_request * len(lat)
    cpu_ms = {k: 1000 * (cpu1[k] - cpu0[k]) / images for k in cpu1} if cpu1 and images else None
    return Row(name, images, seconds, lat, failures[0], cpu_ms)


def bodies(size: int, images: int, dtypes: list[str]) -> tuple[dict[str, bytes], bytes]:
    """``.npy`` bodies of ``images`` random inputs for /v1/infer per dtype (``float32`` in [0, 1], ``uint8``
    pixels) and one random PNG for /v1/detect."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (images, 3, size, size), dtype=np.uint8)
    npys = {}
    for dtype in dtypes:
        buf = io.BytesIO()
        np.save(buf, pixels if dtype == "uint8" else (pixels / 255.0).astype(np.float32))
        npys[dtype] = buf.getvalue()
    png = io.BytesIO()
    Image.fromarray(pixels[0].transpose(1, 2, 0)).save(png, "PNG")
    return npys, png.getvalue()


def with_engine_batch(port: int, measure) -> Row:
    """``measure()``'s row with the mean engine batch over it (call with one replica only)."""
    from lipdet.deploy.http_backend import engine_counts

    url = f"http://127.0.0.1:{port}"
    calls0, images0 = engine_counts(url)
    row = measure()
    calls1, images1 = engine_counts(url)
    row.engine_batch = (images1 - images0) / max(1, calls1 - calls0)
    return row


def served_rows(model: Path, replicas: int, args: argparse.Namespace, port: int) -> list[Row]:
    from ray import serve

    from lipdet.deploy.serve import ServeOptions, deploy, open_backend

    size = open_backend(model, "cpu").input_size
    npys, png = bodies(size, args.images, args.dtypes)
    deploy(ServeOptions(model=model.resolve(), replicas=replicas, max_batch=args.batch, batch_wait_ms=args.wait_ms,
                        port=port))
    try:
        closed_loop(port, "/v1/infer", npys[args.dtypes[0]], args.images, args.clients, 2.0, 10**6, "warm-up")
        label = f"{replicas} replica{'s' if replicas > 1 else ''}"

        def load(path: str, body: bytes, per_request: int, name: str) -> Row:
            run = functools.partial(closed_loop, port, path, body, per_request, args.clients, args.seconds,
                                    args.max_requests, f"serve {label}, {name}")
            return with_engine_batch(port, run) if replicas == 1 else run()

        return [*(load("/v1/infer", npy, args.images, f"/v1/infer {args.images} {dtype}/req") for dtype, npy in npys.items()),
                load("/v1/detect", png, 1, "/v1/detect 1 PNG/req")]
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help=".onnx to serve (default: a random naive model)")
    p.add_argument("--arch", default="naive")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64, help="max batch of the server and in-process batch")
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--images", type=int, default=8, help="images per /v1/infer request")
    p.add_argument("--dtypes", nargs="+", choices=("uint8", "float32"), default=["uint8", "float32"],
                   help="/v1/infer body dtypes, one row each: uint8 pixels (camera frames) or float32 model inputs")
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per row")
    p.add_argument("--max-requests", type=int, default=20000, help="request cap per row")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args(argv)
    for name in ("batch", "clients", "images", "max_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    from lipdet.cluster import local_cores, ray_session
    from lipdet.hardware import machine

    print(machine().line())
    with tempfile.TemporaryDirectory(prefix="lipdet-bench-") as tmp:
        model = args.model or export_model(args.arch, args.width, Path(tmp))
        print(f"{model.name}: clients {args.clients}, batch {args.batch}, wait {args.wait_ms:g} ms, "
              f"{args.seconds:g} s per row, {local_cores()} cores")
        rows = [in_process(model, args.batch, args.seconds), in_process(model, args.images, args.seconds)]
        from lipdet.deploy.serve_env import serve_environment

        serve_environment()  # lipdet serve's Ray Serve settings, before the local cluster starts
        with ray_session(None, num_cpus=max(args.replicas)):
            for r in args.replicas:
                rows += served_rows(model, r, args, args.port)
    print(f"| {'configuration':<38} | {'images/s':>9} | {'p50 ms':>8} | {'p99 ms':>8} | {'requests':>8} | "
          f"{'fails':>5} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 7}|")
    for row in rows:
        print(row.line())
    served = [r for r in rows if r.cpu_ms]
    if served:
        print(f"\nCPU ms per image ({', '.join(ROLES)}; total over the machine's cores):")
        for row in served:
            parts = "  ".join(f"{k} {v:.2f}" for k, v in row.cpu_ms.items())
            batch = f"  (engine batch {row.engine_batch:.1f} images)" if row.engine_batch is not None else ""
            print(f"  {row.name:<38} {parts}  total {sum(row.cpu_ms.values()):.2f}{batch}")
    for one in (r for r in rows if r.name.startswith("serve 1 replica,") and "/v1/infer" in r.name):
        share = (one.images / one.seconds) / (rows[0].images / rows[0].seconds)
        p99 = sorted(one.latencies)[int(round(0.99 * (len(one.latencies) - 1)))] if one.latencies else float("nan")
        met = share >= 0.7 and p99 < 0.25
        print(f"target (1 replica >= 70% of in-process at batch {args.batch}, p99 < 250 ms at {args.clients} "
              f"clients), {one.name.split(', ')[1]}: {100 * share:.0f}%, p99 {1000 * p99:.0f} ms -> {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
