"""Post-processing shared by every backend: decode, threshold, per-class NMS, top-k.

Every runtime (torch, ONNX Runtime, TensorRT) produces raw ``(loc, logits)``; this module alone
turns them into detections, so all backends are post-processed identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from lipdet.boxes import decode


@dataclass(frozen=True)
class PostprocessConfig:
    """Detection thresholds (the reference's defaults)."""

    score_threshold: float = 0.2
    iou_threshold: float = 0.3
    top_k: int = 20


def postprocess(
    loc: Tensor,
    logits: Tensor,
    priors: Tensor,
    input_size: int,
    cfg: PostprocessConfig = PostprocessConfig(),
) -> list[dict[str, Tensor]]:
    """Turn raw head outputs into detections.

    Args:
        loc: ``(N, P, 4)`` SSD offsets.
        logits: ``(N, P, C)`` class logits, class 0 background.
        priors: ``(P, 4)`` normalised ``(cx, cy, w, h)``.
        input_size: input side in pixels.

    Returns:
        Per image ``{"boxes": (D, 4) xyxy in input pixels, "scores": (D,), "labels": (D,) digits 0-9}``,
        at most ``cfg.top_k`` detections sorted by score.
    """
    loc, logits = loc.float(), logits.float()
    priors = priors.to(loc.device)
    boxes_all = decode(loc, priors).clamp(0.0, 1.0) * input_size  # (N, P, 4)
    probs = logits.softmax(dim=-1)[..., 1:]  # (N, P, C-1), background dropped
    out = []
    for boxes, scores in zip(boxes_all, probs):
        prior_idx, cls_idx = torch.nonzero(scores > cfg.score_threshold, as_tuple=True)
        s = scores[prior_idx, cls_idx]
        b = boxes[prior_idx]
        keep = batched_nms(b, s, cls_idx, cfg.iou_threshold)[: cfg.top_k]
        out.append({"boxes": b[keep], "scores": s[keep], "labels": cls_idx[keep]})
    return out
