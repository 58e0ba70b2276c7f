"""Post-hoc class-temperature calibration and the training-time temperature cap (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from lipdet.data.dataset import SVHNDetection
from lipdet.loss import MultiBoxLoss
from lipdet.models import build_model
from lipdet.train.calibrate import fit_class_temperatures, learnt_temperature_heads
from lipdet.train.loop import LOG_TEMPERATURE_CAP, LoopConfig, TrainStep, collate


def _runaway_model() -> torch.nn.Module:
    """A tiny sll-spectral with the 9x9 class temperature run away to 1e5 (as after margin training)."""
    torch.manual_seed(0)
    model = build_model("sll-spectral", width=0.25).eval()
    with torch.no_grad():
        model.cls_heads[model.taps[1]].log_temperature.fill_(math.log(1e5))
    return model


def test_calibration_refits_temperatures_and_keeps_every_certificate(tiny_svhn):
    ds = SVHNDetection(tiny_svhn, split="train", input_size=74, seed=0)
    model = _runaway_model()
    x = torch.stack([ds[i][0] for i in range(8)])
    with torch.no_grad():
        logits0 = model(x)[1]
        z0 = logits0 / model.prior_temperatures().view(1, -1, 1)
        saturated0 = float((logits0.softmax(-1)[..., 1:].max(-1).values >= 1.0).float().mean())
    report = fit_class_temperatures(model, ds, limit=16, steps=60)
    assert report["before"][1] == pytest.approx(1e5, rel=1e-4)
    assert all(0.0 < t < 1e3 for t in report["after"]), report
    assert report["nll_after"] < report["nll_before"]
    with torch.no_grad():
        logits1 = model(x)[1]
        z1 = logits1 / model.prior_temperatures().view(1, -1, 1)
        saturated1 = float((logits1.softmax(-1)[..., 1:].max(-1).values >= 1.0).float().mean())
    # pre-temperature logits (hence every certified class radius) unchanged; scores no longer saturated
    torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-6)
    assert saturated0 > 0.0 and saturated1 == 0.0


def test_calibration_skips_models_without_learnt_temperatures(tiny_svhn):
    ds = SVHNDetection(tiny_svhn, split="train", input_size=74, seed=0)
    for model in (build_model("naive", width=0.25), build_model("sll-spectral", width=0.25, learn_temperature=False)):
        assert learnt_temperature_heads(model) == []
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert "skipped" in fit_class_temperatures(model, ds, limit=4)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_step_caps_a_runaway_temperature(tiny_svhn):
    ds = SVHNDetection(tiny_svhn, split="train", input_size=74, seed=0)
    model = _runaway_model().train()
    with torch.no_grad():
        model.cls_heads[model.taps[1]].log_temperature.fill_(LOG_TEMPERATURE_CAP + 3.0)
    cfg = LoopConfig(arch="sll-spectral", width=0.25, margin_eps=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = TrainStep(cfg, model, MultiBoxLoss(model.priors, 74), opt, sched, torch.device("cpu"), 10)
    assert len(step.log_temperatures) == len(model.taps)
    images, targets = collate([ds[i] for i in range(4)])
    losses = step(images, targets, 0)
    assert math.isfinite(float(losses["loss"]))
    assert max(float(p) for p in step.log_temperatures) == pytest.approx(LOG_TEMPERATURE_CAP)  # float32 of the cap


def test_run_calibration_and_its_validation_never_read_the_test_split(tiny_svhn, tmp_path):
    """``lipdet train``'s post-training step refits on the training images and validates on the
    held-out ones: with the test split's annotations destroyed it gives the same validation score
    as :func:`evaluate` on the held-out images."""
    import shutil

    from lipdet.train.loop import evaluate, load_split
    from lipdet.train.trainer import TrainOptions, calibrate_run_model, plan_run

    data = tmp_path / "svhn"
    shutil.copytree(tiny_svhn, data)
    (data / "test" / "digitStruct.mat").write_bytes(b"not a MATLAB file")
    plan = plan_run(TrainOptions(data=data, out=str(tmp_path / "runs"), arch="sll-spectral", width=0.25, gpu=False))
    model = _runaway_model()
    lines: list[str] = []
    report = calibrate_run_model(plan, model, lines.append)
    assert report is not None and report["images"] == 36  # 40 train images less the 4 held out
    val = evaluate(model, load_split(plan.loop, "val"), plan.loop, torch.device("cpu"), model.priors)
    assert report["val_map_50"] == val["map_50"] and report["val_map"] == val["map"]
    assert any(line.startswith("calibrated the class temperatures") for line in lines)
