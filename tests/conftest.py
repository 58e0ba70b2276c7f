"""Shared fixtures.

``ray_cluster`` starts ONE local Ray cluster for the whole session (``num_cpus=2``, no dashboard);
every test that runs Ray Train workers (train and eval stages) requests it instead of calling
``ray.init`` itself. Starting a cluster costs seconds; worker groups come and go inside it.

``_private_lipdet_folders`` (automatic) gives the session an empty lipdet cache and runs folder.

``_quick_ray_train`` (automatic) sets :data:`RAY_TRAIN_ENV` for the session, so every Ray Train run
of the suite (in process, or a ``lipdet`` subprocess that inherits the environment) polls its
workers often and starts no metrics or preemption-watcher actors.

``tiny_svhn`` is a few dozen synthetic SVHN images in format 1 (``train/`` + ``test/``), made once
per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RAY_NUM_CPUS = 2
USER_PATH_ENV = ("LIPDET_CACHE", "LIPDET_RUNS")
"""Every folder lipdet writes to by default (data cache, TensorRT timing cache, runs), by variable."""
RAY_TRAIN_ENV = {
    # The controller polls its workers every 2 s by default: a run's start, each registered
    # checkpoint and its end wait for the next poll (seconds per run, a dozen runs in the suite).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Fewer helper actors per Ray Train run (each is a process start on 2 busy cores); the driver
    # passes RAY_TRAIN_* variables on to the Train controller.
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray Train's own knobs for the suite (none changes what a run computes or records)."""


@pytest.fixture(autouse=True, scope="session")
def _private_lipdet_folders(tmp_path_factory):
    """Point lipdet's cache and runs folders at this session's temporary folders, empty at start.

    The suite never reads or writes the user's ``~/.cache/lipdet`` or ``./runs``, and a step that
    only works with leftovers from an earlier run fails here as it would on a fresh machine. Set
    before any other fixture, so Ray workers started by the session inherit it too.
    """
    saved = {k: os.environ.get(k) for k in USER_PATH_ENV}
    for key in USER_PATH_ENV:
        os.environ[key] = str(tmp_path_factory.mktemp(key.lower().replace("_", "-")))
    yield
    _restore_env(saved)


def _restore_env(saved: dict[str, str | None]) -> None:
    """Put back the environment variables ``saved`` (``None``: it was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="session")
def _quick_ray_train():
    """:data:`RAY_TRAIN_ENV` for the session (a value already set in the environment wins)."""
    saved = {k: os.environ.get(k) for k in RAY_TRAIN_ENV}
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    yield
    _restore_env(saved)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread in the test process: small convs run faster and deterministically that way
    on a 2-core machine (Ray workers set their own thread counts)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray cluster (2 CPUs: two CPU workers fit). Yields ``ray``."""
    import ray

    if not ray.is_initialized():
        from lipdet.deploy.serve_env import serve_environment

        serve_environment()  # the Ray Serve settings `lipdet serve` starts its cluster with (the serve tests use them)
        ray.init(
            address="local",  # never a `ray start` cluster that another test or user runs on this machine
            num_cpus=RAY_NUM_CPUS,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
            namespace="lipdet-tests",
        )
        started = True
    else:  # pragma: no cover - someone initialised Ray before the fixture
        started = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_svhn(tmp_path_factory) -> Path:
    """A tiny SVHN format-1 folder: 40 train / 16 test synthetic images (seed 0)."""
    from lipdet.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny-svhn")
    synthesize(root, 40, 16, 0, progress=False)
    return root
