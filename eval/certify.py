"""Per-anchor robustness certificates for a Lipschitz-bounded detector, and the certified object share.

Background (technical brief, section 4): if the map from the input image to an anchor's class
logits is ``L``-Lipschitz in L2, the anchor's top class cannot change under any perturbation with
``||delta||_2 < margin / (sqrt(2) * L)``, where ``margin`` is the top logit minus the runner-up.
If the map to its four encoded box offsets is ``L_loc``-Lipschitz, those offsets move by at most
``L_loc * eps`` jointly in L2 (:func:`box_radius` bounds the IoU over that whole ball). NMS and the
score threshold are not continuous, so certificates are stated on the raw, per-anchor outputs.

The bounds come from :func:`lipdet.models.lipschitz.head_bounds` on the differentiable twin, i.e.
from the deployed artifact's own weights, one ``(L_loc, L_cls)`` pair per feature-map scale.

CERTIFIED_DEFINITION below is the exact definition used in reports and JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from lipdet.boxes import VARIANCES, decode, map_index

SQRT2 = math.sqrt(2.0)

CERTIFIED_DEFINITION = (
    "Certified object share at eps. For each ground-truth object g we take the deployed engine's clean "
    "detections (after the shared post-processing) that detect g correctly: same digit and IoU >= 0.5 with g. "
    "Each such detection comes from one anchor p at feature-map scale k. The anchor's certified radius is "
    "r_p = min(r_cls, r_box): r_cls = (z_top - z_second) / (sqrt(2) * L_cls[k]) if p's top logit over all "
    "11 classes (background included) is g's digit, else 0; r_box is the largest eps for which every box whose "
    "four encoded offsets lie within L2 distance L_loc[k] * eps of the clean offsets still has IoU >= 0.5 with g "
    "(a closed-form lower bound on the IoU, minimised over a covering of the L2 ball, found by bisection). L_cls[k] and L_loc[k] are the L2 Lipschitz "
    "bounds, input image -> that scale's class logits / box offsets, recomputed from the artifact's weights. "
    "g is certified at eps when one of its correct detections has r_p > eps; the share is certified objects "
    "over all ground-truth objects. Guarantee: under any perturbation with ||delta||_2 <= eps (L2 over the "
    "whole 3xSxS image in [0,1] pixel units), that anchor keeps g's digit as its top class and its decoded box "
    "keeps IoU >= 0.5 with g. Not certified: the score threshold and NMS (discontinuous), and, for fp16/int8 "
    "engines, the rounding gap between the engine and its exact-arithmetic twin."
)


@dataclass
class AnchorBounds:
    """Per-anchor Lipschitz bounds, ``(P,)`` each: input -> that anchor's class logits / box offsets."""

    cls: Tensor
    loc: Tensor
    scale_index: Tensor
    per_scale: list[dict[str, float]]

    @classmethod
    def from_head_bounds(
        cls, bounds: dict[str, Any], num_priors: int, feature_sizes: Sequence[int] | None = None
    ) -> "AnchorBounds":
        """Spread ``head_bounds(model)``'s per-scale bounds over the priors.

        Priors are laid out feature map by feature map, largest map first (``lipdet.boxes``), with
        the same number of anchors at every location, so scale ``k`` owns ``A * f_k^2`` consecutive
        priors. ``feature_sizes`` (the card's prior spec) fixes the order; without it the
        ``per_scale`` entries are sorted largest map first.
        """
        per_scale = [dict(s) for s in bounds.get("per_scale") or []]
        if not per_scale:
            # A single global bound: every anchor gets it.
            lc, ll = float(bounds["cls"]), float(bounds["loc"])
            return cls(
                torch.full((num_priors,), lc), torch.full((num_priors,), ll), torch.zeros(num_priors, dtype=torch.long),
                [{"feature_size": 0, "cls": lc, "loc": ll}],
            )
        if feature_sizes is not None:
            by_size = {int(s["feature_size"]): s for s in per_scale}
            per_scale = [by_size[int(f)] for f in feature_sizes]
        else:
            per_scale.sort(key=lambda s: -int(s["feature_size"]))
        cells = sum(int(s["feature_size"]) ** 2 for s in per_scale)
        if cells == 0 or num_priors % cells:
            raise ValueError(f"{num_priors} priors do not tile feature maps {[s['feature_size'] for s in per_scale]}")
        anchors = num_priors // cells
        counts = [anchors * int(s["feature_size"]) ** 2 for s in per_scale]
        idx = map_index(counts)
        lc = torch.tensor([float(s["cls"]) for s in per_scale], dtype=torch.float64)[idx]
        ll = torch.tensor([float(s["loc"]) for s in per_scale], dtype=torch.float64)[idx]
        clean = [{"feature_size": int(s["feature_size"]), "cls": float(s["cls"]), "loc": float(s["loc"])} for s in per_scale]
        return cls(lc, ll, idx, clean)


def class_radius(logits: Tensor, lipschitz_cls: Tensor) -> tuple[Tensor, Tensor]:
    """Per-anchor certified radius of the top-class decision.

    Args:
        logits: ``(..., P, C)`` raw class logits.
        lipschitz_cls: ``(P,)`` L2 Lipschitz bound of input -> that anchor's logits.

    Returns:
        ``radius (..., P)`` = (top logit - runner-up) / (sqrt(2) * L) in float64, and
        ``top (..., P)`` the top class index (0 = background).
    """
    top2 = logits.double().topk(2, dim=-1)
    margin = top2.values[..., 0] - top2.values[..., 1]
    radius = margin / (SQRT2 * lipschitz_cls.to(margin.device, torch.float64))
    return radius, top2.indices[..., 0]


def iou_lower_bound(offsets: Tensor, priors: Tensor, gt: Tensor, b: Tensor) -> Tensor:
    """Lower bound on IoU(box, gt) over all boxes whose offsets move by at most ``b`` per coordinate.

    With SSD coding ``cx = pcx + dx * v0 * pw`` and ``w = pw * exp(dw * v1)``, a change of at most
    ``b_x`` in ``dx`` and ``b_w`` in ``dw`` keeps the centre within ``b_x * v0 * pw`` and the width
    within ``[w e^{-v1 b_w}, w e^{v1 b_w}]`` (same for y / h). Every such box contains the *inner*
    box (furthest centre, smallest size) and has area at most ``w_max * h_max``, so
    ``IoU >= I(inner, gt) / (w_max h_max + area(gt) - I(inner, gt))``. Clamping the box to the image
    (as post-processing does) only keeps this valid when the intersection is taken with the
    ``gt`` clipped to ``[0, 1]``, which is done here. The bound is non-increasing in every budget.

    Args: ``offsets (M, 4)``, ``priors (M, 4)`` normalised cxcywh, ``gt (M, 4)`` normalised xyxy,
    ``b`` the budget per offset ``(dx, dy, dw, dh)``: ``(M,)`` (the same for all four) or ``(M, 4)``;
    extra leading dimensions of ``b`` broadcast (``(K, M, 4)`` gives ``(K, M)``).
    Returns ``(..., M)`` in float64.
    """
    o, p, g, b = offsets.double(), priors.double(), gt.double(), b.double()
    if b.shape[-1:] != (4,) or b.dim() == 1:
        b = b.unsqueeze(-1).expand(*b.shape, 4)
    v0, v1 = VARIANCES
    c = p[:, :2] + o[:, :2] * v0 * p[:, 2:]
    wh = p[:, 2:] * torch.exp(o[:, 2:] * v1)
    shift = b[..., :2] * v0 * p[:, 2:]
    wh_min = wh * torch.exp(-v1 * b[..., 2:])
    wh_max = wh * torch.exp(v1 * b[..., 2:])
    inner_lo = c + shift - wh_min / 2
    inner_hi = c - shift + wh_min / 2
    g_lo = g[:, :2].clamp(0.0, 1.0)
    g_hi = g[:, 2:].clamp(0.0, 1.0)
    side = (torch.minimum(inner_hi, g_hi) - torch.maximum(inner_lo, g_lo)).clamp_min(0.0)
    side = torch.where(inner_hi > inner_lo, side, torch.zeros_like(side))
    inter = side[..., 0] * side[..., 1]
    area_g = (g[:, 2] - g[:, 0]).clamp_min(0) * (g[:, 3] - g[:, 1]).clamp_min(0)
    union_ub = wh_max[..., 0] * wh_max[..., 1] + area_g - inter
    return torch.where(union_ub > 0, inter / union_ub.clamp_min(1e-300), torch.zeros_like(inter))


def sphere_corners(cells: int = 12) -> Tensor:
    """``(cells**3, 4)`` points covering the unit L2 sphere's non-negative orthant from above.

    Every ``a >= 0`` with ``||a||_2 <= 1`` is below (componentwise) at least one returned corner:
    the orthant is cut into ``cells**3`` cells of the spherical angles
    ``a = (cos t1, sin t1 cos t2, sin t1 sin t2 cos t3, sin t1 sin t2 sin t3)``, ``t_i in [0, pi/2]``,
    and each cell contributes the componentwise maximum of ``a`` over it (each factor is monotone in
    its own angle, so the maximum is a product of the factors' maxima).
    """
    edges = torch.linspace(0.0, math.pi / 2, cells + 1, dtype=torch.float64)
    lo, hi = edges[:-1], edges[1:]
    l1, l2, l3 = torch.meshgrid(lo, lo, lo, indexing="ij")
    u1, u2, u3 = torch.meshgrid(hi, hi, hi, indexing="ij")
    corner = torch.stack(
        [
            torch.cos(l1),
            torch.sin(u1) * torch.cos(l2),
            torch.sin(u1) * torch.sin(u2) * torch.cos(l3),
            torch.sin(u1) * torch.sin(u2) * torch.sin(u3),
        ],
        dim=-1,
    )
    return corner.reshape(-1, 4).clamp(0.0, 1.0)


def iou_lower_bound_l2(offsets: Tensor, priors: Tensor, gt: Tensor, rho: Tensor, cells: int = 12) -> Tensor:
    """Lower bound on IoU(box, gt) over all boxes whose four offsets move by at most ``rho`` in L2.

    The bound of :func:`iou_lower_bound` is non-increasing in each coordinate's budget, so its minimum
    over the corners of :func:`sphere_corners` (scaled by ``rho``) bounds it over the whole L2 ball;
    it is never below the per-coordinate bound with budget ``rho`` (the ball lies in that box), and
    up to ~2x larger in radius. Args as :func:`iou_lower_bound`, ``rho (M,)``. Returns ``(M,)``.
    """
    corners = sphere_corners(cells).to(offsets.device)  # (K, 4)
    budgets = corners.view(-1, 1, 4) * rho.double().view(1, -1, 1)  # (K, M, 4)
    return iou_lower_bound(offsets, priors, gt, budgets).amin(dim=0)


def box_radius(
    offsets: Tensor, priors: Tensor, gt: Tensor, lipschitz_loc: Tensor, iou: float = 0.5, iters: int = 40
) -> Tensor:
    """Largest eps with :func:`iou_lower_bound_l2` ``>= iou`` for offsets moving ``L_loc * eps`` in L2.

    ``L_loc`` bounds input -> the whole box map in L2, so one anchor's four offsets move jointly by at
    most ``L_loc * ||delta||_2``. Bisection on that L2 budget (the bound is non-increasing in it).
    Returns ``(M,)`` float64 radii: 0 where even a zero budget fails, ``inf`` where ``L_loc == 0``.
    """
    m = offsets.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.float64)
    lo = torch.zeros(m, dtype=torch.float64)
    ok0 = iou_lower_bound(offsets, priors, gt, lo) >= iou
    hi = torch.ones(m, dtype=torch.float64)
    for _ in range(40):  # grow until the bound fails (the box budget is never this large in practice)
        fail = iou_lower_bound(offsets, priors, gt, hi) < iou
        if bool(fail.all()):
            break
        hi = torch.where(fail, hi, hi * 2)
    hi = hi * 2.0  # the L2 ball's bound may hold up to 2x further than the per-coordinate one
    for _ in range(iters):
        mid = (lo + hi) / 2
        good = iou_lower_bound_l2(offsets, priors, gt, mid) >= iou
        lo = torch.where(good, mid, lo)
        hi = torch.where(good, hi, mid)
    lloc = lipschitz_loc.double()
    radius = torch.where(lloc > 0, lo / lloc.clamp_min(1e-300), torch.full_like(lo, math.inf))
    return torch.where(ok0, radius, torch.zeros_like(radius))


def detection_anchors(
    loc: Tensor, logits: Tensor, priors: Tensor, input_size: int, dets: dict[str, Tensor], atol: float = 1e-5
) -> Tensor:
    """The prior index that produced each post-processed detection of one image (``-1`` if none).

    Post-processing keeps each detection's box and score exactly as computed from one prior's
    outputs, so the prior is the one whose decoded, clamped box and class probability equal the
    detection's (recomputed here with the same operations).

    Args: ``loc (P, 4)``, ``logits (P, C)``, ``dets`` from :func:`lipdet.postprocess.postprocess`.
    """
    n = dets["boxes"].shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    boxes = decode(loc.float(), priors.float()).clamp(0.0, 1.0) * input_size  # (P, 4)
    probs = logits.float().softmax(dim=-1)[:, 1:]  # (P, C-1)
    out = torch.full((n,), -1, dtype=torch.long)
    for j in range(n):
        lab = int(dets["labels"][j])
        err = (boxes - dets["boxes"][j].float()).abs().amax(dim=1) + (probs[:, lab] - float(dets["scores"][j])).abs()
        best = int(err.argmin())
        if float(err[best]) <= atol * max(1.0, input_size):
            out[j] = best
    return out


def certify_image(
    loc: Tensor,
    logits: Tensor,
    priors: Tensor,
    input_size: int,
    dets: dict[str, Tensor],
    target: dict[str, Tensor],
    bounds: AnchorBounds,
    iou: float = 0.5,
) -> dict[str, Tensor]:
    """Certify one image's ground-truth objects (see :data:`CERTIFIED_DEFINITION`).

    Args:
        loc, logits: the engine's raw clean outputs for the image, ``(P, 4)`` / ``(P, C)``.
        dets: its post-processed detections; ``target``: ``{"boxes" (K, 4) input px, "labels" (K,)}``.

    Returns:
        ``{"detected": (K,) bool, "radius": (K,) float64}``: whether g is detected correctly, and
        the best certified radius over its correct detections (0 if none is certifiable).
    """
    gt = target["boxes"].float()
    labels = target["labels"].long()
    k = gt.shape[0]
    detected = torch.zeros(k, dtype=torch.bool)
    radius = torch.zeros(k, dtype=torch.float64)
    if k == 0 or dets["boxes"].shape[0] == 0:
        return {"detected": detected, "radius": radius}
    anchors = detection_anchors(loc, logits, priors, input_size, dets)
    r_cls_all, top_all = class_radius(logits, bounds.cls)  # (P,)
    ious = box_iou(dets["boxes"].float(), gt)  # (D, K)
    hit = (ious >= iou) & (dets["labels"].long().view(-1, 1) == labels.view(1, -1))
    pairs = torch.nonzero(hit, as_tuple=False)
    if pairs.numel() == 0:
        return {"detected": detected, "radius": radius}
    d_idx, g_idx = pairs[:, 0], pairs[:, 1]
    detected[g_idx] = True
    a = anchors[d_idx]
    valid = a >= 0
    a_safe = a.clamp_min(0)
    right_class = top_all[a_safe] == labels[g_idx] + 1
    r_cls = torch.where(valid & right_class, r_cls_all[a_safe], torch.zeros_like(r_cls_all[a_safe]))
    r_box = box_radius(loc[a_safe].float(), priors[a_safe].float(), gt[g_idx] / input_size, bounds.loc[a_safe], iou)
    r = torch.minimum(r_cls, r_box).clamp_min(0.0)
    for j in range(pairs.shape[0]):
        gi = int(g_idx[j])
        radius[gi] = max(float(radius[gi]), float(r[j]))
    return {"detected": detected, "radius": radius}


def certified_share(radii: Tensor, detected: Tensor, eps: float) -> float:
    """Share of ground-truth objects detected correctly with certified radius ``> eps``."""
    if radii.numel() == 0:
        return 0.0
    return float((detected & (radii > eps)).double().mean())
