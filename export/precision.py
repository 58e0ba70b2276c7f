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
  because the best graph for ONNX Runtime on a CPU is not one TensorRT accepts:

  - ``u8u8-asymmetric`` (``--target ort``): uint8 asymmetric activations, uint8 weights
    (symmetric, zero point 128, per channel): accurate on CPUs with and without VNNI
    (:data:`INT8_FLAVOURS` says why not u8s8).
  - ``s8s8-symmetric`` (``--target trt``): int8 activations with zero point 0, as TensorRT
    requires. On a CPU, ORT runs it barely faster than fp32.

After quantisation every weight's ``DequantizeLinear`` output is renamed to the weight's original
name (the folded ``state_dict`` key), so the dequantised weights can be read back by name
(:func:`onnx_constants`) -- that is how :mod:`lipdet.deploy.twin` rebuilds a differentiable twin
of exactly the weights the int8 engine uses.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lipdet.errors import LipdetError
from lipdet.export.onnx_export import INPUT_NAME, check_graph, ort_session

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
TARGETS: tuple[str, ...] = ("ort", "trt")
INT8_FLAVOURS: dict[str, str] = {"ort": "u8u8-asymmetric", "trt": "s8s8-symmetric"}
"""``--target`` -> int8 flavour recorded in the model card as ``int8_flavour``.

``ort`` was ``u8s8-asymmetric`` (uint8 activations, int8 weights) in earlier lipdet versions;
such files still load and run. u8s8 is not portable: on x86 CPUs without VNNI, ONNX Runtime's
u8s8 kernels multiply with ``vpmaddubsw``, whose int16 pair sums saturate (ONNX Runtime's
quantisation guide names u8u8 or ``reduce_range`` as the fixes). Measured on a 2-core AVX2 EPYC:
the demo model's u8s8 graph failed parity (rel 0.56, cosine 0.986) and the tiny test model lost
5.8 map_50 points. ``reduce_range`` (7-bit weights) cost 1.1 points on the test model even with
VNNI; u8u8 keeps 8-bit weights and has no saturating path, so it is the flavour for every CPU."""
LEGACY_ORT_FLAVOUR = "u8s8-asymmetric"

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
                  fp32_layers: Sequence[str] = ()) -> onnx.ModelProto:
    """Statically quantise an fp32 graph to a QDQ int8 graph calibrated on ``calib_images`` ``(N, 3, S, S)``.

    ``target`` picks the flavour (:data:`INT8_FLAVOURS`): ``"ort"`` = uint8 asymmetric
    activations (fast on ONNX Runtime CPU), ``"trt"`` = int8 symmetric activations (TensorRT).
    Weights are 8-bit, symmetric, per output channel in both; activation ranges by
    :data:`INT8_CALIBRATION`. ``fp32_layers`` (layer names, e.g. ``cls_heads.fire8.conv``: a Conv's
    weight name less ``.weight``) stay in fp32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if target not in INT8_FLAVOURS:
        raise LipdetError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if len(calib_images) == 0:
        raise LipdetError("int8 calibration needs at least one image (calib_n)")
    symmetric = target == "trt"
    exclude = _conv_nodes(model, fp32_layers)
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
                    reduce_range=False,  # full 8-bit weights: u8u8 does not saturate (see INT8_FLAVOURS)
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
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
    """The int8 flavour of a QDQ graph, read from its zero points; None if it is not int8.

    ``"u8u8-asymmetric"`` (uint8 weights), ``"u8s8-asymmetric"`` (uint8 activations, int8
    weights: files from before the redesign) or ``"s8s8-symmetric"``.
    """
    consts = {i.name: i for i in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not q_nodes:
        return None
    kinds = {consts[n.input[0]].data_type for n in q_nodes if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    activation_u8 = any(len(n.input) > 2 and n.input[2] in consts and consts[n.input[2]].data_type == onnx.TensorProto.UINT8
                        for n in q_nodes if n.op_type == "QuantizeLinear")
    if onnx.TensorProto.UINT8 in kinds:
        return INT8_FLAVOURS["ort"]
    return LEGACY_ORT_FLAVOUR if activation_u8 else INT8_FLAVOURS["trt"]


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
