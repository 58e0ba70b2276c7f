"""Folded torch model -> ONNX, the model card inside it, and the checks that guard an export.

The exported graph has one input ``images`` (float32, ``N x 3 x S x S``, values in ``[0, 1]``;
the ``x - 0.5`` normalisation is inside the graph) with a dynamic batch dimension, and two raw
outputs ``loc`` (``N x P x 4``) and ``logits`` (``N x P x C``). Decoding and NMS are not in the
graph: every runtime hands its raw outputs to :mod:`lipdet.postprocess`.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript, opset 18), kept in
memory (``ONNXProgram.model_proto``). Measured on torch 2.14 against the legacy TorchScript
exporter (``dynamo=False``) on a folded sll-l2 model: both name every weight initialiser exactly
like the folded model's ``state_dict`` key, but the dynamo graph is plain (83 nodes of 9 op
types: Conv/Relu/Sub/MaxPool/Pad/Slice/Transpose/Reshape/Concat, static ``Reshape`` targets
``[-1, P, 4]``) where the legacy one has 151 nodes with 50 ``Constant`` and a
``Shape/Gather/Unsqueeze/Concat`` chain per head and ``ConstantOfShape`` pads -- noise for the op
walk and for TensorRT's shape analysis -- and the legacy path warns that it is deprecated since
torch 2.9. The dynamo export costs ~2.5 s instead of ~1 s.

The model card (:class:`lipdet.artifacts.ModelCard`) is stored as its one JSON string in the ONNX
``metadata_props`` under :data:`lipdet.artifacts.CARD_KEY`, so the file alone says what it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from lipdet.artifacts import CARD_KEY, ModelCard
from lipdet.errors import LipdetError
from lipdet.parity import ParityError, compare, format_stats, tolerance, worst  # ParityError, compare: also re-exported


INPUT_NAME = "images"
OUTPUT_NAMES = ("loc", "logits")
OPSET = 18
BATCH_DIM = "N"

ALLOWED_OPS: frozenset[str] = frozenset(
    {
        # the network itself
        "Conv", "Relu", "MaxPool", "Sub", "Add", "Mul", "Pad", "Concat", "Transpose", "Reshape",
        "Flatten", "Slice", "Identity", "Constant",
        # L2-norm pooling (lipdet.models.layers.NormPool)
        "AveragePool", "Sqrt",
        # precision plumbing (fp16 I/O casts, int8 Q/DQ)
        "Cast", "QuantizeLinear", "DequantizeLinear",
    }
)
"""Op types an exported lipdet graph may contain: plain inference ops only.

Anything that could recompute a weight normalisation (``ReduceSum``, ``ReduceL2``, ``Abs``,
``Sqrt``, ``Div``, ``Pow``, ``MatMul`` over weights...) or control flow (``Loop``, ``If``,
``Scan``) means folding failed and the export is refused.
"""

CONSTANT_OPS: frozenset[str] = frozenset({"Constant", "Identity", "Cast", "DequantizeLinear"})
"""Op types allowed to compute from constants alone (weight dequantisation and fp16 casts)."""

# ----------------------------------------------------------------------------------------------
# export


def export_onnx_model(folded: nn.Module, input_size: int | None = None, opset: int = OPSET) -> onnx.ModelProto:
    """Export a folded (plain-op, eval-mode) model to an in-memory ONNX model with a dynamic batch.

    Raises LipdetError if the exporter fails or the graph does not pass ``onnx.checker`` or the
    op whitelist (:func:`graph_problems`).
    """
    size = int(input_size or folded.config.input_size)
    folded = folded.eval()
    example = (torch.rand(2, 3, size, size),)
    arg_name = _forward_arg_name(folded)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet():
            program = torch.onnx.export(
                folded,
                example,
                None,  # in memory: the ONNXProgram's model_proto, weights included
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={arg_name: {0: batch}},
                optimize=True,
                verbose=False,
            )
            model = program.model_proto
    except Exception as e:  # the exporter raises many types; report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LipdetError(f"ONNX export failed: {first[:300]}") from e
    _rename_batch_dim(model)
    _strip_node_metadata(model)
    model.producer_name = "lipdet"
    import lipdet

    model.producer_version = lipdet.__version__
    check_graph(model)
    return model


def _forward_arg_name(model: nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values() if p.name != "self"]
    return params[0].name if params else "x"


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings (errors still raise)."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _rename_batch_dim(model: onnx.ModelProto) -> None:
    """Name the dynamic batch dimension ``N`` on every graph input and output."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def _strip_node_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node/per-value debugging metadata (it bloats the file)."""
    for node in model.graph.node:
        del node.metadata_props[:]
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        del vi.metadata_props[:]


# ----------------------------------------------------------------------------------------------
# graph checks


def graph_problems(model: onnx.ModelProto, allowed: Iterable[str] = ALLOWED_OPS) -> list[str]:
    """Everything wrong with an exported graph's structure (empty list: fine).

    * every node's op type is in ``allowed`` (default domain, or the QDQ contrib domain);
    * no subgraph (``Loop``/``If``/``Scan`` bodies) anywhere;
    * nodes computing from constants alone are only dequantisation, casts, identities:
      nothing recomputes a normalisation from the weights at run time;
    * one input ``images`` and outputs ``loc``, ``logits``.
    """
    allowed = frozenset(allowed)
    problems: list[str] = []
    g = model.graph
    constant = {i.name for i in g.initializer}
    for node in g.node:
        where = f"{node.op_type} node {node.name or '?'}"
        if node.domain not in ("", "ai.onnx", "com.microsoft") or node.op_type not in allowed:
            problems.append(f"{where}: op not allowed in a deployed lipdet graph")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            problems.append(f"{where}: has a subgraph (control flow)")
        ins = [i for i in node.input if i]
        if all(i in constant for i in ins):
            if node.op_type not in CONSTANT_OPS:
                problems.append(f"{where}: computes from weights alone (a normalisation left in the graph?)")
            constant.update(o for o in node.output if o)
    inputs = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
    if inputs != [INPUT_NAME]:
        problems.append(f"graph inputs are {inputs}, expected ['{INPUT_NAME}']")
    outputs = [o.name for o in g.output]
    if outputs != list(OUTPUT_NAMES):
        problems.append(f"graph outputs are {outputs}, expected {list(OUTPUT_NAMES)}")
    return problems


def check_graph(model: onnx.ModelProto) -> None:
    """``onnx.checker`` (full check, with shape inference) plus :func:`graph_problems`; LipdetError if either fails."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        first = (str(e).strip().splitlines() or ["invalid"])[0]
        raise LipdetError(f"exported ONNX graph fails onnx.checker: {first[:300]}") from None
    problems = graph_problems(model)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LipdetError(f"exported ONNX graph is not plain inference ops: {problems[0]}{more}")


# ----------------------------------------------------------------------------------------------
# model card


def set_card(model: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    """Store ``card`` as JSON in ``metadata_props[CARD_KEY]`` (replacing any previous card)."""
    keep = [p for p in model.metadata_props if p.key != CARD_KEY]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=CARD_KEY, value=card.to_json())
    return model


def get_card(model: onnx.ModelProto | str | Path, source: str | None = None) -> ModelCard | None:
    """The lipdet card of an ONNX model (or file), or None if it has none; a bad card is a one-line LipdetError."""
    if not isinstance(model, onnx.ModelProto):
        source = source or str(model)
        model = load_onnx(model, load_weights=False)
    for p in model.metadata_props:
        if p.key == CARD_KEY:
            return ModelCard.from_json(p.value, source=source or "ONNX model")
    return None


def load_onnx(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise LipdetError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as e:
        raise LipdetError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# numerical checks


@torch.no_grad()
def check_fold(model: nn.Module, folded: nn.Module, images: torch.Tensor,
               rtol: float = tolerance("fold", "fp32")["rel"]) -> dict[str, float]:
    """Folded vs parametrised outputs on ``images`` plus as many uniform-random inputs.

    Passes when the max abs diff is within ``rtol`` of each output's largest magnitude (a
    relative tolerance; absolute for outputs near zero). Raises LipdetError otherwise.
    """
    model.eval()
    folded.eval()
    gen = torch.Generator().manual_seed(0)
    rand = torch.rand(images.shape, generator=gen)
    checked = []
    for name, x in (("real", images), ("random", rand)):
        stats = compare(folded(x), model(x))
        if stats["rel"] > rtol:
            raise ParityError(
                f"folded model differs from the trained one on {name} inputs: {format_stats(stats)}"
                f" (tolerance {rtol:g} relative); refusing to export"
            )
        checked.append(stats)
    return worst(*checked)


def ort_session(model: onnx.ModelProto | str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    """An ONNX Runtime session for a model (in memory or on disk)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=list(providers))


def run_session(session, images: torch.Tensor | np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Run an ORT session over ``images`` in chunks; returns ``(loc, logits)`` float32 arrays."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    x = np.ascontiguousarray(x, dtype=np.float32)
    locs, logits = [], []
    for i in range(0, len(x), batch):
        loc, cls = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i : i + batch]})
        locs.append(loc.astype(np.float32, copy=False))
        logits.append(cls.astype(np.float32, copy=False))
    return np.concatenate(locs), np.concatenate(logits)
