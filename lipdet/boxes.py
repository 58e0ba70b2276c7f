"""SSD priors and box coding.

Conventions used across lipdet:

* Boxes are ``(x1, y1, x2, y2)``; "normalised" boxes are in units of the input side (``[0, 1]``).
* Priors are ``(cx, cy, w, h)`` normalised, shape ``(P, 4)``, ordered feature map by feature map
  (largest map first), then row ``y``, column ``x``, then anchor -- the order in which
  :func:`flatten_head_outputs` lays out the heads' outputs.
* Box offsets are SSD's centre-size encoding with variances ``(0.1, 0.2)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

VARIANCES: tuple[float, float] = (0.1, 0.2)


@dataclass(frozen=True)
class PriorSpec:
    """The prior (anchor) layout of a Tinier SSD.

    Attributes:
        feature_sizes: side of each square feature map that feeds a head, largest first.
        scales: prior scale per feature map, as a fraction of the input side.
        aspect_ratios: width / height of the anchors at every location (digits are tall).
    """

    feature_sizes: tuple[int, ...] = (18, 9, 4, 2)
    scales: tuple[float, ...] = (0.15, 0.35, 0.55, 0.725)
    aspect_ratios: tuple[float, ...] = (0.85, 0.6, 0.4, 0.25)

    @property
    def anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    @property
    def priors_per_map(self) -> tuple[int, ...]:
        """Priors of each feature map, in prior order (largest map first)."""
        return tuple(self.anchors_per_location * s * s for s in self.feature_sizes)

    @property
    def num_priors(self) -> int:
        return sum(self.priors_per_map)

    def map_index(self) -> Tensor:
        """``(P,)`` long: the feature map (0 = largest) each prior belongs to."""
        return map_index(self.priors_per_map)

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[float]]) -> "PriorSpec":
        return cls(
            feature_sizes=tuple(int(v) for v in d["feature_sizes"]),
            scales=tuple(float(v) for v in d["scales"]),
            aspect_ratios=tuple(float(v) for v in d["aspect_ratios"]),
        )


def feature_sizes_for(input_size: int) -> tuple[int, ...]:
    """Feature-map sides of Tinier SSD's four heads for a square input of ``input_size`` pixels.

    74 -> (18, 9, 4, 2): 74 -pool2-> 37 -pool-> 18 -pool-> 9 -pool-> 4 -pool-> 2 (floor division).
    """
    s = input_size // 2  # fire3's 2x2 pool
    sizes = []
    for _ in range(4):
        s = s // 2
        sizes.append(s)
    return tuple(sizes)


def map_index(priors_per_map: Sequence[int]) -> Tensor:
    """``(P,)`` long: for per-map prior counts in prior order, the map index of each prior."""
    return torch.repeat_interleave(torch.arange(len(priors_per_map)), torch.tensor(list(priors_per_map), dtype=torch.long))


def make_priors(spec: PriorSpec) -> Tensor:
    """Priors ``(P, 4)`` as normalised ``(cx, cy, w, h)`` clipped to ``[0, 1]``."""
    out = []
    for size, scale in zip(spec.feature_sizes, spec.scales):
        for y in range(size):
            for x in range(size):
                cx, cy = (x + 0.5) / size, (y + 0.5) / size
                for ar in spec.aspect_ratios:
                    out.append((cx, cy, scale * math.sqrt(ar), scale / math.sqrt(ar)))
    return torch.tensor(out, dtype=torch.float32).clamp_(0.0, 1.0)


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """``(..., 4)`` centre-size boxes to corner boxes."""
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    """``(..., 4)`` corner boxes to centre-size boxes."""
    return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], dim=-1)


def encode(boxes: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """Encode normalised xyxy ``boxes (P, 4)`` matched to ``priors (P, 4)`` as SSD offsets ``(P, 4)``."""
    b = xyxy_to_cxcywh(boxes)
    g_c = (b[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    g_wh = torch.log(b[..., 2:].clamp_min(1e-6) / priors[..., 2:]) / variances[1]
    return torch.cat([g_c, g_wh], dim=-1)


def decode(offsets: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """Decode SSD offsets ``(..., P, 4)`` against ``priors (P, 4)`` to normalised xyxy boxes."""
    c = priors[..., :2] + offsets[..., :2] * variances[0] * priors[..., 2:]
    wh = priors[..., 2:] * torch.exp(offsets[..., 2:] * variances[1])
    return cxcywh_to_xyxy(torch.cat([c, wh], dim=-1))


def flatten_head_outputs(loc_maps: Sequence[Tensor], cls_maps: Sequence[Tensor], num_classes: int) -> tuple[Tensor, Tensor]:
    """Lay out per-map head outputs in prior order.

    Args:
        loc_maps: per feature map, ``(N, A*4, H, W)``.
        cls_maps: per feature map, ``(N, A*num_classes, H, W)``.

    Returns:
        ``loc (N, P, 4)`` and ``logits (N, P, num_classes)`` with ``P = sum(A*H*W)``.
    """
    n = loc_maps[0].shape[0]
    loc = torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, 4) for m in loc_maps], dim=1)
    cls = torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, num_classes) for m in cls_maps], dim=1)
    return loc, cls
