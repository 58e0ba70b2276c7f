"""Shard an evaluation over Ray workers, with results identical to a single process.

Why the numbers do not depend on the worker count:

* the units of work are the engine's fixed batches of consecutive dataset indices
  (:meth:`lipdet.eval.evaluate.Evaluator.batches`), so every batch has the same composition
  whichever worker runs it;
* every random draw of an attack is seeded from the run seed and the image's dataset index
  (:func:`lipdet.eval.attacks.image_seed`), never from a shard or worker;
* workers return raw per-image records (ground truth, detections, losses, certificates); the driver
  sorts them by index and computes mAP once (:func:`lipdet.eval.evaluate.summarise`).

Each worker is a Ray actor that loads the backend, the twin and the dataset once, then processes
batches handed out dynamically (a free worker takes the next batch). A worker asks for one CPU (or
the cluster's share if it has fewer CPUs than workers) and, when the evaluation runs on CUDA, one
GPU (or its share). An existing Ray connection is reused; otherwise a local cluster is started for
the call and shut down afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from lipdet.errors import LipdetError


class _ShardWorker:
    """Ray actor body: one :class:`~lipdet.eval.evaluate.Evaluator` per worker process."""

    def __init__(self, model: Any, data_root: str, settings: Any, bounds: dict[str, Any] | None) -> None:
        from dataclasses import replace

        from lipdet.eval.evaluate import Evaluator

        self.ev = Evaluator(model, Path(data_root), replace(settings, workers=1), bounds=bounds)

    def ready(self) -> bool:
        return True

    def run(self, batch_id: int, indices: list[int]) -> tuple[int, list[Any]]:
        return batch_id, self.ev.run_batch(indices)


def _unwrap(err: BaseException) -> BaseException:
    """The user-facing error inside a Ray task/actor error, if there is one."""
    # Ray re-raises a task's exception as a RayTaskError subclass of the original class whose
    # message is the remote traceback; the original exception is its ``cause``.
    cur: BaseException | None = err
    for _ in range(8):
        if cur is None:
            break
        cause = getattr(cur, "cause", None)
        if isinstance(cause, BaseException) and cause is not cur:
            cur = cause
            continue
        if isinstance(cur, LipdetError):
            return LipdetError(cur.message.strip().splitlines()[0] if cur.message.strip() else "worker failed",
                               cur.exit_code)
        cur = cur.__cause__
    return err


def run_sharded(
    model: Any,
    data_root: str | Path,
    settings: Any,
    batches: Sequence[Sequence[int]],
    bounds: dict[str, Any] | None = None,
    on_batch: Callable[[Sequence[int]], None] | None = None,
) -> list[Any]:
    """Run :meth:`Evaluator.run_batch` for every batch on ``settings.workers`` Ray actors.

    Args:
        model: the artifact path (each worker loads its own backend and twin) or a picklable
            backend object.
        data_root: the dataset root every worker opens.
        settings: the :class:`~lipdet.eval.evaluate.EvalSettings` of the run.
        batches: the engine's batches of dataset indices.
        bounds: the driver's ``head_bounds`` of the twin (certificates), so workers skip recomputing them.
        on_batch: called on the driver with each finished batch (progress).

    Returns:
        All image records, sorted by dataset index.
    """
    import ray
    import torch

    workers = max(1, min(int(settings.workers), len(batches)))
    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=max(workers, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        started = True
    try:
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        use_gpu = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        gpus = float(resources.get("GPU", 0.0))
        if use_gpu and gpus <= 0:
            raise LipdetError("--workers with a CUDA device: the Ray cluster has no GPU")
        options: dict[str, Any] = {"num_cpus": min(1.0, cpus / workers)}
        if use_gpu:
            options["num_gpus"] = min(1.0, gpus / workers)
        actor_cls = ray.remote(_ShardWorker).options(**options)
        model_arg = str(model) if isinstance(model, (str, Path)) else model
        actors = [actor_cls.remote(model_arg, str(data_root), settings, bounds) for _ in range(workers)]
        try:
            ray.get([a.ready.remote() for a in actors])
        except Exception as e:  # construction failed in a worker: surface the user's error
            err = _unwrap(e)
            if isinstance(err, LipdetError):
                raise err from None
            raise

        queue = list(enumerate([list(b) for b in batches]))
        queue.reverse()
        pending: dict[Any, Any] = {}
        results: dict[int, list[Any]] = {}
        for a in actors:
            if queue:
                bid, idx = queue.pop()
                pending[a.run.remote(bid, idx)] = a
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor = pending.pop(ref)
            try:
                bid, records = ray.get(ref)
            except Exception as e:
                err = _unwrap(e)
                if isinstance(err, LipdetError):
                    raise err from None
                raise
            results[bid] = records
            if on_batch is not None:
                on_batch(batches[bid])
            if queue:
                nb, idx = queue.pop()
                pending[actor.run.remote(nb, idx)] = actor
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    out = [r for bid in sorted(results) for r in results[bid]]
    out.sort(key=lambda r: r.index)
    return out
