"""``lipdet export``: checkpoint -> folded model -> ONNX (fp32 / fp16 / int8) -> optional TensorRT plan.

Every step is verified before anything is written; a failed check leaves no file behind:

1. fold the checkpoint (``fold_model``) and compare with the trained model on real and random
   inputs (1e-5 relative);
2. export the folded model to ONNX (dynamic batch; only plain inference ops; ``onnx.checker``);
3. ONNX Runtime fp32 vs the folded torch model on 64 real test images (1e-4 relative);
4. fp16 / int8: convert or quantise the graph (int8 calibrated on ``--calib-n`` training images,
   flavour by ``--target``), compare with fp32, and measure the clean map_50 change on the
   validation (test) split;
5. ``--trt``: build a plan from that ONNX, run it, compare with ONNX Runtime on the same batch.

The model card (config, priors, Lipschitz bounds, source checkpoint and sha256, precision, int8
flavour, dataset, post-processing thresholds, validation results) is stored inside the ONNX.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import typer

from lipdet.errors import LipdetError
from lipdet.metrics import batched, map_of

VAL_N_DEFAULT = 1000
PARITY_N = 64


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured."""

    onnx: Path
    plan: Optional[Path] = None
    sidecar: Optional[Path] = None
    card: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# data


def _data_root(meta_data: dict[str, Any] | None, say) -> Path:
    """The checkpoint's dataset folder, or the embedded synthetic one if it is gone."""
    from lipdet.data.dataset import resolve_training_data

    root, note = resolve_training_data(meta_data)
    if "not available" in note:
        say(f"note: {note}")
    return root


def _load_split(root: Path, split: str, input_size: int, n: int, seed: int = 0):
    """Up to ``n`` items (0 = all) of a split: images ``(n, 3, S, S)`` and their targets."""
    from lipdet.data.dataset import SVHNDetection

    ds = SVHNDetection(root, split, input_size=input_size)
    idx = list(range(len(ds)))
    if n and n < len(ds):
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(len(ds), generator=g)[:n].tolist())
    items = [ds[i] for i in idx]
    images = torch.stack([im for im, _ in items])
    return images, [t for _, t in items]


def _has_split(root: Path, split: str) -> bool:
    return (root / split / "digitStruct.mat").is_file()


# ----------------------------------------------------------------------------------------------
# evaluation helpers


def _map_of(run, images: torch.Tensor, targets: list[dict[str, Any]], priors: torch.Tensor,
            input_size: int) -> dict[str, float]:
    """Clean ``map_50`` and ``map`` of a ``run(images) -> (loc, logits)`` callable (:func:`lipdet.metrics.map_of`)."""
    r = map_of(run, batched(images, targets), priors, input_size)
    return {"map_50": float(r["map_50"]), "map": float(r["map"])}


def _session_runner(session):
    from lipdet.export.onnx_export import run_session

    def run(x: torch.Tensor):
        loc, logits = run_session(session, x)
        return torch.from_numpy(loc), torch.from_numpy(logits)

    return run


def _load_checkpoint_model(path: Path):
    """``lipdet.artifacts.load_model`` with any unexpected unpickling failure turned into one line."""
    from lipdet.artifacts import load_model

    try:
        return load_model(path)
    except LipdetError:
        raise
    except Exception as e:  # e.g. a truncated file failing inside torch's weights-only unpickler
        raise LipdetError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None


def _check_out_folder(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LipdetError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise LipdetError(f"output folder is not writable: {parent}")
    if path.is_dir():
        raise LipdetError(f"output path is a folder: {path} (give a file name such as {path / 'model.onnx'})")


def default_onnx_path(checkpoint: Path, precision: str) -> Path:
    """``model.onnx`` beside the checkpoint for fp32, ``model.fp16.onnx`` / ``model.int8.onnx`` otherwise."""
    stem = checkpoint.stem
    return checkpoint.with_name(f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx")


# ----------------------------------------------------------------------------------------------
# the pipeline


def export_model(
    checkpoint: Path | None = None,
    out: Path | None = None,
    precision: str = "fp32",
    trt: bool = False,
    max_batch: int = 64,
    calib_data: Path | None = None,
    calib_n: int = 256,
    target: str | None = None,
    val_n: int = VAL_N_DEFAULT,
    workspace_mb: int = 1024,
    timing_cache: Path | None = None,
    echo=print,
) -> ExportResult:
    """Run the whole export (see the module docstring); returns what was written and measured."""
    from lipdet.export.onnx_export import TOLERANCES, ParityError, compare, format_stats, within
    from lipdet.export.precision import INT8_FLAVOURS, PRECISIONS, TARGETS
    from lipdet.export.tensorrt import require_trt

    say = echo
    # -- options: everything that can be refused without work is refused first -----------------
    if precision not in PRECISIONS:
        raise LipdetError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if target is None:
        target = "trt" if trt else "ort"
    if target not in TARGETS:
        raise LipdetError(f"unknown --target {target!r}; choose one of: {', '.join(TARGETS)}")
    if trt and precision == "int8" and target == "ort":
        raise LipdetError("--precision int8 --target ort makes uint8 asymmetric activations, which TensorRT rejects; "
                          "use --target trt (the default with --trt)")
    if max_batch < 1:
        raise LipdetError(f"--max-batch must be >= 1, got {max_batch}")
    if calib_n < 1:
        raise LipdetError(f"--calib-n must be >= 1, got {calib_n}")
    if trt:
        require_trt()  # before anything is read or written
    if checkpoint is None:
        from lipdet.runs import latest_model

        checkpoint = latest_model()
    checkpoint = Path(checkpoint)
    onnx_out = Path(out) if out is not None else default_onnx_path(checkpoint, precision)
    if onnx_out.suffix.lower() != ".onnx":
        raise LipdetError(f"--out must name an .onnx file, got {onnx_out}")
    plan_out = onnx_out.with_suffix(".plan") if trt else None
    _check_out_folder(onnx_out)
    calib_root: Path | None = None
    if calib_data is not None:
        from lipdet.data.dataset import resolve_data

        calib_root = resolve_data(Path(calib_data))
        if not _has_split(calib_root, "train"):
            raise LipdetError(f"--calib-data {calib_data}: no train/digitStruct.mat to calibrate on")

    # -- checkpoint and folding ------------------------------------------------------------------
    from lipdet.artifacts import make_card
    from lipdet.export.onnx_export import check_fold, export_onnx_model, ort_session, run_session, set_card
    from lipdet.io import sha256_file
    from lipdet.models import fold_model
    from lipdet.models.lipschitz import head_bounds
    from lipdet.postprocess import PostprocessConfig

    model = _load_checkpoint_model(checkpoint)
    meta = getattr(model, "checkpoint_meta", {}) or {}
    cfg = model.config
    size = int(cfg.input_size)
    say(f"checkpoint: {checkpoint} ({cfg.arch}, width {cfg.width}, input {size})")
    folded = fold_model(model)

    root = _data_root(meta.get("data"), say)
    test_split = "test" if _has_split(root, "test") else "train"
    parity_images, _ = _load_split(root, test_split, size, PARITY_N)
    checks: dict[str, Any] = {}
    checks["fold"] = check_fold(model, folded, parity_images)
    say(f"fold: folded vs trained model on {len(parity_images)} real + random images: {format_stats(checks['fold'])}")

    # -- ONNX fp32 -------------------------------------------------------------------------------
    fp32 = export_onnx_model(folded, size)
    sess32 = ort_session(fp32)
    out32 = run_session(sess32, parity_images)
    with torch.no_grad():
        ref = folded(parity_images)
    checks["onnx_fp32_vs_torch"] = compare(out32, ref)
    say(f"parity: ONNX Runtime fp32 vs folded torch ({len(parity_images)} {test_split} images): "
        f"{format_stats(checks['onnx_fp32_vs_torch'])}")
    if not within(checks["onnx_fp32_vs_torch"], "fp32"):
        raise ParityError(f"ONNX fp32 differs from the folded model beyond {TOLERANCES['fp32']['rel']:g} relative: "
                          f"{format_stats(checks['onnx_fp32_vs_torch'])}")

    # -- precision -------------------------------------------------------------------------------
    final = fp32
    ort_ok, ort_reason = True, ""
    flavour = None
    if precision == "fp16":
        from lipdet.export.precision import ort_cpu_support, to_fp16

        final = to_fp16(fp32)
        ort_ok, ort_reason = ort_cpu_support(final, size)
        if not ort_ok:
            say(f"note: ONNX Runtime on the CPU cannot run this fp16 graph ({ort_reason}); it is exported for TensorRT "
                "and is not evaluated here")
    elif precision == "int8":
        from lipdet.export.precision import quantize_int8

        flavour = INT8_FLAVOURS[target]
        calib_root = calib_root or root
        calib_split = "train" if _has_split(calib_root, "train") else "test"
        calib, _ = _load_split(calib_root, calib_split, size, calib_n, seed=1)
        say(f"int8: calibrating {flavour} Q/DQ on {len(calib)} {calib_split} images of {calib_root}")
        final = quantize_int8(fp32, calib, target=target)

    sess_final = sess32
    if precision != "fp32" and ort_ok:
        sess_final = ort_session(final)
        checks[f"onnx_{precision}_vs_fp32"] = compare(run_session(sess_final, parity_images), out32)
        say(f"parity: {precision} vs fp32 (ONNX Runtime, {len(parity_images)} images): "
            f"{format_stats(checks[f'onnx_{precision}_vs_fp32'])}")
        if not within(checks[f"onnx_{precision}_vs_fp32"], precision):
            raise ParityError(f"{precision} graph differs from fp32 beyond tolerance {TOLERANCES[precision]}: "
                              f"{format_stats(checks[f'onnx_{precision}_vs_fp32'])}")
    val_images, val_targets = _load_split(root, test_split, size, val_n, seed=2)
    priors = folded.priors.cpu()
    validation: dict[str, Any] = {"split": test_split, "images": len(val_images), "data": str(root)}
    validation["fp32"] = _map_of(_session_runner(sess32), val_images, val_targets, priors, size)
    if precision == "fp32":
        say(f"validation map_50 ({len(val_images)} {test_split} images): fp32 {validation['fp32']['map_50']:.4f}")
    elif ort_ok:
        validation[precision] = _map_of(_session_runner(sess_final), val_images, val_targets, priors, size)
        validation["map_50_change"] = validation[precision]["map_50"] - validation["fp32"]["map_50"]
        validation["parity_vs_fp32"] = checks[f"onnx_{precision}_vs_fp32"]
        say(f"validation map_50 ({len(val_images)} {test_split} images): fp32 {validation['fp32']['map_50']:.4f}"
            f" -> {precision} {validation[precision]['map_50']:.4f} ({validation['map_50_change']:+.4f})")
    else:
        validation[precision] = None
        validation["not_evaluated"] = f"ONNX Runtime CPU cannot run the {precision} graph: {ort_reason}"

    # -- card ------------------------------------------------------------------------------------
    pp = PostprocessConfig()
    card_fields: dict[str, Any] = dict(
        lipschitz=head_bounds(folded),
        source={"checkpoint": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)},
        precision=precision,
        int8_flavour=flavour,
        data=meta.get("data"),
        postprocess={**asdict(pp), "variances": [0.1, 0.2]},
        validation=validation,
        parity={k: v for k, v in checks.items()},
        opset=int(next(o.version for o in final.opset_import if o.domain in ("", "ai.onnx"))),
    )
    card = make_card(folded, **card_fields)
    say(f"lipschitz (L2, input pixels -> head outputs): loc {card['lipschitz']['loc']:.4g}, "
        f"cls {card['lipschitz']['cls']:.4g}")
    set_card(final, card)

    # -- write (and build the plan) atomically ----------------------------------------------------
    result = ExportResult(onnx=onnx_out, card=card, checks=checks)
    build = None
    if trt:
        def build(tmp_onnx: Path, tmp_plan: Path) -> dict[str, Any]:
            return _build_and_check_plan(tmp_onnx, tmp_plan, onnx_out, size, max_batch, workspace_mb, timing_cache,
                                         parity_images, sess_final if ort_ok else sess32, precision, flavour,
                                         checks, say)

    result.plan, result.sidecar = write_outputs(final.SerializeToString(), onnx_out, plan_out, build)
    say(f"wrote {onnx_out}")
    if result.plan:
        say(f"wrote {result.plan}")
        say(f"wrote {result.sidecar}")
    say(f"next: lipdet eval {result.plan or onnx_out} --pgd")
    return result


def write_outputs(onnx_bytes: bytes, onnx_out: Path, plan_out: Path | None = None,
                  build: Callable[[Path, Path], dict[str, Any]] | None = None) -> tuple[Path | None, Path | None]:
    """Write the ONNX and, with ``plan_out``, the plan and its sidecar: all of them or none.

    Each file is written to a temporary name beside its target (:func:`lipdet.io.atomic_path`);
    ``build(tmp_onnx, tmp_plan)`` builds and checks the plan from the temporary ONNX and returns
    the sidecar dict. Only when everything succeeded are the three renamed into place; any
    exception removes every temporary file.
    """
    from lipdet.export.tensorrt import sidecar_path
    from lipdet.io import atomic_path

    with contextlib.ExitStack() as stack:
        tmp_onnx = stack.enter_context(atomic_path(onnx_out))
        tmp_onnx.write_bytes(onnx_bytes)
        if plan_out is None:
            return None, None
        if build is None:
            raise ValueError("write_outputs: plan_out needs a build function")
        tmp_plan = stack.enter_context(atomic_path(plan_out))
        sidecar = build(tmp_onnx, tmp_plan)
        side_path = sidecar_path(plan_out)
        tmp_side = stack.enter_context(atomic_path(side_path))
        tmp_side.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return plan_out, side_path


def _build_and_check_plan(tmp_onnx, tmp_plan, onnx_out, size, max_batch, workspace_mb, timing_cache,
                          images, session, precision, flavour, checks, say) -> dict[str, Any]:
    """Build the plan from the (temporary) ONNX, run it against ONNX Runtime, return its sidecar."""
    from lipdet.export.onnx_export import INPUT_NAME, ParityError, compare, format_stats, run_session
    from lipdet.export.tensorrt import TRT_TOLERANCES, TrtRunner, build_plan, make_sidecar
    from lipdet.io import sha256_file

    say(f"tensorrt: building {Path(onnx_out).with_suffix('.plan').name} (batch 1..{max_batch}, "
        f"workspace {workspace_mb} MiB)")
    info = build_plan(tmp_onnx, tmp_plan, input_size=size, max_batch=max_batch, precision=precision,
                      workspace_mb=workspace_mb, timing_cache=timing_cache)
    runner = TrtRunner(tmp_plan)
    x = images[: max(1, min(len(images), 2 * max_batch))]  # more than max_batch when possible: splitting runs too
    got = runner.run(x)
    want = run_session(session, x)
    stats = compare(got, want)
    checks[f"tensorrt_{precision}_vs_onnxruntime"] = stats
    say(f"parity: TensorRT {precision} vs ONNX Runtime on {len(x)} images: {format_stats(stats)}")
    tol = TRT_TOLERANCES[precision]
    if not (stats["rel"] <= tol["rel"] and stats["cosine"] >= tol["cosine"]):
        raise ParityError(f"TensorRT engine differs from the ONNX beyond tolerance {tol}: {format_stats(stats)}")
    return make_sidecar(
        env=info["env"], precision=precision, int8_flavour=flavour, input_name=INPUT_NAME, input_size=size,
        min_batch=1, opt_batch=info["opt_batch"], max_batch=max_batch, onnx_path=onnx_out,
        onnx_sha256=sha256_file(tmp_onnx), workspace_bytes=info["workspace_bytes"],
        timing_cache=info["timing_cache"], parity=stats,
    )


# ----------------------------------------------------------------------------------------------
# typer command


def command(
    model: Optional[Path] = typer.Argument(
        None, help="Checkpoint to export (model.pt). Default: the latest run's model.pt (runs/LATEST).",
        show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="ONNX file to write. Default: beside the checkpoint (model.onnx; "
        "model.fp16.onnx / model.int8.onnx for reduced precision). The plan goes beside it (.plan + .plan.json).",
        show_default=False),
    precision: str = typer.Option("fp32", "--precision", "-p", help="fp32 | fp16 | int8: precision of the graph "
                                  "(and so of the TensorRT engine)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT plan (needs an NVIDIA GPU and "
                             "pip install 'lipdet\\[gpu]')."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Largest batch of the TensorRT profile (1..N)."),
    calib_data: Optional[Path] = typer.Option(
        None, "--calib-data", help="SVHN folder whose train/ split calibrates int8 (default: the model's own data).",
        show_default=False),
    calib_n: int = typer.Option(256, "--calib-n", min=1, help="Training images used to calibrate int8."),
    target: Optional[str] = typer.Option(
        None, "--target", help="Runtime the int8 graph is for: ort (uint8 activations and weights, accurate on every CPU) or "
        "trt (int8 symmetric, what TensorRT needs). Default: trt with --trt, else ort.", show_default=False),
    val_n: int = typer.Option(VAL_N_DEFAULT, "--val-n", min=0, help="Validation (test split) images for the clean "
                              "map_50 check of each precision; 0 = the whole split."),
    workspace_mb: int = typer.Option(1024, "--workspace-mb", min=16, help="TensorRT builder workspace limit (MiB)."),
    timing_cache: Optional[Path] = typer.Option(
        None, "--timing-cache", help="TensorRT timing cache file (default: in lipdet's cache folder, per TensorRT "
        "version and GPU).", show_default=False),
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
    """
    export_model(
        checkpoint=model, out=out, precision=precision, trt=trt, max_batch=max_batch, calib_data=calib_data,
        calib_n=calib_n, target=target, val_n=val_n, workspace_mb=workspace_mb, timing_cache=timing_cache,
        echo=typer.echo,
    )
