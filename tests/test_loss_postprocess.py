import pytest
import torch

from torchvision.ops import box_iou

from lipdet.boxes import PriorSpec, cxcywh_to_xyxy, encode, make_priors
from lipdet.loss import MultiBoxLoss, hard_negatives, match_targets
from lipdet.postprocess import PostprocessConfig, postprocess

S = 74


def _target():
    return {"boxes": torch.tensor([[10.0, 12.0, 24.0, 40.0], [30.0, 10.0, 46.0, 44.0]]), "labels": torch.tensor([3, 0])}


def test_every_ground_truth_gets_a_prior():
    priors = make_priors(PriorSpec())
    loc_t, cls_t = match_targets([_target()], priors, S)
    assert set(cls_t[0].unique().tolist()) == {0, 1, 4}  # background, digit 0 -> 1, digit 3 -> 4
    assert (cls_t[0] == 1).sum() >= 1 and (cls_t[0] == 4).sum() >= 1


def _match_one_by_one(targets, priors, input_size, iou_threshold=0.5):
    """Reference matcher: the textbook per-image SSD assignment, one image and one box at a time."""
    p_xyxy = cxcywh_to_xyxy(priors)
    loc_t = torch.zeros(len(targets), priors.shape[0], 4)
    cls_t = torch.zeros(len(targets), priors.shape[0], dtype=torch.long)
    for i, t in enumerate(targets):
        boxes = t["boxes"].float() / input_size
        if boxes.numel() == 0:
            continue
        iou = box_iou(boxes, p_xyxy)
        best_gt_iou, best_gt = iou.max(dim=0)
        for j, prior in enumerate(iou.argmax(dim=1).tolist()):  # later boxes win a shared prior
            best_gt_iou[prior], best_gt[prior] = 2.0, j
        cls = t["labels"][best_gt] + 1
        cls[best_gt_iou < iou_threshold] = 0
        cls_t[i] = cls
        loc_t[i] = torch.where((cls > 0)[:, None], encode(boxes[best_gt], priors), 0.0)
    return loc_t, cls_t


def _random_targets(gen, n):
    targets = []
    for _ in range(n):
        k = int(torch.randint(0, 6, (1,), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * 50
        wh = 4 + torch.rand(k, 2, generator=gen) * 30
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp_max(S)], 1), "labels": torch.randint(0, 10, (k,), generator=gen)})
    return targets


def test_batched_matching_equals_the_per_image_reference():
    gen = torch.Generator().manual_seed(0)
    priors = make_priors(PriorSpec())
    for _ in range(20):
        targets = _random_targets(gen, 8)
        targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}  # no object
        loc_t, cls_t = match_targets(targets, priors, S)
        ref_loc, ref_cls = _match_one_by_one(targets, priors, S)
        assert torch.equal(cls_t, ref_cls)
        torch.testing.assert_close(loc_t, ref_loc, rtol=0, atol=1e-5)
        assert (cls_t[0] == 0).all() and (loc_t[0] == 0).all()
    # two copies of one box claim the same best prior: the later one keeps it
    twin = {"boxes": torch.tensor([[10.0, 12.0, 24.0, 40.0]] * 2), "labels": torch.tensor([3, 7])}
    _, cls_t = match_targets([twin], priors, S)
    best = box_iou(twin["boxes"][:1] / S, cxcywh_to_xyxy(priors)).argmax()
    assert cls_t[0, best] == 8
    # an empty batch of objects
    _, cls_t = match_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2, priors, S)
    assert cls_t.shape == (2, priors.shape[0]) and (cls_t == 0).all()


def test_hard_negatives_pick_the_highest_losses_per_image():
    gen = torch.Generator().manual_seed(1)
    ce = torch.rand(4, 50, generator=gen)
    pos = torch.zeros(4, 50, dtype=torch.bool)
    pos[0, :2] = True  # 6 negatives
    pos[1, :20] = True  # 3 * 20 > 49: capped at 49
    # image 2: no positives, still the 3 hardest; image 3: one positive, 3 negatives
    pos[3, 7] = True
    neg = hard_negatives(ce, pos)
    for i, want in enumerate((6, 49, 3, 3)):
        assert int(neg[i].sum()) == want
        loss = ce[i].masked_fill(pos[i], 0.0)
        chosen, rest = loss[neg[i]], loss[~neg[i]]
        assert chosen.min() >= rest.max()  # the hardest ones, nothing easier


def test_loss_decreases_on_tiny_overfit_batch():
    torch.manual_seed(0)
    priors = make_priors(PriorSpec())
    loc = torch.zeros(1, priors.shape[0], 4, requires_grad=True)
    logits = torch.zeros(1, priors.shape[0], 11, requires_grad=True)
    crit = MultiBoxLoss(priors, S)
    opt = torch.optim.Adam([loc, logits], lr=0.1)
    first = None
    for _ in range(150):
        out = crit(loc, logits, [_target()])
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.25 * first
    assert set(out) == {"loss", "loc", "cls"}


def test_postprocess_on_hand_made_score_maps():
    priors = make_priors(PriorSpec())
    p = priors.shape[0]
    logits = torch.full((1, p, 11), -10.0)
    logits[..., 0] = 10.0  # background everywhere
    want = torch.tensor([[0.2, 0.1, 0.4, 0.6], [0.5, 0.2, 0.8, 0.7]])
    loc = torch.zeros(1, p, 4)
    from lipdet.boxes import cxcywh_to_xyxy
    from torchvision.ops import box_iou

    for box, digit in zip(want, (7, 2)):
        iou = box_iou(box[None], cxcywh_to_xyxy(priors))[0]
        best = iou.topk(3).indices  # three overlapping priors predict the same object
        logits[0, best, 0] = -10.0
        logits[0, best, digit + 1] = 10.0
        loc[0, best] = encode(box.expand(3, 4), priors[best])
    dets = postprocess(loc, logits, priors, S, PostprocessConfig())[0]
    assert dets["labels"].tolist() in ([7, 2], [2, 7])
    order = dets["labels"].argsort(descending=True)
    torch.testing.assert_close(dets["boxes"][order], want * S, atol=1e-3, rtol=1e-4)
    assert (dets["scores"] > 0.99).all()


def test_postprocess_threshold_and_top_k():
    priors = make_priors(PriorSpec())
    logits = torch.randn(2, priors.shape[0], 11)
    dets = postprocess(torch.zeros(2, priors.shape[0], 4), logits, priors, S, PostprocessConfig(0.05, 0.3, 5))
    for d in dets:
        assert len(d["boxes"]) <= 5
        assert (d["scores"] > 0.05).all()
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= S).all()


def test_lipschitz_margin_option():
    """cls_margin raises the non-target logits of positive anchors before the CE: same loss as shifting
    by hand, background anchors untouched, and it keeps pushing past a lead that plain CE already
    considers nearly solved. A per-prior margin (learnt temperatures) works per call."""
    import math

    import torch.nn.functional as F

    from lipdet.loss import lipschitz_margin

    torch.manual_seed(0)
    priors = make_priors(PriorSpec())
    loc = torch.zeros(1, priors.shape[0], 4)
    logits = torch.randn(1, priors.shape[0], 11)
    plain = MultiBoxLoss(priors, S)
    _, cls_t = match_targets([_target()], priors, S)
    pos = (cls_t > 0).float().unsqueeze(-1)
    assert 0 < pos.sum() < pos.numel()
    shifted = logits + 2.0 * (1 - F.one_hot(cls_t, 11).float()) * pos
    torch.testing.assert_close(plain(loc, logits, [_target()], cls_margin=2.0)["cls"],
                               plain(loc, shifted, [_target()])["cls"])
    # per prior: 2 on the positives equals a scalar 2; negatives never matter
    per_prior = torch.where(cls_t[0] > 0, torch.tensor(2.0), torch.tensor(50.0))
    torch.testing.assert_close(plain(loc, logits, [_target()], cls_margin=per_prior)["cls"],
                               plain(loc, logits, [_target()], cls_margin=2.0)["cls"])
    torch.testing.assert_close(plain(loc, logits, [_target()], cls_margin=0.0)["cls"], plain(loc, logits, [_target()])["cls"])
    tau = torch.full((priors.shape[0],), 4.0)
    torch.testing.assert_close(lipschitz_margin(0.5, tau), torch.full_like(tau, math.sqrt(2) * 2.0))
    # a lead of 3 logits: plain CE is small, the margin loss (margin 5) is not
    lead = torch.zeros(1, priors.shape[0], 11)
    lead.scatter_(2, cls_t[..., None], 3.0)
    assert plain(loc, lead, [_target()], cls_margin=5.0)["cls"] > 3 * plain(loc, lead, [_target()])["cls"]
    assert lipschitz_margin(0.5, 10.0) == pytest.approx(math.sqrt(2) * 5.0)
