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
batches handed out dynamically by a ``ray.util.ActorPool`` (a free worker takes the next batch). A worker asks for one CPU (or
the cluster's share if it has fewer CPUs than workers) and, when the evaluation runs on CUDA, one
GPU (or its share). An existing Ray connection is reused; otherwise a local cluster is started for
the call and shut down afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from lipdet.cluster import ray_session, user_error
from lipdet.errors import LipdetError


class _ShardWorker:
    """Ray actor body: one :class:`~lipdet.eval.evaluate.Evaluator` per worker process."""

    def __init__(self, model: Any, data_root: str, settings: Any, bounds: dict[str, Any] | None) -> None:
        from dataclasses import replace

        from lipdet.eval.evaluate import Evaluator

        self.ev = Evaluator(model, Path(data_root), replace(settings, workers=1, address=None), bounds=bounds)

    def ready(self) -> bool:
        return True

    def run(self, batch_id: int, indices: list[int]) -> tuple[int, list[Any]]:
        return batch_id, self.ev.run_batch(indices)


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
    import ray  # lazy: Ray is heavy and only sharded evaluation needs it
    import torch
    from ray.util import ActorPool

    workers = max(1, min(int(settings.workers), len(batches)))
    with ray_session(settings.address, num_cpus=workers):
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        use_gpu = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        gpus = float(resources.get("GPU", 0.0))
        if use_gpu and gpus <= 0:
            raise LipdetError("sharded workers on a CUDA device: the Ray cluster has no GPU")
        options: dict[str, Any] = {"num_cpus": min(1.0, cpus / workers)}
        if use_gpu:
            options["num_gpus"] = min(1.0, gpus / workers)
        actor_cls = ray.remote(_ShardWorker).options(**options)
        model_arg = str(model) if isinstance(model, (str, Path)) else model
        actors = [actor_cls.remote(model_arg, str(data_root), settings, bounds) for _ in range(workers)]
        results: dict[int, list[Any]] = {}
        try:
            ray.get([a.ready.remote() for a in actors])  # construction errors surface here
            jobs = list(enumerate([list(b) for b in batches]))
            # a free worker takes the next batch; results come back in completion order
            for bid, records in ActorPool(actors).map_unordered(lambda a, job: a.run.remote(*job), jobs):
                results[bid] = records
                if on_batch is not None:
                    on_batch(batches[bid])
        except Exception as e:  # a worker's LipdetError is the user's error, as one line
            err = user_error(e)
            if isinstance(err, LipdetError):
                raise err from None
            raise
        finally:
            for a in actors:
                ray.kill(a)
    out = [r for bid in sorted(results) for r in results[bid]]
    out.sort(key=lambda r: r.index)
    return out
