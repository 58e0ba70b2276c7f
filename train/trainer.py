"""The training driver: validate the request, start or join Ray, run a ``TorchTrainer``, collect results.

Order of work in :func:`run_training`:

1. :func:`plan_run` checks every option and the data *before* Ray starts (bad input is a one-line
   :class:`~lipdet.errors.LipdetError`, exit 2) and decides the run folder.
2. :func:`lipdet.cluster.ray_session` joins ``--address``/``RAY_ADDRESS`` or an already initialised
   Ray, or starts a local cluster sized for the workers (and stops it afterwards).
3. A ``TorchTrainer`` runs :func:`lipdet.train.loop.train_loop_per_worker` on N workers (or an
   elastic MIN..MAX, :class:`WorkerRange`: after a lost node it goes on with the workers left) with
   ``FailureConfig(max_failures)`` and ``CheckpointConfig(num_to_keep)``; Ray's run storage is
   ``<out>/<name>`` (``RunConfig(storage_path=out, name=name)``), so re-running with the same
   storage path and name -- ``--resume NAME`` -- restores the latest checkpoint.
4. While it runs, a thread drains rank 0's progress events: a tqdm bar on stderr, one line per epoch,
   and ``metrics.jsonl`` rewritten after every epoch.
5. At the end the last checkpoint becomes ``model.pt`` (``lipdet.artifacts.save_checkpoint``), with
   ``metrics.jsonl`` and ``curves.png`` beside it, and the run is marked latest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from lipdet.artifacts import save_checkpoint
from lipdet.cluster import check_address, ray_session
from lipdet.cluster import first_line as _first_line
from lipdet.data.dataset import SVHNDetection, resolve_data
from lipdet.data.digitstruct import count_records
from lipdet.data.split import ValSplit
from lipdet.data.synth import synth_sizes
from lipdet.errors import LipdetError
from lipdet.hardware import PRECISION_CHOICES, PrecisionChoice, choose_precision
from lipdet.io import write_bytes_atomic, write_text_atomic
from lipdet.models import build_from_config
from lipdet.models.config import ARCHS, ModelConfig
from lipdet.models.tinier_ssd import resolve_options
from lipdet.runs import mark_latest, new_run_name, runs_root
from lipdet.train.calibrate import fit_class_temperatures, learnt_temperature_heads
from lipdet.train.loop import (
    evaluate,
    load_split,
    load_train_state,
    make_progress_sink,
    train_loop_per_worker,
    validation_record,
)
from lipdet.train.plots import plot_curves
from lipdet.train.recipe import PRECISIONS, LoopConfig

DEFAULT_EPOCHS = 6
"""Epochs when neither ``--epochs`` nor ``$LIPDET_TRAIN_EPOCHS`` is given."""
EPOCHS_ENV = "LIPDET_TRAIN_EPOCHS"
FAULT_ENV = "LIPDET_TRAIN_FAULT"
CHECKPOINTS_TO_KEEP = 2
RUN_FILE = "train.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
MODEL_FILE = "model.pt"
DEFAULTS: dict[str, Any] = {"arch": "naive", "batch_size": 32, "lr": 1e-3, "width": 1.0, "seed": 0}

SLL_LR = 1e-2
"""Default peak lr of the ``sll-*`` archs: their learned head temperatures need it (1e-3 leaves
them nearly frozen; docs/results/beat-the-seed.md measured 0.106 -> 0.230 map_50)."""


def default_lr(arch: str) -> float:
    """The default peak Adam learning rate for ``arch``."""
    return SLL_LR if arch.startswith("sll-") else DEFAULTS["lr"]


CERTIFIED_TRAINING: dict[str, dict[str, Any]] = {
    "sll-spectral": {
        "model_options": {"loc_scale": 1.0, "learn_loc_scale": False, "pool": "l2", "shrink": "conv"},
        "margin_eps": 1.0,
    },
}
"""Training defaults per arch beyond the model's own (``--option`` / ``--margin-eps`` override them).

``sll-spectral`` is the fully 1-Lipschitz model, trained for certificates at eps 0.5: a fixed box
scale (a learnt one grows to 8-42 and makes every box certificate vanish), L2-norm pooling with
learnt 1x1 channel projections (max-pool halves the image signal at every stage), and the
Lipschitz-margin loss, whose margin follows the learnt class temperatures, aimed at radius 1.0
(it is rarely reached, and aiming past 0.5 lengthens the tail of certified radii); the
temperatures are refitted after training (:mod:`lipdet.train.calibrate`). See
docs/results/beat-the-seed.md. The
other archs' bounds include unconstrained layers, so a margin in temperature units certifies nothing
there: they keep plain cross-entropy and learnt scales."""


def default_model_options(arch: str) -> dict[str, Any]:
    """The model options a new run of ``arch`` starts from (before ``--option``)."""
    return dict(CERTIFIED_TRAINING.get(arch, {}).get("model_options", {}))


def default_margin_eps(arch: str) -> float:
    """The default Lipschitz-margin radius of ``arch``'s training loss (0 = plain cross-entropy)."""
    return float(CERTIFIED_TRAINING.get(arch, {}).get("margin_eps", 0.0))


def _extras(loop: LoopConfig) -> str:
    """``", options pool=l2 ..., margin eps 0.5"`` for the start line (empty when neither is set)."""
    parts = []
    if loop.model_options:
        parts.append("options " + " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(loop.model_options.items())))
    if loop.margin_eps > 0:
        parts.append(f"margin eps {loop.margin_eps:g}")
    return "".join(", " + p for p in parts)


def parse_model_options(items: Sequence[str]) -> dict[str, Any]:
    """``["pool=l2", "loc_scale=1", "learn_loc_scale=false"]`` -> ``{"pool": "l2", "loc_scale": 1, ...}``.

    Values are parsed as JSON (numbers, ``true``/``false``, ``null``), anything else stays a string.
    Keys are checked against the arch later (:func:`lipdet.models.tinier_ssd.resolve_options`).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LipdetError(f"option expects KEY=VALUE, got {item!r}")
        raw = raw.strip()
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@dataclass(frozen=True)
class WorkerRange:
    """How many Ray Train workers a run uses: a fixed count (``min == max``) or an elastic range.

    ``lipdet train --workers 2`` is fixed; ``--workers 1..2`` is elastic (Ray Train V2's
    ``ScalingConfig(num_workers=(min, max))``): the run starts once ``min`` workers fit, grows to
    ``max`` when the cluster has room (checked every ``resize_check_s``), and after losing a node
    continues from the last checkpoint with the workers that remain (never fewer than ``min``).

    When the worker count changes, the global batch is kept (each of N workers takes
    ``batch_size // N`` images a step, :func:`lipdet.train.loop.make_train_loader`) and the learning
    rate and its schedule are unchanged: an epoch stays the same number of optimizer steps of the
    same size, so the step-based schedule restored from the checkpoint stays on course and a run
    that lost nodes optimises as it would have, only slower.
    """

    min: int
    max: int

    @classmethod
    def parse(cls, value: "int | str | WorkerRange") -> "WorkerRange":
        """``2`` / ``"2"`` -> fixed 2, ``"1..4"`` -> elastic 1 to 4. Raises :class:`LipdetError`
        naming the parameter (``workers``) for anything else."""
        if isinstance(value, WorkerRange):
            return value.check()
        text = str(value).strip()
        low, sep, high = text.partition("..")
        try:
            lo, hi = (int(low), int(high)) if sep else (int(text),) * 2
        except ValueError:
            raise LipdetError(f"workers must be N or MIN..MAX (for example 2 or 1..4), got {text!r}") from None
        return cls(lo, hi).check()

    def check(self) -> "WorkerRange":
        """Itself, when ``1 <= min <= max``; else a :class:`LipdetError` naming ``workers``."""
        if self.min < 1:
            raise LipdetError(f"workers must be >= 1, got {self}")
        if self.min > self.max:
            raise LipdetError(f"workers MIN..MAX needs MIN <= MAX, got {self}")
        return self

    @property
    def elastic(self) -> bool:
        return self.min < self.max

    def num_workers(self) -> "int | tuple[int, int]":
        """Ray Train's ``ScalingConfig(num_workers=...)``: an int, or ``(min, max)`` when elastic."""
        return (self.min, self.max) if self.elastic else self.max

    def __str__(self) -> str:
        return str(self.max) if self.min == self.max else f"{self.min}..{self.max}"


RESIZE_CHECK_S = 60.0
"""Default seconds between an elastic run's checks for room to grow (Ray's
``elastic_resize_monitor_interval_s``): growing restarts the worker group from the last checkpoint,
so the work since that checkpoint is redone; checking often only pays on short epochs."""


@dataclass
class TrainOptions:
    """What ``lipdet train`` was asked to do. ``None`` means "default" (or, with ``resume``, "as before")."""

    arch: str | None = None
    data: Path | None = None
    workers: int | str | WorkerRange = 2  # N, "N" or "MIN..MAX" (WorkerRange.parse)
    resize_check_s: float = RESIZE_CHECK_S  # elastic runs: seconds between checks for room to grow
    gpu: bool | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    width: float | None = None
    seed: int | None = None
    out: str | None = None
    name: str | None = None
    address: str | None = None
    max_failures: int = 2
    resume: str | None = None
    precision: str = "auto"  # lipdet.hardware.PRECISION_CHOICES; resolved once by plan_run / _settle_devices
    threads: int = 0
    train_limit: int = 0
    val_limit: int = 0
    augment: bool = True
    fault: str | None = None
    progress: bool = True
    model_options: dict[str, Any] = field(default_factory=dict)
    margin_eps: float | None = None
    val_fraction: float | None = None
    val_count: int | None = None
    val_seed: int | None = None

    def val_split(self) -> ValSplit | None:
        """The validation split asked for (None: nothing asked, the default or the run's own)."""
        if self.val_fraction is None and self.val_count is None and self.val_seed is None:
            return None
        if self.val_count is not None and self.val_fraction is not None:
            raise LipdetError("give val_fraction or val_count, not both")
        if self.val_count is not None and self.val_count < 1:
            raise LipdetError(f"val_count must be >= 1, got {self.val_count}")
        default = ValSplit()
        return ValSplit(seed=default.seed if self.val_seed is None else self.val_seed,
                        fraction=default.fraction if self.val_fraction is None else self.val_fraction,
                        count=self.val_count or 0).check()


@dataclass
class RunPlan:
    """A validated run, ready to hand to Ray."""

    name: str
    storage_path: str  # RunConfig.storage_path (absolute local path or URI)
    run_dir: Path  # local folder for model.pt, metrics.jsonl, curves.png
    remote: bool
    workers: int  # the most workers (a fixed run: the count)
    use_gpu: bool | None  # None: decide from the joined cluster's GPUs
    max_failures: int
    loop: LoopConfig
    data_root: Path
    resumed: bool
    previous_history: list[dict[str, Any]] = field(default_factory=list)
    val_images: int = 0  # validation images held out of the train split
    precision: PrecisionChoice | None = None  # the resolved precision and why (None: once the cluster is joined)
    min_workers: int | None = None  # elastic runs: the fewest workers it trains with (None: fixed)
    resize_check_s: float = RESIZE_CHECK_S

    @property
    def worker_range(self) -> WorkerRange:
        """The run's workers as a :class:`WorkerRange` (fixed unless ``min_workers`` is below ``workers``)."""
        return WorkerRange(self.min_workers or self.workers, self.workers)


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    name: str


# --------------------------------------------------------------------------------------------
# Storage: a local folder or a pyarrow filesystem URI (s3://, gs://, ...)
# --------------------------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class RunStorage:
    """Ray's run folder ``<out>/<name>``, local or remote, for the few files the driver reads/writes."""

    def __init__(self, out: str, name: str) -> None:
        self.name = name
        self.remote = _is_uri(out)
        if self.remote:
            import pyarrow.fs  # lazy: Ray's storage layer, heavy; only a remote --out needs it

            try:
                self._fs, base = pyarrow.fs.FileSystem.from_uri(out)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
                raise LipdetError(
                    f"out {out}: cannot open this storage ({type(e).__name__}: {_first_line(e)})"
                ) from None
            self.storage_path = out.rstrip("/")
            self._base = f"{base.rstrip('/')}/{name}"
            self.local = None
        else:
            root = Path(out.removeprefix("file://")).expanduser().resolve()
            self.storage_path = str(root)
            self.local = root / name

    def exists(self, rel: str = "") -> bool:
        if self.local is not None:
            return (self.local / rel).exists() if rel else self.local.is_dir()
        import pyarrow.fs  # lazy: Ray's storage layer, heavy; only a remote --out needs it

        path = f"{self._base}/{rel}" if rel else self._base
        return self._fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        if not self.exists(rel):
            return None
        if self.local is not None:
            return (self.local / rel).read_text()
        with self._fs.open_input_stream(f"{self._base}/{rel}") as f:
            return f.read().decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.local / rel, data)
            return
        self._fs.create_dir(self._base, recursive=True)
        with self._fs.open_output_stream(f"{self._base}/{rel}") as f:
            f.write(data)

    def upload(self, local_file: Path) -> None:
        """Copy a local artifact into the run folder (no-op when the run folder is local)."""
        if self.local is None:
            self.write_bytes(local_file.name, local_file.read_bytes())

    def describe(self) -> str:
        return str(self.local) if self.local is not None else f"{self.storage_path}/{self.name}"


# --------------------------------------------------------------------------------------------
# Validation (no Ray yet)
# --------------------------------------------------------------------------------------------


def default_epochs() -> int:
    """``$LIPDET_TRAIN_EPOCHS`` if set, else :data:`DEFAULT_EPOCHS`."""
    raw = os.environ.get(EPOCHS_ENV, "").strip()
    if not raw:
        return DEFAULT_EPOCHS
    try:
        value = int(raw)
    except ValueError:
        raise LipdetError(f"${EPOCHS_ENV} must be a whole number, got {raw!r}") from None
    if value < 1:
        raise LipdetError(f"${EPOCHS_ENV} must be >= 1, got {value}")
    return value


def _cuda_visible() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001
        return False


def _resolve_data(data: Path | None) -> tuple[Path, bool]:
    """``(resolved data folder, whether it is the embedded synthetic set)``; may generate that set."""
    root = Path(resolve_data(data)).resolve()
    return root, data is None


def plan_run(opts: TrainOptions) -> RunPlan:
    """Check every option and the data, decide names and folders. Raises LipdetError; starts no Ray.

    Every option is checked before the data is resolved: resolving the default data may generate
    the embedded synthetic SVHN, which a refused command must not do.
    """
    use_gpu = _validate_options(opts)
    out = str(opts.out) if opts.out is not None else str(runs_root(None))
    if opts.resume is not None:
        storage, loop, previous = _plan_resume(opts, out, use_gpu)
    else:
        storage, loop = _plan_new(opts, out, use_gpu)
        previous = []
    precision = resolve_precision(opts.precision, use_gpu, loop.precision if opts.resume is not None else None)
    loop.precision = precision.precision if precision is not None else opts.precision  # else: _settle_devices
    data_root = Path(loop.data_root)
    val_images = check_splits(data_root, loop.input_size, loop.validation)
    run_dir = storage.local if storage.local is not None else runs_root(None) / storage.name
    workers = WorkerRange.parse(opts.workers)
    return RunPlan(
        name=storage.name,
        storage_path=storage.storage_path,
        run_dir=run_dir,
        remote=storage.remote,
        workers=workers.max,
        min_workers=workers.min if workers.elastic else None,
        resize_check_s=opts.resize_check_s,
        use_gpu=use_gpu,
        max_failures=opts.max_failures,
        loop=loop,
        data_root=data_root,
        resumed=opts.resume is not None,
        previous_history=previous,
        val_images=val_images,
        precision=precision,
    )


def resolve_precision(requested: str, use_gpu: bool | None, recorded: str | None = None) -> PrecisionChoice | None:
    """The precision the workers train in, decided once, here on the driver.

    ``requested`` is one of :data:`lipdet.hardware.PRECISION_CHOICES`. A resumed run asked for
    ``auto`` keeps ``recorded`` (its ``train.json`` precision); otherwise
    :func:`lipdet.hardware.choose_precision` decides for the workers' device (``auto``: bf16 only
    where it is native and measured faster). None while the joined cluster has still to decide
    between GPU and CPU (``use_gpu`` None): :func:`_settle_devices` resolves it then.
    """
    if requested == "auto" and recorded in PRECISIONS:
        return PrecisionChoice(recorded, "as the run recorded it")
    if use_gpu is None and requested in ("auto", "bf16"):
        return None
    if use_gpu and requested == "auto" and not _cuda_visible():
        return PrecisionChoice("fp32", "auto: the workers' GPUs are not visible from this driver to check bf16")
    return choose_precision(requested, torch.device("cuda" if use_gpu else "cpu"))


def _validate_options(opts: TrainOptions) -> bool | None:
    """Refuse bad values, names, addresses and devices; returns ``use_gpu`` (None: the joined
    cluster decides, once Ray is up)."""
    WorkerRange.parse(opts.workers)
    if not (opts.resize_check_s > 0 and math.isfinite(opts.resize_check_s)):
        raise LipdetError(f"resize_check_s must be > 0 seconds, got {opts.resize_check_s}")
    if opts.epochs is not None and opts.epochs < 1:
        raise LipdetError(f"epochs must be >= 1, got {opts.epochs}")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise LipdetError(f"batch_size must be >= 1, got {opts.batch_size}")
    if opts.lr is not None and not opts.lr > 0:
        raise LipdetError(f"lr must be > 0, got {opts.lr}")
    if opts.width is not None and not opts.width > 0:
        raise LipdetError(f"width must be > 0, got {opts.width}")
    if opts.max_failures < -1:
        raise LipdetError(f"max_failures must be >= 0 (or -1 for unlimited), got {opts.max_failures}")
    if opts.arch is not None and opts.arch not in ARCHS:
        raise LipdetError(f"unknown arch {opts.arch!r}; choose one of: {', '.join(ARCHS)}")
    if opts.precision not in PRECISION_CHOICES:
        raise LipdetError(f"unknown precision {opts.precision!r}; choose one of: {', '.join(PRECISION_CHOICES)}")
    if opts.name is not None and opts.resume is not None and opts.name != opts.resume:
        raise LipdetError("name and resume give different runs; resume alone names the run it continues")
    for label, value in (("name", opts.name), ("resume", opts.resume)):
        if value is not None and (not value or "/" in value or value in (".", "..") or value.startswith(".")):
            raise LipdetError(f"{label} must be a plain folder name, got {value!r}")
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)
    if opts.gpu and not address and not _cuda_visible():
        raise LipdetError(
            "gpu=True asked for, but no CUDA GPU is visible (train on the CPU, or join a GPU cluster with address)"
        )
    # With --address and neither --gpu nor --cpu, the cluster decides (resolved once Ray is joined).
    use_gpu: bool | None = bool(opts.gpu) if opts.gpu is not None else (None if address else _cuda_visible())
    if opts.precision == "fp16" and use_gpu is False:
        raise LipdetError("precision fp16 needs a GPU (use bf16 on the CPU)")
    opts.val_split()  # refuses bad val_* values
    return use_gpu


def _plan_resume(opts: TrainOptions, out: str, use_gpu: bool | None
                 ) -> tuple[RunStorage, LoopConfig, list[dict[str, Any]]]:
    """The stopped run ``opts.resume`` under ``out``: its storage, its loop config updated with
    this call's epochs/device/threads (:func:`plan_run` then resolves the precision: ``auto`` keeps
    the recorded one), and the history it recorded."""
    storage = RunStorage(out, opts.resume)
    loop = _saved_loop(storage, opts.resume, out)
    _check_unchanged(opts, loop)
    if opts.data is not None and Path(opts.data).resolve() != Path(loop.data_root):
        raise LipdetError(f"resume continues {opts.resume} on its own data ({loop.data_root}); give no data")
    if not loop.synthetic and not Path(loop.data_root).is_dir():
        raise LipdetError(f"the data of run {opts.resume} is gone: {loop.data_root}")
    done = _finished_epochs(storage)
    epochs = opts.epochs if opts.epochs is not None else loop.epochs
    if done is not None and done >= epochs:
        raise LipdetError(
            f"run {opts.resume} already finished {done} epochs; pass epochs > {done} to train it longer"
        )
    # only now, with every option accepted, may the embedded synthetic data be (re)generated
    data_root = _resolve_data(None)[0] if loop.synthetic else Path(loop.data_root)
    loop.epochs = epochs
    loop.data_root = str(data_root)
    loop.use_gpu = bool(use_gpu)
    loop.threads = opts.threads
    loop.fault = opts.fault
    return storage, loop, _read_history(storage)


def _saved_loop(storage: RunStorage, name: str, out: str) -> LoopConfig:
    """The loop config recorded in the run's ``train.json`` (run ``name`` under ``out``)."""
    saved_text = storage.read_text(RUN_FILE)
    if saved_text is None:
        raise LipdetError(f"no run named {name!r} to resume under {out}")
    try:
        return LoopConfig.from_dict(json.loads(saved_text)["loop"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LipdetError(f"{storage.describe()}/{RUN_FILE} is not a lipdet run description") from None


def _check_unchanged(opts: TrainOptions, loop: LoopConfig) -> None:
    """A resumed run keeps the settings it was started with: refuse different ones."""
    for label, given, before in (
        ("arch", opts.arch, loop.arch),
        ("width", opts.width, loop.width),
        ("seed", opts.seed, loop.seed),
        ("batch_size", opts.batch_size, loop.batch_size),
        ("lr", opts.lr, loop.lr),
        ("margin_eps", opts.margin_eps, loop.margin_eps),
    ):
        if given is not None and given != before:
            raise LipdetError(
                f"resume continues {opts.resume} as it was started: {label} was {before}, not {given}"
            )
    split = loop.validation
    for label, given, before in (
        ("val_seed", opts.val_seed, split.seed),
        ("val_count", opts.val_count, split.count or None),
        ("val_fraction", opts.val_fraction, None if split.count else split.fraction),
    ):
        if given is not None and given != before:
            raise LipdetError(f"resume continues {opts.resume} on its own validation split "
                              f"({_split_options(split)}): {label}={given} would change it")
    if opts.model_options and opts.model_options != {k: loop.model_options.get(k) for k in opts.model_options}:
        raise LipdetError(f"resume continues {opts.resume} as it was started: its model_options were "
                          f"{loop.model_options or 'the defaults'}")


def _plan_new(opts: TrainOptions, out: str, use_gpu: bool | None) -> tuple[RunStorage, LoopConfig]:
    """A new run: its storage (a free name under ``out``) and its loop config, defaults filled in."""
    arch = opts.arch or DEFAULTS["arch"]
    width = opts.width if opts.width is not None else DEFAULTS["width"]
    model_options = {**default_model_options(arch), **opts.model_options}
    margin_eps = opts.margin_eps if opts.margin_eps is not None else default_margin_eps(arch)
    _check_model_request(arch, width, model_options, margin_eps)
    epochs = opts.epochs if opts.epochs is not None else default_epochs()
    storage = _new_storage(opts, out, arch)
    val_split = opts.val_split() or ValSplit()
    val_split.size(_train_records(opts.data))  # refuses a split that leaves nothing to train on
    # only now, with every option accepted, may the embedded synthetic data be generated
    data_root, synthetic = _resolve_data(opts.data)
    loop = LoopConfig(
        arch=arch,
        width=width,
        model_options=model_options,
        data_root=str(data_root),
        synthetic=synthetic,
        epochs=epochs,
        batch_size=opts.batch_size or DEFAULTS["batch_size"],
        lr=opts.lr if opts.lr is not None else default_lr(arch),
        seed=opts.seed if opts.seed is not None else DEFAULTS["seed"],
        precision=opts.precision,
        use_gpu=bool(use_gpu),
        threads=opts.threads,
        augment=opts.augment,
        train_limit=opts.train_limit,
        val_limit=opts.val_limit,
        val_split=val_split.to_dict(),
        fault=opts.fault,
        run_name=storage.name,
        margin_eps=margin_eps,
    )
    return storage, loop


def _new_storage(opts: TrainOptions, out: str, arch: str) -> RunStorage:
    """``--name`` (refused when taken) or a fresh ``<arch>-<date>-<time>`` under ``out``."""
    if opts.name is None:
        local_root = Path(out) if not _is_uri(out) else runs_root(None)
        return RunStorage(out, new_run_name(arch, local_root))
    storage = RunStorage(out, opts.name)
    if storage.exists():
        raise LipdetError(
            f"a run named {opts.name!r} already exists under {out}: continue it with: lipdet train --resume {opts.name}, "
            "or pick another name"
        )
    return storage


def _check_model_request(arch: str, width: float, model_options: dict[str, Any], margin_eps: float) -> None:
    """Refuse unknown widths/options and a margin the arch cannot certify (before any data is made)."""
    resolve_options(ModelConfig(arch=arch, width=width, input_size=LoopConfig.input_size,
                                options=dict(model_options)))
    if margin_eps < 0 or not math.isfinite(margin_eps):
        raise LipdetError(f"margin_eps must be >= 0, got {margin_eps}")
    if margin_eps > 0 and not arch.startswith("sll-"):
        raise LipdetError("margin_eps needs a Lipschitz arch (sll-*): naive has no Lipschitz bound to certify")


def _split_options(split: ValSplit) -> str:
    """``"val_fraction=0.1, val_seed=0"`` (or ``val_count=N``): a split as the parameters that make it."""
    size = f"val_count={split.count}" if split.count > 0 else f"val_fraction={split.fraction:g}"
    return f"{size}, val_seed={split.seed}"


def _train_records(data: Path | None) -> int:
    """Images in the train split of ``data`` (None: the embedded synthetic set, made or not yet)
    without preparing any: an upper bound on the usable ones, known before any data is generated."""
    if data is None:
        return synth_sizes()[0]
    mat = Path(data) / "train" / "digitStruct.mat"
    if not mat.is_file():
        resolve_data(Path(data))  # the folder's own refusal (missing, not SVHN)
        raise LipdetError(f"{data} has no train/digitStruct.mat: lipdet train needs it for training")
    return count_records(mat)


def check_splits(root: Path, input_size: int, val_split: ValSplit) -> int:
    """Read (and cache) the train split once here, so bad data fails before Ray and workers start
    warm; returns the validation images ``val_split`` holds out of it. The test split must exist
    (for ``lipdet eval``'s final table) but is not read: training never looks at it."""
    for split in ("train", "test"):
        if not (root / split / "digitStruct.mat").is_file():
            role = "training and validation" if split == "train" else "the final evaluation (lipdet eval)"
            raise LipdetError(f"{root} has no {split}/digitStruct.mat: lipdet train needs it for {role}")
    ds = SVHNDetection(root, split="train", input_size=input_size, seed=0)
    if len(ds) == 0:
        raise LipdetError(f"{root / 'train'}: no usable images")
    return val_split.size(len(ds))


def _finished_epochs(storage: RunStorage) -> int | None:
    """Epochs the run had finished when it last wrote model.pt (recorded in train.json)."""
    text = storage.read_text(RUN_FILE)
    if not text:
        return None
    with contextlib.suppress(json.JSONDecodeError, TypeError, ValueError):
        done = json.loads(text).get("finished_epochs")
        return int(done) if done is not None else None
    return None


def _read_history(storage: RunStorage) -> list[dict[str, Any]]:
    text = storage.read_text(METRICS_FILE) or ""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict) and "epoch" in rec:
                out.append(rec)
    return out


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def cluster_gpus() -> float:
    """GPUs the joined Ray cluster declares."""
    import ray  # lazy: Ray is heavy / optional

    return float(ray.cluster_resources().get("GPU", 0.0))


def check_resources(workers: int, use_gpu: bool) -> None:
    """One-line error when the cluster can never fit the workers (instead of waiting forever)."""
    import ray  # lazy: Ray is heavy / optional

    total = ray.cluster_resources()
    kind = "GPU" if use_gpu else "CPU"
    have = float(total.get(kind, 0.0))
    if have < workers:
        raise LipdetError(
            f"workers={workers} needs {workers} {kind}s but the Ray cluster has {have:g}"
            + (" (a GPU run needs one GPU per worker)" if use_gpu else "")
        )


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def format_epoch(rec: dict[str, Any]) -> str:
    """One progress line per epoch: ``epoch 2/6  2 workers  loss ...`` (the workers that trained it)."""
    workers = rec.get("workers", rec.get("world_size"))
    return (
        f"epoch {rec['epoch']}/{rec.get('epochs', '?')}  "
        + (f"{workers} worker{'s' if workers != 1 else ''}  " if workers is not None else "")
        + f"loss {rec['loss']:.3f} "
        f"(loc {rec['loc']:.3f} cls {rec['cls']:.3f})  val map_50 {rec['val_map_50']:.3f}  "
        f"{rec['images_per_s']:.0f} img/s  lr {rec['lr']:.2e}"
        + (f"  [resumed from epoch {rec['resumed_from']}]" if rec.get("resumed_from") is not None else "")
    )


class ProgressMonitor:
    """Drains rank 0's events in a thread: live bar + per-epoch lines on stderr, metrics.jsonl on disk."""

    def __init__(
        self,
        sink: Any,
        metrics_path: Path,
        epochs: int,
        history: list[dict[str, Any]] | None = None,
        show: bool = True,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.sink = sink
        self.metrics_path = metrics_path
        self.epochs = epochs
        self.records: dict[int, dict[str, Any]] = {int(r["epoch"]): r for r in history or []}
        self.show = show
        self.write = write or (lambda s: print(s, file=sys.stderr, flush=True))
        self.world_size: int | None = None
        self._bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lipdet-progress", daemon=True)

    def start(self) -> "ProgressMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()  # whatever arrived last
        self._close_bar()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        import ray  # lazy: Ray is heavy / optional

        try:
            events = ray.get(self.sink.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort
            return
        for ev in events:
            self.handle(ev)

    def handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "start":
            before, self.world_size = self.world_size, ev.get("world_size")
            start = int(ev.get("start_epoch") or 0)
            # A restarted attempt: forget epochs after its checkpoint (they will be redone).
            self.records = {e: r for e, r in self.records.items() if e <= start}
            self._write_metrics()
            msg = (
                f"{ev.get('world_size')} worker(s) on {ev.get('device')}, {ev.get('threads')} torch thread(s) each; "
                f"{ev.get('train_images')} train images, {ev.get('validation') or 'validation'}, "
                f"{ev.get('steps_per_epoch')} steps per epoch"
            )
            if ev.get("resumed_from") is not None:
                msg += f"; resuming after epoch {ev['resumed_from']}"
            if before is not None and before != self.world_size:
                msg = f"worker group resized {before} -> {self.world_size}: " + msg
            self._echo(msg)
        elif kind == "step":
            self._step(ev)
        elif kind == "epoch":
            self._close_bar()
            rec = {k: v for k, v in ev.items() if k not in ("kind",)}
            self.records[int(rec["epoch"])] = rec
            self._write_metrics()
            self._echo(format_epoch(rec))

    def _step(self, ev: dict[str, Any]) -> None:
        if not self.show:
            return
        if self._bar is None or getattr(self._bar, "_lipdet_epoch", None) != ev["epoch"]:
            self._close_bar()
            self._bar = tqdm(
                total=int(ev["steps"]), desc=f"epoch {ev['epoch']}/{self.epochs} ({self.world_size or '?'}w)",
                file=sys.stderr,
                leave=False, dynamic_ncols=True, disable=None,
            )
            self._bar._lipdet_epoch = ev["epoch"]
        self._bar.n = int(ev["step"])
        self._bar.set_postfix(loss=f"{ev['loss']:.3f}", img_s=f"{ev['images_per_s']:.0f}", refresh=False)
        self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _echo(self, line: str) -> None:
        if self._bar is not None:
            self._close_bar()
        self.write(line)

    def history(self) -> list[dict[str, Any]]:
        return [self.records[e] for e in sorted(self.records)]

    def _write_metrics(self) -> None:
        write_metrics(self.metrics_path, self.history())


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON object per epoch, in epoch order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in history))


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if isinstance(v, (int, float, str, bool, type(None)))}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def build_trainer(plan: RunPlan, progress_sink: Any = None, train_fn: Callable | None = None):
    """The ``TorchTrainer`` for ``plan`` (exposed for the benchmark and tests)."""
    # lazy: Ray is heavy / optional
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:
        from ray.train import LoggingConfig

        logging_kw = {"logging_config": LoggingConfig(log_level="WARNING")}
    except ImportError:  # pragma: no cover - older Ray
        logging_kw = {}
    config = plan.loop.to_dict()
    if progress_sink is not None:
        config["progress"] = progress_sink
    return TorchTrainer(
        train_fn or train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=_scaling_config(ScalingConfig, plan),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            failure_config=FailureConfig(max_failures=plan.max_failures),
            **logging_kw,
        ),
    )


def _scaling_config(scaling_cls: type, plan: RunPlan) -> Any:
    """Ray Train's ``ScalingConfig`` for the plan's workers: fixed, or elastic ``(min, max)`` checking
    for room to grow every ``plan.resize_check_s`` seconds (Ray Train V2)."""
    workers = plan.worker_range
    elastic = {"elastic_resize_monitor_interval_s": plan.resize_check_s} if workers.elastic else {}
    return scaling_cls(num_workers=workers.num_workers(), use_gpu=plan.use_gpu, **elastic)


def run_training(opts: TrainOptions, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Everything ``lipdet train`` does; returns where the model went and its metrics."""
    say = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    plan = plan_run(opts)
    storage = RunStorage(plan.storage_path, plan.name)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    _write_run_record(plan, storage)
    say(_start_line(plan, storage))
    _warn_precision(plan, say)
    t0 = time.perf_counter()
    with ray_session(opts.address, plan.workers):
        if _settle_devices(plan):
            _write_run_record(plan, storage)  # train.json records the precision the cluster's device resolved
            say(f"precision: {_precision_text(plan)}")
            _warn_precision(plan, say)
        state = _fit(plan, opts, say)
    seconds = time.perf_counter() - t0
    if int(state["epoch"]) < plan.loop.epochs:
        raise LipdetError(
            f"run {plan.name} stopped after epoch {state['epoch']}/{plan.loop.epochs}; "
            f"continue it with: lipdet train --resume {plan.name}",
            exit_code=130,
        )
    return finish_run(plan, storage, state, seconds, say)


def _write_run_record(plan: RunPlan, storage: RunStorage) -> None:
    """``train.json`` in the run folder (and its local copy when the run folder is remote)."""
    run_record = {
        "name": plan.name,
        "storage": storage.describe(),
        "loop": {k: v for k, v in plan.loop.to_dict().items() if k != "fault"},
        "workers": plan.workers,
        "min_workers": plan.worker_range.min,
        "use_gpu": plan.use_gpu,
    }
    storage.write_bytes(RUN_FILE, json.dumps(run_record, indent=2, sort_keys=True).encode())
    if storage.remote:
        write_text_atomic(plan.run_dir / RUN_FILE, json.dumps(run_record, indent=2, sort_keys=True))


def _start_line(plan: RunPlan, storage: RunStorage) -> str:
    """``training naive (width 1) for 6 epochs on synthetic SVHN: 2 worker(s), CPU, ... -> RUN``."""
    what = "resuming" if plan.resumed else "training"
    return (
        f"{what} {plan.loop.arch} (width {plan.loop.width:g}) for {plan.loop.epochs} epochs on "
        f"{'synthetic SVHN' if plan.loop.synthetic else plan.data_root}: {_workers_text(plan)}, "
        f"{ {True: 'GPU', False: 'CPU', None: 'GPU if the cluster has them'}[plan.use_gpu] }, "
        f"{_precision_text(plan)}, batch {plan.loop.batch_size}, "
        f"lr {plan.loop.lr:g}, seed {plan.loop.seed}{_extras(plan.loop)}; "
        f"{plan.loop.validation.describe(plan.val_images)} -> {storage.describe()}"
    )


def _workers_text(plan: RunPlan) -> str:
    """``2 worker(s)``, or ``1..2 workers (elastic: grows when the cluster has room, checked every 60 s)``."""
    workers = plan.worker_range
    if not workers.elastic:
        return f"{workers} worker(s)"
    return f"{workers} workers (elastic: grows when the cluster has room, checked every {plan.resize_check_s:g} s)"


def _precision_text(plan: RunPlan) -> str:
    """``bf16 (auto: native bf16 (...), a bf16 matmul ran 3.80x fp32 here)``: what the run trains in and why."""
    if plan.precision is None:
        return f"{plan.loop.precision} (resolved once the cluster has decided GPU or CPU)"
    return f"{plan.precision.precision} ({plan.precision.reason})"


def _warn_precision(plan: RunPlan, say: Callable[[str], None]) -> None:
    """The one warning line of a precision asked for where it is slower (:class:`PrecisionChoice`)."""
    if plan.precision is not None and plan.precision.warning:
        say(plan.precision.warning)


def _settle_devices(plan: RunPlan) -> bool:
    """With Ray joined: decide GPU or CPU where the plan left it to the cluster, resolve the precision
    that waited for it, and check the cluster can ever fit the workers. True when the precision was
    resolved here (the caller records and prints it)."""
    late = False
    if plan.use_gpu is None:
        plan.use_gpu = cluster_gpus() >= plan.worker_range.min
        plan.loop.use_gpu = plan.use_gpu
        if plan.loop.precision == "fp16" and not plan.use_gpu:
            raise LipdetError("precision fp16 needs a GPU and the Ray cluster has too few for the workers")
        if plan.precision is None:
            plan.precision = resolve_precision(plan.loop.precision, plan.use_gpu)
            plan.loop.precision, late = plan.precision.precision, True
    check_resources(plan.worker_range.min, plan.use_gpu)
    return late


def _fit(plan: RunPlan, opts: TrainOptions, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the ``TorchTrainer`` with live progress; returns the last checkpoint's training state."""
    import ray  # lazy: Ray is heavy / optional
    from ray.train import TrainingFailedError

    sink = make_progress_sink()
    monitor = ProgressMonitor(
        sink, plan.run_dir / METRICS_FILE, plan.loop.epochs, history=plan.previous_history,
        show=opts.progress, write=say,
    ).start()
    trainer = build_trainer(plan, progress_sink=sink)
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise LipdetError(
            f"training failed ({_first_line(e)}); continue it with: lipdet train --resume {plan.name}"
            + (f" --out {opts.out}" if opts.out is not None else ""),
            exit_code=1,
        ) from e
    finally:
        monitor.stop()
        with contextlib.suppress(Exception):
            ray.kill(sink)
    if result.checkpoint is None:
        raise LipdetError(f"training of {plan.name} reported no checkpoint", exit_code=1)
    with result.checkpoint.as_directory() as folder:
        return load_train_state(folder)


def calibrate_run_model(plan: RunPlan, model: Any, say: Callable[[str], None]) -> dict[str, Any] | None:
    """After margin training, refit the learnt class temperatures (:mod:`lipdet.train.calibrate`)
    on the run's training images and validate again; None when the run has nothing to calibrate."""
    if plan.loop.margin_eps <= 0 or not learnt_temperature_heads(model):
        return None
    loop = plan.loop
    report = fit_class_temperatures(model, load_split(loop, "train", loop.train_limit))
    val = evaluate(model, load_split(loop, "val", loop.val_limit), loop, torch.device("cpu"), model.priors)
    report["val_map_50"], report["val_map"] = val["map_50"], val["map"]
    say("calibrated the class temperatures (scores only: certified radii do not depend on them): "
        + ", ".join(f"{a:.4g} -> {b:.4g}" for a, b in zip(report["before"], report["after"]))
        + f"; val map_50 {val['map_50']:.3f}")
    return report


def finish_run(plan: RunPlan, storage: RunStorage, state: dict[str, Any], seconds: float, say) -> TrainResult:
    """Write model.pt, metrics.jsonl and curves.png from the final checkpoint; mark the run latest."""
    history = [_jsonable(r) for r in state.get("history") or []]
    last = history[-1] if history else {}
    model = build_from_config(ModelConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    model.eval()
    calibration = calibrate_run_model(plan, model, say)
    meta = {
        "run": plan.name,
        "arch": plan.loop.arch,
        "width": plan.loop.width,
        "data": {"root": str(plan.data_root), "synthetic": bool(plan.loop.synthetic),
                 "val": validation_record(plan.loop)},
        "epochs": int(state["epoch"]),
        "metrics": last,
        "train": {
            "workers": plan.workers,
            "min_workers": plan.worker_range.min,
            "gpu": plan.use_gpu,
            "precision": plan.loop.precision,
            "batch_size": plan.loop.batch_size,
            "lr": plan.loop.lr,
            "seed": plan.loop.seed,
            "augment": plan.loop.augment,
            "storage": storage.describe(),
            "seconds": round(seconds, 1),
        },
        "validation": last.get("validation") or plan.loop.validation.describe(plan.val_images),
    }
    final = last
    if calibration:
        meta["calibration"] = calibration
        final = {"val_map_50": calibration["val_map_50"], "val_map": calibration["val_map"]}
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = save_checkpoint(run_dir / MODEL_FILE, model, meta)
    write_metrics(run_dir / METRICS_FILE, history)
    curves = plot_curves(history, run_dir / CURVES_FILE, title=plan.name)
    for f in (model_path, run_dir / METRICS_FILE, curves):
        storage.upload(f)
    record = json.loads(storage.read_text(RUN_FILE) or "{}")
    record["finished_epochs"] = int(state["epoch"])
    storage.write_bytes(RUN_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    mark_latest(run_dir)
    minutes, secs = divmod(int(round(seconds)), 60)
    say(
        f"done in {minutes}m{secs:02d}s: val map_50 {final.get('val_map_50', float('nan')):.3f} "
        f"(map {final.get('val_map', float('nan')):.3f}) after {state['epoch']} epochs"
        + (f", with calibrated temperatures (last epoch: {last.get('val_map_50', float('nan')):.3f})"
           if calibration else "")
    )
    return TrainResult(
        run_dir=run_dir, model_path=model_path, metrics=last, history=history, seconds=seconds, name=plan.name
    )


__all__ = [
    "DEFAULT_EPOCHS",
    "EPOCHS_ENV",
    "RunPlan",
    "RunStorage",
    "TrainOptions",
    "TrainResult",
    "WorkerRange",
    "build_trainer",
    "check_address",
    "default_epochs",
    "plan_run",
    "ray_session",
    "run_training",
    "write_metrics",
]
