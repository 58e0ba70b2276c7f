"""``lipdet train`` refuses bad input with one line and exit 2, before any Ray worker starts.

Also the pieces of the driver and loop that need no Ray: the schedule, augmentation, progress
bookkeeping, curves and storage helpers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lipdet.cli import main
from lipdet.errors import LipdetError
from lipdet.train import trainer
from lipdet.train.loop import LoopConfig, augment_batch, default_threads, lr_factor
from lipdet.train.plots import plot_curves
from lipdet.train.trainer import ProgressMonitor, RunStorage, TrainOptions, check_address, default_epochs, plan_run


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail loudly if the command gets as far as starting or joining Ray."""

    def boom(*a, **k):
        raise AssertionError("Ray was started before the input was validated")

    monkeypatch.setattr(trainer, "ray_session", boom)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fail(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "workers must be >= 1"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--arch", "resnet"], "Invalid value for '--arch': Value error, 'resnet' is not one of 'naive'"),
        (["--precision", "fp8"], "Invalid value for '--precision'"),
        (["--cpu", "--precision", "fp16"], "fp16 needs a GPU"),
        (["--resume", "no-such-run"], "no run named 'no-such-run'"),
        (["--width", "-1"], "width must be > 0"),
        (["--margin-eps", "0.5"], "margin_eps needs a Lipschitz arch"),
        (["--arch", "sll-l2", "--margin-eps", "-1"], "margin_eps must be >= 0"),
        (["--arch", "sll-spectral", "-O", "pool"], "option expects KEY=VALUE"),
        (["--arch", "sll-spectral", "-O", "pool=avg"], "pool must be one of max, l2"),
        (["--arch", "sll-spectral", "-O", "bogus=1"], "unknown option(s) for arch sll-spectral: bogus"),
        (["-O", "pool=l2"], "unknown option(s) for arch naive: pool"),
    ],
)
def test_bad_options(args, message, tmp_path, capsys, no_ray):
    line = _fail([*args, "--out", str(tmp_path / "runs")], capsys)
    assert message in line


def test_gpu_without_a_gpu(tmp_path, capsys, no_ray):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert "no CUDA GPU is visible" in _fail(["--gpu", "--out", str(tmp_path)], capsys)


def test_data_that_is_not_svhn_format_1(tmp_path, capsys, no_ray):
    bad = tmp_path / "photos"
    bad.mkdir()
    (bad / "cat.png").write_bytes(b"not really")
    assert "not an SVHN format-1 folder" in _fail(["--data", str(bad), "--out", str(tmp_path)], capsys)
    assert "not found" in _fail(["--data", str(tmp_path / "missing"), "--out", str(tmp_path)], capsys)


def test_data_without_a_test_split(tiny_svhn, tmp_path, capsys, no_ray):
    import shutil

    only_train = tmp_path / "svhn"
    shutil.copytree(tiny_svhn / "train", only_train / "train")
    assert "no test/digitStruct.mat" in _fail(["--data", str(only_train), "--out", str(tmp_path)], capsys)


def test_unreachable_address(tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _unused_port()
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in _fail(
        ["--address", f"127.0.0.1:{port}", "--out", str(tmp_path)], capsys
    )
    assert "not HOST:PORT" in _fail(["--address", "nowhere", "--out", str(tmp_path)], capsys)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # the environment variable is checked too
    assert "cannot reach" in _fail(["--out", str(tmp_path)], capsys)


def test_existing_name_and_bad_epoch_env(tiny_svhn, tmp_path, capsys, no_ray, monkeypatch):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    line = _fail(["--data", str(tiny_svhn), "--out", str(tmp_path / "runs"), "--name", "taken"], capsys)
    assert "already exists" in line and "--resume taken" in line
    monkeypatch.setenv("LIPDET_TRAIN_EPOCHS", "many")
    assert "LIPDET_TRAIN_EPOCHS" in _fail(["--data", str(tiny_svhn), "--out", str(tmp_path / "runs")], capsys)


def test_console_script_one_line_error(tmp_path):
    """Through the installed entry point (a fresh process): one line on stderr, exit 2."""
    r = subprocess.run(
        [sys.executable, "-m", "lipdet.cli", "train", "--workers", "0"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: workers must be >= 1, got 0"


def test_help_documents_the_options_and_the_epoch_variable():
    from typer.testing import CliRunner

    from lipdet.cli import app

    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for opt in ("--arch", "--data", "--workers", "--gpu", "--cpu", "--epochs", "--batch-size", "--lr", "--width",
                "--seed", "--out", "--name", "--address", "--max-failures", "--resume", "--precision",
                "LIPDET_TRAIN_EPOCHS", "lipdet train --workers 2"):
        assert opt in r.output, opt


# ------------------------------------------------------------------------------------------
# planning without Ray
# ------------------------------------------------------------------------------------------


def test_plan_defaults_and_epoch_env(tiny_svhn, tmp_path, monkeypatch):
    monkeypatch.setenv("LIPDET_TRAIN_EPOCHS", "3")
    plan = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), gpu=False))
    assert plan.loop.epochs == 3 and default_epochs() == 3
    assert plan.loop.arch == "naive" and plan.loop.batch_size == 32 and plan.loop.lr == 1e-3
    assert plan.loop.data_root == str(tiny_svhn.resolve()) and plan.loop.synthetic is False
    assert plan.run_dir.parent == tmp_path.resolve() and plan.name.startswith("naive-")
    assert plan.use_gpu is False and plan.workers == 2
    monkeypatch.delenv("LIPDET_TRAIN_EPOCHS")
    assert plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), epochs=5)).loop.epochs == 5


def test_model_options_and_margin_reach_the_loop(tiny_svhn, tmp_path):
    assert trainer.parse_model_options(["pool=l2", "loc_scale=1", "learn_loc_scale=false", "x = y"]) == {
        "pool": "l2", "loc_scale": 1, "learn_loc_scale": False, "x": "y"}
    plan = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), arch="sll-spectral", gpu=False,
                                 model_options={"loc_scale": 2.0}, margin_eps=0.25))
    assert plan.loop.model_options == {**trainer.default_model_options("sll-spectral"), "loc_scale": 2.0}
    assert plan.loop.margin_eps == 0.25
    naive = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), gpu=False))
    assert naive.loop.model_options == {} and naive.loop.margin_eps == 0.0


def test_train_margin_ramps_up_with_the_temperature():
    from lipdet.loss import lipschitz_margin
    from lipdet.models import build_model
    from lipdet.train.loop import train_margin

    model = build_model("sll-spectral", cls_temperature=8.0, learn_temperature=False)
    cfg = LoopConfig(arch="sll-spectral", margin_eps=0.5, margin_ramp=0.5)
    assert train_margin(LoopConfig(arch="sll-spectral"), model, 0, 100) is None
    full = train_margin(cfg, model, 60, 100)
    assert full.shape == (model.num_priors,)
    torch.testing.assert_close(full, torch.full_like(full, lipschitz_margin(0.5, 8.0)))
    torch.testing.assert_close(train_margin(cfg, model, 24, 100), full * 0.5)  # step 25 of a 50-step ramp
    learnt = build_model("sll-spectral", cls_temperature=3.0, learn_temperature=True)
    with torch.no_grad():
        learnt.cls_heads["fire9"].log_temperature.fill_(0.0)  # tau 1 on the 9x9 scale only
    taus = learnt.prior_temperatures()
    sizes = learnt.prior_spec.feature_sizes
    a = learnt.prior_spec.anchors_per_location
    start = a * sizes[0] ** 2
    assert torch.allclose(taus[:start], torch.tensor(3.0)) and torch.allclose(taus[start:start + a * 81], torch.tensor(1.0))


def test_resume_refuses_changed_settings(tiny_svhn, tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    loop = LoopConfig(data_root=str(tiny_svhn.resolve()), synthetic=False, epochs=2, seed=1)
    (run / trainer.RUN_FILE).write_text(json.dumps({"loop": loop.to_dict()}))
    with pytest.raises(LipdetError, match="arch was naive"):
        plan_run(TrainOptions(resume="r1", out=str(tmp_path), arch="sll-l2"))
    with pytest.raises(LipdetError, match="model_options were the defaults"):
        plan_run(TrainOptions(resume="r1", out=str(tmp_path), model_options={"pool": "l2"}))
    with pytest.raises(LipdetError, match="margin_eps was 0.0"):
        plan_run(TrainOptions(resume="r1", out=str(tmp_path), margin_eps=0.5))
    plan = plan_run(TrainOptions(resume="r1", out=str(tmp_path), epochs=4))
    assert plan.resumed and plan.loop.epochs == 4 and plan.loop.seed == 1 and plan.name == "r1"


def test_resume_accepts_an_old_run_description_with_loss_options(tiny_svhn, tmp_path):
    """train.json of runs made before loss_options was removed still resumes (the key is ignored)."""
    run = tmp_path / "old"
    run.mkdir()
    loop = LoopConfig(data_root=str(tiny_svhn.resolve()), synthetic=False, epochs=2).to_dict()
    (run / trainer.RUN_FILE).write_text(json.dumps({"loop": {**loop, "loss_options": {"cls_margin": 1.0}}}))
    plan = plan_run(TrainOptions(resume="old", out=str(tmp_path), epochs=3))
    assert plan.resumed and plan.loop.epochs == 3 and "loss_options" not in plan.loop.to_dict()


def test_check_address_accepts_a_live_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        check_address(f"127.0.0.1:{s.getsockname()[1]}")
        check_address(f"ray://127.0.0.1:{s.getsockname()[1]}")
    check_address("auto")


# ------------------------------------------------------------------------------------------
# loop pieces
# ------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[warm - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1 :]))
    assert f[-1] < 0.05 and lr_factor(total, total, warm) == pytest.approx(0.02)


def test_recipe_is_seeded_and_its_schedule_follows_the_run_length():
    from lipdet.train.recipe import build_training

    cfg = LoopConfig(width=0.25, seed=1)
    a = build_training(cfg, torch.device("cpu"), total_steps=100, warmup_steps=10)
    b = build_training(cfg, torch.device("cpu"), total_steps=100, warmup_steps=10)
    assert all(torch.equal(x, y) for x, y in zip(a.raw.state_dict().values(), b.raw.state_dict().values()))
    assert a.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(0, 100, 10))
    for _ in range(50):
        a.scheduler.step()
    a.set_total_steps(60)  # cert_sweep's budget fit: the cosine now ends at step 60
    a.scheduler.step()
    assert a.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * lr_factor(51, 60, 10))
    assert a.step.total_steps == 60
    assert a.scheduler.state_dict()["lr_lambdas"] == [None]  # no schedule copy in checkpoints


def test_threads_per_worker():
    assert default_threads(2, cores=2) == 1
    assert default_threads(1, cores=2) == 2
    assert default_threads(4, cores=2) == 1
    assert default_threads(2, cores=16) == 8


def test_augmentation_keeps_boxes_on_their_digits():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(16, 3, 74, 74)
    targets = []
    for i in range(16):
        images[i, :, 20:50, 30:44] = 1.0  # a white "digit"
        targets.append({"boxes": torch.tensor([[30.0, 20.0, 44.0, 50.0]]), "labels": torch.tensor([i % 10])})
    out, new = augment_batch(images, targets, gen)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    zoomed = 0
    for img, t in zip(out, new):
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        assert 0 <= x1 < x2 <= 74 and 0 <= y1 < y2 <= 74
        inside = img[:, int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
        mask = torch.ones(74, 74, dtype=torch.bool)
        mask[int(y1) - 1 : int(y2) + 2, int(x1) - 1 : int(x2) + 2] = False
        outside = img[:, mask]
        # the digit still contrasts with the background inside its (moved) box
        assert (inside.mean() - outside.mean()).abs() > 0.2
        zoomed += int(x2 - x1 < 13.5)
    assert zoomed > 0  # some images were zoomed out
    assert [t["labels"].item() for t in new] == [i % 10 for i in range(16)]


def test_progress_monitor_writes_one_record_per_epoch_and_forgets_redone_epochs(tmp_path):
    lines: list[str] = []
    mon = ProgressMonitor(sink=None, metrics_path=tmp_path / "m.jsonl", epochs=3, show=False, write=lines.append)
    rec = dict(loss=1.0, loc=0.2, cls=0.6, val_map_50=0.1, val_map=0.05, images_per_s=10.0, lr=1e-3, epochs=3)
    mon.handle({"kind": "start", "world_size": 2, "start_epoch": 0, "resumed_from": None})
    mon.handle({"kind": "epoch", "epoch": 1, **rec})
    mon.handle({"kind": "epoch", "epoch": 2, **rec})
    # the group died in epoch 3 and restarted from the epoch-1 checkpoint: epoch 2 will be redone
    mon.handle({"kind": "start", "world_size": 2, "start_epoch": 1, "resumed_from": 1})
    assert [json.loads(x)["epoch"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1]
    mon.handle({"kind": "epoch", "epoch": 2, **rec, "resumed_from": 1})
    assert [json.loads(x)["epoch"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]
    assert any("epoch 2/3" in x and "resumed from epoch 1" in x for x in lines)


def test_curves_png(tmp_path):
    hist = [dict(epoch=e, loss=3.0 / e, loc=1.0 / e, cls=1.0 / e, val_map_50=0.1 * e, val_map=0.05 * e)
            for e in (1, 2, 3)]
    p = plot_curves(hist, tmp_path / "curves.png", title="t")
    assert p.read_bytes()[:4] == b"\x89PNG"
    assert plot_curves([], tmp_path / "empty.png").is_file()


def test_run_storage_local(tmp_path):
    st = RunStorage(str(tmp_path), "r")
    assert not st.exists() and st.read_text("x.json") is None and not st.remote
    st.write_bytes("x.json", b"{}")
    assert st.exists() and st.exists("x.json") and st.read_text("x.json") == "{}"
    assert Path(st.storage_path) == tmp_path.resolve()


# ------------------------------------------------------------------------------------------
# the validation split (held out of the train split; the test split is never read)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--val-fraction", "0"], "fraction must be > 0 and < 1, got 0.0"),
        (["--val-fraction", "1"], "fraction must be > 0 and < 1, got 1.0"),
        (["--val-count", "0"], "count must be >= 1, got 0"),
        (["--val-count", "40"], "holds out 40 images, but the train split has only 40"),
        (["--val-count", "5", "--val-fraction", "0.2"], "count, not both"),
    ],
)
def test_bad_validation_split(args, message, tiny_svhn, tmp_path, capsys, no_ray):
    """Refused in one line before any work: no run folder, no crop cache beside the data."""
    before = sorted(p.name for p in tiny_svhn.rglob("*"))
    assert message in _fail([*args, "--data", str(tiny_svhn), "--out", str(tmp_path / "runs")], capsys)
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tiny_svhn.rglob("*")) == before


def test_plan_holds_out_the_validation_split_and_the_start_line_says_so(tiny_svhn, tmp_path):
    from lipdet.data.split import ValSplit

    plan = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), gpu=False))
    assert plan.loop.validation == ValSplit() and plan.val_images == 4  # 10% of 40
    line = trainer._start_line(plan, RunStorage(plan.storage_path, plan.name))
    assert "validation (4 images held out of train, seed 0)" in line
    plan = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), gpu=False, val_count=6, val_seed=2))
    assert plan.loop.validation == ValSplit(seed=2, count=6) and plan.val_images == 6
    assert "validation (6 images held out of train, seed 2)" in trainer._start_line(
        plan, RunStorage(plan.storage_path, plan.name))


def test_the_model_trains_only_on_images_outside_the_validation_split(tiny_svhn):
    """Every batch every rank of a 2-worker run draws, over two epochs, is a training image; the
    validation images never appear (pixel for pixel)."""
    from lipdet.train.loop import first, load_parts, load_split, make_train_loader

    cfg = LoopConfig(data_root=str(tiny_svhn.resolve()), synthetic=False, batch_size=8)
    train_ds, val_ds = load_parts(cfg)
    val_images = torch.stack([val_ds[i][0] for i in range(len(val_ds))]).flatten(1)
    seen = []
    for epoch in (1, 2):
        for rank in (0, 1):
            loader, sampler, _ = make_train_loader(first(train_ds, 0), cfg, rank, 2)
            sampler.set_epoch(epoch)
            seen += [images.flatten(1) for images, _ in loader]
    seen_images = torch.cat(seen)
    assert len(seen_images) >= len(train_ds) and len(val_ds) == 4
    assert not (seen_images[:, None, :] == val_images[None, :, :]).all(-1).any()
    with pytest.raises(ValueError, match="never reads the test split"):
        load_split(cfg, "test")
    assert len(load_split(cfg, "val", 3)) == 3 and len(load_split(cfg, "train", 5)) == 5


def test_resume_keeps_the_recorded_validation_split(tiny_svhn, tmp_path):
    from lipdet.data.split import ValSplit

    run = tmp_path / "r2"
    run.mkdir()
    loop = LoopConfig(data_root=str(tiny_svhn.resolve()), synthetic=False, epochs=2,
                      val_split=ValSplit(seed=3, fraction=0.2).to_dict())
    (run / trainer.RUN_FILE).write_text(json.dumps({"loop": loop.to_dict()}))
    with pytest.raises(LipdetError, match=r"its own validation split \(.*fraction.0\.2.*seed.3\): .*seed.4 would change"):
        plan_run(TrainOptions(resume="r2", out=str(tmp_path), val_seed=4))
    with pytest.raises(LipdetError, match="own validation split .*count.8 would change it"):
        plan_run(TrainOptions(resume="r2", out=str(tmp_path), val_count=8))
    for same in ({}, {"val_seed": 3}, {"val_seed": 3, "val_fraction": 0.2}):
        plan = plan_run(TrainOptions(resume="r2", out=str(tmp_path), epochs=4, **same))
        assert plan.loop.validation == ValSplit(seed=3, fraction=0.2) and plan.val_images == 8


def test_curves_title_names_the_validation_split(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    titles: list[str] = []
    real = Figure.savefig

    def spy(self, *a, **k):
        titles.extend(ax.get_title() for ax in self.axes)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    label = "validation (4 images held out of train, seed 0)"
    hist = [dict(epoch=e, loss=1.0, loc=0.5, cls=0.5, val_map_50=0.1, val_map=0.05, validation=label) for e in (1, 2)]
    plot_curves(hist, tmp_path / "curves.png")
    assert label in titles and not any("test" in t for t in titles)


# ------------------------------------------------------------------------------------------
# precision: auto by default, resolved once on the driver (issue #17)
# ------------------------------------------------------------------------------------------


def test_auto_precision_is_resolved_on_the_driver_and_recorded(tiny_svhn, tmp_path):
    """The default is auto; the plan carries what the hardware module chose and why, the start line says
    both, train.json records the resolved precision (never "auto")."""
    from lipdet.hardware import choose_precision

    assert TrainOptions().precision == "auto"
    plan = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), gpu=False))
    expected = choose_precision("auto", torch.device("cpu"))
    assert plan.precision == expected and plan.loop.precision == expected.precision in ("fp32", "bf16")
    storage = RunStorage(plan.storage_path, plan.name)
    line = trainer._start_line(plan, storage)
    assert f"{expected.precision} ({expected.reason})" in line and "a bf16 matmul ran" in line
    plan.run_dir.mkdir(parents=True)
    trainer._write_run_record(plan, storage)
    assert json.loads((plan.run_dir / trainer.RUN_FILE).read_text())["loop"]["precision"] == expected.precision
    explicit = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), gpu=False, precision="fp32"))
    assert explicit.loop.precision == "fp32" and explicit.precision.reason == "as requested"


def test_explicit_bf16_where_it_is_slower_prints_one_warning_line(tiny_svhn, tmp_path, capsys, no_ray, monkeypatch):
    """On an AVX2-only CPU (issue #17's EPYC: bf16 matmul 0.10x fp32) ``--precision bf16`` still trains in bf16,
    after one warning line with the measured reason; auto picks fp32 there and says why."""
    from lipdet import hardware

    epyc = hardware.Machine("AMD EPYC 7B13", "AVX2", frozenset({"avx2", "fma"}), 2)
    monkeypatch.setattr(hardware, "machine", lambda: epyc)
    monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda: 0.1)
    with pytest.raises(AssertionError, match="Ray was started"):  # no_ray: everything before Ray has run
        main(["train", "--data", str(tiny_svhn), "--out", str(tmp_path / "runs"), "--cpu", "--precision", "bf16"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert ", bf16 (as requested), batch" in lines[0]
    warnings = [x for x in lines if x.startswith("warning:")]
    assert warnings == [lines[1]] and "slower than fp32" in lines[1] and "0.10x" in lines[1] and "AVX2" in lines[1]
    with pytest.raises(AssertionError, match="Ray was started"):
        main(["train", "--data", str(tiny_svhn), "--out", str(tmp_path / "runs"), "--cpu"])
    err = capsys.readouterr().err
    assert ", fp32 (auto: no native bf16 (no AMX/AVX512-BF16) on AVX2, a bf16 matmul ran 0.10x fp32 here)" in err
    assert "warning" not in err


def test_resume_keeps_the_recorded_precision(tiny_svhn, tmp_path):
    run = tmp_path / "r3"
    run.mkdir()
    loop = LoopConfig(data_root=str(tiny_svhn.resolve()), synthetic=False, epochs=2, precision="bf16")
    (run / trainer.RUN_FILE).write_text(json.dumps({"loop": loop.to_dict()}))
    plan = plan_run(TrainOptions(resume="r3", out=str(tmp_path), epochs=4, gpu=False))
    assert plan.loop.precision == "bf16" and plan.precision.reason == "as the run recorded it"
    assert "bf16 (as the run recorded it)" in trainer._start_line(plan, RunStorage(plan.storage_path, plan.name))
    again = plan_run(TrainOptions(resume="r3", out=str(tmp_path), epochs=4, gpu=False, precision="fp32"))
    assert again.loop.precision == "fp32"  # an explicit precision is this call's choice


def test_precision_waits_for_the_cluster_when_the_device_does(tiny_svhn, tmp_path, monkeypatch):
    """With --address and neither --gpu nor --cpu the cluster decides the device, then the precision
    (here a cluster without GPUs: Ray's resource queries are replaced by their answer)."""
    assert trainer.resolve_precision("auto", None) is None and trainer.resolve_precision("bf16", None) is None
    assert trainer.resolve_precision("fp32", None).precision == "fp32"
    plan = plan_run(TrainOptions(data=tiny_svhn, out=str(tmp_path), gpu=False))
    plan.precision, plan.use_gpu, plan.loop.precision = None, None, "auto"
    assert "auto (resolved once the cluster has decided GPU or CPU)" in trainer._start_line(
        plan, RunStorage(plan.storage_path, plan.name))
    monkeypatch.setattr(trainer, "cluster_gpus", lambda: 0.0)
    monkeypatch.setattr(trainer, "check_resources", lambda workers, use_gpu: None)
    assert trainer._settle_devices(plan) is True
    assert plan.use_gpu is False and plan.loop.precision == plan.precision.precision in ("fp32", "bf16")


# ------------------------------------------------------------------------------------------
# validation sharded over the workers: the same detections and map_50 as one worker
# ------------------------------------------------------------------------------------------

_SHARD_RANK = """
import json, os, sys
import torch, torch.distributed as dist
from lipdet.models import build_model
from lipdet.train.loop import LoopConfig, evaluate, load_split, validation_detections

cfg = LoopConfig.from_dict(json.loads(sys.argv[1]))
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
model = build_model(cfg.arch, width=cfg.width)
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
ds, cpu = load_split(cfg, "val"), torch.device("cpu")
preds = validation_detections(model, ds, cfg, cpu, model.priors, rank, world, cfg.batch_size // world)
val = evaluate(model, ds, cfg, cpu, model.priors, rank, world, cfg.batch_size // world)
if rank == 0:
    torch.save({"preds": preds, "val": val}, sys.argv[3])
dist.destroy_process_group()
"""


def test_validation_sharded_over_two_workers_equals_one_worker(tiny_svhn, tmp_path):
    """Two gloo ranks each predict their half of the validation images; rank 0 gathers them and gets the
    detections and the map_50 of one worker, image for image."""
    from lipdet.data import detection_collate
    from lipdet.data.split import ValSplit
    from lipdet.loss import MultiBoxLoss
    from lipdet.models import build_model
    from lipdet.train.loop import evaluate, load_split, validation_detections

    cfg = LoopConfig(arch="naive", width=0.25, data_root=str(tiny_svhn.resolve()), synthetic=False, batch_size=32,
                     val_split=ValSplit(count=15).to_dict())  # odd: the ranks' slices differ in size
    val_ds = load_split(cfg, "val")
    torch.manual_seed(0)
    model = build_model("naive", width=0.25)
    x, t = detection_collate([val_ds[i] for i in range(len(val_ds))])
    crit, opt = MultiBoxLoss(model.priors, cfg.input_size), torch.optim.Adam(model.parameters(), 5e-3)
    for _ in range(40):  # over-fitted on these images: real detections to compare, not an empty list
        opt.zero_grad()
        crit(*model(x), t)["loss"].backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    one = validation_detections(model, val_ds, cfg, torch.device("cpu"), model.priors, 0, 1, cfg.batch_size)
    val_one = evaluate(model, val_ds, cfg, torch.device("cpu"), model.priors, 0, 1, cfg.batch_size)
    assert val_one["map_50"] > 0 and sum(len(d["scores"]) for _, d, _ in one) > 0

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_unused_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _SHARD_RANK, json.dumps(cfg.to_dict()), str(tmp_path / "weights.pt"),
                               str(tmp_path / "rank0.pt")], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    two = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert two["val"] == val_one
    assert [i for i, _, _ in two["preds"]] == [i for i, _, _ in one] == list(range(15))
    for (_, d2, t2), (_, d1, t1) in zip(two["preds"], one):
        assert torch.equal(t2["boxes"], t1["boxes"]) and torch.equal(t2["labels"], t1["labels"])
        assert torch.equal(d2["labels"], d1["labels"])
        torch.testing.assert_close(d2["boxes"], d1["boxes"], rtol=0, atol=1e-4)  # batch of 8 vs 15: same image maths
        torch.testing.assert_close(d2["scores"], d1["scores"], rtol=0, atol=1e-6)
