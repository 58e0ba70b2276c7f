"""Artifact formats shared by every stage, each read and written only by its own typed class.

* :mod:`lipdet.artifacts.checkpoint`: training checkpoints (``model.pt``, :class:`Checkpoint`)
  and :func:`artifact_kind`, the one suffix dispatch (checkpoint / onnx / plan);
* :mod:`lipdet.artifacts.card`: the versioned :class:`ModelCard` that travels inside every
  exported ONNX (and is rebuilt for a checkpoint);
* :mod:`lipdet.artifacts.sidecar`: the :class:`PlanSidecar` (``model.plan.json``) beside a
  TensorRT plan;
* :mod:`lipdet.artifacts.fields`: typed reading of their JSON (one-line errors naming the field).
"""

from lipdet.artifacts.card import (
    CARD_FORMAT,
    CARD_KEY,
    CARD_VERSIONS,
    InputContract,
    LayerBound,
    LipschitzBounds,
    ModelCard,
    ScaleBound,
    Source,
    TensorRTInfo,
    TrainingData,
    make_card,
)
from lipdet.artifacts.checkpoint import (
    ARTIFACT_KINDS,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSIONS,
    Checkpoint,
    artifact_kind,
    checkpoint_dict,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from lipdet.artifacts.sidecar import SIDECAR_FORMAT, PlanProfile, PlanSidecar, SourceOnnx, sidecar_path

__all__ = [
    "ARTIFACT_KINDS", "CARD_FORMAT", "CARD_KEY", "CARD_VERSIONS", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSIONS",
    "SIDECAR_FORMAT", "Checkpoint", "InputContract", "LayerBound", "LipschitzBounds", "ModelCard", "PlanProfile",
    "PlanSidecar", "ScaleBound", "Source", "SourceOnnx", "TensorRTInfo", "TrainingData", "artifact_kind",
    "checkpoint_dict", "load_checkpoint", "load_model", "make_card", "save_checkpoint", "sidecar_path",
]
