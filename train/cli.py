"""``lipdet train``: the command-line face of :mod:`lipdet.train.trainer`."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Optional

import typer

from lipdet.data.split import DEFAULT_VAL_FRACTION
from lipdet.hardware import PRECISION_CHOICES
from lipdet.models.config import ARCHS
from lipdet.models.tinier_ssd import SLLOptions
from lipdet.train.trainer import (
    DEFAULT_EPOCHS,
    EPOCHS_ENV,
    FAULT_ENV,
    RESIZE_CHECK_S,
    TrainOptions,
    WorkerRange,
    default_margin_eps,
    parse_model_options,
    run_training,
)

Arch = enum.Enum("Arch", {a: a for a in ARCHS}, type=str)
"""``--arch`` choices (typer makes a bad value a usage error)."""
Precision = enum.Enum("Precision", {p: p for p in PRECISION_CHOICES}, type=str)
"""``--precision`` choices."""


def command(
    arch: Optional[Arch] = typer.Option(
        None, "--arch", help="Architecture. (default: naive)", show_default=False,
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", help="SVHN format-1 folder (train/ and test/ with digitStruct.mat). "
        "Default: the embedded synthetic SVHN, generated once into the cache.", show_default=False,
    ),
    workers: str = typer.Option(
        "2", "--workers", "-w", metavar="N|MIN..MAX", help="Ray Train workers (DDP: gloo on CPU, NCCL on GPU). "
        "MIN..MAX is elastic: the run starts once MIN fit, grows to MAX when the cluster has room, and after "
        "losing a node continues from the last checkpoint with the workers left (global batch kept, see README).",
    ),
    resize_check: float = typer.Option(
        RESIZE_CHECK_S, "--resize-check", metavar="SECONDS",
        help="Elastic runs (--workers MIN..MAX): seconds between checks for room to grow (growing restarts "
        "the workers from the last checkpoint).",
    ),
    gpu: Optional[bool] = typer.Option(
        None, "--gpu/--cpu", help="Train on GPUs (one per worker). (default: --gpu when CUDA is visible)",
        show_default=False,
    ),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", "-e", help=f"Epochs. (default: ${EPOCHS_ENV} if set, else {DEFAULT_EPOCHS}; "
        "with --resume: the run's own)", show_default=False,
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", "-b", help="Global batch (split across workers). (default: 32)", show_default=False
    ),
    lr: Optional[float] = typer.Option(
        None, "--lr", help="Peak Adam learning rate (warm-up, then cosine decay). (default: 1e-3 for naive, 1e-2 for sll-*)", show_default=False
    ),
    width: Optional[float] = typer.Option(
        None, "--width", help="Channel multiplier. (default: 1.0)", show_default=False
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed",
        help="Seed for init, shuffling and augmentation; a 1-worker CPU run repeats exactly. (default: 0)",
        show_default=False,
    ),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="Runs folder, or shared storage (s3://, gs://, an NFS path) for a multi-node "
        "cluster. (default: $LIPDET_RUNS or ./runs)", show_default=False,
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Run name (folder under --out). (default: <arch>-<date>-<time>)", show_default=False
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="Join this Ray cluster (HOST:PORT, ray://HOST:PORT or auto) instead of starting a "
        "local one. (default: $RAY_ADDRESS)", show_default=False,
    ),
    max_failures: int = typer.Option(
        2, "--max-failures", help="Worker failures to recover from (restart from the last checkpoint); -1 = always."
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue the stopped run NAME under --out from its last checkpoint "
        "(same settings; --epochs may extend it).", show_default=False,
    ),
    precision: Precision = typer.Option(
        "auto", "--precision", "-p", help="auto (bf16 where this CPU has native bf16 and a short probe measures it "
        "faster, or on a GPU with bf16; else fp32: the start line says which and why), fp32, bf16 (autocast + "
        "channels_last; Lipschitz normalisations stay fp32; a warning where it is slower), or fp16 (GPU only). "
        "With --resume, auto keeps the run's own."
    ),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="Share of the train split held out for validation (model selection and "
        f"calibration never see the test split). (default: {DEFAULT_VAL_FRACTION}; with --resume: the run's own)",
        show_default=False,
    ),
    val_count: Optional[int] = typer.Option(
        None, "--val-count", help="Hold out exactly N train images for validation instead of --val-fraction.",
        show_default=False,
    ),
    val_seed: Optional[int] = typer.Option(
        None, "--val-seed", help="Seed of the choice of validation images. (default: 0)", show_default=False
    ),
    val_limit: int = typer.Option(
        0, "--val-limit", help="Validate on the first N validation images only (0 = all of them).", hidden=True
    ),
    threads: int = typer.Option(
        0, "--threads", help="Torch threads per worker (0 = cores // workers on the node).", hidden=True
    ),
    option: Optional[list[str]] = typer.Option(
        None, "--option", "-O", metavar="KEY=VALUE", help="Model option (repeatable), e.g. -O pool=l2 -O loc_scale=1. "
        f"sll-* keys: {SLLOptions.help()} (naive has none; sll-spectral trains with its own defaults, see README). "
        "Values are JSON (numbers, true/false) or plain strings.", show_default=False,
    ),
    margin_eps: Optional[float] = typer.Option(
        None, "--margin-eps", help="sll-* only: train the class heads for certified L2 radius EPS (Lipschitz-margin "
        "cross-entropy on object anchors, margin sqrt(2)*EPS*tau ramped up over the first half). "
        f"(default: {default_margin_eps('sll-spectral')} for sll-spectral, 0 = plain cross-entropy otherwise)", show_default=False,
    ),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Photometric + zoom-out augmentation."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress bar on stderr."),
) -> None:
    """Train a detector with Ray Train and write RUN/model.pt, metrics.jsonl and curves.png.

    Each epoch every worker trains on its shard of the train split, then the model is scored
    (map_50) on validation images held out of the train split (--val-fraction, seeded by
    --val-seed; the test split is left for lipdet eval) and checkpointed; a worker that dies is replaced and the
    run continues from the last checkpoint. The run folder is --out/NAME; it becomes the latest run,
    which `lipdet export` picks up.

    Example (synthetic SVHN, two CPU workers, a few minutes on 2 cores):

        lipdet train --workers 2

    Other examples:

        lipdet train --data ~/svhn --arch sll-l2 --width 4 --epochs 60 --gpu --precision bf16

        lipdet train --address ray://head:10001 --out s3://bucket/lipdet-runs --workers 8 --gpu

        lipdet train --address head:6379 --out /shared/lipdet-runs --workers 2..8

        lipdet train --resume naive-20250101-120000 --epochs 40

    Environment: LIPDET_TRAIN_EPOCHS sets the default epoch count (tests use it); LIPDET_RUNS the
    default --out; RAY_ADDRESS the default --address; LIPDET_SYNTH_SIZE="TRAIN,TEST" the size of
    the synthetic dataset.
    """
    result = run_training(
        TrainOptions(
            arch=arch.value if arch is not None else None,
            data=data,
            workers=WorkerRange.parse(workers),
            resize_check_s=resize_check,
            gpu=gpu,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            width=width,
            seed=seed,
            out=out,
            name=name,
            address=address,
            max_failures=max_failures,
            resume=resume,
            precision=precision.value,
            threads=threads,
            val_limit=val_limit,
            val_fraction=val_fraction,
            val_count=val_count,
            val_seed=val_seed,
            augment=augment,
            fault=os.environ.get(FAULT_ENV) or None,
            progress=progress,
            model_options=parse_model_options(option or []),
            margin_eps=margin_eps,
        )
    )
    typer.echo(f"model: {result.model_path}")
    typer.echo(f"metrics: {result.run_dir / 'metrics.jsonl'}  curves: {result.run_dir / 'curves.png'}")
    typer.echo(f"next: lipdet export {result.model_path}   (or: lipdet export --trt on a GPU machine)")
