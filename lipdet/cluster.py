"""The one way lipdet attaches to Ray: join a running cluster or start a local one for a call.

Ray is an optional heavy import: it is imported inside these functions, never at module top, so
importing lipdet (or running ``--help``) does not load it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from lipdet.errors import LipdetError

_QUIET = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
"""Ray's start-up options for lipdet: workers print nothing (progress and errors come back through
lipdet's own channels), and without the dashboard Ray Train's placement-group cleaner would flood
the console with "State API may be temporarily unavailable" warnings."""


def local_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast (one line, naming ``address``) when a ``HOST:PORT`` Ray address does not answer;
    ``auto`` and ``local`` pass (Ray resolves them)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LipdetError(f"address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise LipdetError(f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int = 1) -> Iterator[bool]:
    """Attach to Ray for the body: an initialised one, ``address`` / ``$RAY_ADDRESS``, or a new local one.

    Args:
        address: ``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``; None = ``$RAY_ADDRESS``, else local.
        num_cpus: the least CPU count a new local cluster declares (it declares all local cores when
            there are more).

    Yields True when this call started the cluster (and shuts it down on exit), False when it
    joined one that was already initialised in this process (left running).
    """
    import ray  # lazy: Ray is heavy and only the distributed paths need it

    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, **{k: v for k, v in _QUIET.items() if k != "include_dashboard"})
        else:  # "local": a new instance even when `ray start` runs on this machine (Ray would join that one)
            ray.init(address="local", num_cpus=max(local_cores(), int(num_cpus)), **_QUIET)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        where = f"at {address}" if address else "locally"
        raise LipdetError(f"cannot start or join Ray {where}: {first_line(e)}") from None
    try:
        yield True
    finally:
        ray.shutdown()


def user_error(err: BaseException) -> BaseException:
    """The :class:`LipdetError` inside a Ray task/actor error, as one line; ``err`` itself otherwise.

    Ray re-raises a remote exception as a ``RayTaskError`` subclass of the original class whose
    message is the remote traceback; the original exception is its ``cause``.
    """
    cur: BaseException | None = err
    for _ in range(8):
        if cur is None:
            break
        cause = getattr(cur, "cause", None)
        if isinstance(cause, BaseException) and cause is not cur:
            cur = cause
            continue
        if isinstance(cur, LipdetError):
            msg = cur.message.strip()
            return LipdetError(msg.splitlines()[0] if msg else "worker failed", cur.exit_code)
        cur = cur.__cause__
    return err
