"""The training recipe: what a lipdet detector trains with, built one way for every caller.

:func:`build_training` turns a :class:`LoopConfig` into a :class:`Training`: the model (seeded
initial weights, the run's memory format, optionally wrapped for DDP), the MultiBox loss, fused Adam,
the warm-up + cosine schedule and the :class:`TrainStep` that combines them (autocast, GradScaler for
fp16 on CUDA, the Lipschitz margin, the temperature cap). The Ray Train workers
(:func:`lipdet.train.loop.train_loop_per_worker`), ``scripts/cert_sweep.py``, ``scripts/gpu_check.py``
and ``benchmarks/train_throughput.py`` all train what it builds, so a step measured by one of them is
the step the others take.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from lipdet.data.split import ValSplit
from lipdet.loss import MultiBoxLoss, lipschitz_margin
from lipdet.models import build_model
from lipdet.train.calibrate import learnt_temperature_heads

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
    the optimisation does not change with the worker count. The run trains on the train split less
    the validation images of ``val_split`` and validates on those; it never reads the test split.
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
    train_limit: int = 0  # 0 = every training image (the train split less the validation images)
    val_limit: int = 0  # 0 = every validation image
    val_split: dict[str, Any] = field(default_factory=lambda: ValSplit().to_dict())  # ValSplit.to_dict()
    progress_every_s: float = 1.0
    fault: str | None = None  # test hook "EPOCH:RANK:MARKER": SIGKILL once at that epoch's start
    run_name: str = ""
    margin_eps: float = 0.0  # Lipschitz-margin CE for this certified radius (0 = plain CE)
    margin_ramp: float = 0.5  # fraction of the steps over which the margin grows linearly from 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopConfig":
        """From a saved run description; keys this version does not have (e.g. ``loss_options`` of an
        older run's ``train.json``, which nothing reads any more) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def validation(self) -> ValSplit:
        """The validation images held out of the train split (:class:`lipdet.data.split.ValSplit`)."""
        return ValSplit.from_dict(self.val_split)

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
# Schedule, optimizer, margin
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.02) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class Schedule:
    """The run's length in optimizer steps, which the lr schedule and the margin ramp read.

    Mutable on purpose: ``scripts/cert_sweep.py`` fixes its epoch count after timing the first
    epoch (:meth:`Training.set_total_steps`).
    """

    total_steps: int
    warmup_steps: int


def warmup_cosine(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a ``LambdaLR`` that reads ``schedule`` at every step.

    The factor is a plain function (not a callable object), so the scheduler's ``state_dict`` holds
    no copy of the schedule and a resumed run with more epochs follows its new length.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule.total_steps, schedule.warmup_steps)
    )


def make_optimizer(cfg: LoopConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam over ``model``'s parameters, the fused kernel where torch has one for their device
    (CPU and CUDA: one pass over all parameters instead of a dozen ``foreach`` ops; on the 2-core
    CPU 1.2 ms instead of 3.5-4.8 ms a step for ``naive``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_margin(cfg: LoopConfig, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
    """The per-prior Lipschitz margin ``(P,)`` of training step ``step`` (0-based), or None.

    ``sqrt(2) * eps_t * tau_k`` for each prior's scale ``k`` (:meth:`TinierSSD.prior_temperatures`:
    for ``sll-spectral`` exactly the bound of input -> that prior's logits), with ``eps_t`` growing
    linearly from 0 to ``cfg.margin_eps`` over the first ``cfg.margin_ramp`` of the run: a full
    margin from the first step keeps every anchor background.
    """
    if cfg.margin_eps <= 0:
        return None
    ramp = min(1.0, (step + 1) / max(1.0, cfg.margin_ramp * total_steps)) if cfg.margin_ramp > 0 else 1.0
    return lipschitz_margin(cfg.margin_eps * ramp, model.prior_temperatures())


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without its DDP wrapper (itself when it has none)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


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
        self.cfg, self.model, self.raw = cfg, model, unwrap(model)
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


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


@dataclass
class Training:
    """A training run's objects, as :func:`build_training` makes them.

    Attributes:
        model: what the step trains (DDP-wrapped on Ray workers), on the device, in the config's
            memory format.
        raw: ``model`` without the DDP wrapper (what checkpoints, validation and the margin read).
        priors: ``(P, 4)`` normalised ``(cx, cy, w, h)`` default boxes, a CPU copy.
        criterion: the MultiBox loss (its priors on the device).
        optimizer, scheduler: fused Adam; warm-up + cosine ``LambdaLR``, stepped once per step.
        schedule: the run's length in steps, which the scheduler and the margin ramp follow.
        step: ``step(images, targets, global_step) -> {"loss", "loc", "cls"}``.
        model_config: ``raw.config.to_dict()`` (rebuilds the architecture; checkpoints carry it).
    """

    config: LoopConfig
    device: torch.device
    model: nn.Module
    raw: nn.Module
    priors: Tensor
    criterion: MultiBoxLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Schedule
    step: TrainStep
    model_config: dict[str, Any]

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 GradScaler (fp16 on CUDA only), else None."""
        return self.step.scaler

    def set_total_steps(self, total_steps: int) -> None:
        """Change the run's length: the lr schedule and the margin ramp follow it from the next step."""
        self.schedule.total_steps = self.step.total_steps = total_steps

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler", "scaler"}``: plain dicts and tensors (model on the CPU)."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.raw.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the scaler only where both sides have one)."""
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_training(
    config: LoopConfig,
    device: torch.device,
    *,
    total_steps: int,
    warmup_steps: int | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> Training:
    """Build the recipe of ``config`` on ``device``.

    Seeds every global generator with ``config.seed`` first, so the initial weights depend on the
    seed alone. The model moves to ``device`` in :attr:`LoopConfig.memory_format`; ``wrap`` (e.g.
    ``ray.train.torch.prepare_model``: DDP) wraps it before the optimizer is made.

    Args:
        total_steps: optimizer steps of the whole run (lr schedule and margin ramp).
        warmup_steps: linear lr warm-up steps; default ``int(config.warmup_frac * total_steps)``.
    """
    seed_everything(config.seed)
    model = build_model(config.arch, width=config.width, input_size=config.input_size, **config.model_options)
    model_config = model.config.to_dict()
    priors = model.priors.detach().clone()
    criterion = MultiBoxLoss(priors, config.input_size).to(device)
    model = model.to(device=device, memory_format=config.memory_format)
    if wrap is not None:
        model = wrap(model)
    optimizer = make_optimizer(config, model)
    warmup = int(config.warmup_frac * total_steps) if warmup_steps is None else warmup_steps
    schedule = Schedule(total_steps=total_steps, warmup_steps=warmup)
    scheduler = warmup_cosine(optimizer, schedule)
    step = TrainStep(config, model, criterion, optimizer, scheduler, device, total_steps)
    return Training(config=config, device=device, model=model, raw=unwrap(model), priors=priors,
                    criterion=criterion, optimizer=optimizer, scheduler=scheduler, schedule=schedule, step=step,
                    model_config=model_config)


__all__: list[str] = [
    "LOG_TEMPERATURE_CAP",
    "LoopConfig",
    "PRECISIONS",
    "Schedule",
    "TrainStep",
    "Training",
    "build_training",
    "lr_factor",
    "make_optimizer",
    "seed_everything",
    "train_margin",
    "unwrap",
    "warmup_cosine",
]
