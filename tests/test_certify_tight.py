"""Tight certificates against brute force: per-anchor head rows, pairwise class radii, the box radius.

Small linear "detectors" whose exact radii are known: a 3x3 convolution head read straight off the
input (trunk bound 1), and a linear map onto one anchor's box offsets with equal singular values, so
the reachable offsets are exactly an L2 ball that dense sampling explores.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_iou

from lipdet.boxes import cxcywh_to_xyxy, decode, encode, flatten_head_outputs
from lipdet.certificates import (
    AnchorBounds,
    HeadRows,
    box_radius,
    class_radius,
    conv_anchor_rows,
    iou_lower_bound_ball,
    norm_upper,
    spectral_norm_upper,
)
from lipdet.eval.certify import binding_summary

C, A, CIN, F = 5, 2, 3, 3  # classes, anchors per location, input channels, map side (corners, edges, interior)


def _conv_detector(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A class head ``(A*C, CIN, 3, 3)`` (padding 1), its bias, and one random input ``(1, CIN, F, F)``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(A * C, CIN, 3, 3, generator=g, dtype=torch.float64), torch.randn(A * C, generator=g, dtype=torch.float64),
            torch.randn(1, CIN, F, F, generator=g, dtype=torch.float64))


def _logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(P, C)`` logits in prior order (row, column, anchor)."""
    z = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    return flatten_head_outputs([z[:, : A * 4]], [z], C)[1][0]


def _anchor_bounds(weight: torch.Tensor, trunk: float = 1.0) -> AnchorBounds:
    cls_n, pair, pattern = conv_anchor_rows(weight, 1, F, C)
    rows = [HeadRows(F, cls_n, cls_n, pair, pattern)]  # (its box rows: unused here)
    per_scale = [{"feature_size": F, "trunk": trunk, "cls": 1.0, "loc": 1.0}]
    return AnchorBounds.from_head_bounds({"cls": 1.0, "loc": 1.0, "per_scale": per_scale}, A * F * F, [F], rows)


def test_norm_bounds_are_upper_bounds_and_tight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 11, 300, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 6, dtype=torch.float64).view(-1, 1, 1)
    exact = torch.linalg.matrix_norm(w, 2)
    up = spectral_norm_upper(w)
    assert bool((up >= exact).all()) and bool((up <= exact * (1 + 1e-12)).all())
    v = w[:, 0]
    assert bool((norm_upper(v) >= v.norm(dim=-1)).all()) and bool((norm_upper(v) <= v.norm(dim=-1) * (1 + 1e-12)).all())
    rank1 = torch.randn(4, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 50, generator=g, dtype=torch.float64)
    assert float(spectral_norm_upper(rank1)) >= float(torch.linalg.matrix_norm(rank1, 2))


def test_per_anchor_rows_match_the_exact_jacobian():
    """Each prior's constants equal the norms of its exact Jacobian input -> logits (corners, edges, interior)."""
    weight, bias, x = _conv_detector(1)
    jac = torch.autograd.functional.jacobian(lambda inp: _logits(weight, bias, inp), x).reshape(A * F * F, C, -1)
    ab = _anchor_bounds(weight)
    exact_norm = torch.linalg.matrix_norm(jac, 2)
    assert torch.allclose(ab.cls, exact_norm, rtol=1e-12) and bool((ab.cls >= exact_norm).all())
    exact_pair = (jac.unsqueeze(1) - jac.unsqueeze(2)).norm(dim=-1)  # (P, C, C)
    got = ab.pair[ab.group]
    assert torch.allclose(got, exact_pair, rtol=1e-12, atol=1e-12) and bool((got >= exact_pair).all())
    # The whole convolution's operator norm bounds every anchor's (and is what the old radius used).
    whole = torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        lambda inp: torch.nn.functional.conv2d(inp, weight, padding=1), x).reshape(A * C * F * F, -1), 2)
    assert bool((ab.cls <= whole * (1 + 1e-12)).all()) and float(ab.cls.min()) < 0.8 * float(whole)


def test_pairwise_class_radius_is_exact_for_a_linear_detector_and_beats_the_old_one():
    weight, bias, x = _conv_detector(2)
    ab = _anchor_bounds(weight)
    logits = _logits(weight, bias, x)
    p = logits.shape[0]
    radius, top = ab.class_radius(logits, torch.arange(p))
    jac = torch.autograd.functional.jacobian(lambda inp: _logits(weight, bias, inp), x).reshape(p, C, -1)
    old, old_top = class_radius(logits, ab.cls)
    assert torch.equal(top, old_top) and bool((radius >= old * (1 - 1e-12)).all()) and float((radius / old).median()) > 1.2
    for i in range(p):
        t = int(top[i])
        diff = jac[i, t] - jac[i]  # (C, n) gradients of z_t - z_j
        margin = logits[i, t] - logits[i]
        per = margin / diff.norm(dim=-1)
        per[t] = math.inf
        j = int(per.argmin())
        assert float(radius[i]) <= float(per[j]) and float(radius[i]) >= float(per[j]) * (1 - 1e-12)  # exact
        step = -(diff[j] / diff[j].norm()).view_as(x)  # the closest point of the boundary z_t = z_j
        for scale, flips in ((1 - 1e-6, False), (1 + 1e-6, True)):
            moved = _logits(weight, bias, x + scale * float(radius[i]) * step)[i]
            assert (int(moved.argmax()) != t) == flips
        # Random directions and gradient steps on the margin inside the radius never flip the class.
        g = torch.Generator().manual_seed(i)
        d = torch.randn(200, *x.shape[1:], generator=g, dtype=torch.float64)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * float(radius[i]) * (1 - 1e-9)
        for k in range(0, 200, 50):
            z = torch.stack([_logits(weight, bias, x + dd.unsqueeze(0))[i] for dd in d[k:k + 50]])
            assert bool((z.argmax(dim=-1) == t).all())


def _configs(m: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random priors, a ground truth near each and clean offsets near the truth (some near the image border)."""
    g = torch.Generator().manual_seed(seed)
    priors = torch.cat([torch.rand(m, 2, generator=g) * 0.9 + 0.05, torch.rand(m, 2, generator=g) * 0.4 + 0.08], dim=1)
    gt = cxcywh_to_xyxy(priors + torch.randn(m, 4, generator=g) * 0.03).clamp(0, 1)
    return priors, gt, encode(gt, priors) + torch.randn(m, 4, generator=g) * noise


def _sampled_radius(offsets: torch.Tensor, priors: torch.Tensor, gt: torch.Tensor, scale: float,
                    directions: int = 3000, steps: int = 240) -> torch.Tensor:
    """Smallest input-space radius at which dense sampling of a linear map ``x -> o + scale * Q x`` finds IoU < 0.5.

    ``Q`` (4 x n) has orthonormal rows, so the offsets reachable from ``||x|| <= r`` are exactly the ball of
    radius ``scale * r``: the directions sample its surface and the line search its inside.
    """
    g = torch.Generator().manual_seed(7)
    d = torch.randn(directions, 4, generator=g, dtype=torch.float64)
    d = torch.cat([d / d.norm(dim=1, keepdim=True), torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64)])
    top = 6.0 / scale
    ts = torch.linspace(0.0, top, steps + 1, dtype=torch.float64)[1:]
    best = torch.full((offsets.shape[0],), math.inf, dtype=torch.float64)
    for i in range(offsets.shape[0]):
        pts = offsets[i].double() + scale * ts.view(-1, 1, 1) * d.view(1, -1, 4)  # (T, D, 4)
        boxes = decode(pts.reshape(-1, 4), priors[i].double().expand(pts.shape[0] * pts.shape[1], 4)).clamp(0, 1)
        bad = (box_iou(boxes, gt[i : i + 1].double()).view(pts.shape[:2]) < 0.5).any(dim=1)
        if bool(bad.any()):
            best[i] = ts[int(bad.int().argmax())]
    return best


def test_box_radius_is_sound_and_close_against_dense_sampling():
    priors, gt, offsets = _configs(24, 3, 0.25)
    w = torch.linalg.qr(torch.randn(9, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0].T * 2.5
    lloc = spectral_norm_upper(w)  # the linear "model" x (9,) -> offsets: its per-anchor bound
    assert abs(float(lloc) - 2.5) < 1e-12
    r = box_radius(offsets, priors, gt, lloc.expand(24))
    sampled = _sampled_radius(offsets, priors, gt, 2.5)
    ok = torch.isfinite(sampled) & (sampled > 0)
    assert int(ok.sum()) >= 20
    assert bool((r <= sampled + 1e-12).all())  # sound: never beyond a point that fails
    ratio = r[ok] / sampled[ok]
    assert float(ratio.median()) >= 0.85 and float(ratio.min()) >= 0.7, ratio
    # The bound it was bisected on holds at the radius for boxes sampled inside the ball.
    rho = r * 2.5
    lb = iou_lower_bound_ball(offsets, priors, gt, rho)
    assert bool((lb >= 0.5).all())


def test_binding_is_the_smaller_radius():
    cert = {"detected": torch.tensor([True, True, False]), "radius": torch.tensor([0.2, 0.5, 0.0], dtype=torch.float64),
            "r_cls": torch.tensor([0.2, 0.9, 0.0], dtype=torch.float64),
            "r_box": torch.tensor([0.7, 0.5, 0.0], dtype=torch.float64), "binding": ["cls", "box", "none"]}
    s = binding_summary([cert], [0.0, 0.3, 0.6])
    assert s["binding"] == {"cls": 1, "box": 1, "none": 1}
    assert s["median_r_cls_detected"] in (0.2, 0.9) and s["median_r_box_detected"] in (0.5, 0.7)
    assert [(p["certified"], p["failed_cls"], p["failed_box"]) for p in s["binding_curve"]] == [(2, 0, 0), (1, 1, 0), (0, 1, 1)]
