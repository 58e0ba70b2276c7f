"""Per-anchor robustness certificates of a Lipschitz-bounded detector: the maths that needs no ground truth.

Used by ``lipdet eval --certify`` (:mod:`lipdet.eval.certify`, which adds the ground-truth matching and
the certified object share) and by ``lipdet serve`` (a certified radius per detection, :func:`detection_radii`).

Background (technical brief, section 4). An anchor at feature-map scale ``k`` reads a ``k x k``
patch of that scale's tap feature map ``F(x)`` through one slice of the folded head kernel: its 11
class logits are ``z = W_a^cls * patch(F(x)) + b`` and its 4 box offsets ``o = W_a^loc * patch(F(x)) + b'``
(:func:`head_rows`). ``patch`` keeps some coordinates of ``F(x)`` (the padding zeros are constant), so
``||patch(u) - patch(v)|| <= ||u - v||``, and ``F`` is ``T_k``-Lipschitz in L2 (``T_k`` =
``head_bounds(...)["per_scale"][k]["trunk"]``, an upper bound by construction). Hence, for a
perturbation ``delta`` of the input image:

* class pairs: ``|(z_t - z_j)(x + delta) - (z_t - z_j)(x)| <= T_k ||w_t - w_j|| ||delta||`` (``w`` the rows
  of ``W_a^cls``), so the top class ``t`` (background included) cannot change while
  ``||delta|| < min_j (z_t - z_j) / (T_k ||w_t - w_j||)`` (:func:`pairwise_class_radius`). For a linear
  map this is exactly the distance to the nearest decision boundary. It is never smaller than the
  previous ``margin / (sqrt(2) L_cls)``: ``||w_t - w_j|| = ||W_a^T (e_t - e_j)|| <= sqrt(2) ||W_a||`` and
  ``||W_a|| <=`` the whole convolution's operator norm (the anchor's outputs at one location are a
  sub-vector of the convolution's output on an input supported on the patch);
* boxes: ``||o(x + delta) - o(x)|| <= T_k ||W_a^loc|| ||delta||``, and :func:`box_radius` finds the
  largest offset ball on which a provable lower bound of the IoU with a reference box (the ground truth
  in eval, the anchor's own clean box in serve) stays >= 0.5 (:func:`iou_lower_bound_ball`).

Every constant is an upper bound by construction: row norms and spectral norms are computed in float64
with their rounding error bounded explicitly (:func:`norm_upper`, :func:`spectral_norm_upper`). NMS and the
score threshold are not continuous, so certificates are stated on the raw, per-anchor outputs.

:data:`DETECTION_DEFINITION` states the per-detection radius (no ground truth: the detection's own class
and clean box are the references) that ``lipdet serve`` answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lipdet.boxes import VARIANCES, decode, map_index
from lipdet.errors import LipdetError
from lipdet.models.lipschitz import head_bounds

SQRT2 = math.sqrt(2.0)
UNIT_ROUNDOFF = 2.0**-53  # float64
ROUND_UP = 1.0 + 2.0**-48  # covers the rounding of a few float64 products/sums on top of a bound


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)`` for float64: the relative error bound of an n-term dot product."""
    nu = n * UNIT_ROUNDOFF
    if nu >= 0.5:
        raise LipdetError(f"a {n}-term float64 sum is too long for the rounding bound")
    return nu / (1.0 - nu)


def norm_upper(x: Tensor, dim: int = -1) -> Tensor:
    """Guaranteed upper bound on the exact L2 norm of the float64 values ``x`` along ``dim``.

    The computed sum of squares is within ``gamma(n + 1)`` (relative) of the exact one for any
    summation order; the square root adds at most one more rounding. ``x`` itself may carry one
    relative rounding (a float64 difference of float32 weights): covered by the ``+3``.
    """
    n = x.shape[dim]
    return (x.double().square().sum(dim=dim) * (1.0 + gamma(n + 3))).sqrt() * ROUND_UP


def spectral_norm_upper(w: Tensor) -> Tensor:
    """Provable upper bound on ``||w||_2`` for a batch of small matrices ``w (..., r, n)`` (float64).

    ``G = w w^T`` (``r x r``) is formed in float64: ``|G_hat - G| <= gamma_n |w||w|^T`` entrywise, so
    ``lambda_max(G) <= lambda_max(G_hat) + e_G`` with ``e_G`` that matrix's Frobenius norm. For the
    computed eigen-pair ``(V, lam)`` of ``G_hat``: ``lambda_max(V^T G_hat V) <= max(lam) + ||V^T G_hat V
    - diag(lam)||_F`` (Weyl), and ``lambda_max(G_hat) <= lambda_max(V^T G_hat V) / (1 - ||V^T V - I||_F)``
    (Ostrowski: a congruence scales eigenvalues by factors >= ``sigma_min(V)^2``). The products are
    bounded with their own ``gamma`` terms. Returns ``(...)`` float64; tight to ~1e-14 relative.
    """
    w = w.double()
    r, n = w.shape[-2], w.shape[-1]
    g = w @ w.mT
    e_g = (gamma(n) * (w.abs() @ w.abs().mT)).square().sum(dim=(-1, -2)).sqrt()
    lam, v = torch.linalg.eigh(g)
    eye = torch.eye(r, dtype=torch.float64)
    m_err = gamma(2 * r) * (v.abs().mT @ g.abs() @ v.abs())
    resid = ((v.mT @ g @ v - torch.diag_embed(lam)).abs() + m_err).square().sum(dim=(-1, -2)).sqrt()
    o_err = gamma(r) * (v.abs().mT @ v.abs())
    orth = ((v.mT @ v - eye).abs() + o_err).square().sum(dim=(-1, -2)).sqrt()
    if bool((orth >= 0.5).any()):
        raise LipdetError("eigenvectors too far from orthogonal for a spectral norm bound")
    top = (lam[..., -1] + resid).clamp_min(0.0) / (1.0 - orth)
    return ((top + e_g) * ROUND_UP).sqrt() * ROUND_UP


def pair_norm_upper(rows: Tensor) -> Tensor:
    """``(..., C, n)`` rows -> ``(..., C, C)`` upper bounds on ``||rows_i - rows_j||_2`` (0 on the diagonal)."""
    rows = rows.double()
    return torch.stack([norm_upper(rows - rows[..., t : t + 1, :]) for t in range(rows.shape[-2])], dim=-2)


def _valid_taps(size: int, kernel: int, padding: int) -> tuple[list[list[int]], list[int]]:
    """Distinct sets of kernel rows that land inside a ``size``-long map (stride 1), and each output row's set."""
    sets: list[list[int]] = []
    index: list[int] = []
    for y in range(size):
        s = [k for k in range(kernel) if 0 <= y - padding + k < size]
        if s not in sets:
            sets.append(s)
        index.append(sets.index(s))
    return sets, index


def conv_anchor_rows(weight: Tensor, padding: int, size: int, per_anchor: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor bounds of a stride-1 head convolution on a ``size x size`` map.

    Output channel ``a * per_anchor + c`` is output ``c`` of anchor ``a`` (:func:`lipdet.boxes.flatten_head_outputs`).
    At location ``(y, x)`` the anchor's outputs are its kernel slice restricted to the taps inside the map
    (a "pattern": interior, edge or corner) applied to the patch.

    Args: ``weight (A * per_anchor, Cin, k, k)``.
    Returns: ``norm (Q, A)`` upper bounds on ``||W_a||_2`` per pattern ``q`` and anchor; ``pair (Q, A, C, C)``
    upper bounds on ``||w_i - w_j||_2`` (``C = per_anchor``); ``pattern (size * size,)`` the pattern of each
    location ``y * size + x``.
    """
    cout, cin, k, _ = weight.shape
    if cout % per_anchor:
        raise LipdetError(f"head with {cout} outputs is not a whole number of anchors of {per_anchor}")
    w = weight.double().reshape(cout // per_anchor, per_anchor, cin, k, k)
    sets, index = _valid_taps(size, k, padding)
    norms, pairs = [], []
    for ry in sets:
        for rx in sets:
            sub = w[:, :, :, ry][..., rx].reshape(w.shape[0], per_anchor, -1)  # (A, C, n)
            norms.append(spectral_norm_upper(sub))
            pairs.append(pair_norm_upper(sub))
    pattern = torch.tensor([iy * len(sets) + ix for iy in index for ix in index], dtype=torch.long)
    return torch.stack(norms), torch.stack(pairs), pattern


@dataclass
class HeadRows:
    """One scale's per-anchor head constants (without the trunk factor), see :func:`conv_anchor_rows`."""

    feature_size: int
    cls: Tensor  # (Q, A) ||W_a^cls||_2
    loc: Tensor  # (Q, A) ||W_a^loc||_2
    pair: Tensor  # (Q, A, C, C) ||w_i - w_j||_2 of the class rows
    pattern: Tensor  # (f * f,) location -> pattern


def _head_conv(head: nn.Module) -> nn.Conv2d:
    """The plain convolution a (folded or foldable) lipdet head computes, BatchNorm/temperature folded in."""
    conv = getattr(head, "conv", None)
    if not isinstance(conv, nn.Conv2d) and hasattr(head, "fold"):
        conv = getattr(head.fold(), "conv", None)
    if not isinstance(conv, nn.Conv2d):
        raise LipdetError(f"no plain convolution in head {type(head).__name__}")
    if conv.stride != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise LipdetError("per-anchor head bounds need a stride-1, zero-padded, ungrouped head convolution")
    return conv


def head_rows(model: nn.Module) -> list[HeadRows]:
    """:class:`HeadRows` of every scale of a lipdet detector (``.taps``, ``.cls_heads``, ``.loc_heads``), largest map first."""
    out = []
    with torch.no_grad():
        for tap, size in zip(model.taps, model.prior_spec.feature_sizes):
            cls_conv, loc_conv = _head_conv(model.cls_heads[tap]), _head_conv(model.loc_heads[tap])
            cls_norm, pair, pattern = conv_anchor_rows(cls_conv.weight, int(cls_conv.padding[0]), int(size),
                                                       int(model.config.num_classes))
            loc_norm, _, loc_pattern = conv_anchor_rows(loc_conv.weight, int(loc_conv.padding[0]), int(size), 4)
            if not torch.equal(pattern, loc_pattern) or cls_norm.shape != loc_norm.shape:
                raise LipdetError(f"the class and box heads of {tap} differ in kernel, padding or anchors")
            out.append(HeadRows(int(size), cls_norm, loc_norm, pair, pattern))
    return out


@dataclass
class AnchorBounds:
    """Per-anchor Lipschitz bounds, ``(P,)`` each: input -> that anchor's class logits / box offsets.

    With per-anchor head rows (:func:`head_rows`) also ``pair (G, C, C)``, input -> ``z_i - z_j`` of the
    anchors of group ``g``, and ``group (P,)`` each prior's group; without them (whole-convolution bounds
    only) both are None and the class radius falls back to ``margin / (sqrt(2) L_cls)``.
    """

    cls: Tensor
    loc: Tensor
    scale_index: Tensor
    per_scale: list[dict[str, float]]
    pair: Tensor | None = None
    group: Tensor | None = None

    @classmethod
    def from_head_bounds(
        cls, bounds: dict[str, Any], num_priors: int, feature_sizes: Sequence[int] | None = None,
        rows: Sequence[HeadRows] | None = None,
    ) -> "AnchorBounds":
        """Spread ``head_bounds(model)``'s per-scale bounds over the priors.

        Priors are laid out feature map by feature map, largest map first (``lipdet.boxes``), with
        the same number of anchors at every location, so scale ``k`` owns ``A * f_k^2`` consecutive
        priors. ``feature_sizes`` (the card's prior spec) fixes the order; without it the
        ``per_scale`` entries are sorted largest map first. With ``rows`` (:func:`head_rows` of the same
        model) every prior gets ``trunk_k x`` its own head rows' norms instead of the whole head's.
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
        out = cls(lc, ll, idx, clean)
        return out._with_rows(per_scale, anchors, rows) if rows is not None else out

    def _with_rows(self, per_scale: list[dict[str, Any]], anchors: int, rows: Sequence[HeadRows]) -> "AnchorBounds":
        """Replace the whole-head bounds by ``trunk_k x`` each prior's own head-row norms (see module docstring)."""
        by_size = {r.feature_size: r for r in rows}
        cls_p, loc_p, group, pairs, offset = [], [], [], [], 0
        for s, summary in zip(per_scale, self.per_scale):
            r = by_size.get(int(s["feature_size"]))
            if r is None or "trunk" not in s or r.cls.shape[1] != anchors:
                raise LipdetError(f"no head rows / trunk bound for feature map {s['feature_size']} with {anchors} anchors")
            t = float(s["trunk"])
            q = r.pattern.repeat_interleave(anchors)  # prior -> pattern, (f*f*A,)
            a = torch.arange(anchors).repeat(r.pattern.numel())  # prior -> anchor
            cls_p.append(r.cls[q, a] * t * ROUND_UP)
            loc_p.append(r.loc[q, a] * t * ROUND_UP)
            group.append(offset + q * anchors + a)
            pairs.append((r.pair * t * ROUND_UP).reshape(-1, *r.pair.shape[-2:]))
            offset += r.cls.numel()
            summary.update(trunk=t, cls_anchor_max=float(cls_p[-1].max()), loc_anchor_max=float(loc_p[-1].max()))
        return AnchorBounds(torch.cat(cls_p), torch.cat(loc_p), self.scale_index, self.per_scale,
                            torch.cat(pairs), torch.cat(group))

    @classmethod
    def of_model(
        cls, model: nn.Module, num_priors: int, feature_sizes: Sequence[int] | None = None,
        bounds: dict[str, Any] | None = None,
    ) -> "AnchorBounds":
        """The per-anchor bounds of a folded lipdet detector (the twin of an artifact), as certificates use them.

        ``head_bounds(model)`` (or ``bounds``, when the caller already computed it) spread over the
        ``num_priors`` priors (``feature_sizes``: the card's prior spec order) with the model's own
        per-anchor :func:`head_rows`: the one computation ``lipdet eval --certify`` and ``lipdet serve`` share.
        """
        bounds = head_bounds(model) if bounds is None else bounds
        return cls.from_head_bounds(bounds, num_priors, feature_sizes, head_rows(model))

    def class_radius(self, logits: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Certified class radius and top class of the priors ``anchors (M,)`` given their ``logits (M, C)``.

        Pairwise (:func:`pairwise_class_radius`) with head rows, else :func:`class_radius`.
        """
        if self.pair is None or self.group is None:
            return class_radius(logits, self.cls[anchors])
        return pairwise_class_radius(logits, self.pair[self.group[anchors]])


def class_radius(logits: Tensor, lipschitz_cls: Tensor) -> tuple[Tensor, Tensor]:
    """Per-anchor certified radius of the top-class decision from one bound for all logits.

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


def pairwise_class_radius(logits: Tensor, pair: Tensor) -> tuple[Tensor, Tensor]:
    """Certified radius of the top-class decision from pairwise constants.

    Args:
        logits: ``(M, C)`` raw class logits of ``M`` anchors.
        pair: ``(M, C, C)`` upper bounds on the Lipschitz constants of input -> ``z_i - z_j``.

    Returns ``radius (M,)`` = ``min_{j != t} (z_t - z_j) / pair[t, j]`` (float64; ``inf`` for a pair with
    constant 0 and a positive margin, 0 for a tie) and ``top (M,)``. Sound: while ``||delta||`` is below
    it, every margin ``z_t - z_j`` stays positive; for a linear map it is exactly the distance to the
    nearest decision boundary.
    """
    z = logits.double()
    top = z.argmax(dim=-1)
    margin = z.gather(-1, top.view(-1, 1)) - z  # (M, C), 0 at t
    lip = pair.double().gather(1, top.view(-1, 1, 1).expand(-1, 1, z.shape[-1])).squeeze(1)  # (M, C) row t
    per = torch.where(lip > 0, margin / lip.clamp_min(1e-300) / ROUND_UP, torch.where(margin > 0, math.inf, 0.0))
    per = per.scatter(-1, top.view(-1, 1), math.inf)
    return per.amin(dim=-1), top


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
    """Coarse lower bound on IoU(box, gt) over all boxes whose four offsets move by at most ``rho`` in L2.

    The previous certificate's bound, kept as the reference :func:`iou_lower_bound_ball` is tested against
    (that one is 2-4x tighter in radius). The bound of :func:`iou_lower_bound` is non-increasing in each coordinate's budget, so its minimum
    over the corners of :func:`sphere_corners` (scaled by ``rho``) bounds it over the whole L2 ball;
    it is never below the per-coordinate bound with budget ``rho`` (the ball lies in that box), and
    up to ~2x larger in radius. Args as :func:`iou_lower_bound`, ``rho (M,)``. Returns ``(M,)``.
    """
    corners = sphere_corners(cells).to(offsets.device)  # (K, 4)
    budgets = corners.view(-1, 1, 4) * rho.double().view(1, -1, 1)  # (K, M, 4)
    return iou_lower_bound(offsets, priors, gt, budgets).amin(dim=0)


def _overlap(c: Tensor, w: Tensor, g0: Tensor, g1: Tensor) -> Tensor:
    """Length of ``[c - w/2, c + w/2] ∩ [g0, g1]`` (0 if empty); broadcasts."""
    return (torch.minimum(c + w / 2, g1) - torch.maximum(c - w / 2, g0)).clamp_min(0.0)


def _clipped_side(c: Tensor, w: Tensor) -> Tensor:
    """Length of ``[c - w/2, c + w/2]`` clipped to ``[0, 1]`` (post-processing's clamp) = ``min(w, c + w/2, 1 - c + w/2, 1)^+``.

    Concave in ``c`` and symmetric about 0.5; non-decreasing in ``w``.
    """
    return torch.minimum(torch.minimum(w, c + w / 2), (1 - c + w / 2).clamp_max(1.0)).clamp_min(0.0)


def _axis_cells(o_c: Tensor, o_s: Tensor, pc: Tensor, ps: Tensor, g0: Tensor, g1: Tensor, r: Tensor,
                cells: int) -> tuple[Tensor, Tensor]:
    """Per-cell bounds for one axis when its two offsets (centre ``u``, log-size ``s``) move in a disk.

    The disk ``u^2 + s^2 <= r^2`` is covered by ``cells`` strips ``s in [a, b]``, ``|u| <= sqrt(r^2 -
    min_{[a,b]} s^2)``: centre ``c in [c0 - v0 p R, c0 + v0 p R]``, size ``w in [w(a), w(b)]``. Over a strip the
    overlap with the (clipped) ground truth is >= its value at the smallest size and the nearer-to-worst
    centre end (it grows with ``w`` and is quasi-concave in ``c``), and the clipped side is <= its value at
    the largest size and the centre closest to 0.5 (concave in ``c``).

    Args: offsets ``o_c, o_s (M,)``, prior centre/size ``pc, ps (M,)``, ground truth ``[g0, g1] (M,)``
    clipped to ``[0, 1]``, disk radii ``r (S, M)``. Returns ``(overlap_min, side_max)``, ``(S, M, cells)``.
    """
    v0, v1 = VARIANCES
    edges = r.unsqueeze(-1) * torch.linspace(-1.0, 1.0, cells + 1, dtype=torch.float64)
    a, b = edges[..., :-1], edges[..., 1:]
    s_min = torch.where((a <= 0) & (b >= 0), torch.zeros_like(a), torch.minimum(a.abs(), b.abs()))
    shift = v0 * ps.unsqueeze(-1) * (r.unsqueeze(-1).square() - s_min.square()).clamp_min(0.0).sqrt()
    c0 = (pc + v0 * ps * o_c).unsqueeze(-1)
    w_lo = ps.unsqueeze(-1) * torch.exp(v1 * (o_s.unsqueeze(-1) + a))
    w_hi = ps.unsqueeze(-1) * torch.exp(v1 * (o_s.unsqueeze(-1) + b))
    g0, g1 = g0.unsqueeze(-1), g1.unsqueeze(-1)
    overlap = torch.minimum(_overlap(c0 - shift, w_lo, g0, g1), _overlap(c0 + shift, w_lo, g0, g1))
    nearest_half = torch.minimum(torch.maximum(torch.full_like(shift, 0.5), c0 - shift), c0 + shift)
    return overlap, _clipped_side(nearest_half, w_hi)


def iou_lower_bound_ball(offsets: Tensor, priors: Tensor, gt: Tensor, rho: Tensor, splits: int = 16,
                         cells: int = 32) -> Tensor:
    """Provable lower bound on min IoU(box, gt) over boxes whose four offsets lie within L2 ``rho`` of ``offsets``.

    The box is decoded with SSD coding and clipped to ``[0, 1]`` like post-processing. IoU factors by
    axis: intersection ``I_x I_y``, clipped area ``W_x H_y``, where ``(I_x, W_x)`` depend only on the x
    offsets ``(dx, dw)`` and ``(I_y, H_y)`` on ``(dy, dh)``. A perturbation with ``|d_x|^2 + |d_y|^2 <= rho^2``
    has ``|d_x| = rho' cos(phi)``, ``|d_y| = rho' sin(phi)``, ``rho' <= rho``; ``[0, pi/2]`` is cut into
    ``splits`` angle cells, each giving an x disk of radius ``rho cos(phi_lo)`` and a y disk of ``rho
    sin(phi_hi)``. Each disk is covered by :func:`_axis_cells`; for every pair of x / y cells
    ``IoU >= I_x,min I_y,min / (W_x,max H_y,max + area(gt) - I_x,min I_y,min)`` (IoU grows with the
    intersection and falls with the box area). The minimum over all cells bounds the ball; the gap to the
    true minimum shrinks like ``1 / splits + 1 / cells``.

    Args: ``offsets (M, 4)``, ``priors (M, 4)`` normalised cxcywh, ``gt (M, 4)`` normalised xyxy, ``rho (M,)``.
    Returns ``(M,)`` float64.
    """
    o, p, g = offsets.double(), priors.double(), gt.double()
    phi = torch.linspace(0.0, math.pi / 2, splits + 1, dtype=torch.float64)
    rx = rho.double().view(1, -1) * torch.cos(phi[:-1]).view(-1, 1)  # (S, M)
    ry = rho.double().view(1, -1) * torch.sin(phi[1:]).view(-1, 1)
    gc = g.clamp(0.0, 1.0)
    ix, wx = _axis_cells(o[:, 0], o[:, 2], p[:, 0], p[:, 2], gc[:, 0], gc[:, 2], rx, cells)
    iy, hy = _axis_cells(o[:, 1], o[:, 3], p[:, 1], p[:, 3], gc[:, 1], gc[:, 3], ry, cells)
    inter = ix.unsqueeze(-1) * iy.unsqueeze(-2)  # (S, M, cells, cells)
    area_g = ((g[:, 2] - g[:, 0]).clamp_min(0) * (g[:, 3] - g[:, 1]).clamp_min(0)).view(1, -1, 1, 1)
    union = wx.unsqueeze(-1) * hy.unsqueeze(-2) + area_g - inter
    lb = torch.where(union > 0, inter / union.clamp_min(1e-300), torch.zeros_like(inter))
    return lb.amin(dim=(-1, -2)).amin(dim=0)


def box_iou_exact(offsets: Tensor, priors: Tensor, gt: Tensor) -> Tensor:
    """IoU of the clipped decoded boxes of ``offsets (..., M, 4)`` with ``gt (M, 4)``, float64, ``(..., M)``."""
    v0, v1 = VARIANCES
    o, p, g = offsets.double(), priors.double(), gt.double()
    c = p[:, :2] + o[..., :2] * v0 * p[:, 2:]
    wh = p[:, 2:] * torch.exp(o[..., 2:] * v1)
    gc = g.clamp(0.0, 1.0)
    inter = _overlap(c, wh, gc[:, :2], gc[:, 2:]).prod(dim=-1)
    area_g = (g[:, 2] - g[:, 0]).clamp_min(0) * (g[:, 3] - g[:, 1]).clamp_min(0)
    union = _clipped_side(c, wh).prod(dim=-1) + area_g - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-300), torch.zeros_like(inter))


def _probe_directions(count: int = 232) -> Tensor:
    """``(24 + 8 + count, 4)`` unit directions: the axes, the 2-axis diagonals and seeded random ones."""
    eye = torch.eye(4, dtype=torch.float64)
    dirs = [eye, -eye]
    for i in range(4):
        for j in range(i + 1, 4):
            for si in (1.0, -1.0):
                for sj in (1.0, -1.0):
                    dirs.append(((si * eye[i] + sj * eye[j]) / SQRT2).view(1, 4))
    rand = torch.randn(count, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dirs.append(rand / rand.norm(dim=1, keepdim=True))
    return torch.cat(dirs)


def _failing_radius(offsets: Tensor, priors: Tensor, gt: Tensor, iou: float, iters: int = 24) -> Tensor:
    """``(M,)`` radii at which some probed offset on the sphere has IoU ``< iou``: upper bounds of the true radius."""
    dirs = _probe_directions()

    def fails(rho: Tensor) -> Tensor:
        pts = offsets.double().unsqueeze(0) + rho.view(1, -1, 1) * dirs.view(-1, 1, 4)
        return (box_iou_exact(pts, priors, gt) < iou).any(dim=0)

    hi = torch.ones(offsets.shape[0], dtype=torch.float64)
    for _ in range(60):
        ok = fails(hi)
        if bool(ok.all()):
            break
        hi = torch.where(ok, hi, hi * 2)
    lo = torch.zeros_like(hi)
    for _ in range(iters):  # keep a failing point at hi
        mid = (lo + hi) / 2
        f = fails(mid)
        hi, lo = torch.where(f, mid, hi), torch.where(f, lo, mid)
    return hi


def box_radius(
    offsets: Tensor, priors: Tensor, gt: Tensor, lipschitz_loc: Tensor, iou: float = 0.5, iters: int = 14,
    chunk: int = 64, bracket_iters: int = 24,
) -> Tensor:
    """Largest eps with :func:`iou_lower_bound_ball` ``>= iou`` for offsets moving ``L_loc * eps`` in L2.

    ``L_loc (M,)`` bounds input -> that anchor's four offsets in L2, so they move by at most
    ``L_loc * ||delta||_2``. The bracket's top is a radius where a probed offset already fails
    (:func:`_failing_radius`, ``bracket_iters`` bisection steps), the bisection (``iters`` steps) keeps the
    invariant "bound >= iou at lo" (a tiny margin of 1e-12 absorbs float64 rounding) and returns ``lo``: a
    radius at which the ball's bound was evaluated and held, so any number of steps is sound; fewer steps
    only stop the bisection earlier, up to ``2^-iters`` of the bracket short of where it converges. Returns
    ``(M,)`` float64 radii: 0 where even a zero budget fails, ``inf`` where ``L_loc == 0``.
    """
    m = offsets.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.float64)
    rhos = []
    for sl in torch.arange(m).split(chunk):
        o, p, g = offsets[sl], priors[sl], gt[sl]
        lo = torch.zeros(sl.numel(), dtype=torch.float64)
        ok0 = box_iou_exact(o, p, g) >= iou + 1e-12
        hi = _failing_radius(o, p, g, iou, bracket_iters)
        for _ in range(iters):
            mid = (lo + hi) / 2
            good = iou_lower_bound_ball(o, p, g, mid) >= iou + 1e-12
            lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
        rhos.append(torch.where(ok0, lo, torch.zeros_like(lo)))
    rho = torch.cat(rhos)
    lloc = lipschitz_loc.double()
    still = torch.where(box_iou_exact(offsets, priors, gt) >= iou, math.inf, 0.0)  # offsets that never move
    return torch.where(lloc > 0, rho / lloc.clamp_min(1e-300) / ROUND_UP, still)


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


SERVE_BISECTION = 8
"""Bisection steps of the served box radius (and of its bracket): the bisection stops within 2^-8 of its
bracket (0.5% of eval's 14-step radius at most, measured); its lower end is a radius where the bound held."""

DETECTION_DEFINITION = (
    "Certified L2 radius of one detection, without ground truth. The detection comes from one anchor p (the "
    "prior whose decoded box and class score are the detection's) at feature-map scale k, with raw class logits "
    "z and box offsets o on the model input x. T_k is an upper bound on the L2 Lipschitz constant input -> tap "
    "feature map and W_a the anchor's rows of the folded head kernel (for the border pattern of its location), "
    "all computed from the served model's weights (its ONNX twin) as upper bounds with float64 rounding bounded, "
    "as for lipdet eval --certify. cls = min over classes j != t of (z_t - z_j) / (T_k * ||w_t - w_j||_2) when p's "
    "top class t over all logits (background included) is the detection's digit, else 0 (w_i: the rows of W_a^cls). "
    f"box = rho / (T_k * ||W_a^loc||_2), rho the lower end of a {SERVE_BISECTION}-step bisection for the largest L2 "
    "offset radius on which a provable lower bound on the IoU between any box decoded (and clipped to the image) "
    "from offsets within rho of o and p's own clean box is >= 0.5 (the lower end is a radius where that bound was "
    "evaluated and held, divided by the constants rounded up). radius = min(cls, box); binding names the smaller ('cls' on a tie). Units: the L2 norm of a "
    "perturbation of the whole 3xSxS model input in [0,1] pixel units, i.e. of the letterboxed, resized image the "
    "server built from the request, not of the client's original pixels. Guarantee (exact arithmetic, the twin's "
    "weights): under any perturbation with ||delta||_2 < cls, p keeps the detection's digit as its top class; with "
    "||delta||_2 < box, p's decoded box keeps IoU >= 0.5 with its clean box. Not certified: the score threshold and "
    "NMS (discontinuous), the engine's fp32 rounding at the perturbed input, and for fp16/int8 engines the gap "
    "between the engine and its exact-arithmetic twin."
)


def binding_of(r_cls: Tensor, r_box: Tensor, traced: Tensor) -> list[str]:
    """Which part binds per anchor: ``"cls"`` (``r_cls <= r_box``), ``"box"``, or ``"none"`` where not ``traced``."""
    return ["none" if not bool(v) else ("cls" if bool(c <= b) else "box") for c, b, v in zip(r_cls, r_box, traced)]


def anchor_radii(
    loc: Tensor, logits: Tensor, priors: Tensor, anchors: Tensor, labels: Tensor, boxes: Tensor,
    bounds: AnchorBounds, iou: float = 0.5, iters: int = 14, bracket_iters: int = 24,
) -> tuple[Tensor, Tensor]:
    """Certified class and box radii of ``M`` traced anchors against reference digits and boxes.

    Args:
        loc, logits: one image's raw outputs, ``(P, 4)`` / ``(P, C)``; ``priors (P, 4)`` normalised cxcywh.
        anchors: ``(M,)`` prior indices (:func:`detection_anchors`; ``-1`` = not traced).
        labels: ``(M,)`` digits (class index - 1) that must stay each anchor's top class.
        boxes: ``(M, 4)`` normalised xyxy reference boxes the decoded box must keep IoU ``>= iou`` with.
        iters, bracket_iters: :func:`box_radius`'s bisection steps.

    Returns:
        ``(r_cls, r_box)``, ``(M,)`` float64 in input-pixel L2 units: the class radius (0 where the anchor's
        top class is not the label) and the box radius; both 0 for an untraced anchor.
    """
    valid = anchors >= 0
    a = anchors.clamp_min(0)
    r_cls, top = bounds.class_radius(logits[a], a)
    r_cls = torch.where(valid & (top == labels.long() + 1), r_cls, torch.zeros_like(r_cls))
    r_box = box_radius(loc[a].float(), priors[a].float(), boxes, bounds.loc[a], iou, iters, bracket_iters=bracket_iters)
    return r_cls, torch.where(valid, r_box, torch.zeros_like(r_box))


def detection_radii(
    loc: Tensor, logits: Tensor, priors: Tensor, input_size: int, dets: dict[str, Tensor], bounds: AnchorBounds,
    iters: int = SERVE_BISECTION,
) -> dict[str, Any]:
    """The certified radius of each post-processed detection of one image (see :data:`DETECTION_DEFINITION`).

    Args:
        loc, logits: the engine's raw outputs, ``(P, 4)`` / ``(P, C)``; ``priors (P, 4)``; ``input_size`` S.
        dets: :func:`lipdet.postprocess.postprocess`'s detections of this image (``D`` of them).
        iters: bisection steps of the box radius (and its bracket).

    Returns:
        ``{"cls", "box", "radius": (D,) float64, "binding": [D str]}``: radii as L2 norms over the
        ``3 x S x S`` input in [0, 1] pixel units; ``binding`` ``"cls"``, ``"box"`` or ``"none"`` (no anchor
        traced: radii 0).
    """
    anchors = detection_anchors(loc, logits, priors, input_size, dets)
    a = anchors.clamp_min(0)
    own = decode(loc[a].float(), priors[a].float()).clamp(0.0, 1.0)  # (D, 4) the anchors' clean boxes
    r_cls, r_box = anchor_radii(loc, logits, priors, anchors, dets["labels"], own, bounds, 0.5, iters, iters)
    return {"cls": r_cls, "box": r_box, "radius": torch.minimum(r_cls, r_box).clamp_min(0.0),
            "binding": binding_of(r_cls, r_box, anchors >= 0)}
