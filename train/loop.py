"""The per-worker training loop that every Ray Train worker runs.

One call of :func:`train_loop_per_worker` is one attempt of a training run on one worker:

* :func:`setup_worker`: its shard of the training images (the train split less the validation
  images of :class:`lipdet.data.split.ValSplit`, :func:`load_parts`) through a seeded
  ``DistributedSampler`` (``set_epoch`` each epoch), the loader through
  ``ray.train.torch.prepare_data_loader`` (device placement), and the recipe
  (:func:`lipdet.train.recipe.build_training`) with the model wrapped for DDP by
  ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU);
* :func:`restore_checkpoint`: if Ray Train hands it a checkpoint (``ray.train.get_checkpoint()``: a
  worker died and the group was restarted, or ``lipdet train --resume``) it restores model,
  optimizer, scheduler and history and continues after the checkpoint's epoch;
* each epoch :func:`train_epoch`, then :func:`evaluate` (map_50 on the validation images held out
  of the train split, never the test split: every rank predicts its slice, rank 0 gathers the
  predictions and computes the metric), then :func:`report_epoch`: every rank calls
  ``ray.train.report`` -- a barrier -- with rank 0 alone attaching a checkpoint.

A checkpoint is a folder holding :data:`STATE_FILE`, a ``torch.save`` of plain dicts and tensors that
``torch.load(weights_only=True)`` accepts (see :func:`load_train_state`).

Live progress goes to the driver through a small Ray actor (:class:`ProgressSink`) that rank 0 pushes
events to without waiting; the driver drains it. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lipdet.cluster import local_cores
from lipdet.data.dataset import SVHNDetection, carve_validation, resolve_data
from lipdet.metrics import DetectionMAP, detections_of
from lipdet.train.recipe import (
    LOG_TEMPERATURE_CAP,
    PRECISIONS,
    LoopConfig,
    Training,
    TrainStep,
    build_training,
    lr_factor,
    make_optimizer,
    train_margin,
)

STATE_FILE = "train_state.pt"
STATE_FORMAT = "lipdet-train-state"
# --------------------------------------------------------------------------------------------
# Progress: rank 0 -> driver
# --------------------------------------------------------------------------------------------


class ProgressSink:
    """A mailbox actor: rank 0 ``push``-es events (fire and forget), the driver ``drain``-s them.

    Use it through :func:`make_progress_sink`, which wraps it as a zero-CPU Ray actor so it never
    takes a worker's CPU slot.
    """

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self._events = self._events, []
        return out


def make_progress_sink():
    """A :class:`ProgressSink` actor handle (requires Ray to be initialised), on the driver's node:
    on a cluster, losing another node must not lose the progress channel with it."""
    import ray  # lazy: Ray is heavy / optional
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(ProgressSink).options(scheduling_strategy=here).remote()


class _Emitter:
    """Rank 0's side of the progress channel; silent on other ranks or without a sink."""

    def __init__(self, sink: Any, enabled: bool) -> None:
        self._sink = sink if enabled else None

    def __call__(self, kind: str, **payload: Any) -> None:
        if self._sink is None:
            return
        try:
            self._sink.push.remote({"kind": kind, "time": time.time(), **payload})
        except Exception:  # the driver went away: progress is best effort
            self._sink = None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def collate(batch):
    """``(images (N,3,S,S), [{"boxes", "labels"}])``: only tensors in the targets.

    ``prepare_data_loader`` moves every leaf of a batch to the device and logs a debug line for
    each leaf that is not a tensor (names, ids): dropping them keeps that per-item cost out of
    the step.
    """
    images = torch.stack([b[0] for b in batch])
    return images, [{"boxes": b[1]["boxes"], "labels": b[1]["labels"]} for b in batch]


PARTS: tuple[str, ...] = ("train", "val")
"""What a run reads of its data: the train split's training images and its validation images."""


def load_parts(cfg: LoopConfig) -> tuple[torch.utils.data.Subset, torch.utils.data.Subset]:
    """``(training images, validation images)`` of the run's train split, by ``cfg.validation``
    (:func:`lipdet.data.dataset.carve_validation`: disjoint, the same on every worker). The test
    split is never read here."""
    root = Path(cfg.data_root)
    if cfg.synthetic and not root.is_dir():
        # Another node of the cluster: make the embedded synthetic set in this node's cache.
        root = resolve_data(None)
    # The dataset keeps its crops in memory (uint8) and caches them on disk: items are cheap.
    base = SVHNDetection(root, split="train", input_size=cfg.input_size, seed=0)
    return carve_validation(base, cfg.validation)


def first(dataset: torch.utils.data.Dataset, limit: int) -> torch.utils.data.Dataset:
    """The first ``limit`` items of ``dataset`` (all of it when ``limit`` <= 0)."""
    return torch.utils.data.Subset(dataset, range(limit)) if 0 < limit < len(dataset) else dataset


def load_split(cfg: LoopConfig, part: str, limit: int = 0) -> torch.utils.data.Dataset:
    """One part (``"train"`` or ``"val"``, see :func:`load_parts`) of the run's data, its first
    ``limit`` images when ``limit`` > 0."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS} (a run never reads the test split), got {part!r}")
    return first(load_parts(cfg)[PARTS.index(part)], limit)


def validation_record(cfg: LoopConfig) -> dict[str, Any]:
    """The run's validation split as a checkpoint records it (:meth:`lipdet.data.split.ValSplit.record`)."""
    base = SVHNDetection(Path(cfg.data_root), split="train", input_size=cfg.input_size, seed=0)
    return cfg.validation.record([r.name for r in base.records])


def augment_batch(images: Tensor, targets: list[dict[str, Tensor]], gen: torch.Generator) -> tuple[Tensor, list]:
    """Cheap, label-preserving augmentation on a batch (no flips: digits are not symmetric).

    * photometric: per-image contrast and brightness, per-channel gain, and a random colour
      inversion (house numbers come both light-on-dark and dark-on-light);
    * geometric: a random zoom-out (shrink by up to 25% and paste at a random offset on the image's
      mean colour), boxes scaled and shifted with it.
    """
    n, _, s, _ = images.shape
    dev = images.device
    r = torch.rand(n, 6, generator=gen).to(dev)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (0.6 + 0.8 * r[:, 0]).view(n, 1, 1, 1)
    bright = (r[:, 1] - 0.5).view(n, 1, 1, 1) * 0.3
    gain = 0.85 + 0.3 * torch.rand(n, 3, 1, 1, generator=gen).to(dev)
    out = ((images - mean) * contrast + mean + bright) * gain
    invert = (r[:, 2] < 0.25).view(n, 1, 1, 1)
    out = torch.where(invert, 1.0 - out, out).clamp_(0.0, 1.0)

    new_targets = []
    zoom = r[:, 3] < 0.5
    for i in range(n):
        t = targets[i]
        if not bool(zoom[i]):
            new_targets.append(t)
            continue
        scale = 0.75 + 0.25 * float(r[i, 4])
        side = max(8, int(round(s * scale)))
        off_x = int(float(r[i, 5]) * (s - side))
        off_y = int(float(torch.rand(1, generator=gen)) * (s - side))
        small = torch.nn.functional.interpolate(out[i : i + 1], size=(side, side), mode="bilinear", align_corners=False)
        canvas = out[i : i + 1].mean(dim=(2, 3), keepdim=True).expand(1, 3, s, s).clone()
        canvas[:, :, off_y : off_y + side, off_x : off_x + side] = small
        out[i] = canvas[0]
        k = side / s
        shift = torch.tensor([off_x, off_y, off_x, off_y], dtype=t["boxes"].dtype, device=t["boxes"].device)
        boxes = t["boxes"] * k + shift
        new_targets.append({**t, "boxes": boxes})
    return out, new_targets



def make_train_loader(
    dataset: torch.utils.data.Dataset, cfg: LoopConfig, rank: int, world: int
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DistributedSampler, int]:
    """This rank's loader over ``dataset``, its sampler and the per-worker batch ``batch_size // world``.

    A DistributedSampler even for one worker: its order depends only on (seed, epoch), so a run
    resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
    """
    per_worker = max(1, cfg.batch_size // world)
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    shard = len(sampler)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=per_worker,
        sampler=sampler,
        collate_fn=collate,
        drop_last=shard > per_worker,  # equal step counts on every rank; no 1-image tail batch
        num_workers=0,
    )
    return loader, sampler, per_worker


# --------------------------------------------------------------------------------------------
# Checkpoint state
# --------------------------------------------------------------------------------------------


def save_train_state(folder: Path, state: dict[str, Any]) -> Path:
    """Write a training checkpoint's state into ``folder`` (plain dicts and tensors only)."""
    path = Path(folder) / STATE_FILE
    torch.save({"format": STATE_FORMAT, "version": 1, **state}, path)
    return path


def load_train_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint folder's state with ``weights_only=True``."""
    path = Path(folder) / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a lipdet training state")
    return state


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _maybe_fault(spec: str | None, epoch: int, rank: int) -> None:
    """Test hook: ``EPOCH:RANK:MARKER`` kills this worker (SIGKILL) once, at the start of EPOCH."""
    if not spec:
        return
    at_epoch, at_rank, marker = spec.split(":", 2)
    if epoch != int(at_epoch) or rank != int(at_rank):
        return
    marker_path = Path(marker)
    if marker_path.exists():
        return
    # Die only once the previous epoch's checkpoint is committed: Ray Train registers reports when
    # its controller next polls the workers, and a crash right after report() can beat that poll.
    try:
        import ray.train  # lazy: Ray is heavy / optional
        from ray.train.v2.api.report_config import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    except Exception:  # noqa: BLE001 - best effort; older Ray
        time.sleep(5)
    marker_path.write_text(f"killed rank {rank} at epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Worker:
    """One Ray Train worker's share of a run: its place in the group, its data and its recipe."""

    cfg: LoopConfig
    rank: int
    world: int
    threads: int  # torch threads
    device: torch.device
    emit: _Emitter
    train_ds: torch.utils.data.Dataset
    val_ds: torch.utils.data.Dataset
    sampler: torch.utils.data.DistributedSampler
    loader: Any  # the prepared DataLoader: batches on ``device``
    per_worker: int  # this rank's batch
    training: Training
    validation: str  # "validation (N images held out of train, seed S)": metrics and curves say it

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``).

    ``config`` is :meth:`LoopConfig.to_dict` plus ``"progress"``: an optional :class:`ProgressSink`
    actor handle.
    """
    cfg = LoopConfig.from_dict(config)
    with contextlib.suppress(Exception):  # `kill -USR1 <worker pid>` prints its Python stacks to its log
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    worker = setup_worker(cfg, config.get("progress"))
    start_epoch, history, resumed_from = restore_checkpoint(worker.training)
    worker.emit(
        "start",
        world_size=worker.world,
        epochs=cfg.epochs,
        start_epoch=start_epoch,
        resumed_from=resumed_from,
        steps_per_epoch=worker.steps_per_epoch,
        threads=worker.threads,
        device=str(worker.device),
        train_images=len(worker.train_ds),
        val_images=len(worker.val_ds),
        validation=worker.validation,
    )
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        _maybe_fault(cfg.fault, epoch, worker.rank)
        started = time.time()
        train = train_epoch(worker, epoch)
        t_val = time.perf_counter()
        val = evaluate(worker.training.raw, worker.val_ds, cfg, worker.device, worker.training.priors,
                       worker.rank, worker.world, worker.per_worker, cfg.memory_format)
        metrics = epoch_metrics(worker, epoch, train, val, time.perf_counter() - t_val, resumed_from)
        metrics.update(epoch_start_unix_s=started, epoch_end_unix_s=time.time())  # benchmarks' CPU window
        history.append(metrics)
        worker.emit("epoch", **metrics)
        report_epoch(worker, epoch, metrics, history)
        resumed_from = None
    worker.emit("done", epochs=cfg.epochs)


def setup_worker(cfg: LoopConfig, progress_sink: Any = None) -> Worker:
    """This worker's rank, torch threads, device, data (its shard, prepared by Ray Train) and recipe
    (the model DDP-wrapped by ``prepare_model``)."""
    import ray.train.torch  # lazy: Ray is heavy / optional

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.threads or default_threads(max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable once, before any inter-op work (a restarted actor: done)
        torch.set_num_interop_threads(threads)
    device = ray.train.torch.get_device()
    train_all, val_all = load_parts(cfg)
    train_ds, val_ds = first(train_all, cfg.train_limit), first(val_all, cfg.val_limit)
    if len(train_ds) == 0:
        raise RuntimeError("no training images (the train split less the validation images)")
    loader, sampler, per_worker = make_train_loader(train_ds, cfg, rank, world)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    training = build_training(cfg, device, total_steps=max(1, len(loader) * cfg.epochs),
                              wrap=ray.train.torch.prepare_model)
    return Worker(cfg=cfg, rank=rank, world=world, threads=threads, device=device,
                  emit=_Emitter(progress_sink, enabled=rank == 0), train_ds=train_ds, val_ds=val_ds,
                  sampler=sampler, loader=loader, per_worker=per_worker, training=training,
                  validation=cfg.validation.describe(len(val_all), len(val_ds)))


def restore_checkpoint(training: Training) -> tuple[int, list[dict[str, Any]], int | None]:
    """Restore the checkpoint Ray Train hands this attempt, if any.

    Returns ``(epochs done, history, resumed_from)``: ``(0, [], None)`` for a fresh start, else the
    checkpoint's epoch twice and its history.
    """
    import ray.train  # lazy: Ray is heavy / optional

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, [], None
    with checkpoint.as_directory() as folder:
        state = load_train_state(folder)
    training.load_state_dict(state)
    start_epoch = int(state["epoch"])
    return start_epoch, list(state.get("history") or []), start_epoch


def train_epoch(worker: Worker, epoch: int) -> dict[str, float]:
    """Train one epoch (1-based ``epoch``) on this rank's shard; rank 0 emits step progress.

    Returns the group's ``loss``, ``loc``, ``cls`` (means over every rank's batches),
    ``images_per_s`` (all ranks' images over the slowest rank's time), ``train_time_s`` and
    ``data_time_s`` (the ranks' mean time waiting for batches and augmenting them: what the step
    never overlaps with, so a data loader that starves the step shows here).
    """
    cfg, steps = worker.cfg, worker.steps_per_epoch
    worker.sampler.set_epoch(epoch)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + worker.rank)
    worker.training.model.train()
    sums = torch.zeros(6, dtype=torch.float64)  # loss, loc, cls, batches, images, data seconds
    t0 = last_emit = t_data = time.perf_counter()
    for step, (images, targets) in enumerate(worker.loader, start=1):
        if cfg.augment:
            images, targets = augment_batch(images, targets, aug_gen)
        data_s = time.perf_counter() - t_data
        losses = worker.training.step(images, targets, (epoch - 1) * steps + step - 1)
        sums += torch.tensor(
            [float(losses["loss"].detach()), float(losses["loc"].detach()), float(losses["cls"].detach()),
             1.0, float(images.shape[0]), data_s],
            dtype=torch.float64,
        )
        now = t_data = time.perf_counter()
        if now - last_emit >= cfg.progress_every_s or step == steps:
            last_emit = now
            worker.emit("step", epoch=epoch, step=step, steps=steps, loss=float(sums[0] / sums[3]),
                        images_per_s=float(sums[4]) * worker.world / max(now - t0, 1e-9))
    sums, train_time = _reduce_over_ranks(sums, time.perf_counter() - t0, worker.world, worker.device)
    nb = max(1.0, float(sums[3]))
    return {"loss": float(sums[0]) / nb, "loc": float(sums[1]) / nb, "cls": float(sums[2]) / nb,
            "images_per_s": float(sums[4]) / max(train_time, 1e-9), "train_time_s": train_time,
            "data_time_s": float(sums[5]) / worker.world}


def _reduce_over_ranks(sums: Tensor, train_time: float, world: int, device: torch.device) -> tuple[Tensor, float]:
    """The group's sum of every rank's ``sums`` ``(6,)`` float64 and the slowest rank's ``train_time`` (s)."""
    if world > 1:
        reduced = sums.to(device=device, dtype=torch.float64)
        dist.all_reduce(reduced)
        sums = reduced.cpu().double()
    max_time = torch.tensor([train_time], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(max_time, op=dist.ReduceOp.MAX)
    return sums, float(max_time)


def epoch_metrics(worker: Worker, epoch: int, train: dict[str, float], val: dict[str, float], val_time: float,
                  resumed_from: int | None) -> dict[str, Any]:
    """The epoch's record (``metrics.jsonl``, ``ray.train.report``, the checkpoint's history)."""
    return {
        "epoch": epoch,
        "epochs": worker.cfg.epochs,
        "loss": train["loss"],
        "loc": train["loc"],
        "cls": train["cls"],
        "lr": float(worker.training.scheduler.get_last_lr()[0]),
        "val_map_50": val["map_50"],
        "val_map": val["map"],
        "validation": worker.validation,
        "images_per_s": train["images_per_s"],
        "train_time_s": train["train_time_s"],
        "data_time_s": train["data_time_s"],
        "val_time_s": val_time,
        "world_size": worker.world,
        "workers": worker.world,  # the workers that trained this epoch (an elastic run's count changes)
        "threads_per_worker": worker.threads,
        "resumed_from": resumed_from,
        "precision": worker.cfg.precision,
    }


def report_epoch(worker: Worker, epoch: int, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """``ray.train.report`` the epoch on every rank (a barrier); rank 0 attaches the checkpoint."""
    import ray.train  # lazy: Ray is heavy / optional

    if worker.rank != 0:
        ray.train.report(metrics)
        return
    state = {
        "epoch": epoch,
        **worker.training.state_dict(),
        "config": worker.training.model_config,
        "train": worker.cfg.to_dict(),
        "history": history,
        "metrics": metrics,
    }
    with tempfile.TemporaryDirectory(prefix="lipdet-ckpt-") as tmp:
        save_train_state(Path(tmp), state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
        )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _runner(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
            mem_format: torch.memory_format) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``images (N, 3, S, S) -> (loc (N, P, 4), logits (N, P, C))`` of ``model`` on ``device``, autocast."""

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(device).contiguous(memory_format=mem_format)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model(images)

    return run


def _batches(dataset: torch.utils.data.Dataset, indices: Sequence[int], size: int
             ) -> Iterator[tuple[Tensor, list[dict[str, Tensor]]]]:
    """``(images (n, 3, S, S), targets)`` of ``dataset[indices]``, ``size`` items at a time (CPU)."""
    for start in range(0, len(indices), size):
        items = [dataset[i] for i in indices[start : start + size]]
        yield torch.stack([it[0] for it in items]), [it[1] for it in items]


def _gather_on_rank0(preds: list[Any], rank: int, world: int) -> list[Any] | None:
    """Every rank's ``preds`` concatenated on rank 0 (None on the other ranks)."""
    if world == 1:
        return preds
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(preds, gathered, dst=0)
    if rank != 0:
        return None
    return [p for part in gathered or [] for p in part]


@torch.no_grad()
def validation_detections(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: LoopConfig,
    device: torch.device,
    priors: Tensor,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 64,
    mem_format: torch.memory_format = torch.contiguous_format,
) -> list[tuple[int, dict[str, Tensor], dict[str, Tensor]]] | None:
    """``(index, detections, target)`` of every image of ``dataset``, in index order, on rank 0 (None elsewhere).

    Every rank predicts its slice (images ``rank, rank + world, ...``: all cores work) in batches of
    ``max(16, batch_size)``; the forward runs on ``device`` under the config's autocast, the
    post-processing on the CPU (:func:`lipdet.metrics.detections_of`: boxes in pixels), and rank 0
    gathers the slices over the process group.
    """
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(dataset), world))
    run = _runner(model, device, cfg.autocast_dtype, mem_format)
    pairs = list(detections_of(run, _batches(dataset, mine, max(16, batch_size)), priors, cfg.input_size))
    model.train(was_training)
    preds = _gather_on_rank0([(i, det, target) for i, (det, target) in zip(mine, pairs)], rank, world)
    return None if preds is None else sorted(preds, key=lambda x: x[0])


def evaluate(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: LoopConfig,
    device: torch.device,
    priors: Tensor,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 64,
    mem_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """map_50/map of ``model`` on ``dataset``: the ranks share the forward
    (:func:`validation_detections`), rank 0 computes the metric once.

    ``priors`` ``(P, 4)`` normalised ``(cx, cy, w, h)``. Returns the metrics (in [0, 1]) on rank 0
    and zeros elsewhere (only rank 0's report is kept by Ray); they do not depend on ``world``.
    """
    preds = validation_detections(model, dataset, cfg, device, priors, rank, world, batch_size, mem_format)
    if preds is None:
        return {"map_50": 0.0, "map": 0.0}
    metric = DetectionMAP()  # computes locally: the other ranks are already waiting in report()
    if preds:
        metric.update([p[1] for p in preds], [p[2] for p in preds])
    res = metric.compute()
    return {"map_50": float(res["map_50"]), "map": float(res["map"])}


def default_threads(workers_on_node: int, cores: int | None = None) -> int:
    """Torch threads per worker: ``max(1, cores // workers)`` (``cores``: this process's CPU affinity)."""
    if cores is None:
        cores = local_cores()
    return max(1, cores // max(1, workers_on_node))


__all__: list[str] = [
    "LOG_TEMPERATURE_CAP",
    "LoopConfig",
    "PARTS",
    "PRECISIONS",
    "ProgressSink",
    "STATE_FILE",
    "TrainStep",
    "Worker",
    "augment_batch",
    "collate",
    "default_threads",
    "evaluate",
    "first",
    "load_parts",
    "load_split",
    "load_train_state",
    "lr_factor",
    "make_optimizer",
    "make_progress_sink",
    "make_train_loader",
    "save_train_state",
    "train_loop_per_worker",
    "train_margin",
    "validation_detections",
    "validation_record",
]
