"""The model configuration saved with every checkpoint and ONNX model card.

A :class:`ModelConfig` is enough to rebuild the exact architecture (``build_model(**cfg.to_dict())``);
weights come from the checkpoint's state dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lipdet.errors import LipdetError

ARCHS: tuple[str, ...] = ("naive", "sll-spectral", "sll-standard", "sll-l2")
"""Architecture names accepted everywhere as ``--arch``."""

CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(str(d) for d in range(10))
"""Model class index -> name. Index 0 is background; index ``d + 1`` is digit ``d``."""

NUM_CLASSES: int = len(CLASS_NAMES)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a detector.

    Attributes:
        arch: one of :data:`ARCHS`.
        width: channel multiplier (1.0 = the reference widths).
        input_size: square input side in pixels (74 for Tinier SSD).
        num_classes: classes including background (11).
        options: arch-specific extras (e.g. SLL inner width, head temperature); plain JSON types.
    """

    arch: str = "naive"
    width: float = 1.0
    input_size: int = 74
    num_classes: int = NUM_CLASSES
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise LipdetError(f"unknown arch {self.arch!r}; choose one of: {', '.join(ARCHS)}")
        if not self.width > 0:
            raise LipdetError(f"width must be > 0, got {self.width}")
        if self.input_size < 32:
            raise LipdetError(f"input size must be >= 32 pixels, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (safe for ``torch.load(weights_only=True)`` and ONNX metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LipdetError(f"model config has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in known})
