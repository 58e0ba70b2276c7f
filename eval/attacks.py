"""Adversarial attacks on detectors, all in the L2 norm over the whole input image.

Conventions (every function here):

* Images are ``(N, 3, S, S)`` float32 in ``[0, 1]`` -- the pixel space the deployed model reads
  (the model subtracts 0.5 inside its graph). ``eps`` is an L2 radius in that space, measured over
  the full ``3 x S x S`` tensor of one image: ``||x_adv - x||_2 <= eps``. An image stays in ``[0, 1]``.
* An *attack loss* is a number the attacker maximises, computed from raw head outputs
  ``loc (N, P, 4)`` / ``logits (N, P, C)`` (before post-processing); see :class:`AttackLoss`.
* Randomness is drawn per image from a seed the caller derives from the image's dataset index
  (:func:`image_seed`), so an image is attacked the same way whatever batch or Ray worker it lands
  in.

Two attacks:

* :func:`pgd_l2` -- projected gradient ascent (as torchattacks' PGDL2): random start inside the
  ball, ``steps`` steps of size ``alpha`` along the gradient divided by its per-image L2 norm,
  projection onto the ball, clamp to ``[0, 1]``; with restarts, the per-image worst (highest
  loss) result is kept. Gradients come from a differentiable model (the deployed artifact's twin).
* :func:`square_l2` -- a gradient-free random search in the style of the L2 Square attack
  (Andriushchenko et al., ECCV 2020) that only *queries* a model: it moves perturbation mass
  between two random square windows with a fresh pseudo-Gaussian pattern and keeps a candidate
  only when the queried loss increases. Run on the deployed engine it catches gradient masking and
  twin/engine divergence, which a twin-crafted attack cannot see.

The default ``--attack-loss ensemble`` runs :func:`pgd_l2` once per loss of :data:`ENSEMBLE_LOSSES`
and keeps, per image, the candidate that is worst for the deployed engine (:func:`image_harm`,
:func:`worst_per_image`); the evaluator replays the candidates on the engine and applies them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lipdet.errors import LipdetError
from lipdet.loss import MultiBoxLoss
from lipdet.metrics import object_scores

ATTACK_LOSSES: tuple[str, ...] = ("multibox", "cls", "loc", "vanish")
"""Attack losses: MultiBox vs ground truth (cls + alpha * loc), its classification or localisation
term alone, or "vanish" (TOG vanishing: every anchor pushed to background)."""

ENSEMBLE = "ensemble"
"""``--attack-loss ensemble``: PGD once per loss of :data:`ENSEMBLE_LOSSES`, the per-image worst kept."""

ENSEMBLE_LOSSES: tuple[str, ...] = ("multibox", "cls", "loc", "vanish")
"""The losses the ensemble runs, in tie-break order (the first of equally bad candidates is kept)."""

ATTACK_CHOICES: tuple[str, ...] = (ENSEMBLE, *ATTACK_LOSSES)
"""Every value ``--attack-loss`` accepts; :data:`ENSEMBLE` is the default."""

SELECTION_LOSS = "multibox"
"""The loss that scores images under the ensemble: its tie-break, and the clean / adversarial losses
reported (on the engine) and Square's objective when ``--attack-loss ensemble``."""

SELECTION_RULE = (
    "Per image, of the adversarial images PGD crafted with each loss, the one kept is the one that leaves the "
    "fewest ground-truth objects detected correctly by the deployed engine (a detection of the same digit with "
    "IoU >= 0.5, after the shared post-processing); among those, the one whose correct detections have the lowest "
    "total score (each object's best-scoring correct detection); then the highest MultiBox loss of the engine's raw "
    "outputs against the ground truth; remaining ties to the first loss in the list."
)


def attack_losses(name: str) -> tuple[str, ...]:
    """The single losses ``--attack-loss name`` runs, in order: :data:`ENSEMBLE_LOSSES` for
    ``ensemble``, else ``(name,)``. The one check of an attack-loss name (LipdetError if unknown)."""
    if name == ENSEMBLE:
        return ENSEMBLE_LOSSES
    if name in ATTACK_LOSSES:
        return (name,)
    raise LipdetError(f"unknown attack_loss {name!r}; choose one of: {', '.join(ATTACK_CHOICES)}")


def scoring_loss(name: str) -> str:
    """The single loss that scores images for ``--attack-loss name``: the loss itself, or
    :data:`SELECTION_LOSS` for the ensemble (clean / adversarial losses, Square's objective)."""
    losses = attack_losses(name)
    return losses[0] if len(losses) == 1 else SELECTION_LOSS

ModelFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``images (N, 3, S, S) -> (loc (N, P, 4), logits (N, P, C))``."""


def image_seed(seed: int, index: int, tag: str = "") -> int:
    """A 63-bit seed for image ``index`` under the run seed ``seed`` and an attack ``tag``.

    Derived by hashing, so it depends on the image's dataset index only -- not on its batch, shard
    or worker -- and different tags (attack, eps, restart) give independent streams.
    """
    digest = hashlib.sha256(f"lipdet:{int(seed)}:{int(index)}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class AttackLoss:
    """The quantity an attacker maximises, from raw outputs and the ground truth.

    * ``multibox``: the SSD training loss (:class:`lipdet.loss.MultiBoxLoss`, ``cls + alpha * loc``)
      against the ground truth;
    * ``cls`` / ``loc``: its classification (hard-negative-mined cross-entropy) or localisation
      (smooth L1 on matched priors) term alone;
    * ``vanish``: the mean over all anchors of ``log p(background)`` -- maximising it pushes every
      anchor to background, so objects vanish (TOG's vanishing attack; needs no ground truth).

    :meth:`batch` is the scalar whose gradient the attack follows; :meth:`per_image` the ``(N,)``
    values used to pick the worst restart and to accept random-search candidates. For every loss,
    the gradient of :meth:`batch` with respect to image ``i`` is a positive multiple of the gradient
    of ``per_image()[i]``, so after PGD's per-image normalisation the two give the same step.
    """

    def __init__(self, name: str, priors: Tensor, input_size: int, alpha: float = 2.0) -> None:
        if attack_losses(name) != (name,):
            raise ValueError(f"AttackLoss is one loss of {ATTACK_LOSSES}, got {name!r}")
        self.name = name
        self.criterion = MultiBoxLoss(priors.detach().float().cpu(), input_size, alpha=alpha)
        self._device = torch.device("cpu")

    def _crit(self, device: torch.device) -> MultiBoxLoss:
        if device != self._device:
            self.criterion = self.criterion.to(device)
            self._device = device
        return self.criterion

    def batch(self, loc: Tensor, logits: Tensor, targets: Sequence[dict[str, Tensor]]) -> Tensor:
        """Scalar attack loss of a batch (differentiable)."""
        if self.name == "vanish":
            return _vanish(logits).sum()
        out = self._crit(loc.device)(loc, logits, _on(targets, loc.device))
        return out["loss"] if self.name == "multibox" else out[self.name]

    @torch.no_grad()
    def per_image(self, loc: Tensor, logits: Tensor, targets: Sequence[dict[str, Tensor]]) -> Tensor:
        """``(N,)`` attack loss of each image on its own (float32, on the CPU)."""
        if self.name == "vanish":
            return _vanish(logits).float().cpu()
        crit = self._crit(loc.device)
        key = "loss" if self.name == "multibox" else self.name
        tg = _on(targets, loc.device)
        vals = [crit(loc[i : i + 1], logits[i : i + 1], [tg[i]])[key] for i in range(loc.shape[0])]
        return torch.stack(vals).float().cpu() if vals else torch.zeros(0)


def _vanish(logits: Tensor) -> Tensor:
    """Per image: mean over anchors of log p(background)."""
    return F.log_softmax(logits.float(), dim=-1)[..., 0].mean(dim=-1)


def _on(targets: Sequence[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    return [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


def _per_image_norm(x: Tensor) -> Tensor:
    """L2 norm of each image, computed in float64, shape ``(N,)``."""
    return x.detach().double().flatten(1).norm(dim=1)


def project_l2(images: Tensor, adv: Tensor, eps: float) -> Tensor:
    """Project ``adv`` onto the L2 ball of radius ``eps`` around ``images``, then clamp to [0, 1].

    The perturbation is scaled by ``min(1, eps / ||delta||)`` (in float64 so rounding cannot push
    it past ``eps``). Clamping afterwards moves every pixel towards the clean image (which is in
    ``[0, 1]``), so it can only shrink the perturbation.
    """
    delta = adv.detach() - images
    norm = _per_image_norm(delta)
    scale = torch.where(norm > eps, eps / norm.clamp_min(1e-300), torch.ones_like(norm))
    delta = (delta.double() * scale.view(-1, 1, 1, 1)).to(images.dtype)
    return (images + delta).clamp_(0.0, 1.0)


def _random_start(images: Tensor, eps: float, seeds: Sequence[int]) -> Tensor:
    """A uniform-radius random point in the L2 ball: Gaussian direction, radius ``U(0, 1) * eps``."""
    deltas = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        d = torch.randn(images.shape[1:], generator=g)
        r = torch.rand((), generator=g)
        deltas.append(d * (r * eps / d.norm().clamp_min(1e-12)))
    delta = torch.stack(deltas).to(images.device, images.dtype)
    return project_l2(images, images + delta, eps)


@dataclass
class AttackResult:
    """Output of an attack on one batch.

    Attributes:
        adv: ``(N, 3, S, S)`` adversarial images in ``[0, 1]`` (on the input's device).
        loss: ``(N,)`` attack loss of ``adv`` on the attacked model (CPU).
        outputs: the attacked model's ``(loc, logits)`` on ``adv`` (CPU), or None.
        queries: model evaluations per image (forward passes; PGD counts forward+backward as one).
    """

    adv: Tensor
    loss: Tensor
    outputs: tuple[Tensor, Tensor] | None
    queries: int


def pgd_l2(
    model: ModelFn,
    images: Tensor,
    targets: Sequence[dict[str, Tensor]],
    loss: AttackLoss,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    restarts: int = 1,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[], None] | None = None,
) -> AttackResult:
    """L2 PGD with random start and restarts, keeping each image's worst (highest-loss) result.

    Args:
        model: differentiable ``images -> (loc, logits)`` (the twin), in eval mode.
        images: ``(N, 3, S, S)`` clean images in ``[0, 1]``, on ``model``'s device.
        targets: per image ``{"boxes" (K, 4) xyxy input px, "labels" (K,)}``.
        loss: the :class:`AttackLoss` to maximise.
        eps: L2 radius in ``[0, 1]`` pixel units over the whole image (>= 0).
        steps: gradient steps per restart (>= 1).
        alpha: step length; default ``2.5 * eps / steps`` (Madry et al.'s rule of thumb).
        restarts: independent random starts (>= 1).
        seeds: one seed per image (see :func:`image_seed`); restart ``r`` of image ``i`` draws from
            ``image_seed(seeds[i], r)``. Default: the image's position in the batch.
        on_step: called after every gradient step (progress bars).

    Returns:
        An :class:`AttackResult`; ``outputs`` are the model's outputs on ``adv``.

    With ``eps == 0`` the clean images are returned unchanged (bit for bit).
    """
    if eps < 0:
        raise LipdetError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise LipdetError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise LipdetError(f"restarts must be >= 1, got {restarts}")
    images = images.detach()
    n = images.shape[0]
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"need one seed per image, got {len(seeds)} for {n} images")
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)

    if eps == 0 or n == 0:
        with torch.no_grad():
            lo, lg = model(images)
        return AttackResult(images.clone(), loss.per_image(lo, lg, targets), (lo.float().cpu(), lg.float().cpu()), 1)

    best_adv = images.clone()
    best_loss = torch.full((n,), -math.inf)
    best_out: tuple[Tensor, Tensor] | None = None
    for r in range(restarts):
        adv = _random_start(images, eps, [image_seed(s, r, "pgd-start") for s in seeds])
        for _ in range(steps):
            adv.requires_grad_(True)
            lo, lg = model(adv)
            value = loss.batch(lo, lg, targets)
            (grad,) = torch.autograd.grad(value, adv)
            gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            adv = project_l2(images, adv.detach() + alpha * grad / gnorm, eps)
            if on_step is not None:
                on_step()
        with torch.no_grad():
            lo, lg = model(adv)
        lo, lg = lo.float().cpu(), lg.float().cpu()
        per = loss.per_image(lo, lg, targets)
        better = per > best_loss
        if best_out is None:
            best_out = (lo.clone(), lg.clone())
        bd = better.to(images.device)
        best_adv[bd] = adv[bd]
        best_loss[better] = per[better]
        best_out[0][better] = lo[better]
        best_out[1][better] = lg[better]
    return AttackResult(best_adv, best_loss, best_out, restarts * (steps + 1))


# ----------------------------------------------------------------------------------------------
# The ensemble's per-image choice


def image_harm(dets: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]], loss: Tensor) -> Tensor:
    """How bad an attacked batch is for the model, per image: ``(N, 3)`` float64, larger is worse.

    Columns: minus the number of ground-truth objects detected correctly; minus the sum over objects of
    the score at which each is detected correctly (:func:`lipdet.metrics.object_scores`: its best
    detection of the same digit with IoU >= 0.5, 0 if none); the MultiBox loss of the raw outputs
    against the ground truth. Rows compare lexicographically (:func:`worst_per_image`).

    Args:
        dets: per image the engine's post-processed detections on the adversarial image
            (``{"boxes" (D, 4) xyxy input px, "scores" (D,), "labels" (D,)}``), as mAP scores them.
        targets: per image ``{"boxes" (K, 4), "labels" (K,)}`` in the same frame.
        loss: ``(N,)`` :data:`SELECTION_LOSS` of the engine's raw outputs on the same images.

    Why this order, measured on the engine (not the twin), is the right one for mAP:

    * mAP is not a sum over images: what a detection costs depends on how its score ranks against every
      other image's detections, so no per-image number orders candidates exactly as mAP would. The keys
      are the per-image changes whose effect on AP50 has a fixed sign whatever the rest of the data set
      holds, most certain first.
    * A ground-truth object with no correct detection is a miss at every score threshold: recall its
      class never recovers. Fewer objects detected correctly is the first key.
    * An object is recalled at the score of its best correct detection (the one COCO matching takes);
      lowering that score moves it below more false positives of the whole data set and never raises
      AP. A lower total of those scores is the second key. (Measured on a trained naive model, 100
      synthetic test images: this key makes the kept images 4.5 map_50 points worse than the
      strongest single loss; breaking ties by the MultiBox loss
      alone left the model 1.4 points better off than under that loss.)
    * The MultiBox loss (cross-entropy on object and hardest background anchors, smooth L1 on boxes)
      breaks what remains, e.g. images without objects, by confident false positives and displaced boxes.
    * All keys come from the deployed engine's outputs, the artifact the mAP is reported for: a candidate
      that only fools the twin (fp16/int8 rounding, twin/engine gap) is not chosen.
    """
    scores = [object_scores(d, t) for d, t in zip(dets, targets)]
    detected = torch.tensor([float((sc > 0).sum()) for sc in scores], dtype=torch.float64)
    found_at = torch.tensor([float(sc.double().sum()) for sc in scores], dtype=torch.float64)
    return torch.stack([-detected, -found_at, loss.detach().double().cpu()], dim=1)


def worst_per_image(harms: Sequence[Tensor]) -> Tensor:
    """Per image, the index of the worst candidate: ``harms[k]`` is candidate ``k``'s ``(N, M)``
    :func:`image_harm`. Lexicographic maximum; on a tie the earliest candidate is kept (deterministic).
    Returns ``(N,)`` int64."""
    if not harms:
        raise ValueError("worst_per_image needs at least one candidate")
    best = torch.zeros(harms[0].shape[0], dtype=torch.long)
    for i in range(harms[0].shape[0]):
        for k in range(1, len(harms)):
            if tuple(harms[k][i].tolist()) > tuple(harms[int(best[i])][i].tolist()):
                best[i] = k
    return best


# ----------------------------------------------------------------------------------------------
# Square-style L2 random search


def pseudo_gaussian(side: int, transpose: bool = False) -> Tensor:
    """A ``(side, side)`` zero-sum pattern of unit L2 norm: two opposite-signed bumps.

    Each half of the window (left/right, or top/bottom with ``transpose``) holds a bump that decays
    from its centre in square rings, ``sum_{k >= ring} 1 / (k + 1)^2``; the second half is negated
    and scaled to the first one's mass, so the pattern sums to zero.
    A 1-pixel window is a single +1.
    """
    if side <= 1:
        return torch.ones(max(side, 1), max(side, 1))
    half = side // 2
    bumps = []
    for w in (half, side - half):
        yy = torch.arange(side, dtype=torch.float32).view(-1, 1) - (side - 1) / 2
        xx = torch.arange(w, dtype=torch.float32).view(1, -1) - (w - 1) / 2
        ring = torch.maximum(yy.abs(), xx.abs()).floor().long()
        k_max = int(ring.max())
        tail = torch.tensor([sum(1.0 / (k + 1) ** 2 for k in range(r, k_max + 1)) for r in range(k_max + 1)])
        bumps.append(tail[ring])
    # Opposite signs, the negative bump scaled to the same mass (zero sum also for odd sides).
    out = torch.cat([bumps[0], -bumps[1] * (bumps[0].sum() / bumps[1].sum())], dim=1)
    if transpose:
        out = out.t().contiguous()
    return out / out.norm()


def _window_side(it: int, budget: int, side: int, p_init: float) -> int:
    """Window side for iteration ``it`` of ``budget``: ``p`` halves on Square's schedule."""
    frac = 10000.0 * it / max(budget, 1)
    p = p_init
    for mark in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000):
        if frac > mark:
            p /= 2
    return int(min(max(round(math.sqrt(p * side * side)), 3), side))


def _tiled_init(shape: tuple[int, int, int], eps: float, g: torch.Generator) -> Tensor:
    """Square's L2 initialisation: a grid of pseudo-Gaussian tiles with random signs, norm ``eps``."""
    c, h, w = shape
    tile = max(h // 5, 1)
    pattern = pseudo_gaussian(tile)
    delta = torch.zeros(shape)
    for y in range(0, h - tile + 1, tile):
        for x in range(0, w - tile + 1, tile):
            signs = torch.randint(0, 2, (c, 1, 1), generator=g).float() * 2 - 1
            delta[:, y : y + tile, x : x + tile] = signs * pattern
    return delta * (eps / delta.norm().clamp_min(1e-12))


def _window_move(delta: Tensor, eps: float, s: int, g: torch.Generator) -> Tensor:
    """One Square-L2 proposal for one image's perturbation ``delta (C, H, W)``.

    Draw windows W1 and W2 (side ``s``). The mass of ``delta`` on W1 union W2, plus any slack up to
    ``eps``, is re-spent on W1: its old content plus ``lam * u`` for a fresh unit pseudo-Gaussian
    ``u`` with random per-channel signs, ``lam >= 0`` chosen so the total norm is exactly the
    available budget. W2 (outside W1) is zeroed. The norm never exceeds ``eps``.
    """
    c, h, w = delta.shape
    r1, c1, r2, c2 = (int(v) for v in torch.randint(0, max(h - s, 0) + 1, (4,), generator=g))
    c1 = min(c1, w - s)
    c2 = min(c2, w - s)
    transpose = bool(torch.randint(0, 2, (1,), generator=g))
    signs = torch.randint(0, 2, (c, 1, 1), generator=g).float() * 2 - 1
    u = signs * pseudo_gaussian(s, transpose) / math.sqrt(c)  # unit norm over (C, s, s)

    union = torch.zeros(h, w, dtype=torch.bool)
    union[r1 : r1 + s, c1 : c1 + s] = True
    union[r2 : r2 + s, c2 : c2 + s] = True
    outside = float(delta.double()[:, ~union].pow(2).sum())
    budget2 = max(eps * eps - outside, 0.0)
    d1 = delta[:, r1 : r1 + s, c1 : c1 + s].double()
    u = u.double()
    dot = float((d1 * u).sum())
    d1n2 = float(d1.pow(2).sum())
    lam = -dot + math.sqrt(max(dot * dot - d1n2 + budget2, 0.0))
    new = delta.clone()
    new[:, union] = 0.0
    new[:, r1 : r1 + s, c1 : c1 + s] = (d1 + lam * u).to(delta.dtype)
    # Guard against rounding: never leave the ball.
    norm = float(new.double().norm())
    if norm > eps:
        new = (new.double() * (eps / norm)).to(delta.dtype)
    return new


@torch.no_grad()
def square_l2(
    model: ModelFn,
    images: Tensor,
    targets: Sequence[dict[str, Tensor]],
    loss: AttackLoss,
    eps: float,
    queries: int = 100,
    seeds: Sequence[int] | None = None,
    p_init: float = 0.1,
    clean_outputs: tuple[Tensor, Tensor] | None = None,
    on_query: Callable[[], None] | None = None,
) -> AttackResult:
    """Gradient-free L2 random search (Square-attack style) that only queries ``model``.

    Query 1 is the clean image (``clean_outputs`` if given, at no cost), query 2 a tiled
    pseudo-Gaussian start of norm ``eps``, then ``queries - 2`` window moves
    (:func:`_window_move`) with the window side shrinking on Square's schedule from
    ``sqrt(p_init) * S``. A candidate replaces an image's current point only if its loss is higher
    (greedy), so the returned loss never falls below the clean loss. Every candidate is clamped to
    ``[0, 1]`` and has ``||x_adv - x||_2 <= eps``.

    Args:
        model: ``images (N, 3, S, S) float32 CPU -> (loc, logits)``; gradients are never used.
        queries: forward passes per image, including the clean one (>= 1).
        seeds: one seed per image (see :func:`image_seed`).
    """
    if eps < 0:
        raise LipdetError(f"eps must be >= 0, got {eps}")
    if queries < 1:
        raise LipdetError(f"queries must be >= 1, got {queries}")
    images = images.detach()
    n, c, h, w = images.shape
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    gens = [torch.Generator().manual_seed(image_seed(s, 0, "square")) for s in seeds]

    def query(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lo, lg = model(x)
        lo, lg = lo.float().cpu(), lg.float().cpu()
        return lo, lg, loss.per_image(lo, lg, targets)

    if clean_outputs is None:
        lo, lg, best_loss = query(images)
    else:
        lo, lg = (t.float().cpu() for t in clean_outputs)
        best_loss = loss.per_image(lo, lg, targets)
    best_out = (lo.clone(), lg.clone())
    best_adv = images.clone()
    used = 1
    if on_query is not None:
        on_query()
    if eps == 0 or n == 0:
        return AttackResult(best_adv, best_loss, best_out, used)

    def consider(cand: Tensor) -> None:
        nonlocal used
        lo, lg, cl = query(cand)
        better = cl > best_loss
        best_adv[better] = cand[better]
        best_loss[better] = cl[better]
        best_out[0][better] = lo[better]
        best_out[1][better] = lg[better]
        used += 1
        if on_query is not None:
            on_query()

    if used < queries:
        init = torch.stack([_tiled_init((c, h, w), eps, g) for g in gens]).to(images.dtype)
        consider(project_l2(images, images + init, eps))
    it = 0
    while used < queries:
        it += 1
        s = _window_side(it, queries, min(h, w), p_init)
        delta = best_adv - images
        cand_delta = torch.stack([_window_move(delta[i], eps, s, gens[i]) for i in range(n)])
        consider(project_l2(images, images + cand_delta, eps))
    return AttackResult(best_adv, best_loss, best_out, used)
