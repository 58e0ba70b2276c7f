"""``lipdet train`` end to end on real Ray Train workers (the session's one local cluster).

Tiny everything: 40 synthetic train images (4 of them held out for validation), width 0.25, 1-2
epochs; the 16 test images are never read. The 1-worker runs go two at a time (``one_worker_runs``).
"""

from __future__ import annotations

import contextlib
import io
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lipdet.artifacts import load_checkpoint, load_model
from lipdet.cli import main
from lipdet.data.dataset import SVHNDetection
from lipdet.data.split import ValSplit
from lipdet.errors import LipdetError
from lipdet.train.loop import default_threads, load_train_state
from lipdet.train.trainer import TrainOptions, run_training

pytestmark = pytest.mark.ray

TINY = dict(width=0.25, batch_size=8, epochs=2, progress=False)


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, tiny_svhn, tmp_path_factory):
    """``lipdet train`` on two workers for 2 epochs in bf16, rank 1 SIGKILLed at the start of epoch 2.

    The kill happens on the first attempt only (a marker file guards it), so Ray Train must replace
    the worker group and continue from the epoch-1 checkpoint. One run serves the end-to-end and
    the fault-tolerance tests (each Ray worker group start costs seconds on 2 cores).
    """
    root = tmp_path_factory.mktemp("e2e")
    out, marker = root / "runs", root / "killed"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIPDET_TRAIN_FAULT", f"2:1:{marker}")
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exc:
            main([
                "train", "--data", str(tiny_svhn), "--workers", "2", "--epochs", "2", "--width", "0.25",
                "--batch-size", "8", "--out", str(out), "--name", "e2e", "--seed", "3", "--max-failures", "2",
                "--precision", "bf16",
            ])
    return {
        "code": exc.value.code or 0, "out": out, "run": out / "e2e", "marker": marker,
        "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "data": tiny_svhn,
    }


def test_two_workers_end_to_end(two_worker_run):
    r = two_worker_run
    assert r["code"] == 0, r["stderr"]
    run = r["run"]

    # live progress went to stderr while training, the summary and next step to stdout
    assert "epoch 1/2" in r["stderr"] and "epoch 2/2" in r["stderr"]
    assert str(run / "model.pt") in r["stdout"] and "lipdet export" in r["stdout"]

    hist = _history(run)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(h["world_size"] == 2 for h in hist)
    assert all(h["precision"] == "bf16" for h in hist)  # autocast + channels_last under DDP
    assert all(h["threads_per_worker"] == default_threads(2) for h in hist)  # cores // workers
    for key in ("loss", "loc", "cls", "val_map_50", "val_map", "images_per_s", "lr"):
        assert all(isinstance(h[key], float) for h in hist), key
    assert all(0.0 <= h["val_map_50"] <= 1.0 for h in hist)

    # Ray Train's checkpoints (num_to_keep=2) are on disk and hold plain, weights_only state
    ckpts = sorted(p.name for p in run.glob("checkpoint_epoch_*"))
    assert ckpts == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    state = load_train_state(run / ckpts[-1])
    assert state["epoch"] == 2 and state["config"]["arch"] == "naive" and state["config"]["width"] == 0.25
    assert {"model", "optimizer", "scheduler", "history"} <= set(state)

    # model.pt: the lipdet checkpoint format, loadable, with the run's facts
    model = load_model(run / "model.pt")
    meta = load_checkpoint(run / "model.pt").meta
    assert {k: meta["data"][k] for k in ("root", "synthetic")} == {"root": str(r["data"].resolve()), "synthetic": False}
    assert meta["epochs"] == 2 and meta["arch"] == "naive" and meta["run"] == "e2e"
    assert meta["metrics"]["val_map_50"] == hist[-1]["val_map_50"]
    sd = model.state_dict()
    assert set(sd) == set(state["model"])
    for k, v in state["model"].items():  # model.pt holds the last checkpoint's weights
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    with torch.no_grad():
        loc, logits = model(torch.rand(1, 3, 74, 74))
    assert loc.shape[-1] == 4 and logits.shape[-1] == 11

    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (r["out"] / "LATEST").read_text().strip() == "e2e"


def test_the_validation_split_is_held_out_recorded_and_shown(two_worker_run):
    """The run validated on 4 of the 40 train images (the default 10%, seed 0), said so in its start
    line, metrics.jsonl and checkpoint, and recorded exactly which images in the checkpoint and card."""
    r = two_worker_run
    assert r["code"] == 0, r["stderr"]
    label = "validation (4 images held out of train, seed 0)"
    start = next(line for line in r["stderr"].splitlines() if line.startswith("training naive"))
    assert label in start
    assert f"36 train images, {label}" in r["stderr"]  # the workers' own count
    assert all(h["validation"] == label for h in _history(r["run"]))
    ck = load_checkpoint(r["run"] / "model.pt")
    names = [rec.name for rec in SVHNDetection(r["data"], "train").records]
    assert ck.meta["data"]["val"] == ValSplit().record(names)
    assert ck.meta["data"]["val"]["count"] == 4 and ck.meta["validation"] == label
    card = ck.card(ck.build_model())
    card = card if isinstance(card, dict) else card.to_dict()  # the card as its JSON carries it
    assert card["data"]["val"] == ck.meta["data"]["val"]


def test_killed_worker_is_replaced_and_the_run_resumes(two_worker_run):
    """Rank 1 died at the start of epoch 2; the restarted group resumed from the epoch-1 checkpoint."""
    r = two_worker_run
    assert r["code"] == 0, r["stderr"]
    assert r["marker"].is_file(), "the fault was not injected"
    hist = _history(r["run"])
    assert [h["epoch"] for h in hist] == [1, 2]  # epoch 2 once, epoch 1 not redone
    assert hist[0]["resumed_from"] is None
    assert hist[1]["resumed_from"] == 1
    assert all(h["world_size"] == 2 for h in hist)
    assert "resuming after epoch 1" in r["stderr"]
    assert load_checkpoint(r["run"] / "model.pt").meta["epochs"] == 2


def _stopped_then_resumed(data: Path, root: Path) -> dict:
    """A 1-worker run that dies at epoch 2 with no retries left, then ``--resume``-d."""
    out = str(root / "runs")
    marker = root / "killed"
    with pytest.raises(LipdetError) as exc:
        run_training(
            TrainOptions(data=data, workers=1, out=out, name="stopped", max_failures=0, seed=7,
                         fault=f"2:0:{marker}", **TINY),
            echo=lambda s: None,
        )
    stopped = {
        "error": exc.value,
        "history": _history(Path(out) / "stopped"),
        "has_model": (Path(out) / "stopped" / "model.pt").exists(),
    }
    resumed = run_training(TrainOptions(resume="stopped", out=out, workers=1, progress=False), echo=lambda s: None)
    return {"out": out, "stopped": stopped, "resumed": resumed, "data": data}


def _fresh_seed_7(data: Path, root: Path) -> dict:
    """A fresh 1-worker run with the stopped run's seed and settings, start to end."""
    return {"result": run_training(TrainOptions(data=data, workers=1, out=str(root / "runs"), name="again", seed=7,
                                                **TINY), echo=lambda s: None)}


def _margin_sll_spectral(data: Path, root: Path) -> dict:
    """A 1-worker, 1-epoch sll-spectral run with its defaults (margin loss, then calibration); its echoed lines."""
    lines: list[str] = []
    res = run_training(
        TrainOptions(data=data, workers=1, arch="sll-spectral", out=str(root / "runs"), name="cal",
                     width=0.25, batch_size=8, epochs=1, progress=False),
        echo=lines.append,
    )
    return {"result": res, "lines": lines}


@pytest.fixture(scope="module")
def one_worker_runs(ray_cluster, tiny_svhn, tmp_path_factory) -> dict[str, Future]:
    """The module's 1-worker runs, two at a time on the session's 2-CPU cluster: a Ray Train run spends
    most of its seconds starting processes one after another, so a second run fills the other core.

    Independent runs (own folders, own seeds): each still runs start to end exactly as alone. Yields
    each run's finished future: ``.result()`` is its result, or raises its own error in the tests
    that use it (and only there).
    """
    jobs = {"stopped_then_resumed": _stopped_then_resumed, "fresh_seed_7": _fresh_seed_7,
            "margin_sll_spectral": _margin_sll_spectral}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(job, tiny_svhn, tmp_path_factory.mktemp(name)) for name, job in jobs.items()}
    return futures


@pytest.fixture(scope="module")
def stopped_then_resumed(one_worker_runs) -> dict:
    return one_worker_runs["stopped_then_resumed"].result()


def test_resume_continues_a_stopped_run(stopped_then_resumed):
    s = stopped_then_resumed["stopped"]
    assert "--resume stopped" in s["error"].message and s["error"].exit_code != 2
    assert [h["epoch"] for h in s["history"]] == [1] and not s["has_model"]

    res = stopped_then_resumed["resumed"]
    hist = _history(res.run_dir)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["resumed_from"] == 1
    assert hist[0]["loss"] == s["history"][0]["loss"]  # epoch 1 kept, not redone
    meta = load_checkpoint(res.model_path).meta
    assert meta["epochs"] == 2 and meta["train"]["seed"] == 7  # the run's own settings came back


def test_resume_of_a_finished_run_asks_for_more_epochs(stopped_then_resumed):
    with pytest.raises(LipdetError, match="already finished 2 epochs"):
        run_training(TrainOptions(resume="stopped", out=stopped_then_resumed["out"], workers=1), echo=lambda s: None)


def test_seed_makes_a_one_worker_run_repeat_exactly(stopped_then_resumed, one_worker_runs):
    """Same seed, fresh 1-worker CPU run: the same losses as the (stopped, then resumed) run.

    Epoch 1 shows the seed reproduces a run; epoch 2 that resuming from a checkpoint is exact (the
    batch order and augmentation depend only on seed and epoch).
    """
    res = one_worker_runs["fresh_seed_7"].result()["result"]
    mine = _history(res.run_dir)
    theirs = _history(stopped_then_resumed["resumed"].run_dir)
    for a, b in zip(mine, theirs):
        assert (a["loss"], a["loc"], a["cls"], a["val_map_50"]) == (b["loss"], b["loc"], b["cls"], b["val_map_50"])
    sa = load_checkpoint(res.model_path).state_dict
    sb = load_checkpoint(stopped_then_resumed["resumed"].model_path).state_dict
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_margin_trained_sll_spectral_ends_with_calibrated_temperatures(one_worker_runs):
    """sll-spectral trains with the margin loss by default; model.pt then holds class temperatures
    refitted after training (recorded in its meta), the pre-temperature network untouched."""
    run = one_worker_runs["margin_sll_spectral"].result()
    res, lines = run["result"], run["lines"]
    ck = load_checkpoint(res.model_path)
    cal = ck.meta["calibration"]
    assert len(cal["after"]) == 4 and all(0 < t < 1e3 for t in cal["after"])
    assert cal["nll_after"] <= cal["nll_before"] and 0.0 <= cal["val_map_50"] <= 1.0
    model = load_model(res.model_path)
    taus = [model.cls_heads[t].temperature() for t in model.taps]
    assert taus == pytest.approx(cal["after"], rel=1e-5)
    assert any("calibrated the class temperatures" in line for line in lines)
    assert any("with calibrated temperatures" in line and line.startswith("done in") for line in lines)
