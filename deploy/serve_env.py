"""The Ray Serve settings ``lipdet serve`` starts its cluster with.

A module of its own, free of Ray and FastAPI imports, so that whoever starts a local Ray cluster for serving
(``lipdet serve``, ``benchmarks/serve.py``, the test session's cluster) can set them first without paying for
:mod:`lipdet.deploy.serve`'s imports.
"""

from __future__ import annotations

import os

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}
"""Ray Serve settings ``lipdet serve`` runs with: the request-path part of Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED``
(handlers on the replica's own event loop, buffered request-path logs, gRPC from proxy to replica), without its
direct ingress (replicas listening on their own ports, no proxy), which would change what ``--host``/``--port`` mean.
Measured with ``benchmarks/serve.py`` (1 replica, 8 clients x 8 uint8 images, interleaved with Ray's defaults on an
idle 2-core Intel Xeon): p99 286-293 -> 247-256 ms and 9-15% less CPU per image, most of it in the proxy and Ray's
own processes (README, Benchmarks). Read by Ray's processes when they start:
:func:`serve_environment` sets them before a local cluster starts; a cluster joined with ``--address`` keeps its own."""


def serve_environment() -> None:
    """Put :data:`SERVE_ENV` into this process's environment (a value the user set wins), so that the processes
    of a local Ray cluster started afterwards (proxy, replicas) inherit it."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
