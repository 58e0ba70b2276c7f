"""lipdet.certificates' per-detection entry points (what lipdet serve answers), on a real folded model.

The maths under them (head rows, pairwise class radii, the IoU lower bounds, the box radius) is tested
against brute force in test_certify_tight.py and under PGD in test_eval_certify.py; here: that
``detection_radii`` traces each detection to its anchor and combines exactly those pieces, and that
its fewer bisection steps land within 2% of eval's box radius.
"""

from __future__ import annotations

import torch

from lipdet.boxes import decode
from lipdet.certificates import (
    AnchorBounds,
    binding_of,
    box_radius,
    detection_anchors,
    detection_radii,
    pairwise_class_radius,
)
from lipdet.models import build_model, fold_model
from lipdet.postprocess import PostprocessConfig, postprocess

S = 32


def with_runner_up(dets: dict, logits: torch.Tensor, priors: torch.Tensor) -> dict:
    """``dets`` plus the first detection's anchor as its runner-up digit (what a low score threshold lets
    through): a detection whose digit is not its anchor's top class, so its class radius must be 0."""
    probs = logits.softmax(-1)[:, 1:]  # (P, C-1), as post-processing scores them
    prior = int((probs[:, int(dets["labels"][0])] - dets["scores"][0]).abs().argmin())
    runner = int(probs[prior].topk(2).indices[1])
    return {"boxes": torch.cat([dets["boxes"], dets["boxes"][:1]]),
            "scores": torch.cat([dets["scores"], probs[prior, runner].view(1)]),
            "labels": torch.cat([dets["labels"], torch.tensor([runner])])}


def test_detection_radii_are_the_traced_anchors_certificates():
    torch.manual_seed(2)
    twin = fold_model(build_model("sll-spectral", width=0.25, input_size=S).eval())
    priors = twin.priors.float()
    bounds = AnchorBounds.of_model(twin, priors.shape[0], twin.prior_spec.feature_sizes)
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loc, logits = twin(images)
    seen_cls = seen_zero = 0
    for i in range(len(images)):
        dets = with_runner_up(postprocess(loc[i : i + 1], logits[i : i + 1], priors, S, PostprocessConfig())[0],
                              logits[i], priors)
        r = detection_radii(loc[i], logits[i], priors, S, dets, bounds)
        a = detection_anchors(loc[i], logits[i], priors, S, dets)
        assert bool((a >= 0).all()) and len(r["binding"]) == len(a) > 0
        own = decode(loc[i][a], priors[a]).clamp(0.0, 1.0)
        assert torch.allclose(own * S, dets["boxes"], atol=1e-4)  # the traced anchor's box is the detection's
        pair_r, top = pairwise_class_radius(logits[i][a], bounds.pair[bounds.group[a]])
        is_top = top == dets["labels"] + 1
        assert torch.equal(r["cls"], torch.where(is_top, pair_r, torch.zeros_like(pair_r)))
        full = box_radius(loc[i][a], priors[a], own, bounds.loc[a])  # eval's 14 steps, 24-step bracket
        assert bool(((r["box"] - full).abs() <= 0.02 * full).all())  # each is a radius where the bound held
        assert bool((r["box"] > 0).all())  # the clean box has IoU 1 with itself: a positive radius
        assert torch.equal(r["radius"], torch.minimum(r["cls"], r["box"]))
        assert r["binding"] == binding_of(r["cls"], r["box"], a >= 0)
        seen_cls += int(is_top.sum())
        seen_zero += int((~is_top).sum())
    assert seen_cls > 0 and seen_zero > 0


def test_binding_names_the_smaller_part():
    r_cls, r_box = torch.tensor([0.1, 0.5, 0.3, 0.2]), torch.tensor([0.2, 0.4, 0.3, 0.1])
    traced = torch.tensor([True, True, True, False])
    assert binding_of(r_cls, r_box, traced) == ["cls", "box", "cls", "none"]
