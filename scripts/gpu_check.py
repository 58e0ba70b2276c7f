#!/usr/bin/env python3
"""Run lipdet's CUDA code paths on a GPU and measure them, in one process (Ray not needed).

1. Training steps: the TrainStep of :func:`lipdet.train.recipe.build_training` -- the step every
   Ray Train worker takes -- for ``naive`` and ``sll-spectral`` in fp32, bf16 and fp16 (GradScaler)
   on the GPU: losses stay finite and fall, images/s side by side (batch 32, the pipeline's default,
   and 256); after the mixed-precision steps the ``sll-spectral`` heads are attacked for their
   Lipschitz bound (power iteration, random pairs, gradient ascent): the SLL normalisations run in
   fp32 under autocast, so the measured constant must stay <= the certified one.
2. PGD on the GPU vs the CPU (:func:`lipdet.eval.attacks.pgd_l2`): same model, images and seeds,
   so the adversarial losses must agree to float tolerance; time per image on each.
3. ONNX Runtime's providers, and with ``--onnx`` the deployed-artifact path end to end:
   ``lipdet eval MODEL.onnx --pgd --certify`` with ``--device cuda`` (twin and PGD on the GPU,
   ONNX Runtime's CUDA provider where installed) and ``--device cpu``, results compared.

Prints a summary and writes everything to ``--out``/gpu_check.json. Exits 2 without a CUDA GPU
(``--device cpu`` runs the same checks on the CPU, fp16 skipped: a dry run of the script itself).

Usage::

    python scripts/gpu_check.py --out /tmp/gpu [--onnx runs/sll-spectral/model-fp32.onnx]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import onnxruntime as ort
import torch

from lipdet.data.dataset import resolve_data
from lipdet.eval.attacks import AttackLoss, pgd_l2
from lipdet.models import build_model
from lipdet.models.fold import fold_model
from lipdet.models.lipschitz import empirical_lipschitz, head_bounds
from lipdet.train.loop import collate, load_split
from lipdet.train.recipe import LoopConfig, build_training
from lipdet.train.trainer import default_lr, default_margin_eps, default_model_options

RESULTS: dict[str, Any] = {}


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def section(name: str, fn: Callable[[], Any]) -> None:
    """Run one check; a failure is recorded (with its message) and the others still run."""
    t0 = time.perf_counter()
    log(f"== {name}")
    try:
        RESULTS[name] = fn()
        RESULTS[name + "_s"] = round(time.perf_counter() - t0, 1)
    except Exception as exc:  # noqa: BLE001 - a report of what broke, per section
        RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"   FAILED: {type(exc).__name__}: {exc}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(n_batches: int, batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, list[dict]]]:
    """The first ``n_batches * batch_size`` synthetic SVHN training crops (the validation images held
    out, as in ``lipdet train``), as device batches."""
    cfg = LoopConfig(data_root=str(resolve_data(None)), synthetic=True)
    ds = load_split(cfg, "train", n_batches * batch_size)
    out = []
    for b in range(n_batches):
        images, targets = collate([ds[i] for i in range(b * batch_size, (b + 1) * batch_size)])
        out.append((images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]))
    return out


def train_steps(arch: str, precision: str, device: torch.device, data: list, steps: int, warmup: int = 5) -> dict:
    """``steps`` timed TrainSteps (after ``warmup``) of ``arch`` in ``precision`` on ``device``."""
    cfg = LoopConfig(arch=arch, precision=precision, use_gpu=device.type == "cuda",
                     model_options=default_model_options(arch), margin_eps=default_margin_eps(arch),
                     lr=default_lr(arch))
    total = warmup + steps
    training = build_training(cfg, device, total_steps=total, warmup_steps=2)
    model, step = training.model, training.step
    losses = []
    t0 = None
    for i in range(total):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        images, targets = data[i % len(data)]
        losses.append(float(step(images, targets, i)["loss"].detach()))
    sync(device)
    dt = time.perf_counter() - t0
    n = data[0][0].shape[0]
    res = {"images_per_s": round(steps * n / dt, 1), "ms_per_step": round(1000 * dt / steps, 2),
           "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
           "finite": all(math.isfinite(v) for v in losses), "scaler": step.scaler is not None}
    if arch == "sll-spectral":
        res["lipschitz"] = measured_head_bounds(model.eval(), images[:1].float())
    return res


def measured_head_bounds(model: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """Per scale: the certified cls/loc bounds and a measured lower bound of each (attacked)."""
    x = x.contiguous()
    heads = head_bounds(model)
    out = []
    for i, scale in enumerate(heads["per_scale"]):
        row = {"feature_size": scale["feature_size"]}
        for j, key in enumerate(("loc", "cls")):
            def fn(inp, i=i, j=j):
                return model.head_maps(inp)[j][i].float()

            measured = empirical_lipschitz(fn, x, power_iters=10, ascent_steps=10, pairs=4)
            row[key] = {"certified": round(float(scale[key]), 5), "measured": round(measured, 5),
                        "holds": measured <= float(scale[key]) * (1 + 1e-3)}
        out.append(row)
    return out


def check_training(device: torch.device, batch_sizes: list[int]) -> dict:
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    out: dict[str, Any] = {}
    for bs in batch_sizes:
        steps = 40 if bs <= 64 else 15
        data = batches(4, bs, device)
        for arch in ("naive", "sll-spectral"):
            for p in precisions:
                key = f"{arch}/{p}/batch{bs}"
                r = train_steps(arch, p, device, data, steps)
                out[key] = r
                log(f"   {key}: {r['images_per_s']} img/s, {r['ms_per_step']} ms/step, loss {r['loss_first']} -> "
                    f"{r['loss_last']}, finite {r['finite']}"
                    + (f", bounds hold {all(v['holds'] for s in r['lipschitz'] for v in (s['loc'], s['cls']))}"
                       if "lipschitz" in r else ""))
            base = out[f"{arch}/fp32/batch{bs}"]["images_per_s"]
            for p in precisions[1:]:
                out[f"{arch}/{p}/batch{bs}"]["vs_fp32"] = round(out[f"{arch}/{p}/batch{bs}"]["images_per_s"] / base, 2)
    return out


def check_pgd(device: torch.device) -> dict:
    """PGD on ``device`` vs on the CPU, same model/images/seeds."""
    torch.manual_seed(0)
    model = fold_model(build_model("sll-spectral")).eval()
    images, targets = batches(1, 16, torch.device("cpu"))[0]
    out: dict[str, Any] = {}
    results = {}
    for dev in (torch.device("cpu"), device):
        m = model.to(dev)
        loss = AttackLoss("multibox", m.priors, 74)
        tg = [{k: v.to(dev) for k, v in t.items()} for t in targets]
        x = images.to(dev)
        pgd_l2(m, x[:2], tg[:2], loss, eps=0.5, steps=2)  # warm-up (kernels, allocator)
        sync(dev)
        t0 = time.perf_counter()
        res = pgd_l2(m, x, tg, loss, eps=0.5, steps=10, seeds=list(range(16)))
        sync(dev)
        results[dev.type] = res
        out[f"{dev.type}_ms_per_image"] = round(1000 * (time.perf_counter() - t0) / 16, 2)
        delta = (res.adv - x).flatten(1).norm(dim=1)
        out[f"{dev.type}_max_delta_norm"] = round(float(delta.max()), 6)
    a, b = results["cpu"].loss, results[device.type].loss
    out["loss_cpu"] = [round(float(v), 4) for v in a]
    out["max_rel_loss_diff"] = float(((a - b).abs() / a.abs().clamp_min(1e-6)).max())
    log(f"   PGD eps 0.5 x10: cpu {out['cpu_ms_per_image']} ms/img, {device.type} {out[f'{device.type}_ms_per_image']} "
        f"ms/img, max rel. loss diff {out['max_rel_loss_diff']:.2e}")
    return out


def check_ort() -> dict:
    out = {"version": ort.__version__, "providers": ort.get_available_providers()}
    log(f"   onnxruntime {out['version']}: {out['providers']}")
    return out


def check_eval_cli(onnx: Path, out_dir: Path, limit: int) -> dict:
    """``lipdet eval ONNX --pgd --certify`` with --device cuda, auto and cpu (subprocesses, the real CLI).

    ``cuda`` needs ONNX Runtime's CUDA provider (else: a one-line error, exit 2); ``auto`` runs the
    twin and PGD on the GPU and the engine on the best provider there is.
    """
    out: dict[str, Any] = {}
    for dev in ("cuda", "auto", "cpu"):
        js = out_dir / f"eval-{onnx.stem}-{dev}.json"
        cmd = [sys.executable, "-m", "lipdet.cli", "eval", str(onnx.resolve()), "--pgd", "--certify", "--device", dev,
               "--limit", str(limit), "--json", str(js.resolve()), "--no-progress"]
        t0 = time.perf_counter()
        # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the checkout's
        # lipdet/ folder alone lacks the stage subpackages (they are mapped in at install time)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir)
        row: dict[str, Any] = {"rc": p.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                               "tail": (p.stdout + p.stderr)[-1500:]}
        if p.returncode == 0 and js.is_file():
            row["result"] = json.loads(js.read_text())
            js.unlink()
        out[dev] = row
        res = row.get("result") or {}
        log(f"   eval --device {dev}: rc {p.returncode}, {row['wall_s']} s, provider "
            f"{(res.get('backend') or {}).get('provider')}, clean {(res.get('clean') or {}).get('map_50')}, "
            f"pgd {(res.get('pgd') or {}).get('map_50')}, certified {(res.get('certify') or {}).get('certified_share')}"
            + ("" if p.returncode == 0 else f": {row['tail'].strip().splitlines()[-1] if row['tail'].strip() else ''}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--onnx", type=Path, action="append", default=[], help="ONNX models to evaluate (repeatable)")
    ap.add_argument("--batch-sizes", default="32,256", help="training-step batch sizes to time")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: train,pgd,ort,eval")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to torch (use --device cpu for a dry run)", file=sys.stderr)
        raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    RESULTS["env"] = {"torch": torch.__version__, "python": sys.version.split()[0],
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    log(f"torch {torch.__version__}, device {RESULTS['env']['gpu'] or 'cpu'}")
    t0 = time.perf_counter()
    section("data", lambda: {"train_crops": len(batches(1, 32, torch.device("cpu"))[0][1])})
    if "ort" not in skip:
        section("ort", check_ort)
    if "train" not in skip:
        section("train", lambda: check_training(device, [int(b) for b in args.batch_sizes.split(",")]))
    if "pgd" not in skip:
        section("pgd", lambda: check_pgd(device))
    if "eval" not in skip:
        for onnx in args.onnx:
            section(f"eval:{onnx.name}", lambda onnx=onnx: check_eval_cli(onnx, args.out, args.eval_limit))
    RESULTS["total_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    log(f"wrote {args.out / 'gpu_check.json'} ({RESULTS['total_s']} s)")


if __name__ == "__main__":
    main()
