"""Shared fixtures.

``ray_cluster`` starts ONE local Ray cluster for the whole session (``num_cpus=2``, no dashboard);
every test that runs Ray Train workers (train and eval stages) requests it instead of calling
``ray.init`` itself. Starting a cluster costs seconds; worker groups come and go inside it.

``tiny_svhn`` is a few dozen synthetic SVHN images in format 1 (``train/`` + ``test/``), made once
per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RAY_NUM_CPUS = 2


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
        # Fewer helper actors per Ray Train run (each is a process start on 2 busy cores); the
        # driver passes RAY_TRAIN_* variables on to the Train controller.
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(
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
