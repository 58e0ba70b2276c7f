"""Training checkpoints (``model.pt``) and the one suffix dispatch of lipdet's artifacts.

A checkpoint (``model.pt``) is a plain dict that ``torch.load(..., weights_only=True)`` accepts::

    {"format": "lipdet-checkpoint", "version": 1, "lipdet_version": "...",
     "config": ModelConfig.to_dict(), "state_dict": {...}, "meta": {...}}

``meta`` holds JSON-able facts about the run (dataset root, epoch, metrics). Training resumption
state (optimizer, scheduler) lives in Ray Train's own checkpoints, not here.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lipdet
from lipdet.artifacts.card import ModelCard, Source, TrainingData
from lipdet.artifacts.fields import check_version
from lipdet.errors import LipdetError
from lipdet.io import atomic_path
from lipdet.models.config import ModelConfig

CHECKPOINT_FORMAT = "lipdet-checkpoint"
CHECKPOINT_VERSIONS = (1,)
"""Checkpoint versions this lipdet reads (the one it writes is the last)."""


@dataclass
class Checkpoint:
    """A loaded lipdet checkpoint."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def data(self) -> dict[str, Any] | None:
        """The dataset the model was trained on, as recorded (``{"root", "synthetic"}``), or None."""
        data = self.meta.get("data")
        return data if isinstance(data, dict) else None

    def build_model(self) -> nn.Module:
        """The model this checkpoint stores, in eval mode on the CPU; LipdetError if the weights do not fit."""
        from lipdet.models import build_from_config

        model = build_from_config(self.config)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise LipdetError(f"{self.path}: weights do not match the recorded {self.config.arch} architecture") from e
        return model.eval()

    def card(self, model: nn.Module) -> ModelCard:
        """The model card of a checkpoint served as it is (fp32, source path, training data)."""
        source = Source(checkpoint=str(Path(self.path).resolve())) if self.path is not None else None
        data = TrainingData.from_meta(self.data, str(self.path))
        return ModelCard.for_model(model, precision="fp32", source=source, data=data)


def checkpoint_dict(model: nn.Module, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict for ``model`` (which must carry ``.config``)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSIONS[-1],
        "lipdet_version": lipdet.__version__,
        "config": model.config.to_dict(),
        "state_dict": state,
        "meta": dict(meta or {}),
    }


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a lipdet checkpoint, atomically (temp file, then rename)."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(checkpoint_dict(model, meta), buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a lipdet checkpoint with ``weights_only=True``; any problem is a one-line LipdetError."""
    path = Path(path)
    if not path.is_file():
        raise LipdetError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise LipdetError(f"{path}: not a readable torch checkpoint (not a torch.save archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise LipdetError(f"{path}: refused to load (weights_only=True): {first}") from None
    except Exception as e:  # truncated / corrupt archives surface as many error types inside torch
        raise LipdetError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise LipdetError(f"{path}: not a lipdet checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    check_version(obj.get("version"), CHECKPOINT_VERSIONS, "checkpoint", str(path), obj.get("lipdet_version"))
    try:
        cfg = ModelConfig.from_dict(obj["config"])
        state = obj["state_dict"]
    except (KeyError, TypeError) as e:
        raise LipdetError(f"{path}: lipdet checkpoint is missing {e}") from None
    return Checkpoint(config=cfg, state_dict=state, meta=dict(obj.get("meta") or {}), path=path)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the model stored in a checkpoint, in eval mode on the CPU."""
    return load_checkpoint(path).build_model()


ARTIFACT_KINDS: dict[str, str] = {".pt": "checkpoint", ".onnx": "onnx", ".plan": "plan", ".engine": "plan"}
"""File suffix -> artifact kind: the one place lipdet tells artifacts apart by name."""


def artifact_kind(path: str | Path) -> str:
    """``"checkpoint"``, ``"onnx"`` or ``"plan"`` for an existing artifact; a one-line LipdetError otherwise."""
    path = Path(path)
    if not path.exists():
        raise LipdetError(f"model not found: {path}")
    kind = ARTIFACT_KINDS.get(path.suffix.lower())
    if kind is None:
        raise LipdetError(f"{path}: unknown model type '{path.suffix.lower()}'; expected a .pt checkpoint, "
                          "an .onnx model or a .plan engine")
    return kind
