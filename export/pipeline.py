"""The export pipeline as small steps: checkpoint -> folded model -> ONNX (fp32 / fp16 / int8) -> plan.

Every step is verified before anything is written; a failed check leaves no file behind:

1. :func:`validate_request`: refuse bad options before any work;
2. :func:`fold_step`: fold the checkpoint (``fold_model``) and compare with the trained model on
   real and random inputs (1e-5 relative);
3. :func:`onnx_fp32_step`: export the folded model to ONNX (dynamic batch; only plain inference
   ops; ``onnx.checker``), ONNX Runtime fp32 vs the folded torch model on 64 real test images
   (1e-4 relative);
4. :func:`precision_step`: fp16 / int8: convert or quantise the graph (int8 calibrated on
   ``--calib-n`` training images, flavour by ``--target``: ``precision.INT8_FLAVOURS``) and compare with fp32;
5. :func:`validation_step`: the clean map_50 (change) on the validation (test) split;
6. :func:`card_step`: the model card (config, priors, Lipschitz bounds, source checkpoint and
   sha256, precision, int8 flavour, dataset, post-processing thresholds, validation results);
7. :func:`write_step`: write the ONNX (card inside) and, with ``--trt``, :func:`plan_step` builds a
   plan from that ONNX, runs it and compares it with ONNX Runtime on the same batch.

Each step returns what it made and measured and changes nothing it was given;
:func:`export_model` composes them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import onnx
import torch
from torch import nn

from lipdet.artifacts import LipschitzBounds, ModelCard, PlanSidecar, Source, TrainingData, load_checkpoint, sidecar_path
from lipdet.data.dataset import SVHNDetection, resolve_data, resolve_training_data
from lipdet.errors import LipdetError
from lipdet.export.onnx_export import INPUT_NAME, check_fold, export_onnx_model, ort_session, run_session, set_card
from lipdet.export.precision import (
    INT8_CALIBRATION,
    INT8_FLAVOURS,
    PRECISIONS,
    SENSITIVE_SQNR_DB,
    TARGETS,
    keep_in_fp32,
    layer_sqnr,
    ort_cpu_support,
    quantize_int8,
    saturation_warning,
    sensitive_layers,
    to_fp16,
)
from lipdet.export.tensorrt import TrtRunner, build_plan, make_sidecar, require_trt
from lipdet.hardware import machine
from lipdet.io import atomic_path, sha256_file
from lipdet.metrics import batched, map_of
from lipdet.models import fold_model
from lipdet.models.lipschitz import head_bounds
from lipdet.parity import ParityError, compare, format_stats, tolerance, within
from lipdet.postprocess import PostprocessConfig
from lipdet.runs import latest_model

VAL_N_DEFAULT = 1000
PARITY_N = 64

Say = Callable[[str], Any]
Outputs = tuple[Any, Any]  # (loc (N, P, 4), logits (N, P, C)): numpy float32 from ORT, tensors from torch


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured."""

    onnx: Path
    plan: Optional[Path] = None
    sidecar: Optional[Path] = None
    card: Optional[ModelCard] = None
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportRequest:
    """The export's options, checked and resolved by :func:`validate_request`."""

    checkpoint: Path
    onnx_out: Path
    precision: str  # fp32 | fp16 | int8
    target: str  # ort | ort-vnni | trt (precision.TARGETS)
    trt: bool
    max_batch: int  # images
    calib_root: Optional[Path]  # None: the checkpoint's own data
    calib_n: int  # images
    val_n: int  # images, 0 = the whole split
    workspace_mb: int  # MiB
    timing_cache: Optional[Path]


@dataclass(frozen=True)
class Folded:
    """:func:`fold_step`: the trained and folded models, the data they are checked on, the fold parity."""

    model: nn.Module
    folded: nn.Module
    meta: dict[str, Any]
    size: int  # input side, pixels
    root: Path  # dataset folder
    test_split: str
    parity_images: torch.Tensor  # (PARITY_N, 3, size, size) in [0, 1]
    stats: dict[str, float]  # compare(): folded vs trained


@dataclass(frozen=True)
class OnnxFp32:
    """:func:`onnx_fp32_step`: the fp32 graph, its ORT session and outputs on the parity images."""

    model: onnx.ModelProto
    session: Any  # onnxruntime.InferenceSession
    outputs: Outputs
    stats: dict[str, float]  # compare(): ORT fp32 vs folded torch


@dataclass(frozen=True)
class Precision:
    """:func:`precision_step`: the final graph and, when ORT can run it, its session and parity vs fp32."""

    model: onnx.ModelProto
    session: Any  # the final graph's session; the fp32 one when the final graph is fp32 or ORT cannot run it
    ort_ok: bool
    ort_reason: str
    flavour: Optional[str]  # int8 flavour, None otherwise
    stats: Optional[dict[str, float]]  # compare() vs fp32; None for fp32 or when ORT cannot run it
    fp32_layers: Optional[tuple[str, ...]] = None  # int8: the layers kept in fp32 (:func:`int8_step`)


@dataclass(frozen=True)
class PlanRequest:
    """What :func:`plan_step` needs to build and check a TensorRT plan."""

    onnx_out: Path  # final ONNX path (recorded in the sidecar)
    size: int  # input side, pixels
    max_batch: int  # images
    workspace_mb: int  # MiB
    timing_cache: Optional[Path]
    images: torch.Tensor  # (n, 3, size, size) in [0, 1]
    session: Any  # ORT session of the graph the plan is built from
    precision: str
    flavour: Optional[str]


@dataclass(frozen=True)
class PlanResult:
    """:func:`plan_step`: the plan's sidecar and its parity vs ONNX Runtime."""

    sidecar: PlanSidecar
    stats: dict[str, float]


@dataclass(frozen=True)
class Written:
    """:func:`write_step`: the files written and the plan's parity (``{}`` without a plan)."""

    plan: Optional[Path]
    sidecar: Optional[Path]
    checks: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# data and small helpers


def _data_root(meta_data: dict[str, Any] | None, say: Say) -> Path:
    """The checkpoint's dataset folder, or the embedded synthetic one if it is gone."""
    root, note = resolve_training_data(meta_data)
    if "not available" in note:
        say(f"note: {note}")
    return root


def _load_split(root: Path, split: str, input_size: int, n: int,
                seed: int = 0) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Up to ``n`` items (0 = all) of a split: images ``(n, 3, S, S)`` in [0, 1] and their targets."""
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


def _map_of(run: Callable[[torch.Tensor], Outputs], images: torch.Tensor, targets: list[dict[str, Any]],
            priors: torch.Tensor, input_size: int) -> dict[str, float]:
    """Clean ``map_50`` and ``map`` (fractions) of a ``run(images) -> (loc, logits)`` callable."""
    r = map_of(run, batched(images, targets), priors, input_size)
    return {"map_50": float(r["map_50"]), "map": float(r["map"])}


def _session_runner(session: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """An ORT session as ``run(images (N, 3, S, S)) -> (loc, logits)`` torch tensors."""
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, logits = run_session(session, x)
        return torch.from_numpy(loc), torch.from_numpy(logits)

    return run


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
# steps


def _check_options(precision: str, target: str, trt: bool, max_batch: int, calib_n: int) -> None:
    """Refuse option values and combinations that cannot work (LipdetError, one line)."""
    if precision not in PRECISIONS:
        raise LipdetError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise LipdetError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if trt and precision == "int8" and target != "trt":
        raise LipdetError(f"precision 'int8' with target {target!r} makes uint8 asymmetric activations, which TensorRT "
                          "rejects; use target 'trt' (the default when trt is set)")
    if max_batch < 1:
        raise LipdetError(f"max_batch must be >= 1, got {max_batch}")
    if calib_n < 1:
        raise LipdetError(f"calib_n must be >= 1, got {calib_n}")


def validate_request(checkpoint: Path | None = None, out: Path | None = None, precision: str = "fp32",
                     trt: bool = False, max_batch: int = 64, calib_data: Path | None = None, calib_n: int = 256,
                     target: str | None = None, val_n: int = VAL_N_DEFAULT, workspace_mb: int = 1024,
                     timing_cache: Path | None = None) -> ExportRequest:
    """Check and resolve the options; everything that can be refused without work is refused here.

    Defaults: ``target`` trt with ``trt`` else ort; ``checkpoint`` the latest run's model;
    ``out`` :func:`default_onnx_path`. Raises LipdetError (one line) before anything is read or written.
    """
    target = target if target is not None else ("trt" if trt else "ort")
    _check_options(precision, target, trt, max_batch, calib_n)
    if trt:
        require_trt()  # before anything is read or written
    checkpoint = Path(checkpoint) if checkpoint is not None else Path(latest_model())
    onnx_out = Path(out) if out is not None else default_onnx_path(checkpoint, precision)
    if onnx_out.suffix.lower() != ".onnx":
        raise LipdetError(f"out must name an .onnx file, got {onnx_out}")
    _check_out_folder(onnx_out)
    calib_root: Path | None = None
    if calib_data is not None:
        calib_root = resolve_data(Path(calib_data))
        if not _has_split(calib_root, "train"):
            raise LipdetError(f"calib_data {calib_data}: no train/digitStruct.mat to calibrate on")
    return ExportRequest(
        checkpoint=checkpoint, onnx_out=onnx_out, precision=precision, target=target, trt=trt, max_batch=max_batch, calib_root=calib_root, calib_n=calib_n,
        val_n=val_n, workspace_mb=workspace_mb, timing_cache=timing_cache,
    )


def fold_step(checkpoint: Path, say: Say) -> Folded:
    """Load and fold the checkpoint; check the folded model on ``PARITY_N`` real + as many random images."""
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    meta = ckpt.meta
    cfg = model.config
    size = int(cfg.input_size)
    say(f"checkpoint: {checkpoint} ({cfg.arch}, width {cfg.width}, input {size})")
    folded = fold_model(model)
    root = _data_root(meta.get("data"), say)
    test_split = "test" if _has_split(root, "test") else "train"
    parity_images, _ = _load_split(root, test_split, size, PARITY_N)
    stats = check_fold(model, folded, parity_images)
    say(f"fold: folded vs trained model on {len(parity_images)} real + random images: {format_stats(stats)}")
    return Folded(model=model, folded=folded, meta=meta, size=size, root=root, test_split=test_split,
                  parity_images=parity_images, stats=stats)


def onnx_fp32_step(fold: Folded, say: Say) -> OnnxFp32:
    """Export the folded model to fp32 ONNX; ParityError if ONNX Runtime differs from torch beyond tolerance."""
    fp32 = export_onnx_model(fold.folded, fold.size)
    session = ort_session(fp32)
    outputs = run_session(session, fold.parity_images)
    with torch.no_grad():
        ref = fold.folded(fold.parity_images)
    stats = compare(outputs, ref)
    say(f"parity: ONNX Runtime fp32 vs folded torch ({len(fold.parity_images)} {fold.test_split} images): "
        f"{format_stats(stats)}")
    if not within(stats, "onnx", "fp32"):
        raise ParityError(f"ONNX fp32 differs from the folded model beyond {tolerance('onnx', 'fp32')['rel']:g} "
                          f"relative: {format_stats(stats)}")
    return OnnxFp32(model=fp32, session=session, outputs=outputs, stats=stats)


def precision_step(req: ExportRequest, fold: Folded, fp32: OnnxFp32, say: Say) -> Precision:
    """The graph at ``req.precision`` (fp16 converted, int8 calibrated on training images) and its
    ORT parity vs fp32 on the parity images; ParityError beyond tolerance."""
    final, session, ort_ok, ort_reason, flavour, kept = fp32.model, fp32.session, True, "", None, None
    if req.precision == "fp16":
        final = to_fp16(fp32.model)
        ort_ok, ort_reason = ort_cpu_support(final, fold.size)
        if not ort_ok:
            say(f"note: ONNX Runtime on the CPU cannot run this fp16 graph ({ort_reason}); it is exported for TensorRT "
                "and is not evaluated here")
    elif req.precision == "int8":
        flavour = INT8_FLAVOURS[req.target]
        final, kept = int8_step(req, fold, fp32, say)

    stats = None
    if req.precision != "fp32" and ort_ok:
        session = ort_session(final)
        stats = compare(run_session(session, fold.parity_images), fp32.outputs)
        say(f"parity: {req.precision} vs fp32 (ONNX Runtime, {len(fold.parity_images)} images): {format_stats(stats)}")
        if not within(stats, "onnx", req.precision):
            raise ParityError(f"{req.precision} graph differs from fp32 beyond tolerance "
                              f"{tolerance('onnx', req.precision)}: {format_stats(stats)}")
    return Precision(model=final, session=session, ort_ok=ort_ok, ort_reason=ort_reason, flavour=flavour, stats=stats,
                     fp32_layers=kept)


def int8_step(req: ExportRequest, fold: Folded, fp32: OnnxFp32, say: Say) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """The int8 graph and the layers it keeps in fp32.

    Quantises every layer first. When that graph misses the int8 parity tolerance against fp32 on the
    parity images, ONNX Runtime's ``qdq_loss_debug`` measures the output SQNR of the sensitive layers
    (entry conv, heads: :func:`lipdet.export.precision.sensitive_layers`) on calibration images and
    :func:`lipdet.export.precision.keep_in_fp32` keeps those below ``SENSITIVE_SQNR_DB`` (all of
    them when none is) in fp32; the graph is quantised again without them. Deterministic: same
    checkpoint and images, same layers.
    """
    calib_root = req.calib_root or fold.root
    calib_split = "train" if _has_split(calib_root, "train") else "test"
    calib, _ = _load_split(calib_root, calib_split, fold.size, req.calib_n, seed=1)
    method = INT8_CALIBRATION["method"]
    flavour = INT8_FLAVOURS[req.target]
    say(f"int8: calibrating {flavour} Q/DQ ({method} ranges, per-channel weights) on {len(calib)} {calib_split} "
        f"images of {calib_root}")
    warning = saturation_warning(flavour, machine())
    if warning:
        say(warning)
    quant = quantize_int8(fp32.model, calib, target=req.target)
    stats = compare(run_session(ort_session(quant), fold.parity_images), fp32.outputs)
    if within(stats, "onnx", "int8"):
        return quant, ()
    sqnr = layer_sqnr(fp32.model, quant, calib[:32], sensitive_layers(fp32.model))
    kept = tuple(keep_in_fp32(sqnr))
    say(f"int8: every layer quantised misses parity ({format_stats(stats)}); output SQNR of the sensitive layers "
        f"(dB, qdq_loss_debug): " + ", ".join(f"{k} {v:.1f}" for k, v in sqnr.items())
        + f"; keeping in fp32 (below {SENSITIVE_SQNR_DB:g} dB, or all when none is): {', '.join(kept)}")
    return quantize_int8(fp32.model, calib, target=req.target, fp32_layers=kept), kept


def validation_step(req: ExportRequest, fold: Folded, fp32: OnnxFp32, prec: Precision, say: Say) -> dict[str, Any]:
    """Clean ``map_50`` / ``map`` (fractions) of fp32 and of the final precision on ``req.val_n`` test images."""
    val_images, val_targets = _load_split(fold.root, fold.test_split, fold.size, req.val_n, seed=2)
    priors = fold.folded.priors.cpu()
    p, n, split = req.precision, len(val_images), fold.test_split
    validation: dict[str, Any] = {"split": split, "images": n, "data": str(fold.root)}
    validation["fp32"] = _map_of(_session_runner(fp32.session), val_images, val_targets, priors, fold.size)
    if p == "fp32":
        say(f"validation map_50 ({n} {split} images): fp32 {validation['fp32']['map_50']:.4f}")
    elif prec.ort_ok:
        validation[p] = _map_of(_session_runner(prec.session), val_images, val_targets, priors, fold.size)
        validation["map_50_change"] = validation[p]["map_50"] - validation["fp32"]["map_50"]
        validation["parity_vs_fp32"] = prec.stats
        say(f"validation map_50 ({n} {split} images): fp32 {validation['fp32']['map_50']:.4f}"
            f" -> {p} {validation[p]['map_50']:.4f} ({validation['map_50_change']:+.4f})")
    else:
        validation[p] = None
        validation["not_evaluated"] = f"ONNX Runtime CPU cannot run the {p} graph: {prec.ort_reason}"
    return validation


def card_step(req: ExportRequest, fold: Folded, prec: Precision, validation: dict[str, Any],
              checks: dict[str, Any], say: Say) -> ModelCard:
    """The model card of the final graph (:meth:`lipdet.artifacts.ModelCard.for_model`); ``checks`` is copied into it."""
    bounds = LipschitzBounds.from_heads(head_bounds(fold.folded))
    card = ModelCard.for_model(
        fold.folded,
        lipschitz=bounds,
        source=Source(checkpoint=str(req.checkpoint.resolve()), sha256=sha256_file(req.checkpoint)),
        precision=req.precision,
        int8_flavour=prec.flavour,
        int8_fp32_layers=prec.fp32_layers,
        data=TrainingData.from_meta(fold.meta.get("data"), str(req.checkpoint)),
        postprocess=PostprocessConfig(),
        validation=validation,
        parity={k: v for k, v in checks.items()},
        opset=int(next(o.version for o in prec.model.opset_import if o.domain in ("", "ai.onnx"))),
    )
    say(f"lipschitz (L2, input pixels -> head outputs): loc {bounds.loc:.4g}, cls {bounds.cls:.4g}")
    return card


def plan_step(req: PlanRequest, tmp_onnx: Path, tmp_plan: Path, say: Say) -> PlanResult:
    """Build the plan from the (temporary) ONNX, run it against ONNX Runtime; ParityError beyond tolerance.

    Runs ``min(len(images), 2 * max_batch)`` images (at least 1), so batch splitting runs too.
    """
    say(f"tensorrt: building {Path(req.onnx_out).with_suffix('.plan').name} (batch 1..{req.max_batch}, "
        f"workspace {req.workspace_mb} MiB)")
    info = build_plan(tmp_onnx, tmp_plan, input_size=req.size, max_batch=req.max_batch, precision=req.precision,
                      workspace_mb=req.workspace_mb, timing_cache=req.timing_cache)
    runner = TrtRunner(tmp_plan)
    x = req.images[: max(1, min(len(req.images), 2 * req.max_batch))]
    stats = compare(runner.run(x), run_session(req.session, x))
    say(f"parity: TensorRT {req.precision} vs ONNX Runtime on {len(x)} images: {format_stats(stats)}")
    if not within(stats, "tensorrt", req.precision):
        raise ParityError(f"TensorRT engine differs from the ONNX beyond tolerance {tolerance('tensorrt', req.precision)}: "
                          f"{format_stats(stats)}")
    sidecar = make_sidecar(
        env=info["env"], precision=req.precision, int8_flavour=req.flavour, input_name=INPUT_NAME,
        input_size=req.size, min_batch=1, opt_batch=info["opt_batch"], max_batch=req.max_batch,
        onnx_path=req.onnx_out, onnx_sha256=sha256_file(tmp_onnx), workspace_bytes=info["workspace_bytes"],
        timing_cache=info["timing_cache"], parity=stats,
    )
    return PlanResult(sidecar=sidecar, stats=stats)


def write_outputs(onnx_bytes: bytes, onnx_out: Path, plan_out: Path | None = None,
                  build: Callable[[Path, Path], PlanSidecar] | None = None) -> tuple[Path | None, Path | None]:
    """Write the ONNX and, with ``plan_out``, the plan and its sidecar: all of them or none.

    Each file is written to a temporary name beside its target (:func:`lipdet.io.atomic_path`);
    ``build(tmp_onnx, tmp_plan)`` builds and checks the plan from the temporary ONNX and returns
    the :class:`~lipdet.artifacts.PlanSidecar`. Only when everything succeeded are the three renamed into place; any
    exception removes every temporary file.
    """
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
        tmp_side.write_text(sidecar.to_json())
    return plan_out, side_path


def write_step(onnx_bytes: bytes, onnx_out: Path, plan: PlanRequest | None, say: Say) -> Written:
    """Write the ONNX and, with ``plan``, build, check and write the plan and sidecar (all or none)."""
    built: list[PlanResult] = []

    def build(tmp_onnx: Path, tmp_plan: Path) -> PlanSidecar:
        assert plan is not None
        built.append(plan_step(plan, tmp_onnx, tmp_plan, say))
        return built[-1].sidecar

    plan_out = onnx_out.with_suffix(".plan") if plan is not None else None
    plan_path, side_path = write_outputs(onnx_bytes, onnx_out, plan_out, build if plan is not None else None)
    say(f"wrote {onnx_out}")
    if plan_path:
        say(f"wrote {plan_path}")
        say(f"wrote {side_path}")
    checks = {f"tensorrt_{plan.precision}_vs_onnxruntime": built[-1].stats} if plan is not None and built else {}
    return Written(plan=plan_path, sidecar=side_path, checks=checks)


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
    echo: Say = print,
) -> ExportResult:
    """Run the whole export (see the module docstring); returns what was written and measured."""
    say = echo
    req = validate_request(checkpoint, out, precision, trt, max_batch, calib_data, calib_n, target, val_n,
                           workspace_mb, timing_cache)
    fold = fold_step(req.checkpoint, say)
    fp32 = onnx_fp32_step(fold, say)
    prec = precision_step(req, fold, fp32, say)
    checks: dict[str, Any] = {"fold": fold.stats, "onnx_fp32_vs_torch": fp32.stats}
    if prec.stats is not None:
        checks[f"onnx_{req.precision}_vs_fp32"] = prec.stats
    validation = validation_step(req, fold, fp32, prec, say)
    card = card_step(req, fold, prec, validation, checks, say)
    onnx_bytes = set_card(prec.model, card).SerializeToString()
    plan = None
    if req.trt:
        plan = PlanRequest(onnx_out=req.onnx_out, size=fold.size, max_batch=req.max_batch,
                           workspace_mb=req.workspace_mb, timing_cache=req.timing_cache, images=fold.parity_images,
                           session=prec.session, precision=req.precision, flavour=prec.flavour)
    written = write_step(onnx_bytes, req.onnx_out, plan, say)
    result = ExportResult(onnx=req.onnx_out, plan=written.plan, sidecar=written.sidecar, card=card,
                          checks={**checks, **written.checks})
    say(f"next: lipdet eval {result.plan or req.onnx_out} --pgd")
    return result
