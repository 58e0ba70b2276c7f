"""SSD MultiBox loss: prior matching, smooth-L1 localisation and hard-negative-mined cross-entropy."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from lipdet.boxes import cxcywh_to_xyxy, encode


def pad_targets(targets: Sequence[dict[str, Tensor]], input_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack a batch's variable-length targets into padded tensors.

    Returns ``boxes (N, K, 4)`` normalised xyxy (input pixels divided by ``input_size``),
    ``labels (N, K)`` digits and ``valid (N, K)`` (False on padding), ``K`` the batch's most objects
    (at least 1).
    """
    counts = torch.tensor([int(t["boxes"].shape[0]) for t in targets], dtype=torch.long)
    n, k = len(targets), max(int(counts.max()) if len(targets) else 0, 1)
    boxes = torch.zeros(n, k, 4, device=device)
    labels = torch.zeros(n, k, dtype=torch.long, device=device)
    valid = (torch.arange(k) < counts[:, None]).to(device)  # (N, K)
    if int(counts.sum()):
        boxes[valid] = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device, torch.float32) / input_size
        labels[valid] = torch.cat([t["labels"].reshape(-1) for t in targets]).to(device, torch.long)
    return boxes, labels, valid


def match_targets(
    targets: Sequence[dict[str, Tensor]],
    priors: Tensor,
    input_size: int,
    iou_threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Assign ground truth to priors, SSD style, for the whole batch at once.

    Each prior takes the ground-truth box it overlaps most if that IoU is >= ``iou_threshold``;
    every ground-truth box also claims its best prior, so no object goes unmatched (when two boxes
    claim the same prior, the later box in the image's list keeps it).

    Args:
        targets: per image, ``boxes (K, 4)`` xyxy in input pixels and ``labels (K,)`` digits 0-9.
        priors: ``(P, 4)`` normalised ``(cx, cy, w, h)``.
        input_size: input side in pixels (boxes are divided by it).

    Returns:
        ``loc_t (N, P, 4)`` encoded offsets (zero where unmatched) and ``cls_t (N, P)`` class
        indices (0 = background, ``d + 1`` = digit ``d``).
    """
    boxes, labels, valid = pad_targets(targets, input_size, priors.device)
    n, k, p = boxes.shape[0], boxes.shape[1], priors.shape[0]
    iou = box_iou(boxes.view(-1, 4), cxcywh_to_xyxy(priors)).view(n, k, p)
    iou = iou.masked_fill(~valid[:, :, None], -1.0)  # padding never wins
    best_gt_iou, best_gt = iou.max(dim=1)  # (N, P): per prior
    best_prior = iou.argmax(dim=2)  # (N, K): per ground truth
    rows = torch.arange(n, device=priors.device)
    for j in range(k):  # in order: a later box wins a shared best prior
        r = rows[valid[:, j]]
        c = best_prior[r, j]
        best_gt_iou[r, c] = 2.0
        best_gt[r, c] = j
    matched = valid.any(dim=1, keepdim=True) & (best_gt_iou >= iou_threshold)  # (N, P)
    cls_t = (labels.gather(1, best_gt) + 1) * matched
    loc_t = encode(boxes.gather(1, best_gt[..., None].expand(n, p, 4)), priors) * matched[..., None]
    return loc_t, cls_t


def hard_negatives(ce: Tensor, pos: Tensor, neg_pos_ratio: int = 3) -> Tensor:
    """Hard negative mining: ``(N, P)`` mask of each image's ``neg_pos_ratio * positives`` negatives
    with the highest loss ``ce (N, P)`` (at least ``neg_pos_ratio``: images without objects still
    learn background); ``pos (N, P)`` marks the matched priors."""
    neg_loss = ce.detach().masked_fill(pos, 0.0)
    num_neg = (neg_pos_ratio * pos.sum(dim=1, keepdim=True)).clamp_max(pos.shape[1] - 1).clamp_min(neg_pos_ratio)
    k = min(int(num_neg.max()), pos.shape[1])
    hardest = neg_loss.topk(k, dim=1).indices  # (N, k), highest loss first
    keep = torch.arange(k, device=pos.device) < num_neg  # (N, k): this image's first num_neg
    return torch.zeros_like(pos).scatter_(1, hardest, keep)


class MultiBoxLoss(nn.Module):
    """SSD loss: ``cls + alpha * loc``, both divided by the number of matched priors.

    Classification uses cross-entropy on all positives and the hardest negatives, at most
    ``neg_pos_ratio`` negatives per positive (hard negative mining, 3:1 by default).

    A per-call ``cls_margin`` (logit units; None or 0 = plain cross-entropy) turns it into a Lipschitz-margin
    cross-entropy (Tsuzuku et al., NeurIPS 2018) on the positive anchors: every non-target logit of
    a matched (object) anchor is raised by ``cls_margin`` before the softmax, so the loss keeps
    pushing until the digit leads by more than the margin. For a class map with Lipschitz bound
    ``L`` (in logit units, temperature included), ``cls_margin = sqrt(2) * eps * L`` trains for
    certified radius ``eps`` (:func:`lipschitz_margin`). Background anchors get no margin:
    certificates are about detected objects, and a margin on every anchor makes "background
    everywhere" the easiest way down (measured: no detection at all after 3 epochs, see
    docs/results/beat-the-seed.md). The margin is a float or per prior (``(P,)``): a learnt
    temperature changes ``L`` during training (:func:`lipdet.train.recipe.train_margin`). Evaluation
    and post-processing use the raw logits.
    """

    def __init__(self, priors: Tensor, input_size: int, alpha: float = 2.0, neg_pos_ratio: int = 3) -> None:
        super().__init__()
        self.register_buffer("priors", priors.clone(), persistent=False)
        self.input_size = input_size
        self.alpha = alpha
        self.neg_pos_ratio = neg_pos_ratio

    def forward(
        self, loc: Tensor, logits: Tensor, targets: Sequence[dict[str, Tensor]], cls_margin: Tensor | float | None = None
    ) -> dict[str, Tensor]:
        """Args: ``loc (N, P, 4)``, ``logits (N, P, C)``, targets as in :func:`match_targets`;
        ``cls_margin``: this call's margin, a float or ``(P,)`` per prior (None: plain cross-entropy).

        Returns ``{"loss", "loc", "cls"}`` scalars.
        """
        loc, logits = loc.float(), logits.float()
        loc_t, cls_t = match_targets(targets, self.priors.to(loc.device), self.input_size)
        pos = cls_t > 0
        num_pos = pos.sum().clamp_min(1).float()
        loc_loss = F.smooth_l1_loss(loc[pos], loc_t[pos], reduction="sum") / num_pos
        margin = 0.0 if cls_margin is None else cls_margin
        if isinstance(margin, Tensor) or margin > 0:
            margin_t = torch.as_tensor(margin, dtype=logits.dtype, device=logits.device)
            margin_t = margin_t.view(1, -1) if margin_t.dim() == 1 else margin_t.view(1, 1)  # (1, P) or (1, 1)
            onehot = F.one_hot(cls_t, logits.shape[-1]).to(logits.dtype)
            raise_by = (margin_t * pos.to(logits.dtype)).unsqueeze(-1)  # (N, P, 1): positives only
            logits = logits + raise_by * (1.0 - onehot)
        # (N, C, P): softmax over a strided class axis vectorises over priors; over a last axis of 11
        # it is ~7x slower on the CPU.
        ce = F.cross_entropy(logits.transpose(1, 2), cls_t, reduction="none")
        neg = hard_negatives(ce, pos, self.neg_pos_ratio)
        cls_loss = ce[pos | neg].sum() / num_pos
        return {"loss": cls_loss + self.alpha * loc_loss, "loc": loc_loss, "cls": cls_loss}


def lipschitz_margin(eps: float, cls_lipschitz: float | Tensor = 1.0) -> float | Tensor:
    """The logit margin ``sqrt(2) * eps * L`` that certifies radius ``eps`` for a class map bounded by ``L``.

    ``L`` may be a tensor (e.g. ``(P,)`` per prior, :meth:`TinierSSD.prior_temperatures`).
    """
    if isinstance(cls_lipschitz, Tensor):
        return math.sqrt(2.0) * float(eps) * cls_lipschitz
    return math.sqrt(2.0) * float(eps) * float(cls_lipschitz)
