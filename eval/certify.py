"""The certified object share of ``lipdet eval --certify``: per-anchor certificates matched to ground truth.

The per-anchor maths (head rows, :class:`~lipdet.certificates.AnchorBounds`, class and box radii, the
IoU lower bounds, tracing a detection back to its anchor) lives in the shared core,
:mod:`lipdet.certificates`, which ``lipdet serve`` uses too. This module adds what needs ground truth
and a dataset: which detections detect an object correctly (:func:`certify_image`), the certified share
(:func:`certified_share`) and what binds over a whole evaluation (:func:`binding_summary`).

CERTIFIED_DEFINITION below is the exact definition used in reports and JSON.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from lipdet.certificates import AnchorBounds, anchor_radii, binding_of, box_iou_exact, detection_anchors
from lipdet.metrics import correct_pairs

CERTIFIED_DEFINITION = (
    "Certified object share at eps. For each ground-truth object g we take the deployed engine's clean "
    "detections (after the shared post-processing) that detect g correctly: same digit and IoU >= 0.5 with g. "
    "Each such detection comes from one anchor p (anchor a at location (y, x) of feature-map scale k), whose "
    "class logits z and box offsets o are the folded head's rows W_a applied to the k x k patch of the tap "
    "feature map around (y, x) (padding positions dropped). T_k is an upper bound on the L2 Lipschitz constant "
    "input image -> tap feature map; all constants are upper bounds computed from the artifact's weights with "
    "float64 rounding bounded. The anchor's certified radius is r_p = min(r_cls, r_box): r_cls = min over "
    "classes j != t of (z_t - z_j) / (T_k * ||w_t - w_j||_2) when p's top class t over all 11 classes "
    "(background included) is g's digit, else 0 (w_i: the rows of W_a^cls); r_box = rho / (T_k * ||W_a^loc||_2) "
    "where rho is the largest L2 radius (found by bisection) for which a provable lower bound on the IoU "
    "with g of every box decoded (and clipped to the image) from offsets within L2 distance rho of o is >= 0.5 "
    "(the 4-D offset ball split into x/y budgets and cells of centre shift and log-size, each bounded by "
    "monotonicity). g is certified at eps when one of its correct detections has r_p > eps; the share is "
    "certified objects over all ground-truth objects; the part that binds is the smaller of r_cls and r_box. "
    "Guarantee (exact arithmetic): under any perturbation with ||delta||_2 <= eps (L2 over the whole 3xSxS "
    "image in [0,1] pixel units), that anchor keeps g's digit as its top class and its decoded box keeps "
    "IoU >= 0.5 with g. Not certified: the score threshold and NMS (discontinuous), the engine's fp32 rounding "
    "at the perturbed input, and, for fp16/int8 engines, the gap between the engine and its exact-arithmetic twin."
)


def certify_image(
    loc: Tensor,
    logits: Tensor,
    priors: Tensor,
    input_size: int,
    dets: dict[str, Tensor],
    target: dict[str, Tensor],
    bounds: AnchorBounds,
    iou: float = 0.5,
) -> dict[str, Any]:
    """Certify one image's ground-truth objects (see :data:`CERTIFIED_DEFINITION`).

    Args:
        loc, logits: the engine's raw clean outputs for the image, ``(P, 4)`` / ``(P, C)``.
        dets: its post-processed detections; ``target``: ``{"boxes" (K, 4) input px, "labels" (K,)}``.

    Returns:
        ``{"detected": (K,) bool, "radius": (K,) float64, "r_cls": (K,), "r_box": (K,), "binding": [K str],
        "anchor": (K,) long}``: whether g is detected correctly, the best certified radius over its correct
        detections (0 if none is certifiable), that detection's class and box radii, which of them binds:
        ``"cls"`` (``r_cls <= r_box``), ``"box"``, or ``"none"`` (not detected, or no anchor traced), and the
        prior index that gave the radius (``-1``: none).
    """
    gt = target["boxes"].float()
    labels = target["labels"].long()
    k = gt.shape[0]
    out: dict[str, Any] = {"detected": torch.zeros(k, dtype=torch.bool), "radius": torch.zeros(k, dtype=torch.float64),
                           "r_cls": torch.zeros(k, dtype=torch.float64), "r_box": torch.zeros(k, dtype=torch.float64),
                           "binding": ["none"] * k, "anchor": torch.full((k,), -1, dtype=torch.long)}
    if k == 0 or dets["boxes"].shape[0] == 0:
        return out
    hit = correct_pairs(dets, target, iou)  # (D, K)
    pairs = torch.nonzero(hit, as_tuple=False)
    if pairs.numel() == 0:
        return out
    d_idx, g_idx = pairs[:, 0], pairs[:, 1]
    out["detected"][g_idx] = True
    a = detection_anchors(loc, logits, priors, input_size, dets)[d_idx]
    r_cls, r_box = anchor_radii(loc, logits, priors, a, labels[g_idx], gt[g_idx] / input_size, bounds, iou)
    r = torch.minimum(r_cls, r_box).clamp_min(0.0)
    binding = binding_of(r_cls, r_box, a >= 0)
    for j in range(pairs.shape[0]):
        gi = int(g_idx[j])
        if out["binding"][gi] == "none" or float(r[j]) > float(out["radius"][gi]):
            out["radius"][gi], out["r_cls"][gi], out["r_box"][gi] = r[j], r_cls[j], r_box[j]
            out["binding"][gi], out["anchor"][gi] = binding[j], a[j]
    return out


def certified_share(radii: Tensor, detected: Tensor, eps: float) -> float:
    """Share of ground-truth objects detected correctly with certified radius ``> eps``."""
    if radii.numel() == 0:
        return 0.0
    return float((detected & (radii > eps)).double().mean())


def binding_summary(certs: Sequence[dict[str, Any]], grid: Sequence[float]) -> dict[str, Any]:
    """What binds, over the per-image results of :func:`certify_image`.

    Returns ``{"binding": {"cls", "box", "none"} object counts, "median_r_cls_detected",
    "median_r_box_detected"`` (over detected objects with a traced anchor, finite values), ``"binding_curve":
    [{"eps", "certified", "failed_cls", "failed_box"}]}``: at each ``eps`` of ``grid``, objects certified and
    detected objects not certified because their class / box radius is ``<= eps``.
    """
    binding = [b for c in certs for b in c.get("binding", [])]

    def cat(key: str, dtype: torch.dtype) -> Tensor:
        return torch.cat([c[key] for c in certs] or [torch.zeros(0, dtype=dtype)])

    radius, detected = cat("radius", torch.float64), cat("detected", torch.bool)
    r_cls, r_box = cat("r_cls", torch.float64), cat("r_box", torch.float64)
    code = torch.tensor([("cls", "box", "none").index(b) for b in binding], dtype=torch.long)
    traced = detected & (code < 2)

    def median(x: Tensor) -> float:
        x = x[traced & torch.isfinite(x)]
        return float(x.median()) if x.numel() else 0.0

    curve = []
    for e in grid:
        failed = detected & ~(radius > e)
        curve.append({"eps": float(e), "certified": int((detected & (radius > e)).sum()),
                      "failed_cls": int((failed & (code == 0)).sum()), "failed_box": int((failed & (code == 1)).sum())})
    return {"binding": {b: binding.count(b) for b in ("cls", "box", "none")},
            "median_r_cls_detected": median(r_cls), "median_r_box_detected": median(r_box), "binding_curve": curve}


def certified_objects(cert: dict[str, Any], target: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The objects of one image certified at a radius > 0, from :func:`certify_image`'s ``cert``.

    Returns ``(radius (M,) float64, anchor (M,) long, label (M,) long digit, box (M, 4) input-px xyxy)``.
    """
    keep = cert["detected"] & (cert["radius"] > 0) & (cert["anchor"] >= 0)
    return cert["radius"][keep], cert["anchor"][keep], target["labels"].long()[keep], target["boxes"].float()[keep]


def flipped(loc: Tensor, logits: Tensor, priors: Tensor, input_size: int, anchors: Tensor, labels: Tensor,
            boxes: Tensor, iou: float = 0.5) -> Tensor:
    """``(M,)`` bool: the certified statement fails at these raw outputs of one image.

    ``loc (P, 4)``, ``logits (P, C)`` raw outputs; ``anchors (M,)`` prior indices, ``labels (M,)`` digits,
    ``boxes (M, 4)`` ground truth in input px. An object flips when its anchor's top class over all logits
    (background included) is not its digit, or its anchor's decoded box (clipped to the image) has IoU
    ``< iou`` with the ground truth: exactly what :data:`CERTIFIED_DEFINITION` guarantees inside the radius.
    """
    if anchors.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    top = logits[anchors].argmax(dim=-1)
    ious = box_iou_exact(loc[anchors], priors[anchors], boxes.double() / input_size)
    return (top != labels.long() + 1) | (ious < iou)
