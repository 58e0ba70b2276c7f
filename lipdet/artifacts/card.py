"""The model card: a typed, versioned description that travels with every exported model.

The card is one JSON object stored in the ONNX file's ``metadata_props`` under :data:`CARD_KEY`
(and rebuilt in memory for a checkpoint), so a deployed artifact alone says what it is.
:class:`ModelCard` is the only code that writes or reads that JSON (:meth:`ModelCard.to_json`,
:meth:`ModelCard.from_json`); everything else reads its typed fields. The layout (version 1)::

    {"format": "lipdet-model-card", "version": 1, "lipdet_version": "...",
     "model": ModelConfig, "input": {...}, "outputs": {...}, "class_names": [...],
     "priors": PriorSpec, "variances": [0.1, 0.2], "precision": "fp32" | "fp16" | "int8",
     "int8_flavour": str | null, "data": {"root", "synthetic"[, "val"]} | null,
     # written by export (absent from a checkpoint's in-memory card):
     "int8_fp32_layers": [str, ...] (int8 only: the layers kept in fp32, [] for none; absent in older files),
     "postprocess": {"score_threshold", "iou_threshold", "top_k", "variances"},
     "lipschitz": {"loc", "cls", "per_scale": [...]}, "source": {"checkpoint", "sha256"},
     "validation": {...}, "parity": {...}, "opset": 18,
     # a plan's twin only (never written to a file): "tensorrt": {...}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torch import nn

import lipdet
from lipdet.artifacts.fields import Fields, check_version, row_from, row_to_dict, rows_from
from lipdet.boxes import VARIANCES, PriorSpec
from lipdet.errors import LipdetError
from lipdet.models.config import CLASS_NAMES, ModelConfig
from lipdet.postprocess import PostprocessConfig

CARD_KEY = "lipdet"
CARD_FORMAT = "lipdet-model-card"
CARD_VERSIONS = (1,)
"""Model card versions this lipdet reads (the one it writes is the last)."""
WHAT = "model card"

OUTPUTS: dict[str, str] = {"loc": "N x P x 4 SSD offsets", "logits": "N x P x C class logits (0 = background)"}
"""The exported graph's outputs, as the card describes them."""


@dataclass(frozen=True)
class InputContract:
    """The graph input: name, shape (``"N"`` = dynamic batch), value range, where normalisation happens."""

    name: str
    shape: tuple[Any, ...]  # ("N", 3, S, S)
    range: tuple[float, ...]  # (0.0, 1.0)
    normalisation: str

    @classmethod
    def for_size(cls, size: int) -> "InputContract":
        """The contract of every lipdet graph with input side ``size`` pixels."""
        return cls(name="images", shape=("N", 3, int(size), int(size)), range=(0.0, 1.0),
                   normalisation="x - 0.5, inside the graph")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "range": list(self.range),
                "normalisation": self.normalisation}

    @classmethod
    def read(cls, f: Fields) -> "InputContract":
        return cls(name=f.get("name", str), shape=tuple(f.get("shape", list)), range=f.items("range", float),
                   normalisation=f.get("normalisation", str))


@dataclass(frozen=True)
class ScaleBound:
    """Lipschitz bounds (L2, input pixels -> outputs) of one feature map's heads.

    ``trunk``: input -> tap; ``loc_head``/``cls_head``: the heads' own norms; ``loc``/``cls``:
    their products, the per-anchor bounds used for certification (guaranteed upper bounds). Each
    ``*_measured`` is the lower estimate of the same quantity (power iteration), when recorded.
    """

    feature_size: int
    tap: str
    trunk: float
    loc_head: float
    cls_head: float
    loc: float
    cls: float
    trunk_measured: Optional[float] = None
    loc_head_measured: Optional[float] = None
    cls_head_measured: Optional[float] = None
    loc_measured: Optional[float] = None
    cls_measured: Optional[float] = None


@dataclass(frozen=True)
class LayerBound:
    """One layer's Lipschitz bound (``norm``), the bound of input -> that layer (``cumulative``), and
    their measured lower estimates when recorded."""

    name: str
    norm: float
    cumulative: float
    measured: Optional[float] = None
    cumulative_measured: Optional[float] = None


@dataclass(frozen=True)
class LipschitzBounds:
    """The card's ``lipschitz``: ``loc``/``cls`` (max over scales), per-scale rows, optional per-layer rows,
    and the measured lower estimates of ``loc``/``cls`` when recorded."""

    loc: float
    cls: float
    per_scale: tuple[ScaleBound, ...]
    per_layer: tuple[LayerBound, ...] = ()
    loc_measured: Optional[float] = None
    cls_measured: Optional[float] = None

    @classmethod
    def from_heads(cls, heads: dict[str, Any]) -> "LipschitzBounds":
        """From :func:`lipdet.models.lipschitz.head_bounds`' dict."""
        return cls.read(Fields(heads, "Lipschitz bounds", "head_bounds"))

    @classmethod
    def read(cls, f: Fields) -> "LipschitzBounds":
        return cls(loc=f.get("loc", float), cls=f.get("cls", float),
                   per_scale=rows_from(ScaleBound, f.objects("per_scale")),
                   per_layer=rows_from(LayerBound, f.objects("per_layer", default=[])),
                   loc_measured=f.get("loc_measured", float, None), cls_measured=f.get("cls_measured", float, None))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; per-layer rows and measured values only when recorded (older cards have none)."""
        d: dict[str, Any] = {"loc": self.loc, "cls": self.cls, "per_scale": [row_to_dict(r) for r in self.per_scale]}
        if self.per_layer:
            d["per_layer"] = [row_to_dict(r) for r in self.per_layer]
        d.update({k: v for k, v in (("loc_measured", self.loc_measured), ("cls_measured", self.cls_measured))
                  if v is not None})
        return d


@dataclass(frozen=True)
class Source:
    """The checkpoint a model was exported from (absolute path; sha256 hex, absent for a checkpoint's own card)."""

    checkpoint: str
    sha256: Optional[str] = None


@dataclass(frozen=True)
class TrainingData:
    """The dataset a model was trained on (``root`` None: not recorded) and, when recorded, its
    validation split's description ``val`` (passed through as written, e.g. ``{"seed", "count", "from"}``)."""

    root: Optional[str]
    synthetic: bool = False
    val: Optional[dict[str, Any]] = None

    @classmethod
    def from_meta(cls, recorded: Optional[dict[str, Any]], source: str) -> Optional["TrainingData"]:
        """From a checkpoint meta's ``data`` dict (None or empty: not recorded); ``source`` names the checkpoint."""
        return cls.read(Fields(recorded, "checkpoint", source, "meta.data")) if recorded else None

    @classmethod
    def read(cls, f: Fields) -> "TrainingData":
        return cls(root=f.get("root", str, None), synthetic=f.get("synthetic", bool, False), val=f.get("val", dict, None))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"root": self.root, "synthetic": self.synthetic}
        if self.val is not None:
            d["val"] = dict(self.val)
        return d


@dataclass(frozen=True)
class TensorRTInfo:
    """The TensorRT version, GPU and compute capability a plan was built for, and its precision."""

    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str


def _read_postprocess(f: Fields) -> PostprocessConfig:
    """The card's ``postprocess`` thresholds (its ``variances`` copy is the card's ``variances``)."""
    return PostprocessConfig(score_threshold=f.get("score_threshold", float), iou_threshold=f.get("iou_threshold", float),
                             top_k=f.get("top_k", int))


def _read_model(f: Fields) -> ModelConfig:
    """The card's ``model``: each known field type-checked, then :meth:`ModelConfig.from_dict`."""
    for key, kind in (("arch", str), ("width", float), ("input_size", int), ("num_classes", int)):
        f.get(key, kind)
    f.get("options", dict, {})
    try:
        return ModelConfig.from_dict(f.obj)
    except LipdetError as e:
        raise f.error(f"is not a valid model config ({e.message})") from None


def _read_priors(f: Fields) -> PriorSpec:
    return PriorSpec(feature_sizes=f.items("feature_sizes", int), scales=f.items("scales", float),
                     aspect_ratios=f.items("aspect_ratios", float))


@dataclass(frozen=True)
class ModelCard:
    """A lipdet model card (see the module docstring for its JSON layout).

    Required: ``model``, ``priors``, ``input``, ``outputs``, ``class_names``, ``variances``
    (``(0.1, 0.2)``: centre and size). The rest is None when not recorded; ``postprocess`` None
    means the reference thresholds (:meth:`thresholds`).
    """

    model: ModelConfig
    priors: PriorSpec
    input: InputContract
    class_names: tuple[str, ...]
    variances: tuple[float, ...]
    outputs: dict[str, str] = field(default_factory=lambda: dict(OUTPUTS))
    precision: str = "fp32"
    int8_flavour: Optional[str] = None
    int8_fp32_layers: Optional[tuple[str, ...]] = None  # int8: layers kept in fp32 (weight names less ".weight")
    data: Optional[TrainingData] = None
    postprocess: Optional[PostprocessConfig] = None
    lipschitz: Optional[LipschitzBounds] = None
    source: Optional[Source] = None
    validation: Optional[dict[str, Any]] = None  # measured clean mAP per precision, as export recorded it
    parity: Optional[dict[str, dict[str, float]]] = None  # check name -> compare() stats
    opset: Optional[int] = None
    tensorrt: Optional[TensorRTInfo] = None  # a plan's twin: what the plan was built for
    lipdet_version: str = lipdet.__version__
    version: int = CARD_VERSIONS[-1]

    @classmethod
    def for_model(cls, model: nn.Module, **fields: Any) -> "ModelCard":
        """The card of ``model`` (which carries ``.config`` and ``.prior_spec``) plus ``fields``."""
        cfg: ModelConfig = model.config
        return cls(model=ModelConfig.from_dict(cfg.to_dict()), priors=PriorSpec.from_dict(model.prior_spec.to_dict()),
                   input=InputContract.for_size(cfg.input_size), class_names=tuple(CLASS_NAMES),
                   variances=tuple(VARIANCES), **fields)

    def thresholds(self) -> PostprocessConfig:
        """The post-processing thresholds recorded with the model, else the reference defaults."""
        return self.postprocess if self.postprocess is not None else PostprocessConfig()

    # -- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The card as its JSON object (the layout in the module docstring); None fields after
        ``int8_flavour``/``data`` are left out."""
        d: dict[str, Any] = {
            "format": CARD_FORMAT, "version": self.version, "lipdet_version": self.lipdet_version,
            "model": self.model.to_dict(), "input": self.input.to_dict(), "outputs": dict(self.outputs),
            "class_names": list(self.class_names), "priors": self.priors.to_dict(), "variances": list(self.variances),
            "precision": self.precision, "int8_flavour": self.int8_flavour,
            "data": self.data.to_dict() if self.data is not None else None,
        }
        optional = {
            "int8_fp32_layers": list(self.int8_fp32_layers) if self.int8_fp32_layers is not None else None,
            "postprocess": {**asdict(self.postprocess), "variances": list(self.variances)} if self.postprocess else None,
            "lipschitz": self.lipschitz.to_dict() if self.lipschitz is not None else None,
            "source": row_to_dict(self.source) if self.source is not None else None,
            "validation": self.validation, "parity": self.parity, "opset": self.opset,
            "tensorrt": asdict(self.tensorrt) if self.tensorrt is not None else None,
        }
        d.update({k: v for k, v in optional.items() if v is not None})
        return d

    def to_json(self) -> str:
        """The card's JSON text (sorted keys, one line): what the ONNX metadata holds."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "ModelCard":
        """Parse a card; a foreign object, an unknown version or a malformed field is a one-line LipdetError."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise LipdetError(f"{source}: lipdet model card is not valid JSON") from None
        return cls.from_dict(obj, source)

    @classmethod
    def from_dict(cls, obj: Any, source: str = "model") -> "ModelCard":
        """:meth:`from_json` for an already decoded JSON object."""
        if not isinstance(obj, dict) or obj.get("format") != CARD_FORMAT:
            raise LipdetError(f"{source}: metadata is not a lipdet model card")
        check_version(obj.get("version"), CARD_VERSIONS, WHAT, source, obj.get("lipdet_version"))
        f = Fields(obj, WHAT, source)
        sub = lambda key: f.sub(key, required=False)  # noqa: E731
        outputs = f.get("outputs", dict)
        if not all(isinstance(v, str) for v in outputs.values()):
            raise f.error("should map output names to descriptions", "outputs")
        variances = f.items("variances", float)
        if len(variances) != 2:
            raise f.error(f"should hold 2 numbers (centre, size), got {len(variances)}", "variances")
        return cls(
            model=_read_model(f.sub("model")), priors=_read_priors(f.sub("priors")),
            input=InputContract.read(f.sub("input")), class_names=f.items("class_names", str), variances=variances,
            outputs=dict(outputs), precision=f.get("precision", str, "fp32"), int8_flavour=f.get("int8_flavour", str, None),
            int8_fp32_layers=f.items("int8_fp32_layers", str, None),
            data=TrainingData.read(sub("data")) if f.has("data") else None,
            postprocess=_read_postprocess(sub("postprocess")) if f.has("postprocess") else None,
            lipschitz=LipschitzBounds.read(sub("lipschitz")) if f.has("lipschitz") else None,
            source=row_from(Source, sub("source")) if f.has("source") else None,
            validation=f.get("validation", dict, None), parity=f.get("parity", dict, None),
            opset=f.get("opset", int, None),
            tensorrt=row_from(TensorRTInfo, sub("tensorrt")) if f.has("tensorrt") else None,
            lipdet_version=f.get("lipdet_version", str, "unknown"), version=obj["version"],
        )


def make_card(model: nn.Module, **fields: Any) -> ModelCard:
    """The model card of ``model``: its config, input contract, classes and priors, plus ``fields``
    (:meth:`ModelCard.for_model`). Export adds ``lipschitz``, ``source``, ``precision``,
    ``int8_flavour``, ``int8_fp32_layers``, ``data``, ``postprocess``, ``validation``, ``parity`` and ``opset``."""
    return ModelCard.for_model(model, **fields)
