"""``--workers 2`` on Ray gives exactly the single-process results (seeds per image, mAP on the driver)."""

from __future__ import annotations

import pytest
import torch

from lipdet.artifacts import save_checkpoint
from lipdet.eval.evaluate import EvalSettings, evaluate
from lipdet.models import build_model

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_svhn):
    root = tmp_path_factory.mktemp("evald")
    data = tiny_svhn
    torch.manual_seed(0)
    model = build_model("naive", width=0.125)
    with torch.no_grad():  # real BatchNorm statistics, so the outputs depend on the input
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model(torch.rand(8, 3, 74, 74))
    model.eval()
    pt = save_checkpoint(root / "model.pt", model, meta={"data": {"root": str(data), "synthetic": False}})
    return pt, data


def test_two_workers_match_one(tiny, ray_cluster):
    """Three batches over two Ray actors (the session's shared cluster) vs one process."""
    pt, data = tiny
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = dict(pgd=True, eps=0.5, steps=2, restarts=2, eps_sweep=(0.25,), certify=True,
                      blackbox="square", queries=3, batch_size=3, limit=8, seed=7, score_threshold=0.1)
        one = evaluate(pt, data=data, settings=EvalSettings(workers=1, **common), log=lambda m: None)
        two = evaluate(pt, data=data, settings=EvalSettings(workers=2, **common), log=lambda m: None)
        # A different seed attacks differently.
        other = evaluate(pt, data=data, log=lambda m: None, settings=EvalSettings(
            pgd=True, eps=0.5, steps=2, restarts=2, batch_size=3, limit=3, seed=8, score_threshold=0.1))
    finally:
        torch.set_num_threads(old)
    a, b = one.to_dict(), two.to_dict()
    a["settings"].pop("workers")
    b["settings"].pop("workers")
    assert a == b
    assert a["pgd"]["loss"] == "ensemble" and len(a["pgd"]["losses"]) > 1  # the default: the per-image worst of losses
    assert [r.index for r in two.records] == list(range(8))
    n_dets = 0
    for r1, r2 in zip(one.records, two.records):
        for which in ("clean", "pgd", "square"):
            d1, d2 = getattr(r1, which), getattr(r2, which)
            for k in ("boxes", "scores", "labels"):
                assert torch.equal(d1[k], d2[k]), (r1.index, which, k)
            n_dets += d1["boxes"].shape[0]
        assert torch.equal(r1.cert["radius"], r2.cert["radius"])
        assert r1.pgd_winner == r2.pgd_winner and set(r1.pgd_by_loss) == set(a["pgd"]["losses"])
        for name, d1 in r1.pgd_by_loss.items():
            assert all(torch.equal(d1[k], r2.pgd_by_loss[name][k]) for k in ("boxes", "scores", "labels"))
        assert r1.loss == r2.loss
    assert n_dets > 0  # the comparison is not vacuous
    assert any(r.loss["pgd"] != s.loss["pgd"] for r, s in zip(one.records, other.records))
