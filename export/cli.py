"""``lipdet export``: the typer command; the pipeline itself is :mod:`lipdet.export.pipeline`.

checkpoint -> folded model -> ONNX (fp32 / fp16 / int8) -> optional TensorRT plan, every step
verified before anything is written (see :mod:`lipdet.export.pipeline`).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from lipdet.export.pipeline import VAL_N_DEFAULT, ExportResult, default_onnx_path, export_model, write_outputs
from lipdet.export.precision import PRECISIONS, TARGETS

Precision = enum.Enum("Precision", {p: p for p in PRECISIONS}, type=str)
"""``--precision`` choices (typer makes a bad value a usage error)."""
Target = enum.Enum("Target", {t: t for t in TARGETS}, type=str)
"""``--target`` choices."""

__all__ = ["ExportResult", "command", "default_onnx_path", "export_model", "write_outputs"]


def command(
    model: Optional[Path] = typer.Argument(
        None, help="Checkpoint to export (model.pt). Default: the latest run's model.pt (runs/LATEST).",
        show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="ONNX file to write. Default: beside the checkpoint (model.onnx; "
        "model.fp16.onnx / model.int8.onnx for reduced precision). The plan goes beside it (.plan + .plan.json).",
        show_default=False),
    precision: Precision = typer.Option("fp32", "--precision", "-p",
                                  help="Precision of the graph (and so of the TensorRT engine)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT plan (needs an NVIDIA GPU and "
                             "pip install 'lipdet\\[gpu]')."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Largest batch of the TensorRT profile (1..N)."),
    calib_data: Optional[Path] = typer.Option(
        None, "--calib-data", help="SVHN folder whose train/ split calibrates int8 (default: the model's own data).",
        show_default=False),
    calib_n: int = typer.Option(256, "--calib-n", min=1, help="Training images used to calibrate int8."),
    target: Optional[Target] = typer.Option(
        None, "--target", help="Runtime the int8 graph is for: ort (uint8 activations, 7-bit int8 weights: fast and "
        "accurate on every x86 CPU), ort-vnni (full 8-bit weights: as fast, accurate only on CPUs with VNNI/AMX; a "
        "warning where it runs without) or trt (int8 symmetric, what TensorRT needs). Default: trt with --trt, else ort.",
        show_default=False),
    val_n: int = typer.Option(VAL_N_DEFAULT, "--val-n", min=0, help="Validation (test split) images for the clean "
                              "map_50 check of each precision; 0 = the whole split."),
    workspace_mb: int = typer.Option(1024, "--workspace-mb", min=16, help="TensorRT builder workspace limit (MiB)."),
    timing_cache: Optional[Path] = typer.Option(
        None, "--timing-cache", help="TensorRT timing cache file (default: in lipdet's cache folder, per TensorRT "
        "version and GPU).", show_default=False),
    triton: Optional[Path] = typer.Option(
        None, "--triton", help="Also write a Triton model repository here: REPO/<name>/config.pbtxt and "
        "REPO/<name>/1/model.onnx (or model.plan with --trt), max_batch_size --max-batch, dynamic batching.",
        show_default=False),
) -> None:
    """Export a trained checkpoint to ONNX (and optionally a TensorRT plan), verified at every step.

    Folds the model into plain ops (checked against the trained model, 1e-5 relative).
    Exports it with a dynamic batch and its model card inside; ONNX Runtime must match it (1e-4).
    fp16 / int8 live in the graph: each is compared with fp32 and its clean map_50 change printed.
    With --trt, the plan is run and compared with ONNX Runtime. Nothing is written if a check fails.

    Examples:

      lipdet export                                  # latest run -> runs/<name>/model.onnx

      lipdet export runs/sll-l2-20250101-120000/model.pt --out sll.onnx

      lipdet export --precision int8                 # uint8/int8 Q/DQ, fast on ONNX Runtime CPU

      lipdet export --precision int8 --trt           # symmetric int8 Q/DQ + TensorRT plan

      lipdet export --precision fp16 --trt --max-batch 128

      lipdet export --triton triton-models/          # + a Triton repository (no Triton server needed here)
    """
    if triton is not None:
        from lipdet.export.triton import check_repo, write_repository

        check_repo(triton)
    result = export_model(
        checkpoint=model, out=out, precision=precision.value, trt=trt, max_batch=max_batch, calib_data=calib_data,
        calib_n=calib_n, target=target.value if target is not None else None, val_n=val_n, workspace_mb=workspace_mb, timing_cache=timing_cache,
        echo=typer.echo,
    )
    if triton is not None:
        typer.echo(f"triton: {write_repository(triton, result.plan or result.onnx, max_batch)}")
