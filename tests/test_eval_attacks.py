"""Attacks: the L2 ball and [0, 1] are never left, seeds are per image, eps 0 is a no-op, Square is greedy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipdet.errors import LipdetError
from lipdet.eval.attacks import (
    ATTACK_CHOICES,
    ATTACK_LOSSES,
    ENSEMBLE_LOSSES,
    AttackLoss,
    attack_losses,
    image_harm,
    image_seed,
    pgd_l2,
    project_l2,
    pseudo_gaussian,
    scoring_loss,
    square_l2,
    worst_per_image,
)
from lipdet.metrics import object_scores, objects_detected
from lipdet.postprocess import PostprocessConfig, postprocess
from lipdet.models import build_model, fold_model

S = 32  # the smallest input Tinier SSD accepts: fast, and the attacks do not care


@pytest.fixture(scope="module")
def twin() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model("naive", width=0.125, input_size=S)
    with torch.no_grad():  # BatchNorm statistics of real activations, so outputs depend on the input
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = None
        for _ in range(3):
            m(torch.rand(8, 3, S, S))
    m = fold_model(m.eval())
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, S, S, generator=g)
    images[0] = 0.0  # corners of the box: clamping must still keep the ball
    images[1] = 1.0
    targets = [
        {"boxes": torch.tensor([[4.0, 5.0, 14.0, 25.0], [15.0, 6.0, 26.0, 27.0]]), "labels": torch.tensor([3, 7])},
        {"boxes": torch.tensor([[8.0, 4.0, 20.0, 28.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[2.0, 2.0, 30.0, 30.0]]), "labels": torch.tensor([9])},
    ]
    return images, targets


def _norms(adv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return (adv.double() - images.double()).flatten(1).norm(dim=1)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    eps=st.sampled_from([0.0, 1e-4, 0.1, 0.5, 1.0, 3.0]),
    steps=st.integers(1, 3),
    alpha_scale=st.sampled_from([None, 0.1, 5.0]),
    loss_name=st.sampled_from(ATTACK_LOSSES),
)
def test_pgd_stays_in_ball_and_box(twin, batch, eps, steps, alpha_scale, loss_name):
    images, targets = batch
    loss = AttackLoss(loss_name, twin.priors, S)
    alpha = None if alpha_scale is None else alpha_scale * max(eps, 1e-3)
    res = pgd_l2(twin, images, targets, loss, eps, steps, alpha=alpha, restarts=2, seeds=[11, 12, 13, 14])
    assert res.adv.shape == images.shape and res.adv.dtype == images.dtype
    assert float(_norms(res.adv, images).max()) <= eps + 1e-6
    assert float(res.adv.min()) >= 0.0 and float(res.adv.max()) <= 1.0
    assert res.loss.shape == (4,) and torch.isfinite(res.loss).all()


def test_pgd_eps_zero_returns_the_clean_images(twin, batch):
    images, targets = batch
    res = pgd_l2(twin, images, targets, AttackLoss("multibox", twin.priors, S), 0.0, steps=5)
    assert torch.equal(res.adv, images)


def test_pgd_seeds_are_per_image_not_per_batch(twin, batch):
    """The same image with the same seed is attacked identically alone or in a batch."""
    images, targets = batch
    loss = AttackLoss("multibox", twin.priors, S)
    seeds = [image_seed(0, i, "pgd") for i in range(4)]
    whole = pgd_l2(twin, images, targets, loss, 0.5, 3, seeds=seeds).adv
    halves = torch.cat([
        pgd_l2(twin, images[:2], targets[:2], loss, 0.5, 3, seeds=seeds[:2]).adv,
        pgd_l2(twin, images[2:], targets[2:], loss, 0.5, 3, seeds=seeds[2:]).adv,
    ])
    assert torch.allclose(whole, halves, atol=1e-6)
    other = pgd_l2(twin, images, targets, loss, 0.5, 3, seeds=[image_seed(1, i, "pgd") for i in range(4)]).adv
    assert not torch.equal(whole, other)


def test_restarts_keep_the_per_image_worst(twin, batch):
    images, targets = batch
    loss = AttackLoss("cls", twin.priors, S)
    seeds = [5, 6, 7, 8]
    one = pgd_l2(twin, images, targets, loss, 0.5, 2, restarts=1, seeds=seeds)
    three = pgd_l2(twin, images, targets, loss, 0.5, 2, restarts=3, seeds=seeds)
    assert (three.loss >= one.loss - 1e-6).all()  # restart 0 is the same run, later ones only replace it if worse
    lo, lg = twin(three.adv)
    assert torch.allclose(loss.per_image(lo, lg, targets), three.loss, atol=1e-5)


def test_square_is_query_only_greedy_and_in_the_ball(twin, batch):
    images, targets = batch
    loss = AttackLoss("multibox", twin.priors, S)
    calls = []

    @torch.no_grad()
    def engine(x: torch.Tensor):
        assert not x.requires_grad
        calls.append(x.shape[0])
        return twin(x)

    clean = loss.per_image(*twin(images), targets)
    res = square_l2(engine, images, targets, loss, 0.5, queries=12, seeds=[1, 2, 3, 4])
    assert res.queries == 12 and len(calls) == 12
    assert float(_norms(res.adv, images).max()) <= 0.5 + 1e-6
    assert float(res.adv.min()) >= 0.0 and float(res.adv.max()) <= 1.0
    assert (res.loss >= clean - 1e-6).all()
    assert (res.loss > clean).any()  # 11 tries on a random net find some increase
    assert torch.allclose(loss.per_image(*twin(res.adv), targets), res.loss, atol=1e-5)
    again = square_l2(engine, images, targets, loss, 0.5, queries=12, seeds=[1, 2, 3, 4])
    assert torch.equal(again.adv, res.adv)


def test_project_l2_and_pseudo_gaussian():
    x = torch.full((2, 3, 8, 8), 0.5)
    far = x + torch.randn(2, 3, 8, 8)
    p = project_l2(x, far, 0.3)
    assert float(_norms(p, x).max()) <= 0.3 + 1e-7
    near = x + 0.001
    assert torch.allclose(project_l2(x, near, 0.3), near)
    for side in (1, 3, 4, 7, 24):
        pat = pseudo_gaussian(side)
        assert abs(float(pat.norm()) - 1) < 1e-5
        if side > 1:
            assert abs(float(pat.sum())) < 1e-5


def test_bad_parameters_are_user_errors(twin, batch):
    images, targets = batch
    loss = AttackLoss("multibox", twin.priors, S)
    with pytest.raises(LipdetError, match="eps"):
        pgd_l2(twin, images, targets, loss, -0.1)
    with pytest.raises(LipdetError, match="steps"):
        pgd_l2(twin, images, targets, loss, 0.5, steps=0)
    with pytest.raises(LipdetError, match="queries"):
        square_l2(twin, images, targets, loss, 0.5, queries=0)
    with pytest.raises(LipdetError, match="attack.loss"):  # the option or parameter name
        AttackLoss("nope", twin.priors, S)


def test_attack_loss_names_are_checked_in_one_place():
    assert ATTACK_CHOICES[0] == "ensemble" and set(ATTACK_CHOICES[1:]) == set(ATTACK_LOSSES)
    assert attack_losses("ensemble") == ENSEMBLE_LOSSES and set(ENSEMBLE_LOSSES) <= set(ATTACK_LOSSES)
    for name in ATTACK_LOSSES:
        assert attack_losses(name) == (name,) and scoring_loss(name) == name
    assert scoring_loss("ensemble") == "multibox"
    with pytest.raises(LipdetError, match="'bogus'; choose one of: ensemble, multibox") as e:
        attack_losses("bogus")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        AttackLoss("ensemble", torch.zeros(4, 4), S)  # the ensemble is not one loss


def test_image_harm_counts_objects_detected_then_their_scores_then_loss():
    """Columns: minus the objects detected correctly (same digit, IoU >= 0.5), minus the sum of the scores
    they are found at (best correct detection per object), the loss."""
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]]), "labels": torch.tensor([3, 5])}
    hit_both = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 9.0], [20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 10.0, 10.0]]),
                "labels": torch.tensor([3, 5, 3]), "scores": torch.tensor([0.5, 0.25, 0.75])}
    wrong_digit = {"boxes": gt["boxes"].clone(), "labels": torch.tensor([3, 6]), "scores": torch.tensor([0.5, 0.8])}
    shifted = {"boxes": torch.tensor([[6.0, 0.0, 16.0, 10.0]]), "labels": torch.tensor([3]), "scores": torch.tensor([0.9])}
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    assert objects_detected(hit_both, gt).tolist() == [True, True]
    assert object_scores(hit_both, gt).tolist() == [0.75, 0.25]  # the best correct detection of each object
    assert object_scores(wrong_digit, gt).tolist() == [0.5, 0.0] and object_scores(none, gt).tolist() == [0.0, 0.0]
    assert objects_detected(wrong_digit, gt).tolist() == [True, False]
    assert objects_detected(shifted, gt).tolist() == [False, False]  # IoU 4/16 < 0.5
    h = image_harm([hit_both, wrong_digit, shifted, none], [gt] * 4, torch.tensor([0.5, 2.0, 1.0, 3.0]))
    assert h.dtype == torch.float64 and h.tolist() == [[-2.0, -1.0, 0.5], [-1.0, -0.5, 2.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]


def test_worst_per_image_is_lexicographic_and_keeps_the_first_on_ties():
    a = torch.tensor([[-2.0, 9.0], [-1.0, 1.0], [0.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[-1.0, 0.1], [-1.0, 3.0], [0.0, 1.0], [-2.0, 5.0]], dtype=torch.float64)
    c = torch.tensor([[-1.0, 0.2], [-1.0, 3.0], [0.0, 0.5], [-1.0, 2.0]], dtype=torch.float64)
    # image 0: fewer objects detected beats any loss; 1: same count, higher loss, b before the equal c;
    # 2 and 3: ties keep the earliest
    assert worst_per_image([a, b, c]).tolist() == [2, 1, 0, 0]
    assert worst_per_image([a]).tolist() == [0, 0, 0, 0]


def test_ensemble_choice_is_never_better_than_any_loss(twin, batch):
    """PGD with every loss, judged on a stand-in engine: the kept candidate is, per image, at least as bad
    for the model as each loss's own candidate (fewest objects detected, lowest scores, highest MultiBox loss)."""
    images, targets = batch
    judge = AttackLoss("multibox", twin.priors, S)
    cfg = PostprocessConfig(score_threshold=0.01)
    harms = []
    for name in ENSEMBLE_LOSSES:
        res = pgd_l2(twin, images, targets, AttackLoss(name, twin.priors, S), 0.5, 2, seeds=[1, 2, 3, 4])
        with torch.no_grad():
            lo, lg = twin(res.adv)
        dets = postprocess(lo, lg, twin.priors, S, cfg)
        harms.append(image_harm(dets, targets, judge.per_image(lo, lg, targets)))
    pick = worst_per_image(harms)
    for i, k in enumerate(pick.tolist()):
        for h in harms:
            assert tuple(harms[k][i].tolist()) >= tuple(h[i].tolist())
    assert len({tuple(h[0].tolist()) for h in harms}) > 1  # the losses craft different images: not vacuous
