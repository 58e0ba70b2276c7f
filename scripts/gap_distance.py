#!/usr/bin/env python3
"""How close is each correct detection to vanishing? A diagnostic behind docs/results/ (not part of the toolchain).

For every correctly detected digit of the first ``--images`` test images (clean input, the deployed
file's differentiable twin): its score, the logit gap ``digit - background`` of the anchor that produced
it, and the first-order L2 distance to that gap's zero, ``gap / ||d gap / d x||`` (input in [0, 1] pixel
units, as eps is). A vanishing attack (``lipdet eval --attack-loss vanish``) needs roughly that much
perturbation to turn the anchor to background. It is an estimate, not a bound: for a certificate see
``lipdet eval --certify``.

Usage::

    python scripts/gap_distance.py runs/a/model.onnx runs/b/model.onnx --images 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lipdet.certificates import detection_anchors
from lipdet.data.dataset import SVHNDetection, resolve_data
from lipdet.deploy.twin import load_twin
from lipdet.metrics import correct_pairs
from lipdet.postprocess import postprocess


def gap_distances(model: Path, ds: SVHNDetection, images: int) -> dict[str, float]:
    """Quantiles of the score, the gap and the first-order distance over ``model``'s correct detections."""
    twin = load_twin(model)
    size = twin.config.input_size
    rows = []
    for i in range(min(images, len(ds))):
        x, t = ds[i]
        x = x[None].clone().requires_grad_(True)
        loc, logits = twin(x)
        dets = postprocess(loc.detach(), logits.detach(), twin.priors, size)[0]
        hit = correct_pairs(dets, {"boxes": t["boxes"], "labels": t["labels"]}, 0.5).any(dim=1)
        anchors = detection_anchors(loc[0].detach(), logits[0].detach(), twin.priors, size, dets)
        for d in (hit & (anchors >= 0)).nonzero().flatten().tolist():
            gap = logits[0, anchors[d], int(dets["labels"][d]) + 1] - logits[0, anchors[d], 0]
            (grad,) = torch.autograd.grad(gap, x, retain_graph=True)
            rows.append((float(dets["scores"][d]), float(gap), float(gap) / max(float(grad.norm()), 1e-12)))
    v = torch.tensor(rows, dtype=torch.float64).view(-1, 3)
    q = lambda col, p: round(float(torch.quantile(v[:, col], p)), 4) if len(v) else float("nan")  # noqa: E731
    return {"detections": len(v), "score_median": q(0, 0.5), "gap_median": q(1, 0.5), "distance_median": q(2, 0.5),
            "distance_p10": q(2, 0.1), "share_within_0.5": round(float((v[:, 2] < 0.5).double().mean()), 4) if len(v) else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help=".onnx / .pt / .plan artifacts")
    ap.add_argument("--images", type=int, default=100, help="first N test images of the built-in synthetic SVHN")
    args = ap.parse_args()
    ds = SVHNDetection(resolve_data(None), split="test", input_size=74)
    for m in args.models:
        print(json.dumps({"model": str(m), **gap_distances(m, ds, args.images)}), flush=True)


if __name__ == "__main__":
    main()
