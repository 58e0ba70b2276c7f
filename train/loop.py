"""The per-worker training loop that every Ray Train worker runs.

One call of :func:`train_loop_per_worker` is one attempt of a training run on one worker:

* it builds the model and the data (its shard of the train split through a seeded
  ``DistributedSampler``, ``set_epoch`` each epoch), wraps the model for DDP with
  ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU) and the loader with
  ``prepare_data_loader`` (device placement);
* if Ray Train hands it a checkpoint (``ray.train.get_checkpoint()``: a worker died and the group was
  restarted, or ``lipdet train --resume``) it restores model, optimizer, scheduler and history and
  continues after the checkpoint's epoch;
* each epoch it trains, evaluates map_50 on the validation split (every rank predicts its slice, rank 0
  gathers the predictions and computes the metric), and every rank calls ``ray.train.report`` -- a
  barrier -- with rank 0 alone attaching a checkpoint.

A checkpoint is a folder holding :data:`STATE_FILE`, a ``torch.save`` of plain dicts and tensors that
``torch.load(weights_only=True)`` accepts (see :func:`load_train_state`).

Live progress goes to the driver through a small Ray actor (:class:`ProgressSink`) that rank 0 pushes
events to without waiting; the driver drains it. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import math
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lipdet.train.calibrate import learnt_temperature_heads

STATE_FILE = "train_state.pt"
STATE_FORMAT = "lipdet-train-state"
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
LOG_TEMPERATURE_CAP = math.log(1e4)
"""Upper bound on a learnt class temperature during training. Under the Lipschitz-margin loss the
temperature only grows (the margin follows it) -- 1e5-1e6 after 15-18 epochs, and ``exp`` would
overflow float32 in a run of ~100 epochs; past 1e4 the margin loss is a hard hinge on the
pre-temperature logits already. :mod:`lipdet.train.calibrate` refits it for the scores at the end."""


@dataclass
class LoopConfig:
    """Everything a worker needs, as plain JSON-able values (it travels in ``train_loop_config``).

    ``batch_size`` is the global batch: each of the N workers takes ``batch_size // N`` per step, so
    the optimisation does not change with the worker count.
    """

    arch: str = "naive"
    width: float = 1.0
    input_size: int = 74
    model_options: dict[str, Any] = field(default_factory=dict)
    data_root: str = ""
    synthetic: bool = True
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool | None = None  # None: see use_channels_last
    use_gpu: bool = False
    threads: int = 0  # torch threads per worker; 0 = cpu_count // workers on this node
    augment: bool = True
    train_limit: int = 0  # 0 = the whole train split
    val_limit: int = 0  # 0 = the whole validation (test) split
    progress_every_s: float = 1.0
    fault: str | None = None  # test hook "EPOCH:RANK:MARKER": SIGKILL once at that epoch's start
    run_name: str = ""
    margin_eps: float = 0.0  # Lipschitz-margin CE for this certified radius (0 = plain CE)
    margin_ramp: float = 0.5  # fraction of the steps over which the margin grows linearly from 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopConfig":
        """From a saved run description; keys this version does not have (e.g. ``loss_options``) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def use_channels_last(self) -> bool:
        """channels_last by default for bf16/fp16, and for fp32 on the CPU (oneDNN is ~1.4x faster)."""
        if self.channels_last is None:
            return self.precision != "fp32" or not self.use_gpu
        return bool(self.channels_last)

    @property
    def memory_format(self) -> torch.memory_format:
        """The model's and the images' memory format (see :attr:`use_channels_last`)."""
        return torch.channels_last if self.use_channels_last else torch.contiguous_format


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
    """A :class:`ProgressSink` actor handle (requires Ray to be initialised)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressSink).remote()


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


def load_split(cfg: LoopConfig, split: str, limit: int = 0):
    """The ``split`` of the run's dataset (``limit`` > 0 keeps its first ``limit`` images)."""
    from lipdet.data.dataset import SVHNDetection, resolve_data

    root = Path(cfg.data_root)
    if cfg.synthetic and not root.is_dir():
        # Another node of the cluster: make the embedded synthetic set in this node's cache.
        root = resolve_data(None)
    # The dataset keeps its crops in memory (uint8) and caches them on disk: items are cheap.
    base = SVHNDetection(root, split=split, input_size=cfg.input_size, seed=0)
    if 0 < limit < len(base):
        return torch.utils.data.Subset(base, range(limit))
    return base


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


# --------------------------------------------------------------------------------------------
# Schedule, checkpoint state
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.02) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


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
        import ray.train
        from ray.train.v2.api.report_config import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    except Exception:  # noqa: BLE001 - best effort; older Ray
        time.sleep(5)
    marker_path.write_text(f"killed rank {rank} at epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def train_margin(cfg: LoopConfig, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
    """The per-prior Lipschitz margin ``(P,)`` of training step ``step`` (0-based), or None.

    ``sqrt(2) * eps_t * tau_k`` for each prior's scale ``k`` (:meth:`TinierSSD.prior_temperatures`:
    for ``sll-spectral`` exactly the bound of input -> that prior's logits), with ``eps_t`` growing
    linearly from 0 to ``cfg.margin_eps`` over the first ``cfg.margin_ramp`` of the run: a full
    margin from the first step keeps every anchor background.
    """
    if cfg.margin_eps <= 0:
        return None
    from lipdet.loss import lipschitz_margin

    ramp = min(1.0, (step + 1) / max(1.0, cfg.margin_ramp * total_steps)) if cfg.margin_ramp > 0 else 1.0
    return lipschitz_margin(cfg.margin_eps * ramp, model.prior_temperatures())


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class TrainStep:
    """One optimisation step: autocast forward, MultiBox loss with the step's Lipschitz margin,
    (loss-scaled for fp16 on CUDA) backward, optimizer and scheduler step, learnt class
    temperatures kept below :data:`LOG_TEMPERATURE_CAP`.

    The Ray loop runs it on every worker, and ``scripts/gpu_check.py`` runs the very same object on
    a GPU without Ray, so a CUDA/fp16 step checked there is the step the workers take.

    Args:
        model: the model, possibly wrapped for DDP (the margin reads the unwrapped one's temperatures).
        device: where ``model`` lives; images move there in ``memory_format`` of
            :attr:`LoopConfig.use_channels_last`.
        total_steps: the run's steps (the margin ramp and the schedule are fractions of it).
    """

    def __init__(self, cfg: LoopConfig, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, device: torch.device, total_steps: int) -> None:
        self.cfg, self.model, self.raw = cfg, model, _unwrap(model)
        self.criterion, self.optimizer, self.scheduler = criterion, optimizer, scheduler
        self.device, self.total_steps = device, total_steps
        self.amp_dtype = cfg.autocast_dtype
        self.mem_format = cfg.memory_format
        use_scaler = self.amp_dtype is torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.log_temperatures = [h.log_temperature for _, h in learnt_temperature_heads(self.raw)]

    def autocast(self) -> torch.autocast:
        dtype = self.amp_dtype
        return torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def __call__(self, images: Tensor, targets: list[dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        """Train on ``images`` ``(N, 3, S, S)`` in [0, 1] and their targets (boxes in pixels) at
        0-based global ``step``; returns the loss terms (``loss``, ``loc``, ``cls``), still on the device."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.mem_format)
        with self.autocast():
            loc, logits = self.model(images)
        losses = self.criterion(loc, logits, targets,
                                cls_margin=train_margin(self.cfg, self.raw, step, self.total_steps))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(losses["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses["loss"].backward()
            self.optimizer.step()
        self.scheduler.step()
        if self.log_temperatures:
            with torch.no_grad():
                for p in self.log_temperatures:
                    p.clamp_(max=LOG_TEMPERATURE_CAP)
        return losses


def make_optimizer(cfg: LoopConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam over ``model``'s parameters, the fused kernel where torch has one for their device
    (CPU and CUDA: one pass over all parameters instead of a dozen ``foreach`` ops; on the 2-core
    CPU 1.2 ms instead of 3.5-4.8 ms a step for ``naive``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``).

    ``config`` is :meth:`LoopConfig.to_dict` plus ``"progress"``: an optional :class:`ProgressSink`
    actor handle.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from lipdet.loss import MultiBoxLoss
    from lipdet.models import build_model

    cfg = LoopConfig.from_dict(config)
    with contextlib.suppress(Exception):  # `kill -USR1 <worker pid>` prints its Python stacks to its log
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_world = max(1, ctx.get_local_world_size())
    threads = cfg.threads or default_threads(local_world)
    torch.set_num_threads(threads)
    emit = _Emitter(config.get("progress"), enabled=rank == 0)
    _seed_everything(cfg.seed)

    device = ray.train.torch.get_device()
    model = build_model(cfg.arch, width=cfg.width, input_size=cfg.input_size, **cfg.model_options)
    model_config = model.config.to_dict()
    priors = model.priors.detach().clone()
    criterion = MultiBoxLoss(priors, cfg.input_size).to(device)
    mem_format = cfg.memory_format
    model = model.to(device=device, memory_format=mem_format)

    train_ds = load_split(cfg, "train", cfg.train_limit)
    val_ds = load_split(cfg, "test", cfg.val_limit)
    if len(train_ds) == 0:
        raise RuntimeError("the train split is empty")
    per_worker = max(1, cfg.batch_size // world)
    # A DistributedSampler even for one worker: its order depends only on (seed, epoch), so a run
    # resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    shard = len(sampler)
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=per_worker,
        sampler=sampler,
        collate_fn=collate,
        drop_last=shard > per_worker,  # equal step counts on every rank; no 1-image tail batch
        num_workers=0,
    )
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    model = ray.train.torch.prepare_model(model)
    raw = _unwrap(model)

    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = len(loader)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    warmup = int(cfg.warmup_frac * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup))
    train_step = TrainStep(cfg, model, criterion, optimizer, scheduler, device, total_steps)
    scaler = train_step.scaler
    reduce_dtype = torch.float64

    start_epoch, history, resumed_from = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_train_state(folder)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        history = list(state.get("history") or [])
        resumed_from = start_epoch
    emit(
        "start",
        world_size=world,
        epochs=cfg.epochs,
        start_epoch=start_epoch,
        resumed_from=resumed_from,
        steps_per_epoch=steps_per_epoch,
        threads=threads,
        device=str(device),
        train_images=len(train_ds),
        val_images=len(val_ds),
    )

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        _maybe_fault(cfg.fault, epoch, rank)
        sampler.set_epoch(epoch)
        aug_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
        model.train()
        sums = torch.zeros(5, dtype=torch.float64)  # loss, loc, cls, batches, images
        t0 = last_emit = time.perf_counter()
        for step, (images, targets) in enumerate(loader, start=1):
            if cfg.augment:
                images, targets = augment_batch(images, targets, aug_gen)
            losses = train_step(images, targets, (epoch - 1) * steps_per_epoch + step - 1)
            sums += torch.tensor(
                [float(losses["loss"].detach()), float(losses["loc"].detach()), float(losses["cls"].detach()),
                 1.0, float(images.shape[0])],
                dtype=torch.float64,
            )
            now = time.perf_counter()
            if now - last_emit >= cfg.progress_every_s or step == steps_per_epoch:
                last_emit = now
                emit(
                    "step",
                    epoch=epoch,
                    step=step,
                    steps=steps_per_epoch,
                    loss=float(sums[0] / sums[3]),
                    images_per_s=float(sums[4]) * world / max(now - t0, 1e-9),
                )
        train_time = time.perf_counter() - t0
        if world > 1:
            reduced = sums.to(device=device, dtype=reduce_dtype)
            dist.all_reduce(reduced)
            sums = reduced.cpu().double()
        nb = max(1.0, float(sums[3]))
        images_seen = float(sums[4])
        max_time = torch.tensor([train_time], dtype=reduce_dtype, device=device)
        if world > 1:
            dist.all_reduce(max_time, op=dist.ReduceOp.MAX)
        train_time = float(max_time)

        t_val = time.perf_counter()
        val = evaluate(raw, val_ds, cfg, device, priors, rank, world, per_worker, mem_format)
        val_time = time.perf_counter() - t_val
        metrics = {
            "epoch": epoch,
            "epochs": cfg.epochs,
            "loss": float(sums[0]) / nb,
            "loc": float(sums[1]) / nb,
            "cls": float(sums[2]) / nb,
            "lr": float(scheduler.get_last_lr()[0]),
            "val_map_50": val["map_50"],
            "val_map": val["map"],
            "images_per_s": images_seen / max(train_time, 1e-9),
            "train_time_s": train_time,
            "val_time_s": val_time,
            "world_size": world,
            "threads_per_worker": threads,
            "resumed_from": resumed_from,
            "precision": cfg.precision,
        }
        history.append(metrics)
        emit("epoch", **metrics)
        if rank == 0:
            state = {
                "epoch": epoch,
                "model": {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "config": model_config,
                "train": cfg.to_dict(),
                "history": history,
                "metrics": metrics,
            }
            with tempfile.TemporaryDirectory(prefix="lipdet-ckpt-") as tmp:
                save_train_state(Path(tmp), state)
                ray.train.report(
                    metrics,
                    checkpoint=Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
                )
        else:
            ray.train.report(metrics)
        resumed_from = None
    emit("done", epochs=cfg.epochs)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    cfg: LoopConfig,
    device: torch.device,
    priors: Tensor,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 64,
    mem_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """map_50/map of ``model`` on ``dataset``; every rank predicts a slice, rank 0 computes.

    Returns the metrics on rank 0 and zeros elsewhere (only rank 0's report is kept by Ray).
    """
    import torch.distributed as dist

    from lipdet.metrics import DetectionMAP
    from lipdet.postprocess import postprocess

    was_training = model.training
    model.eval()
    mine = list(range(rank, len(dataset), world))
    preds_out: list[tuple[int, dict, dict]] = []
    amp_dtype = cfg.autocast_dtype
    bs = max(16, batch_size)
    for start in range(0, len(mine), bs):
        idx = mine[start : start + bs]
        items = [dataset[i] for i in idx]
        images = torch.stack([it[0] for it in items]).to(device).contiguous(memory_format=mem_format)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loc, logits = model(images)
        dets = postprocess(loc.float(), logits.float(), priors.to(device), cfg.input_size)
        for i, d, (_, t) in zip(idx, dets, items):
            preds_out.append(
                (
                    i,
                    {k: v.detach().cpu() for k, v in d.items()},
                    {"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()},
                )
            )
    if was_training:
        model.train()
    if world > 1:
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(preds_out, gathered, dst=0)
        if rank != 0:
            return {"map_50": 0.0, "map": 0.0}
        preds_out = [p for part in gathered or [] for p in part]
    preds_out.sort(key=lambda x: x[0])
    metric = DetectionMAP()  # computes locally: the other ranks are already waiting in report()
    if preds_out:
        metric.update([p[1] for p in preds_out], [p[2] for p in preds_out])
    res = metric.compute()
    return {"map_50": float(res["map_50"]), "map": float(res["map"])}


def default_threads(workers_on_node: int, cores: int | None = None) -> int:
    """Torch threads per worker: ``max(1, cores // workers)``."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers_on_node))


__all__: list[str] = [
    "LOG_TEMPERATURE_CAP",
    "LoopConfig",
    "PRECISIONS",
    "ProgressSink",
    "STATE_FILE",
    "TrainStep",
    "augment_batch",
    "default_threads",
    "evaluate",
    "load_split",
    "load_train_state",
    "lr_factor",
    "make_progress_sink",
    "save_train_state",
    "train_loop_per_worker",
    "train_margin",
]
