"""The plan sidecar: ``model.plan.json``, what lipdet needs to know about a bare TensorRT plan.

A plan file holds only TensorRT's serialized engine; the sidecar beside it records the TensorRT
version, GPU and compute capability it was built for, its precision and optimisation profile,
and the source ONNX (path and sha256) the differentiable twin is rebuilt from.
:class:`PlanSidecar` is the only code that writes or reads it. The layout (version 1; sorted,
indented JSON)::

    {"format": "lipdet-trt-plan", "version": 1, "lipdet_version": "...", "built_at": "ISO 8601",
     "tensorrt": "10.9.0.34", "gpu": "NVIDIA H100 ...", "compute_capability": "9.0",
     "precision": "fp32", "int8_flavour": null,
     "profile": {"input": "images", "min": [1, 3, S, S], "opt": [...], "max": [...]},
     "max_batch": 64, "input_size": S, "source_onnx": {"path": "/abs/model.onnx", "sha256": "..."},
     "workspace_bytes": 1073741824, "timing_cache": "/path" | null, "parity": {...} | null}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import lipdet
from lipdet.artifacts.card import TensorRTInfo
from lipdet.artifacts.fields import Fields, check_version
from lipdet.errors import LipdetError
from lipdet.io import write_bytes_atomic

SIDECAR_FORMAT = "lipdet-trt-plan"
SIDECAR_VERSIONS = (1,)
"""Sidecar versions this lipdet reads (the one it writes is the last)."""
SIDECAR_REQUIRED = ("format", "tensorrt", "gpu", "compute_capability", "precision", "profile", "source_onnx")
WHAT = "plan sidecar"


def sidecar_path(plan: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


@dataclass(frozen=True)
class PlanProfile:
    """The plan's one optimisation profile: input name and its min / opt / max shapes ``(N, 3, S, S)``."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def read(cls, f: Fields) -> "PlanProfile":
        return cls(input=f.get("input", str), min=f.items("min", int), opt=f.items("opt", int), max=f.items("max", int))

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class SourceOnnx:
    """The ONNX a plan was built from: absolute path when built, and its sha256 (hex)."""

    path: str
    sha256: str


@dataclass(frozen=True)
class PlanSidecar:
    """A plan's sidecar (see the module docstring); sizes in pixels, ``workspace_bytes`` in bytes."""

    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profile: PlanProfile
    source_onnx: SourceOnnx
    int8_flavour: Optional[str] = None
    max_batch: Optional[int] = None  # images
    input_size: Optional[int] = None  # pixels
    workspace_bytes: Optional[int] = None
    timing_cache: Optional[str] = None
    parity: Optional[dict[str, float]] = None  # compare() stats, TensorRT vs ONNX Runtime
    built_at: Optional[str] = None
    lipdet_version: str = lipdet.__version__
    version: int = SIDECAR_VERSIONS[-1]

    def trt_info(self) -> TensorRTInfo:
        """What the plan was built for, as a model card's ``tensorrt`` field."""
        return TensorRTInfo(tensorrt=self.tensorrt, gpu=self.gpu, compute_capability=self.compute_capability,
                            precision=self.precision)

    # -- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON object: every key, null where not recorded."""
        return {
            "format": SIDECAR_FORMAT, "version": self.version, "lipdet_version": self.lipdet_version,
            "built_at": self.built_at, "tensorrt": self.tensorrt, "gpu": self.gpu,
            "compute_capability": self.compute_capability, "precision": self.precision,
            "int8_flavour": self.int8_flavour, "profile": self.profile.to_dict(), "max_batch": self.max_batch,
            "input_size": self.input_size, "source_onnx": asdict(self.source_onnx),
            "workspace_bytes": self.workspace_bytes, "timing_cache": self.timing_cache, "parity": self.parity,
        }

    def to_json(self) -> str:
        """The sidecar file's text (sorted, indented JSON, final newline)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "sidecar") -> "PlanSidecar":
        """Parse a sidecar; anything unusable is a one-line LipdetError (naming the field when one is wrong)."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise LipdetError(f"{source}: not valid JSON") from None
        if not isinstance(obj, dict) or obj.get("format") != SIDECAR_FORMAT:
            raise LipdetError(f"{source}: not a lipdet plan sidecar (format is not '{SIDECAR_FORMAT}')")
        missing = [k for k in SIDECAR_REQUIRED if obj.get(k) is None]
        if missing:
            raise LipdetError(f"{source}: sidecar is missing {', '.join(missing)}")
        check_version(obj.get("version", 1), SIDECAR_VERSIONS, WHAT, source, obj.get("lipdet_version"))
        f = Fields(obj, WHAT, source)
        src = f.sub("source_onnx")
        return cls(
            tensorrt=f.get("tensorrt", str), gpu=f.get("gpu", str), compute_capability=f.get("compute_capability", str),
            precision=f.get("precision", str), profile=PlanProfile.read(f.sub("profile")),
            source_onnx=SourceOnnx(path=src.get("path", str), sha256=src.get("sha256", str)),
            int8_flavour=f.get("int8_flavour", str, None), max_batch=f.get("max_batch", int, None),
            input_size=f.get("input_size", int, None), workspace_bytes=f.get("workspace_bytes", int, None),
            timing_cache=f.get("timing_cache", str, None), parity=f.get("parity", dict, None),
            built_at=f.get("built_at", str, None), lipdet_version=f.get("lipdet_version", str, "unknown"),
            version=int(obj.get("version", 1)),
        )

    # -- files ----------------------------------------------------------------------------------

    @classmethod
    def read(cls, plan: str | Path) -> "PlanSidecar":
        """The sidecar beside ``plan``; one-line LipdetError if it is missing or unusable."""
        plan = Path(plan)
        path = sidecar_path(plan)
        if not path.is_file():
            raise LipdetError(
                f"{plan}: no sidecar {path.name} beside the plan; lipdet needs it to check the plan matches this "
                "TensorRT and GPU -- rebuild with: lipdet export MODEL.pt --trt"
            )
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise LipdetError(f"{path}: not valid JSON") from None
        return cls.from_json(text, source=str(path))

    def write(self, plan: str | Path) -> Path:
        """Write this sidecar beside ``plan`` (atomically); returns its path."""
        path = sidecar_path(plan)
        write_bytes_atomic(path, self.to_json().encode())
        return path
