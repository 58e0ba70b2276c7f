"""Reduced precision lives in the ONNX graph: fp16 by converting it, int8 by explicit Q/DQ nodes.

TensorRT 11 builds strongly typed networks only (no FP16/INT8 builder flags, no calibrators), so
the precision an engine runs in is decided here, in the graph it is built from:

* ``fp16``: :func:`to_fp16` converts every float tensor (weights and activations) to float16 with
  ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``: the graph still
  takes and returns float32, with ``Cast`` nodes at its edges.
* ``int8``: :func:`quantize_int8` runs ``onnxruntime.quantization.quantize_static`` (QDQ format,
  per-channel symmetric 8-bit weights, activation ranges calibrated on training images by
  :data:`INT8_CALIBRATION`, robust to outliers where MinMax is not; optionally with some layers
  kept in fp32: :func:`sensitive_layers` and :func:`keep_in_fp32` are the rule). Two flavours,
  because the best graph for ONNX Runtime on a CPU is not one TensorRT accepts
  (:data:`INT8_SPECS` holds each flavour's settings, :data:`INT8_FLAVOURS` the ``--target`` defaults):

  - ``u8s8-reduce-range`` (``--target ort``, the default): uint8 asymmetric activations, int8
    symmetric per-channel weights in [-64, 64] (ORT's ``reduce_range``). ONNX Runtime's u8s8
    kernels are its fast ones (VNNI / AMX where the CPU has them, ``vpmaddubsw`` on AVX2), and
    7-bit weights cannot saturate ``vpmaddubsw``: accurate and fast on every x86 CPU.
  - ``u8s8-asymmetric`` (``--target ort-vnni``): the same with full 8-bit weights: as fast, one
    more bit of weight precision, accurate only on CPUs with VNNI/AMX (:func:`saturation_warning`).
  - ``s8s8-symmetric`` (``--target trt``): int8 activations with zero point 0, as TensorRT
    requires. On a CPU, ORT runs it barely faster than fp32.

  ``u8u8-asymmetric`` (uint8 weights) was the ``ort`` flavour of the previous version: accurate
  everywhere but ONNX Runtime has no VNNI kernel for it (1.0-1.2x fp32 on an AVX512-VNNI EPYC,
  where u8s8 runs 2.1-2.7x). Its files, and u8s8 files from before it, still load and run.

After quantisation every weight's ``DequantizeLinear`` output is renamed to the weight's original
name (the folded ``state_dict`` key), so the dequantised weights can be read back by name
(:func:`onnx_constants`) -- that is how :mod:`lipdet.deploy.twin` rebuilds a differentiable twin
of exactly the weights the int8 engine uses.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lipdet.errors import LipdetError
from lipdet.export.onnx_export import INPUT_NAME, check_graph, ort_session
from lipdet.hardware import Machine

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Int8Spec:
    """How one int8 flavour quantises: the ``quantize_static`` settings and where it is accurate.

    Attributes:
        activations: ``"uint8"`` (asymmetric) or ``"int8"`` (symmetric, zero point 0).
        weights: ``"uint8"`` or ``"int8"``; always symmetric, per output channel.
        reduce_range: weights in [-64, 64] (ORT's ``reduce_range``) instead of [-127, 127].
        needs_int8_dot: accurate only on CPUs with int8 dot-product instructions (VNNI / AMX,
            :attr:`lipdet.hardware.Machine.int8_dot`): uint8 x full-range int8 pairs summed by AVX2's
            ``vpmaddubsw`` (2 x 255 x 127 > 32767) saturate to int16 elsewhere.
    """

    activations: str
    weights: str
    reduce_range: bool
    needs_int8_dot: bool


INT8_SPECS: dict[str, Int8Spec] = {
    "u8s8-reduce-range": Int8Spec("uint8", "int8", reduce_range=True, needs_int8_dot=False),
    "u8s8-asymmetric": Int8Spec("uint8", "int8", reduce_range=False, needs_int8_dot=True),
    "u8u8-asymmetric": Int8Spec("uint8", "uint8", reduce_range=False, needs_int8_dot=False),
    "s8s8-symmetric": Int8Spec("int8", "int8", reduce_range=False, needs_int8_dot=False),
}
"""Every int8 flavour lipdet writes or has written, by the name the model card records (``int8_flavour``).

Measured on a 2-core AMD EPYC with AVX512 + VNNI (ONNX Runtime 1.32, batch 64, one thread, CPU time,
``benchmarks/inference.py``): u8s8 with or without ``reduce_range`` 2.1-2.7x fp32 (same kernel), u8u8
1.0-1.2x (MLAS has no VNNI u8u8 kernel on this CPU), s8s8 0.8x (1.7x naive; its Relus stay separate for
TensorRT, so half its convolutions do not fuse). Accuracy vs fp32 on a demo-trained naive model, 1000
test images: every flavour within 0.15 map_50 points; ``reduce_range`` lowers the output cosine by ~1e-4.
``reduce_range`` is what makes u8s8 portable: ``|u8 x s8| <= 255 x 64``, so a pair sums to at most
32640 and AVX2's ``vpmaddubsw`` cannot saturate (the saturation cost the issue's AVX2 machine parity:
rel 0.56, cosine 0.986 with full-range weights)."""

TARGETS: tuple[str, ...] = ("ort", "ort-vnni", "trt")
INT8_FLAVOURS: dict[str, str] = {"ort": "u8s8-reduce-range", "ort-vnni": "u8s8-asymmetric", "trt": "s8s8-symmetric"}
"""``--target`` -> int8 flavour (a key of :data:`INT8_SPECS`) recorded in the model card as ``int8_flavour``.

``ort`` (portable, the default) is fast and accurate on every x86 CPU; ``ort-vnni`` keeps 8-bit weights and
is only accurate where the CPU has VNNI/AMX (a u8s8 file loaded elsewhere warns: :func:`saturation_warning`);
``trt`` is what TensorRT accepts."""
LEGACY_ORT_FLAVOUR = "u8s8-asymmetric"
"""The ``ort`` flavour before the u8u8 one: the same graph as ``--target ort-vnni`` writes."""

INT8_CALIBRATION: dict[str, object] = {"method": "Percentile", "percentile": 99.999}
"""How activation ranges are calibrated: ONNX Runtime's ``CalibrationMethod`` and its setting.

Percentile clips each activation's range at the 99.999th percentile of the calibration values, so
a few outliers do not stretch the 256 steps over a range most values never use (MinMax's failure)."""

SENSITIVE_SQNR_DB = 30.0
"""A sensitive layer (entry conv or head, :func:`sensitive_layers`) whose output SQNR in the int8 graph,
against fp32, is below this (dB; 30 dB = 3% relative error) is kept in fp32 by :func:`keep_in_fp32`."""


# ----------------------------------------------------------------------------------------------
# fp16


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 version of an fp32 graph (float32 inputs/outputs kept, Casts at the edges)."""
    from onnxconverter_common import float16

    with _quiet_logs():
        half = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    check_graph(half)
    return half


def ort_cpu_support(model: onnx.ModelProto, input_size: int) -> tuple[bool, str]:
    """Whether ONNX Runtime's CPU provider can load and run ``model``; ``(False, reason)`` if not."""
    try:
        sess = ort_session(model)
        sess.run(None, {INPUT_NAME: np.zeros((1, 3, input_size, input_size), np.float32)})
    except Exception as e:  # ORT raises its own exception types (NOT_IMPLEMENTED, INVALID_GRAPH...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return False, first[:300]
    return True, ""


# ----------------------------------------------------------------------------------------------
# int8


class ImageCalibrationReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a tensor of images ``(N, 3, S, S)``.

    Subclasses the ORT base class lazily (see :func:`calibration_reader`) so this module imports
    without ORT's quantization tools.
    """

    def __init__(self, images: torch.Tensor | np.ndarray, batch: int = 32) -> None:
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        # equal batches: the histogram calibrators (Percentile, Entropy) stack every batch's tensors
        self._batch = max(d for d in range(1, max(1, int(batch)) + 1) if len(self._x) % d == 0) if len(self._x) else 1
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._x):
            return None
        chunk = self._x[self._i : self._i + self._batch]
        self._i += self._batch
        return {INPUT_NAME: chunk}

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return (len(self._x) + self._batch - 1) // self._batch


def calibration_reader(images: torch.Tensor | np.ndarray, batch: int = 32):
    """A CalibrationDataReader (an ORT subclass instance) yielding ``{"images": batch}`` dicts."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    return _Reader(images, batch)


def quantize_int8(model: onnx.ModelProto, calib_images: torch.Tensor | np.ndarray, target: str = "ort",
                  fp32_layers: Sequence[str] = (), flavour: str | None = None) -> onnx.ModelProto:
    """Statically quantise an fp32 graph to a QDQ int8 graph calibrated on ``calib_images`` ``(N, 3, S, S)``.

    ``target`` picks the flavour (:data:`INT8_FLAVOURS`); ``flavour`` (a key of :data:`INT8_SPECS`, e.g. the
    previous default ``u8u8-asymmetric`` for a benchmark) overrides it. Weights are 8-bit (7-bit with
    ``reduce_range``), symmetric, per output channel; activation ranges by :data:`INT8_CALIBRATION`.
    ``fp32_layers`` (layer names, e.g. ``cls_heads.fire8.conv``: a Conv's weight name less ``.weight``)
    stay in fp32, and so do the L2-norm pools' squared activations (:func:`squared_domain_nodes`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if target not in INT8_FLAVOURS:
        raise LipdetError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    name = flavour if flavour is not None else INT8_FLAVOURS[target]
    if name not in INT8_SPECS:
        raise LipdetError(f"unknown int8 flavour {name!r}; choose one of: {', '.join(INT8_SPECS)}")
    if len(calib_images) == 0:
        raise LipdetError("int8 calibration needs at least one image (calib_n)")
    spec = INT8_SPECS[name]
    symmetric = spec.activations == "int8"
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    exclude = _conv_nodes(model, fp32_layers) + squared_domain_nodes(model)
    with tempfile.TemporaryDirectory(prefix="lipdet-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        try:
            with _quiet_logs():
                quantize_static(
                    str(src),
                    str(dst),
                    calibration_reader(calib_images),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=spec.reduce_range,  # weights only (activations stay 8-bit): see INT8_SPECS
                    activation_type=qtype[spec.activations],
                    weight_type=qtype[spec.weights],
                    calibrate_method=getattr(CalibrationMethod, str(INT8_CALIBRATION["method"])),
                    nodes_to_exclude=exclude,
                    extra_options={
                        "CalibPercentile": INT8_CALIBRATION.get("percentile", 99.999),
                        "ActivationSymmetric": symmetric,
                        "WeightSymmetric": True,
                        # TensorRT fuses Relu itself; keep the graph literal for it
                        "QDQKeepRemovableActivations": symmetric,
                    },
                )
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LipdetError(f"int8 quantisation failed: {first[:300]}") from e
        quant = onnx.load(str(dst))
    restore_weight_names(model, quant)
    del quant.metadata_props[:]
    for p in model.metadata_props:
        quant.metadata_props.add(key=p.key, value=p.value)
    quant.producer_name, quant.producer_version = model.producer_name, model.producer_version
    check_graph(quant)
    if symmetric:
        bad = [n.name for n in quant.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not _zero_point_is_zero(quant, n)]
        if bad:
            raise LipdetError(f"int8 graph for TensorRT has a non-zero zero point at {bad[0]} (TensorRT needs symmetric Q/DQ)")
    return quant


def squared_domain_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes that compute on squared activations, kept in fp32 by :func:`quantize_int8`: from each
    ``Mul(x, x)`` downstream (stopping at Convs) up to and including the ``Sqrt`` that ends it -- the L2-norm
    pool ``sqrt(avgpool(x^2) * k + eps)`` of the SLL archs (``pool=l2``); none in the other graphs.

    Squares span twice the dynamic range of ``x`` in bits: 8-bit steps over ``x^2``'s range leave ~4 bits
    for small activations. Measured on sll-spectral trained 24 epochs (300 test images): quantising them cost
    3.5 map_50 points (class-logit cosine 0.9886); kept in fp32 0.7 (cosine 0.9993).
    """
    convs = set(_conv_layers(model))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    picked: dict[str, None] = {}  # ordered set
    for start in (n for n in model.graph.node if n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]):
        todo, seen, ends_in_sqrt = [start], {}, False
        while todo:
            n = todo.pop()
            if n.name in seen or n.name in convs:
                continue
            seen[n.name] = None
            if n.op_type == "Sqrt":
                ends_in_sqrt = True
            else:
                todo += [c for o in n.output for c in consumers.get(o, [])]
        if ends_in_sqrt:  # a square that is not a norm is left alone
            picked.update(seen)
    return list(picked)


def _conv_layers(model: onnx.ModelProto) -> dict[str, str]:
    """``{Conv node name: layer name}``: the layer is the Conv's weight initializer name less ``.weight``."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: n.input[1].removesuffix(".weight") for n in model.graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits}


def _conv_nodes(model: onnx.ModelProto, layers: Sequence[str]) -> list[str]:
    """The Conv node names of ``layers`` (LipdetError naming a layer the graph does not have)."""
    by_layer = {layer: node for node, layer in _conv_layers(model).items()}
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise LipdetError(f"no Conv layer {missing[0]!r} in this graph; its layers: {', '.join(by_layer)}")
    return [by_layer[layer] for layer in layers]


def sensitive_layers(model: onnx.ModelProto) -> list[str]:
    """The layers int8 hurts most here, in graph order: the entry conv(s) (the Convs the input reaches through
    no other Conv) and the heads (the Convs whose outputs reach a graph output through no other Conv).

    They are the unbounded first and last layers of the Lipschitz analysis: the entry conv sees raw
    pixels, the heads' outputs are the scores and box offsets themselves (nothing downstream averages
    their rounding error out).
    """
    convs = _conv_layers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    entry, _ = _walk(consumers, [i.name for i in model.graph.input], convs)
    heads = set()
    for n in model.graph.node:
        if n.name in convs:
            met, reached = _walk(consumers, list(n.output), convs)
            if not met and reached & outputs:
                heads.add(n.name)
    return [convs[n.name] for n in model.graph.node if n.name in entry | heads]


def _walk(consumers: dict[str, list[onnx.NodeProto]], start: list[str], convs: dict[str, str]
          ) -> tuple[set[str], set[str]]:
    """``(Conv nodes met, tensors reached)`` walking downstream from the tensors ``start``, stopping at Convs."""
    reached, todo, met = set(start), list(start), set()
    while todo:
        for n in consumers.get(todo.pop(), []):
            if n.name in convs:
                met.add(n.name)
                continue
            for o in n.output:
                if o not in reached:
                    reached.add(o)
                    todo.append(o)
    return met, reached


def layer_sqnr(fp32: onnx.ModelProto, quant: onnx.ModelProto, images: torch.Tensor | np.ndarray,
               layers: Sequence[str]) -> dict[str, float]:
    """SQNR in dB (higher: closer) of each layer's output in the int8 graph ``quant`` against ``fp32``, on
    ``images`` ``(N, 3, S, S)``: ONNX Runtime's ``qdq_loss_debug`` (``xmodel_err``: the error accumulated up to
    and including that layer)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    producer = {o: n for n in fp32.graph.node for o in n.output}
    outputs = {n.name: n.output[0] for n in fp32.graph.node}
    wanted = {layer: outputs[node] for node, layer in _conv_layers(fp32).items() if layer in set(layers)}
    with tempfile.TemporaryDirectory(prefix="lipdet-qdq-debug-") as tmp, _quiet_logs():
        acts = {}
        for name, graph in (("fp32", fp32), ("int8", quant)):
            src, aug = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.aug.onnx"
            onnx.save(graph, str(src))
            modify_model_output_intermediate_tensors(str(src), str(aug))
            acts[name] = collect_activations(str(aug), calibration_reader(images))
        errors = compute_activation_error(create_activation_matching(acts["int8"], acts["fp32"]))
    measured = {}
    for layer, tensor in wanted.items():
        # a Conv fused with its Relu has no Q/DQ of its own output: read the first quantised tensor after it
        while tensor not in errors and tensor in outputs.values():
            nxt = [n for n in fp32.graph.node if tensor in n.input and n.op_type != "Conv"]
            if len(nxt) != 1 or producer.get(tensor) is None:
                break
            tensor = nxt[0].output[0]
        if tensor in errors:
            measured[layer] = float(errors[tensor]["xmodel_err"])
    return measured


def keep_in_fp32(sqnr: dict[str, float]) -> list[str]:
    """The rule: of the sensitive layers measured by :func:`layer_sqnr`, keep in fp32 those whose SQNR is below
    :data:`SENSITIVE_SQNR_DB`; when none is (the error is spread over them), all of them."""
    low = [layer for layer, db in sqnr.items() if db < SENSITIVE_SQNR_DB]
    return low or list(sqnr)


def restore_weight_names(fp32: onnx.ModelProto, quant: onnx.ModelProto) -> int:
    """Rename each weight's ``DequantizeLinear`` output in ``quant`` back to the weight's fp32 name.

    Matching is by consumer: the fp32 graph's node ``n`` reads initializer ``w`` at input ``j``;
    the quantised graph's node of the same name reads a DequantizeLinear output there, which
    becomes ``w``. Returns the number of renamed values.
    """
    inits = {i.name for i in fp32.graph.initializer}
    wanted = {(n.name, j): name for n in fp32.graph.node for j, name in enumerate(n.input) if name in inits}
    producer = {o: n for n in quant.graph.node for o in n.output}
    q_inits = {i.name for i in quant.graph.initializer}
    existing = q_inits | {o for n in quant.graph.node for o in n.output}
    renames: dict[str, str] = {}
    for n in quant.graph.node:
        for j, name in enumerate(n.input):
            target = wanted.get((n.name, j))
            if target is None or name == target or name in renames:
                continue
            p = producer.get(name)
            if p is None or p.op_type != "DequantizeLinear" or p.input[0] not in q_inits:
                continue
            if target in existing:  # the name is taken (weight left unquantised elsewhere): keep ORT's name
                continue
            renames[name] = target
            existing.add(target)
    for n in quant.graph.node:
        for j, name in enumerate(n.input):
            if name in renames:
                n.input[j] = renames[name]
        for j, name in enumerate(n.output):
            if name in renames:
                n.output[j] = renames[name]
    for vi in quant.graph.value_info:
        if vi.name in renames:
            vi.name = renames[vi.name]
    return len(renames)


def _zero_point_is_zero(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    if len(node.input) < 3 or not node.input[2]:
        return True
    consts = {i.name: i for i in model.graph.initializer}
    zp = consts.get(node.input[2])
    return zp is None or not np.any(numpy_helper.to_array(zp))


def int8_flavour(model: onnx.ModelProto) -> str | None:
    """The int8 flavour of a QDQ graph (a key of :data:`INT8_SPECS`), read from its quantised weights and
    zero points; None if it is not int8.

    uint8 weights: ``u8u8-asymmetric``; int8 weights with int8 activations: ``s8s8-symmetric``; with uint8
    activations: ``u8s8-reduce-range`` when every weight lies in [-64, 64], else ``u8s8-asymmetric``
    (a full-range symmetric weight has +-127 in every channel that is not all zero).
    """
    consts = {i.name: i for i in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not q_nodes:
        return None
    weights = [consts[n.input[0]] for n in q_nodes if n.op_type == "DequantizeLinear" and n.input[0] in consts]
    if any(w.data_type == onnx.TensorProto.UINT8 for w in weights):
        return "u8u8-asymmetric"
    activation_u8 = any(len(n.input) > 2 and n.input[2] in consts and consts[n.input[2]].data_type == onnx.TensorProto.UINT8
                        for n in q_nodes if n.op_type == "QuantizeLinear")
    if not activation_u8:
        return INT8_FLAVOURS["trt"]
    int8 = [numpy_helper.to_array(w) for w in weights if w.data_type == onnx.TensorProto.INT8]
    widest = max((int(np.abs(w.astype(np.int16)).max()) for w in int8 if w.size), default=0)
    return INT8_FLAVOURS["ort"] if widest <= 64 else INT8_FLAVOURS["ort-vnni"]


def saturation_warning(flavour: str | None, m: Machine) -> str | None:
    """One warning line when an int8 graph of ``flavour`` runs on CPU ``m`` without the VNNI/AMX it needs to
    be accurate (:attr:`Int8Spec.needs_int8_dot`), else None (other flavours, unknown ones, VNNI/AMX CPUs)."""
    spec = INT8_SPECS.get(flavour or "")
    if spec is None or not spec.needs_int8_dot or m.int8_dot:
        return None
    return (f"warning: this int8 graph ({flavour}: full-range int8 weights) needs VNNI or AMX to be accurate; this CPU "
            f"({m.isa()}) has neither, so ONNX Runtime's u8s8 kernels may saturate (export with --target ort for a "
            "graph that is accurate on every CPU)")


# ----------------------------------------------------------------------------------------------
# constants of a graph (weights as the runtime sees them)


def onnx_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every value computable from constants alone, as float32/int arrays, by name.

    Evaluates initializers, ``Constant`` nodes and the weight plumbing an exported graph may
    hold (``Identity``, ``Cast``, ``DequantizeLinear``) -- so fp16 weights come back as float32
    and int8 weights as ``scale * (q - zero_point)`` exactly as the runtime dequantises them.
    """
    vals: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        ins = [i for i in n.input if i]
        if not all(i in vals for i in ins):
            continue
        if n.op_type == "Constant":
            attr = {a.name: a for a in n.attribute}
            if "value" in attr:
                vals[n.output[0]] = numpy_helper.to_array(attr["value"].t)
        elif n.op_type == "Identity":
            vals[n.output[0]] = vals[ins[0]]
        elif n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            vals[n.output[0]] = vals[ins[0]].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        elif n.op_type == "DequantizeLinear":
            vals[n.output[0]] = _dequantize(n, vals)
    return vals


def _dequantize(node: onnx.NodeProto, vals: dict[str, np.ndarray]) -> np.ndarray:
    x = vals[node.input[0]].astype(np.int64)
    scale = vals[node.input[1]].astype(np.float32)
    zp = vals[node.input[2]].astype(np.int64) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, np.int64)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and x.ndim > 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((x - zp).astype(np.float32) * scale).astype(np.float32)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Mute the quantiser's and converter's warnings (pre-processing advice, fp16 clamping) and the
    calibrators' progress prints (histogram calibration writes to stdout)."""
    import io
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
