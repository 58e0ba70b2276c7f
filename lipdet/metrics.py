"""Detection accuracy: COCO-style mAP through torchmetrics (``faster_coco_eval`` backend).

Boxes are xyxy in the same pixel frame for predictions and targets. Headline is ``map_50``
(the seed's numbers are mAP at IoU 0.5); ``map`` is COCO's 0.5:0.95 average.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from lipdet.postprocess import PostprocessConfig, postprocess

Runner = Callable[[Tensor], "tuple[Any, Any]"]
"""A model as the metrics see it: ``run(images (N, 3, S, S) in [0, 1]) -> (loc (N, P, 4), logits (N, P, C))``
(tensors or arrays; any backend, any device)."""
Batches = Iterable["tuple[Tensor, Sequence[dict[str, Tensor]]]"]
"""``(images (N, 3, S, S), targets)`` pairs, targets per image ``{"boxes" (K, 4) xyxy pixels, "labels" (K,)}``."""

# pycocotools' own float64 thresholds. torchmetrics' defaults are float32 linspace values
# (0.55000001...), whose recall lookups land on neighbouring points and move AP by ~1e-3 against
# COCOeval on the same detections; with these, map / map_50 agree with COCOeval (tested).
IOU_THRESHOLDS = [float(v) for v in np.linspace(0.5, 0.95, 10)]
REC_THRESHOLDS = [float(v) for v in np.linspace(0.0, 1.0, 101)]


class DetectionMAP:
    """Accumulates detections and ground truth, then computes mAP.

    ``update(preds, targets)``: ``preds`` per image ``{"boxes" (D,4), "scores" (D,), "labels" (D,)}``,
    ``targets`` per image ``{"boxes" (K,4), "labels" (K,)}`` (labels are digits 0-9).

    Computation is always local to the process (no torch.distributed sync): callers gather
    detections first and compute once.
    """

    def __init__(self, class_metrics: bool = False) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self._metric = MeanAveragePrecision(
            box_format="xyxy",
            iou_type="bbox",
            backend="faster_coco_eval",
            class_metrics=class_metrics,
            iou_thresholds=IOU_THRESHOLDS,
            rec_thresholds=REC_THRESHOLDS,
            sync_on_compute=False,
            dist_sync_on_step=False,
        )
        self.class_metrics = class_metrics

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        p = [{k: d[k].detach().float().cpu() if k != "labels" else d[k].detach().long().cpu() for k in ("boxes", "scores", "labels")} for d in preds]
        t = [{"boxes": d["boxes"].detach().float().cpu(), "labels": d["labels"].detach().long().cpu()} for d in targets]
        self._metric.update(p, t)

    def compute(self) -> dict[str, float | dict[str, float]]:
        """Returns ``{"map_50", "map", "map_75"}`` in [0, 1] (and ``"per_class": {digit: map_50}``)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = self._metric.compute()
        out: dict[str, float | dict[str, float]] = {
            "map_50": _clean(r["map_50"]),
            "map": _clean(r["map"]),
            "map_75": _clean(r["map_75"]),
        }
        if self.class_metrics and "classes" in r:
            classes = torch.atleast_1d(r["classes"]).tolist()
            per = torch.atleast_1d(r["map_per_class"]).tolist()
            out["per_class_map"] = {str(int(c)): _clean(torch.tensor(v)) for c, v in zip(classes, per)}
        return out

    def reset(self) -> None:
        self._metric.reset()


def _clean(v: Tensor) -> float:
    """torchmetrics reports -1 when there is nothing to score; report 0 instead."""
    x = float(v)
    return 0.0 if x < 0 else x


def detections_of(
    run: Runner, batches: Batches, priors: Tensor, input_size: int, config: PostprocessConfig = PostprocessConfig()
) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """``(detections, target)`` per image of ``batches``, post-processed the one shared way (CPU tensors)."""
    priors = priors.detach().float().cpu()
    with torch.no_grad():
        for images, targets in batches:
            loc, logits = run(images)
            dets = postprocess(torch.as_tensor(loc).float().cpu(), torch.as_tensor(logits).float().cpu(),
                               priors, input_size, config)
            for d, t in zip(dets, targets):
                yield d, {"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()}


def map_of(
    run: Runner,
    batches: Batches,
    priors: Tensor,
    input_size: int,
    config: PostprocessConfig = PostprocessConfig(),
    class_metrics: bool = False,
) -> dict[str, Any]:
    """Clean mAP of a runner over ``batches``: ``{"map_50", "map", "map_75"}`` in [0, 1] (+ per class)."""
    metric = DetectionMAP(class_metrics=class_metrics)
    pairs = list(detections_of(run, batches, priors, input_size, config))
    if pairs:
        metric.update([d for d, _ in pairs], [t for _, t in pairs])
    return metric.compute()


def object_scores(dets: dict[str, Tensor], target: dict[str, Tensor], iou: float = 0.5) -> Tensor:
    """The score at which each ground-truth object of one image is detected correctly: ``(K,)`` float32.

    Object ``g``'s entry is the highest score of a detection with ``g``'s digit and IoU ``>= iou`` with
    its box (the detection COCO matching gives ``g``), ``0`` when there is none. ``dets``:
    ``{"boxes" (D, 4), "scores" (D,), "labels" (D,)}``, ``target``: ``{"boxes" (K, 4), "labels" (K,)}``,
    boxes xyxy in the same pixel frame.
    """
    if dets["boxes"].shape[0] == 0:
        return torch.zeros(target["boxes"].shape[0])
    return (correct_pairs(dets, target, iou).float() * dets["scores"].float().cpu().view(-1, 1)).amax(dim=0)


def objects_detected(dets: dict[str, Tensor], target: dict[str, Tensor], iou: float = 0.5) -> Tensor:
    """Which ground-truth objects of one image are detected correctly (some detection of the same digit with
    IoU ``>= iou``, the "detected correctly" of the certificates): ``(K,)`` bool. Arguments as :func:`object_scores`."""
    return correct_pairs(dets, target, iou).any(dim=0)


def correct_pairs(dets: dict[str, Tensor], target: dict[str, Tensor], iou: float) -> Tensor:
    """``(D, K)`` bool: detection ``d`` has object ``k``'s digit and IoU ``>= iou`` with its box."""
    if dets["boxes"].shape[0] == 0 or target["boxes"].shape[0] == 0:
        return torch.zeros(dets["boxes"].shape[0], target["boxes"].shape[0], dtype=torch.bool)
    ious = box_iou(dets["boxes"].float().cpu(), target["boxes"].float().cpu())  # (D, K)
    same = dets["labels"].long().cpu().view(-1, 1) == target["labels"].long().cpu().view(1, -1)
    return (ious >= iou) & same


def batched(images: Tensor, targets: Sequence[dict[str, Tensor]], size: int = 64) -> Iterator[tuple[Tensor, Sequence[dict[str, Tensor]]]]:
    """``images`` (N, 3, S, S) and their ``targets`` in consecutive batches of ``size``."""
    for i in range(0, len(images), size):
        yield images[i : i + size], targets[i : i + size]
