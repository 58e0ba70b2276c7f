"""Certificates: the bounds hold against PGD, the IoU bound is a true lower bound, objects are certified as defined."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from lipdet.boxes import PriorSpec, cxcywh_to_xyxy, decode, encode, make_priors
from lipdet.eval.attacks import pgd_l2
from lipdet.certificates import (
    AnchorBounds,
    box_radius,
    class_radius,
    detection_anchors,
    head_rows,
    iou_lower_bound,
    iou_lower_bound_ball,
    iou_lower_bound_l2,
    sphere_corners,
)
from lipdet.eval.certify import certified_objects, certified_share, certify_image, flipped
from lipdet.models import build_model, fold_model
from lipdet.models.lipschitz import head_bounds
from lipdet.postprocess import PostprocessConfig, postprocess

S = 32


class MarginAttack:
    """Attack loss: push the watched anchors' runner-up logit above their top (clean) class."""

    def __init__(self, watched: torch.Tensor, top: torch.Tensor) -> None:
        self.watched, self.top = watched, top  # (N, P) bool, (N, P) clean top class

    def _per(self, logits: torch.Tensor) -> torch.Tensor:
        top_logit = logits.gather(-1, self.top.unsqueeze(-1)).squeeze(-1)
        others = logits.scatter(-1, self.top.unsqueeze(-1), -1e9).amax(dim=-1)
        gap = (others - top_logit) * self.watched
        return gap.sum(dim=-1)

    def batch(self, loc, logits, targets):
        return self._per(logits).sum()

    def per_image(self, loc, logits, targets):
        return self._per(logits).detach().cpu()


def test_certified_anchor_never_changes_class_under_pgd():
    torch.manual_seed(0)
    twin = fold_model(build_model("sll-spectral", width=0.25, input_size=S).eval())
    for p in twin.parameters():
        p.requires_grad_(False)
    bounds = AnchorBounds.from_head_bounds(head_bounds(twin), twin.priors.shape[0], twin.prior_spec.feature_sizes)
    assert bool(torch.isfinite(bounds.cls).all()) and float(bounds.cls.min()) > 0  # (head temperature included)
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loc0, logits0 = twin(images)
    radius, top = class_radius(logits0, bounds.cls)
    eps = float(radius.flatten().quantile(0.7))  # 30% of the anchors are certified at eps
    watched = radius > eps
    assert eps > 0 and int(watched.sum()) > 10

    attack = MarginAttack(watched, top)
    res = pgd_l2(twin, images, [{}] * 3, attack, eps, steps=25, restarts=2, seeds=[1, 2, 3])
    with torch.no_grad():
        loc1, logits1 = twin(res.adv)
    # The attack does work: margins of the watched anchors shrink ...
    assert float(res.loss.sum()) > float(attack.per_image(loc0, logits0, None).sum())
    # ... but no certified anchor changes its top class, and no box offset moves more than L_loc * eps.
    assert torch.equal(logits1.argmax(-1)[watched], top[watched])
    moved = (loc1 - loc0).norm(dim=-1)
    assert bool((moved <= bounds.loc.float() * eps + 1e-5).all())


def test_per_anchor_bounds_and_pairwise_radii_hold_under_pgd():
    """The tight constants (head rows, class pairs) on a real folded model: larger radii, still unbroken by PGD."""
    torch.manual_seed(1)
    twin = fold_model(build_model("sll-spectral", width=0.25, input_size=S).eval())
    for p in twin.parameters():
        p.requires_grad_(False)
    hb = head_bounds(twin)
    p_count, sizes = twin.priors.shape[0], twin.prior_spec.feature_sizes
    whole = AnchorBounds.from_head_bounds(hb, p_count, sizes)
    tight = AnchorBounds.from_head_bounds(hb, p_count, sizes, head_rows(twin))
    assert bool((tight.cls <= whole.cls * (1 + 1e-9)).all()) and bool((tight.loc <= whole.loc * (1 + 1e-9)).all())
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loc0, logits0 = twin(images)
    radius, top = tight.class_radius(logits0.reshape(-1, logits0.shape[-1]), torch.arange(p_count).repeat(3))
    radius, top = radius.view(3, -1), top.view(3, -1)
    old, _ = class_radius(logits0, whole.cls)
    assert bool((radius >= old * (1 - 1e-9)).all()) and float((radius / old).median()) > 1.5
    eps = float(radius.flatten().quantile(0.7))
    watched = radius > eps
    attack = MarginAttack(watched, top)
    res = pgd_l2(twin, images, [{}] * 3, attack, eps, steps=25, restarts=2, seeds=[1, 2, 3])
    with torch.no_grad():
        loc1, logits1 = twin(res.adv)
    assert float(res.loss.sum()) > float(attack.per_image(loc0, logits0, None).sum())
    assert torch.equal(logits1.argmax(-1)[watched], top[watched])
    assert bool(((loc1 - loc0).norm(dim=-1) <= tight.loc.float() * eps + 1e-5).all())


def test_anchor_bounds_follow_the_prior_layout():
    spec = PriorSpec(feature_sizes=(4, 2, 1))
    p = spec.num_priors
    hb = {"loc": 3.0, "cls": 5.0, "per_scale": [
        {"feature_size": 1, "loc": 3.0, "cls": 5.0}, {"feature_size": 4, "loc": 1.0, "cls": 2.0},
        {"feature_size": 2, "loc": 2.0, "cls": 4.0}]}
    b = AnchorBounds.from_head_bounds(hb, p, spec.feature_sizes)
    a = spec.anchors_per_location
    assert b.cls.tolist() == [2.0] * (16 * a) + [4.0] * (4 * a) + [5.0] * a
    assert b.loc.tolist() == [1.0] * (16 * a) + [2.0] * (4 * a) + [3.0] * a
    sorted_by_size = AnchorBounds.from_head_bounds(hb, p)  # no spec: largest map first
    assert torch.equal(sorted_by_size.cls, b.cls)


def test_class_radius_formula():
    logits = torch.tensor([[[1.0, 4.0, 2.5], [0.0, 0.0, 3.0]]])
    r, top = class_radius(logits, torch.tensor([2.0, 0.5]))
    assert top.tolist() == [[1, 2]]
    assert r[0, 0].item() == pytest.approx(1.5 / (math.sqrt(2) * 2.0))
    assert r[0, 1].item() == pytest.approx(3.0 / (math.sqrt(2) * 0.5))


def _boxes_near_priors(g: torch.Generator, m: int, offset_noise: float):
    """``m`` random priors, a ground-truth box near each, and noisy encoded offsets towards it."""
    priors = torch.cat([torch.rand(m, 2, generator=g) * 0.6 + 0.2, torch.rand(m, 2, generator=g) * 0.3 + 0.1], dim=1)
    gt = cxcywh_to_xyxy(priors + torch.randn(m, 4, generator=g) * 0.02).clamp(0, 1)
    offsets = encode(gt, priors) + torch.randn(m, 4, generator=g) * offset_noise
    return priors, gt, offsets


def test_iou_lower_bound_holds_for_sampled_boxes():
    g = torch.Generator().manual_seed(0)
    m = 64
    priors, gt, offsets = _boxes_near_priors(g, m, 0.2)
    b = torch.rand(m, generator=g) * 0.5
    lb = iou_lower_bound(offsets, priors, gt, b)
    exact0 = box_iou(decode(offsets, priors).double(), gt.double()).diagonal()
    assert torch.allclose(iou_lower_bound(offsets, priors, gt, torch.zeros(m)), exact0, atol=1e-6)
    assert bool((lb <= exact0 + 1e-9).all())
    for _ in range(50):
        delta = (torch.rand(m, 4, generator=g) * 2 - 1) * b.view(-1, 1)
        box = decode(offsets + delta, priors).clamp(0, 1)  # clamped like post-processing does
        iou = box_iou(box.double(), gt.double()).diagonal()
        assert bool((iou >= lb - 1e-9).all())
    # Bisection: at the radius the bound it certifies with (now the tight iou_lower_bound_ball, no longer
    # iou_lower_bound_l2) is ~0.5; below it, above 0.5.
    r = box_radius(offsets, priors, gt, torch.full((m,), 2.0))
    ok = r > 0
    assert ok.any()
    at = iou_lower_bound_ball(offsets[ok], priors[ok], gt[ok], 2.0 * r[ok] * 0.999)
    assert bool((at >= 0.5).all())
    above = iou_lower_bound_ball(offsets[ok], priors[ok], gt[ok], 2.0 * r[ok] * 1.01)
    assert bool((above < 0.5).all())
    # ... and it is at least the radius the coarse covering bound certifies (bisected here).
    lo, hi = torch.zeros(int(ok.sum()), dtype=torch.float64), 2.0 * r[ok] * 1.01
    for _ in range(30):
        mid = (lo + hi) / 2
        good = iou_lower_bound_l2(offsets[ok], priors[ok], gt[ok], mid) >= 0.5
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    assert bool((2.0 * r[ok] >= lo * (1 - 1e-9)).all())


def test_sphere_corners_cover_the_orthant_of_the_ball():
    corners = sphere_corners(8)
    assert corners.shape == (512, 4)
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(4000, 4, generator=g, dtype=torch.float64).abs()
    pts = pts / pts.norm(dim=1, keepdim=True) * torch.rand(4000, 1, generator=g, dtype=torch.float64)
    covered = (pts.unsqueeze(1) <= corners.unsqueeze(0) + 1e-12).all(dim=2).any(dim=1)
    assert bool(covered.all())
    # The axes themselves (worst cases for one coordinate) are covered too.
    assert bool((torch.eye(4, dtype=torch.float64).unsqueeze(1) <= corners + 1e-12).all(dim=2).any(dim=1).all())


def test_l2_box_bound_holds_under_l2_perturbations_and_beats_the_per_coordinate_bound():
    g = torch.Generator().manual_seed(2)
    m = 48
    priors, gt, offsets = _boxes_near_priors(g, m, 0.1)
    rho = torch.rand(m, generator=g) * 0.8
    lb = iou_lower_bound_l2(offsets, priors, gt, rho)
    coord = iou_lower_bound(offsets, priors, gt, rho)
    assert bool((lb >= coord - 1e-12).all()) and bool((lb > coord + 1e-3).any())
    for _ in range(200):
        d = torch.randn(m, 4, generator=g)
        # on the sphere (the worst case) or inside it, some along a single axis
        d = d / d.norm(dim=1, keepdim=True) * rho.view(-1, 1) * torch.rand(m, 1, generator=g).sqrt()
        box = decode(offsets + d, priors).clamp(0, 1)
        iou = box_iou(box.double(), gt.double()).diagonal()
        assert bool((iou >= lb - 1e-9).all())
    for axis in range(4):
        for sign in (-1.0, 1.0):
            d = torch.zeros(m, 4)
            d[:, axis] = sign * rho
            iou = box_iou(decode(offsets + d, priors).clamp(0, 1).double(), gt.double()).diagonal()
            assert bool((iou >= lb - 1e-9).all())
    # Gradient descent on the IoU inside the ball never gets below the bound.
    d = (torch.randn(m, 4, generator=g) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([d], lr=0.02)
    for _ in range(150):
        dd = d * torch.clamp(rho.view(-1, 1) / d.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        iou = box_iou(decode(offsets + dd, priors).clamp(0, 1), gt).diagonal()
        opt.zero_grad()
        iou.sum().backward()
        opt.step()
    with torch.no_grad():
        dd = d * torch.clamp(rho.view(-1, 1) / d.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        iou = box_iou(decode(offsets + dd, priors).clamp(0, 1).double(), gt.double()).diagonal()
    assert bool((iou >= lb - 1e-6).all())


def test_certify_image_on_hand_made_outputs():
    """One anchor sits exactly on the object with a clear digit margin: certified up to min(r_cls, r_box)."""
    spec = PriorSpec(feature_sizes=(4, 2, 1))
    priors = make_priors(spec)
    p = priors.shape[0]
    gt_box = cxcywh_to_xyxy(priors[5:6]) * S
    target = {"boxes": gt_box, "labels": torch.tensor([7])}
    loc = torch.zeros(p, 4)
    logits = torch.zeros(p, 11)
    logits[:, 0] = 2.0  # everything background...
    logits[5, 1:] = -5.0
    logits[5, 8] = 6.0  # ... except anchor 5: digit 7 (class 8), margin 4 over background
    dets = postprocess(loc[None], logits[None], priors, S, PostprocessConfig(0.2, 0.3, 20))[0]
    assert dets["labels"].tolist() == [7]
    assert detection_anchors(loc, logits, priors, S, dets).tolist() == [5]
    bounds = AnchorBounds.from_head_bounds({"loc": 1.0, "cls": 2.0, "per_scale": []}, p)
    cert = certify_image(loc, logits, priors, S, dets, target, bounds)
    assert cert["detected"].tolist() == [True] and cert["anchor"].tolist() == [5]
    radius, anchors, labels, boxes = certified_objects(cert, target)
    assert anchors.tolist() == [5] and labels.tolist() == [7] and float(radius[0]) == float(cert["radius"][0])
    # The quantisation check's flip test: clean outputs hold; another top class or a moved box flips.
    assert flipped(loc, logits, priors, S, anchors, labels, boxes).tolist() == [False]
    other = logits.clone()
    other[5, 3] = 7.0
    assert flipped(loc, other, priors, S, anchors, labels, boxes).tolist() == [True]
    moved = loc.clone()
    moved[5, :2] = 4.0  # centre shifted by 4 * 0.1 prior widths per axis: IoU ~0.3 < 0.5
    assert flipped(moved, logits, priors, S, anchors, labels, boxes).tolist() == [True]
    r_cls = 4.0 / (math.sqrt(2) * 2.0)
    r_box = float(box_radius(loc[5:6], priors[5:6], gt_box / S, torch.tensor([1.0]))[0])
    assert float(cert["radius"][0]) == pytest.approx(min(r_cls, r_box))
    assert certified_share(cert["radius"], cert["detected"], 0.5 * min(r_cls, r_box)) == 1.0
    assert certified_share(cert["radius"], cert["detected"], 2 * max(r_cls, r_box)) == 0.0

    # Wrong digit: detected neither correctly nor certified.
    wrong = certify_image(loc, logits, priors, S, dets, {"boxes": gt_box, "labels": torch.tensor([3])}, bounds)
    assert wrong["detected"].tolist() == [False] and float(wrong["radius"][0]) == 0.0
    # Detected (score 0.35 > 0.2) but background is the anchor's top class: radius 0.
    logits[5, 8] = 1.4
    dets = postprocess(loc[None], logits[None], priors, S, PostprocessConfig(0.2, 0.3, 20))[0]
    cert = certify_image(loc, logits, priors, S, dets, target, bounds)
    assert cert["detected"].tolist() == [True] and float(cert["radius"][0]) == 0.0
    assert certified_objects(cert, target)[1].numel() == 0  # radius 0: not checked
