"""A Triton Inference Server model repository for an exported artifact (``lipdet export --triton REPO``).

Layout written::

    REPO/<name>/config.pbtxt        platform, max_batch_size, inputs/outputs, dynamic batching
    REPO/<name>/1/model.onnx        platform onnxruntime_onnx   (or 1/model.plan, tensorrt_plan)

``<name>`` is the artifact's file stem with anything but letters, digits, ``-`` and ``_`` replaced
by ``_`` (``model.int8.onnx`` -> ``model_int8``). Input and output names, element types and
per-image dims come from the ONNX graph (a plan's source ONNX), whose first dim is the dynamic
batch that Triton's ``max_batch_size`` stands for; the input side is checked against the model
card. Nothing here starts or needs a Triton server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lipdet.errors import LipdetError
from lipdet.io import write_bytes_atomic, write_text_atomic

PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan")}
TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64"}
"""ONNX TensorProto element type -> Triton DataType name."""
DEFAULT_QUEUE_DELAY_US = 5000
"""Dynamic batching: longest wait for a batch to fill (microseconds), as ``lipdet serve``'s 5 ms."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: name, Triton type, dims without the batch dim."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def model_name(artifact: Path) -> str:
    """The Triton model name of ``artifact`` (its stem, made safe for a folder and a model name)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(artifact).name.rsplit(".", 1)[0])


def graph_tensors(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file, each with a dynamic first (batch) dim and fixed others."""
    from lipdet.export.onnx_export import load_onnx

    graph = load_onnx(onnx_path, load_weights=False).graph
    initialisers = {t.name for t in graph.initializer}

    def spec(v) -> TensorSpec:
        dims = v.type.tensor_type.shape.dim
        rest = [d.dim_value for d in dims[1:]]
        if not dims or dims[0].dim_value or not all(rest):
            raise LipdetError(f"{onnx_path}: tensor {v.name!r} needs a dynamic batch dim and fixed others for Triton")
        kind = v.type.tensor_type.elem_type
        if kind not in TRITON_TYPES:
            raise LipdetError(f"{onnx_path}: tensor {v.name!r} has an element type Triton config cannot name ({kind})")
        return TensorSpec(v.name, TRITON_TYPES[kind], tuple(int(x) for x in rest))

    return [spec(v) for v in graph.input if v.name not in initialisers], [spec(v) for v in graph.output]


def config_text(name: str, platform: str, max_batch: int, inputs: list[TensorSpec], outputs: list[TensorSpec],
                queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """``config.pbtxt`` (protobuf text of Triton's ``inference.ModelConfig``)."""

    def block(kind: str, specs: list[TensorSpec]) -> str:
        items = ",\n".join(f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n    dims: [ '
                           f'{", ".join(str(d) for d in s.dims)} ]\n  }}' for s in specs)
        return f"{kind} [\n{items}\n]\n"

    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {int(max_batch)}\n'
            + block("input", inputs) + block("output", outputs)
            + f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(queue_delay_us)}\n}}\n")


def check_repo(repo: Path) -> None:
    """Refuse (before any export work) a ``--triton`` REPO that is an existing file."""
    if Path(repo).exists() and not Path(repo).is_dir():
        raise LipdetError(f"Triton repository {repo}: exists and is not a folder")


def write_repository(repo: Path, artifact: Path, max_batch: int) -> Path:
    """Write ``artifact`` (``.onnx`` or ``.plan``) into the Triton repository ``repo``; returns its config path.

    ``max_batch``: Triton's ``max_batch_size`` (a plan's is its profile's largest batch).
    """
    artifact = Path(artifact)
    check_repo(repo)
    if artifact.suffix not in PLATFORMS:
        raise LipdetError(f"{artifact}: Triton repositories hold .onnx or .plan models")
    platform, file_name = PLATFORMS[artifact.suffix]
    onnx_path = artifact if artifact.suffix == ".onnx" else _plan_source(artifact)
    inputs, outputs = graph_tensors(onnx_path)
    _check_against_card(onnx_path, inputs)
    name = model_name(artifact)
    folder = Path(repo) / name
    try:
        (folder / "1").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LipdetError(f"Triton repository {repo}: cannot create {folder / '1'} ({e.strerror})") from None
    write_bytes_atomic(folder / "1" / file_name, artifact.read_bytes())
    config = folder / "config.pbtxt"
    write_text_atomic(config, config_text(name, platform, max_batch, inputs, outputs))
    return config


def _plan_source(plan: Path) -> Path:
    from lipdet.artifacts import PlanSidecar
    from lipdet.export.tensorrt import source_onnx

    return source_onnx(PlanSidecar.read(plan), plan)


def _check_against_card(onnx_path: Path, inputs: list[TensorSpec]) -> None:
    from lipdet.export.onnx_export import get_card

    card = get_card(onnx_path)
    size = card.model.input_size if card is not None else None
    if size is not None and inputs and inputs[0].dims[-2:] != (size, size):
        raise LipdetError(f"{onnx_path}: graph input {inputs[0].dims} does not match the card's input size {size}")
