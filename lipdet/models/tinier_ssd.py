"""Tinier SSD detectors: the naive baseline and the Lipschitz (SLL) variants.

Both families share the macro-architecture of the public Tinier SSD for SVHN (technical brief,
section 2) and its prior layout: four heads on the outputs of ``fire8, fire9, fire10, conv12_2``
(18, 9, 4, 2 pixel maps for a 74x74 input), 4 anchors per location, 1700 priors.

* ``naive``: every layer is 3x3 conv (pad 1) + BatchNorm + ReLU; pools ``MP`` = 2x2/2 and
  ``MP3`` = 3x3/2 (``ceil_mode=True``, which equals floor mode on the odd sides 37 and 9 of the
  74x74 network and keeps the map sizes of :func:`lipdet.boxes.feature_sizes_for` for any input);
  heads are 3x3 conv + BN. 337,968 parameters at width 1.
* ``sll-spectral`` / ``sll-standard`` / ``sll-l2``: ``fire1`` is an entry conv 3 -> C in the arch's
  mode (:class:`~lipdet.models.layers.NormConv2d`), every other layer an SLL residual block
  (:class:`~lipdet.models.layers.SLLConv2d`), channel changes by zero-padding / keeping the first
  channels (:class:`~lipdet.models.layers.ChannelPad`), every pool a non-overlapping 2x2/2 max-pool
  (1-Lipschitz; same map sizes), no BatchNorm; heads are convs in the arch's mode. With
  ``sll-spectral`` the maps from input pixels to every box head's *pre-scale* offsets and to every
  class head's *pre-temperature* logits ``z`` are 1-Lipschitz (L2); the class logits
  are ``tau_k * z`` (``cls_temperature``, per scale ``k``), so input -> logits is ``tau_k``-Lipschitz
  and that is the bound ``head_bounds`` reports (the temperature lives in the head's effective
  kernel and bias, hence in the folded weights too). Certified radii do not depend on ``tau``.
  Likewise box offsets are ``s_k`` times a 1-Lipschitz map (``loc_scale``), ``L_loc = max_k s_k``.

  Parameter count (11 classes, 74x74, inner ratio 1, one block per layer): about
  ``345,600 w^2`` for the SLL blocks plus the heads; ``width=4.5`` gives 7,093,104 parameters,
  the seed's "~7M" Lipschitz model (``width=4.0``: 5,632,240; ``width=5.0``: 8,722,160).

Models take images ``(N, 3, S, S)`` in ``[0, 1]``, subtract 0.5 inside (no division: 1-Lipschitz),
and return ``(loc (N, P, 4), logits (N, P, num_classes))`` in prior order. They carry ``.config``
(:class:`ModelConfig`), ``.prior_spec`` and non-persistent buffers ``.priors`` ``(P, 4)`` and
``.prior_maps`` ``(P,)`` (each prior's feature map).

Architecture extras (``config.options``) of the SLL archs:

* ``sll_inner_ratio`` (float, default 1.0): inner width of SLL blocks as a fraction of their channels;
* ``sll_blocks`` (int, default 1): SLL blocks per Tinier SSD layer;
* ``spectral_train_iters`` (int, default 1): power iterations per training forward (spectral mode).
* ``cls_temperature`` (float, default 30.0) and ``learn_temperature`` (bool, default True): the
  class heads output ``tau * (conv(x, W_mode) + b)`` with ``tau`` learnt per head (parameter
  ``cls_heads.<tap>.log_temperature``, init ``log(cls_temperature)``) or fixed. Without it
  (``cls_temperature=1.0, learn_temperature=False``: the seed) 1-Lipschitz logits stay within a
  few tenths of each other, softmax scores stay near 1/11 and never pass the 0.2 threshold.
* ``loc_scale`` (float, default 4.0) and ``learn_loc_scale`` (bool, default True): the same for the
  box heads (``loc_heads.<tap>.log_temperature`` when learnt): box offsets ``s * (conv(x, W_mode) + b)``,
  the pre-scale box map 1-Lipschitz (sll-spectral) and ``s`` counted in ``L_loc``. Unlike the
  temperature it does shrink box certificates (offsets move by ``L_loc * eps``), but without it the
  1-Lipschitz box head cannot regress SSD offsets (loc loss stalls near 2).
  ``cls_temperature=1, learn_temperature=false, loc_scale=1, learn_loc_scale=false`` is the seed.
"""


from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from lipdet.boxes import PriorSpec, feature_sizes_for, flatten_head_outputs, make_priors
from lipdet.errors import LipdetError
from lipdet.models.config import ModelConfig
from lipdet.models.layers import (
    ChannelPad,
    ConvBNAct,
    FoldedConv,
    FoldedSLL,
    MaxPool,
    NormConv2d,
    NormPool,
    SLLConv2d,
)

HW = tuple[int, int]

ARCH_MODES: dict[str, str] = {"sll-spectral": "spectral", "sll-standard": "standard", "sll-l2": "l2"}
"""Entry/exit conv mode of each Lipschitz architecture."""

POOLS: tuple[str, ...] = ("max", "l2")
"""Downsampling of the ``sll-*`` trunks: 2x2/2 max-pool or L2-norm pool (:class:`NormPool`)."""

SHRINKS: tuple[str, ...] = ("truncate", "conv")
"""Channel reduction of the ``sll-*`` trunks: keep the first channels, or a learnt 1x1 spectral conv."""



def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _at_least_one(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _option(default: Any, check: Callable[[Any], bool], need: str, help: str) -> Any:
    return field(default=default, metadata={"check": check, "need": need, "help": help})


@dataclass(frozen=True)
class SLLOptions:
    """Model options of the ``sll-*`` architectures (``-O KEY=VALUE``), with their defaults.

    Validation and the ``-O`` help text both come from these fields (:meth:`from_dict`, :meth:`help`).
    """

    sll_inner_ratio: float = _option(1.0, _positive, "> 0", "SLL block inner width / block width")
    sll_blocks: int = _option(1, _at_least_one, ">= 1", "SLL blocks per Fire layer")
    spectral_train_iters: int = _option(1, _at_least_one, ">= 1", "power iterations per training step")
    cls_temperature: float = _option(30.0, _positive, "> 0", "class head temperature (multiplies its logits)")
    learn_temperature: bool = _option(True, _flag, "true or false", "learn the class temperatures")
    loc_scale: float = _option(4.0, _positive, "> 0", "box head scale")
    learn_loc_scale: bool = _option(True, _flag, "true or false", "learn the box scales")
    pool: str = _option("max", lambda v: v in POOLS, "one of " + ", ".join(POOLS), "downsampling")
    shrink: str = _option("truncate", lambda v: v in SHRINKS, "one of " + ", ".join(SHRINKS), "channel reduction")

    @classmethod
    def from_dict(cls, options: dict[str, Any], arch: str) -> "SLLOptions":
        """Defaults completed by ``options``; an unknown key or a bad value is a one-line LipdetError."""
        names = [f.name for f in fields(cls)]
        unknown = set(options) - set(names)
        if unknown:
            raise LipdetError(f"unknown option(s) for arch {arch}: {', '.join(sorted(unknown))} "
                              f"(allowed: {', '.join(sorted(names))})")
        for f in fields(cls):
            if f.name in options and not f.metadata["check"](options[f.name]):
                raise LipdetError(f"{f.name} must be {f.metadata['need']}, got {options[f.name]!r}")
        return cls(**options)

    @classmethod
    def help(cls) -> str:
        """``pool (max|l2, default max): downsampling; ...`` for the CLI's ``-O`` help."""
        return "; ".join(f"{f.name} ({f.metadata['need']}, default {json.dumps(f.default)}): {f.metadata['help']}"
                         for f in fields(cls))


ARCH_OPTIONS: dict[str, dict[str, Any]] = {"naive": {}, **{a: asdict(SLLOptions()) for a in ARCH_MODES}}
"""Allowed ``config.options`` keys per architecture, with defaults (naive has none)."""


# Tinier SSD layers: (name, reference channels, pool before: None | "MP" | "MP3").
_LAYERS: tuple[tuple[str, int, Optional[str]], ...] = (
    ("fire1", 32, None),
    ("fire2", 32, None),
    ("fire3", 64, "MP"),
    ("fire4", 64, None),
    ("fire5", 64, "MP3"),
    ("fire6", 64, None),
    ("fire7", 128, None),
    ("fire8", 32, None),
    ("fire9", 32, "MP"),
    ("fire10", 32, "MP3"),
    ("conv12_1", 16, None),
    ("conv12_2", 16, "MP"),
)
TAPS: tuple[str, ...] = ("fire8", "fire9", "fire10", "conv12_2")
"""Layers whose outputs feed the four heads, largest map first."""


@dataclass(frozen=True)
class LayerPlan:
    """One module of the network, enough to build it parametrised or folded.

    Attributes:
        name: key in ``model.trunk`` / the heads' dicts.
        kind: ``convbn`` (conv+BN+ReLU), ``convbn-head`` (conv+BN), ``normconv``, ``sll``, ``pool``, ``pad``.
        in_channels, out_channels: channels in and out.
        input_hw: spatial input size in pixels.
        kernel_size, stride: conv or pool geometry.
        mode: conv mode for ``normconv``; ``max`` or ``l2`` for ``pool``.
        inner: SLL inner width.
        ceil_mode: pools only.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    input_hw: HW
    kernel_size: int = 3
    stride: int = 1
    mode: str = ""
    inner: int = 0
    ceil_mode: bool = False
    train_iters: int = 1
    temperature: Optional[float] = None
    learn_temperature: bool = False
    init: str = ""


def scaled_channels(reference: int, width: float) -> int:
    """``round(reference * width)``, at least 1."""
    return max(1, int(round(reference * width)))


def resolve_options(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg.options`` completed with the arch's defaults; unknown keys and bad values raise :class:`LipdetError`."""
    if cfg.arch in ARCH_MODES:
        return asdict(SLLOptions.from_dict(dict(cfg.options), cfg.arch))
    if cfg.options:
        raise LipdetError(f"unknown option(s) for arch {cfg.arch}: {', '.join(sorted(cfg.options))} (allowed: none)")
    return {}


def _pool_out(hw: HW, k: int, s: int, ceil_mode: bool) -> HW:
    def one(n: int) -> int:
        num = n - k
        return (-(-num // s) if ceil_mode else num // s) + 1

    return (one(hw[0]), one(hw[1]))


def plan_network(cfg: ModelConfig) -> tuple[list[LayerPlan], list[LayerPlan], list[LayerPlan]]:
    """The trunk (forward order) and the loc / cls heads (one per tap) of ``cfg``'s network."""
    opts = resolve_options(cfg)
    naive = cfg.arch == "naive"
    mode = ARCH_MODES.get(cfg.arch, "")
    s = cfg.input_size
    hw: HW = (s, s)
    trunk: list[LayerPlan] = []
    tap_shapes: dict[str, tuple[int, HW]] = {}
    c = 3
    for name, ref, pool in _LAYERS:
        cout = scaled_channels(ref, cfg.width)
        if pool is not None:
            k, st = (3, 2) if (pool == "MP3" and naive) else (2, 2)
            ceil_mode = naive and pool == "MP3"
            pool_mode = "max" if naive else str(opts["pool"])
            trunk.append(LayerPlan(f"pool_{name}", "pool", c, c, hw, k, st, ceil_mode=ceil_mode, mode=pool_mode))
            hw = _pool_out(hw, k, st, ceil_mode)
        if min(hw) < 1:
            raise LipdetError(f"input size {s} is too small for Tinier SSD")
        if naive:
            trunk.append(LayerPlan(name, "convbn", c, cout, hw))
        elif name == "fire1":
            trunk.append(LayerPlan(name, "normconv", c, cout, hw, mode=mode,
                                   train_iters=int(opts["spectral_train_iters"])))
        else:
            if cout < c and opts["shrink"] == "conv":
                trunk.append(LayerPlan(f"proj_{name}", "normconv", c, cout, hw, kernel_size=1, mode="spectral",
                                       train_iters=int(opts["spectral_train_iters"]), init="truncate"))
            elif cout != c:
                trunk.append(LayerPlan(f"pad_{name}", "pad", c, cout, hw))
            inner = scaled_channels(cout, float(opts["sll_inner_ratio"]))
            nb = int(opts["sll_blocks"])
            for i in range(nb):
                block = name if i == nb - 1 else f"{name}_{i}"
                trunk.append(LayerPlan(block, "sll", cout, cout, hw, inner=inner))
        c = cout
        if name in TAPS:
            tap_shapes[name] = (c, hw)
    sizes = tuple(tap_shapes[t][1][0] for t in TAPS)
    if sizes != feature_sizes_for(s):
        raise LipdetError(f"internal error: map sizes {sizes} differ from {feature_sizes_for(s)}")
    anchors = PriorSpec(feature_sizes=sizes).anchors_per_location
    scales: dict[bool, tuple[Optional[float], bool]] = {True: (None, False), False: (None, False)}
    if not naive:
        for is_cls, (k_val, k_learn) in ((True, ("cls_temperature", "learn_temperature")),
                                         (False, ("loc_scale", "learn_loc_scale"))):
            val, learn = float(opts[k_val]), bool(opts[k_learn])
            scales[is_cls] = (None if (val == 1.0 and not learn) else val, learn)  # 1, fixed: no scale at all
    locs, clss = [], []
    for t in TAPS:
        ch, fhw = tap_shapes[t]
        for outs, dest, is_cls in ((anchors * 4, locs, False), (anchors * cfg.num_classes, clss, True)):
            if naive:
                dest.append(LayerPlan(t, "convbn-head", ch, outs, fhw))
            else:
                dest.append(LayerPlan(t, "normconv", ch, outs, fhw, mode=mode,
                                      train_iters=int(opts["spectral_train_iters"]),
                                      temperature=scales[is_cls][0], learn_temperature=scales[is_cls][1]))
    return trunk, locs, clss


def make_layer(plan: LayerPlan, folded: bool) -> nn.Module:
    """Instantiate ``plan`` as a trainable module, or (``folded=True``) as its plain folded form."""
    p = plan
    if p.kind == "pool":
        if p.mode == "l2":
            return NormPool(p.kernel_size, p.stride)
        return MaxPool(p.kernel_size, p.stride, p.ceil_mode)
    if p.kind == "pad":
        return ChannelPad(p.in_channels, p.out_channels)
    if p.kind in ("convbn", "convbn-head"):
        relu = p.kind == "convbn"
        if folded:
            return FoldedConv(p.in_channels, p.out_channels, p.kernel_size, relu=relu, input_hw=p.input_hw)
        return ConvBNAct(p.in_channels, p.out_channels, p.input_hw, p.kernel_size, relu=relu)
    if p.kind == "normconv":
        if folded:
            return FoldedConv(p.in_channels, p.out_channels, p.kernel_size, relu=False, input_hw=p.input_hw)
        conv = NormConv2d(p.in_channels, p.out_channels, p.mode, p.input_hw, p.kernel_size,
                          train_iters=p.train_iters, temperature=p.temperature,
                          learn_temperature=p.learn_temperature)
        if p.init == "truncate":  # start as ChannelPad (keep the first channels), then learn
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[:, : p.out_channels, 0, 0] = torch.eye(p.out_channels)
        return conv
    if p.kind == "sll":
        if folded:
            return FoldedSLL(p.in_channels, p.inner, p.kernel_size, input_hw=p.input_hw)
        return SLLConv2d(p.in_channels, p.inner, p.kernel_size, input_hw=p.input_hw)
    raise LipdetError(f"internal error: unknown layer kind {p.kind!r}")


class TinierSSD(nn.Module):
    """A Tinier SSD detector assembled from named modules.

    Attributes:
        config: the :class:`ModelConfig` that rebuilds it.
        prior_spec: the prior layout (feature sizes from ``config.input_size``).
        priors: non-persistent buffer ``(P, 4)``, normalised ``(cx, cy, w, h)``.
        trunk: ``nn.ModuleDict`` of trunk modules in forward order (keys such as ``fire1``).
        taps: names of the trunk modules whose outputs feed the heads, largest map first.
        loc_heads, cls_heads: ``nn.ModuleDict`` tap name -> head module.
        folded: whether the modules are the plain folded ones.
        input_offset: subtracted from the input (images in ``[0, 1]`` -> ``[-0.5, 0.5]``).
    """

    input_offset: float = 0.5

    def __init__(self, config: ModelConfig, trunk: Sequence[tuple[str, nn.Module]], taps: Sequence[str],
                 loc_heads: Sequence[nn.Module], cls_heads: Sequence[nn.Module], folded: bool = False) -> None:
        super().__init__()
        self.config = config
        self.folded = folded
        self.prior_spec = PriorSpec(feature_sizes=feature_sizes_for(config.input_size))
        self.trunk = nn.ModuleDict(list(trunk))
        self.taps = tuple(taps)
        self.loc_heads = nn.ModuleDict(list(zip(self.taps, loc_heads)))
        self.cls_heads = nn.ModuleDict(list(zip(self.taps, cls_heads)))
        self.register_buffer("priors", make_priors(self.prior_spec), persistent=False)
        self.register_buffer("prior_maps", self.prior_spec.map_index(), persistent=False)  # (P,)

    @property
    def num_priors(self) -> int:
        return self.prior_spec.num_priors

    def prior_temperatures(self) -> Tensor:
        """``(P,)`` the current class temperature ``tau_k`` of each prior's scale (1 without one), detached.

        For ``sll-spectral`` this is exactly the Lipschitz bound of input -> that prior's logits, the
        ``L`` of :func:`lipdet.loss.lipschitz_margin`; for the other archs only the head's factor.
        """
        dev = self.priors.device
        taus = []
        for tap in self.taps:
            head = self.cls_heads[tap]
            tau = head.temperature_tensor() if hasattr(head, "temperature_tensor") else None
            taus.append(tau.detach().reshape(()).float() if tau is not None else torch.ones((), device=dev))
        # on the device, without a host sync: this runs every training step under --margin-eps
        return torch.stack(taus).to(dev)[self.prior_maps]

    def features(self, images: Tensor) -> list[Tensor]:
        """Tap outputs ``[(N, C_i, s_i, s_i)]`` for ``images (N, 3, S, S)`` in ``[0, 1]``."""
        x = images - self.input_offset
        feats = []
        for name, layer in self.trunk.items():
            x = layer(x)
            if name in self.taps:
                feats.append(x)
        return feats

    def head_maps(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Raw per-scale head outputs: ``loc (N, A*4, s, s)`` and ``cls (N, A*classes, s, s)`` lists."""
        feats = self.features(images)
        loc = [self.loc_heads[t](f) for t, f in zip(self.taps, feats)]
        cls = [self.cls_heads[t](f) for t, f in zip(self.taps, feats)]
        return loc, cls

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images (N, 3, S, S)`` in ``[0, 1]`` -> ``(loc (N, P, 4), logits (N, P, num_classes))``."""
        loc, cls = self.head_maps(images)
        return flatten_head_outputs(loc, cls, self.config.num_classes)


def _assemble(cfg: ModelConfig, folded: bool) -> TinierSSD:
    trunk, locs, clss = plan_network(cfg)
    return TinierSSD(
        cfg,
        [(p.name, make_layer(p, folded)) for p in trunk],
        TAPS,
        [make_layer(p, folded) for p in locs],
        [make_layer(p, folded) for p in clss],
        folded=folded,
    )


def build_from_config(cfg: ModelConfig) -> TinierSSD:
    """A freshly initialised trainable model for ``cfg`` (options validated)."""
    return _assemble(cfg, folded=False)


def build_folded_from_config(cfg: ModelConfig) -> TinierSSD:
    """The folded (plain ops) structure of ``cfg``'s model, weights uninitialised in meaning."""
    return _assemble(cfg, folded=True).eval()


_CONFIG_FIELDS = ("width", "input_size", "num_classes")


def build_model(arch: str = "naive", **options: Any) -> TinierSSD:
    """Build a detector: ``build_model("sll-l2", width=4.5, sll_inner_ratio=0.5)``.

    Args:
        arch: one of :data:`lipdet.models.config.ARCHS`.
        options: :class:`ModelConfig` fields (``width``, ``input_size``, ``num_classes``,
            ``options``) plus arch extras (see the module docstring), which go into ``config.options``.
    """
    fields = {k: options.pop(k) for k in _CONFIG_FIELDS if k in options}
    extras = dict(options.pop("options", None) or {})
    extras.update(options)
    cfg = ModelConfig(arch=arch, options=extras, **fields)
    return build_from_config(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters())
