#!/usr/bin/env python3
"""Certified-training sweep: train ``sll-spectral`` variants side by side, then certify each.

Each variant trains in its own process (they share one GPU well: the model is small and the steps
are launch-bound) with :func:`lipdet.train.recipe.build_training` -- the model, loss, optimiser and
step that ``lipdet train`` builds on every Ray worker -- on the built-in synthetic SVHN (its 4000 train
crops less the 400 validation crops of ``lipdet train``'s default :class:`lipdet.data.split.ValSplit`;
batch 32, augmentation, Adam at the arch's lr, one epoch of warm-up then cosine, the arch's
training defaults plus the variant's changes). It trains against a time budget: the first epoch is
timed and the epoch count set so the run fits ``--budget-s`` (at most ``--max-epochs``); schedule
and margin ramp follow that count.

Every ``--eval-every`` epochs and at the end: validation map_50 on the validation images; at the end,
the certificate of :mod:`lipdet.eval.certify` on the parametrised model (certified share of the
validation digits at several radii, radius quantiles). The sweep picks variants, so it never looks at
the test split: the final numbers come from ``lipdet experiment`` / ``lipdet eval`` on the test
split. Writes ``OUT/NAME.pt`` (a lipdet checkpoint: ``lipdet export`` takes it, so the deployed
artifact can be certified again) and ``OUT/sweep.json``.

This is the experiment harness behind docs/results/beat-the-seed.md, not part of the toolchain:
``lipdet train --arch sll-spectral --epochs E -O KEY=VALUE --margin-eps M`` trains the same variant
through Ray Train.

Usage::

    python scripts/cert_sweep.py --out /tmp/sweep --variants default,l2pool --budget-s 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lipdet.artifacts import load_checkpoint, save_checkpoint
from lipdet.data.dataset import resolve_data
from lipdet.certificates import AnchorBounds
from lipdet.eval.certify import certified_share, certify_image
from lipdet.models.lipschitz import head_bounds
from lipdet.postprocess import postprocess
from lipdet.train.calibrate import fit_class_temperatures
from lipdet.train.loop import augment_batch, evaluate, load_split, validation_record
from lipdet.train.recipe import PRECISIONS, LoopConfig, build_training
from lipdet.train.trainer import default_lr, default_margin_eps, default_model_options

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "eps1": {"margin_eps": 1.0},
    "width2": {"width": 2.0},
    "l2pool": {"options": {"pool": "l2", "shrink": "conv"}},
    "l2pool-eps1": {"options": {"pool": "l2", "shrink": "conv"}, "margin_eps": 1.0},
    "l2pool-truncate": {"options": {"pool": "l2"}},
}
"""Changes to ``lipdet train --arch sll-spectral``'s defaults: ``options`` (``-O``), ``margin_eps``,
``width``, ``arch``."""

CERT_EPS = (0.025, 0.05, 0.1, 0.25, 0.5)


def loop_config(spec: dict[str, Any], use_gpu: bool, precision: str = "fp32") -> LoopConfig:
    """``lipdet train --arch sll-spectral``'s config (defaults, synthetic SVHN, seed 0) with ``spec``'s changes."""
    arch = spec.get("arch", "sll-spectral")
    return LoopConfig(
        arch=arch, width=float(spec.get("width", 1.0)),
        model_options={**default_model_options(arch), **spec.get("options", {})},
        margin_eps=float(spec.get("margin_eps", default_margin_eps(arch))), lr=default_lr(arch),
        data_root=str(resolve_data(None)), synthetic=True, use_gpu=use_gpu, precision=precision, seed=0,
    )


@torch.no_grad()
def certify(model: torch.nn.Module, ds, device: torch.device) -> dict[str, Any]:
    """eval/certify's certificate of ``model`` on every image of ``ds`` (parametrised model)."""
    model.eval()
    bounds = head_bounds(model)
    ab = AnchorBounds.from_head_bounds(bounds, model.priors.shape[0], model.prior_spec.feature_sizes)
    priors = model.priors.cpu()
    radii, detected = [], []
    for s in range(0, len(ds), 100):
        items = [ds[i] for i in range(s, min(len(ds), s + 100))]
        x = torch.stack([it[0] for it in items]).to(device)
        loc, logits = (t.float().cpu() for t in model(x))
        dets = postprocess(loc, logits, priors, 74)
        for i, (_, t) in enumerate(items):
            c = certify_image(loc[i], logits[i], priors, 74, dets[i], {"boxes": t["boxes"], "labels": t["labels"]}, ab)
            radii.append(c["radius"])
            detected.append(c["detected"])
    r, d = torch.cat(radii), torch.cat(detected)
    rd = r[d] if d.any() else torch.zeros(1, dtype=torch.float64)
    return {
        "objects": int(d.numel()),
        "detected": round(float(d.double().mean()), 4),
        "certified": {str(e): round(certified_share(r, d, e), 5) for e in CERT_EPS},
        "radius_median": round(float(rd.median()), 4),
        "radius_p90": round(float(torch.quantile(rd, 0.9)), 4),
        "radius_max": round(float(rd.max()), 4),
        "bounds": [{k: round(float(p[k]), 3) for k in ("feature_size", "cls", "loc")} for p in bounds["per_scale"]],
    }


def calibrated_certificate(model: torch.nn.Module, cfg: LoopConfig, train_ds, val_ds, device: torch.device) -> dict:
    """What ``lipdet train`` does after margin training -- refit the class temperatures on the training
    images (scores only) -- then the validation map_50 and the certificate (which do not read test data)."""
    calib = fit_class_temperatures(model, train_ds) if cfg.margin_eps > 0 else None
    val = evaluate(model, val_ds, cfg, device, model.priors.to(device), mem_format=cfg.memory_format)
    return {"calibration": calib, "val_map_50": round(val["map_50"], 4), "certificate": certify(model, val_ds, device)}


def recertify(checkpoint: Path, device: torch.device) -> dict:
    """:func:`calibrated_certificate` of a checkpoint this script wrote (``--recertify``)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = LoopConfig.from_dict({k: v for k, v in ckpt.meta["train"].items() if k != "by"})
    model = ckpt.build_model().to(device)
    return calibrated_certificate(model, cfg, load_split(cfg, "train"), load_split(cfg, "val"), device)


def run_variant(name: str, out: Path, device: torch.device, budget_s: float, max_epochs: int, eval_every: int,
                limit: int = 0, precision: str = "fp32") -> dict:
    t_start = time.perf_counter()
    cfg = loop_config(VARIANTS[name], device.type == "cuda", precision)
    train_ds, val_ds = load_split(cfg, "train", limit), load_split(cfg, "val", limit // 4)
    images = torch.stack([train_ds[i][0] for i in range(len(train_ds))]).to(device)
    targets = [{k: train_ds[i][1][k].to(device) for k in ("boxes", "labels")} for i in range(len(train_ds))]
    spe = len(train_ds) // cfg.batch_size
    plan = {"epochs": max_epochs}
    # one epoch of warm-up; the length is fixed after the first epoch (set_total_steps below)
    training = build_training(cfg, device, total_steps=spe * max_epochs, warmup_steps=spe)
    model, priors, step_fn, mem = training.model, training.priors, training.step, cfg.memory_format
    history: list[dict[str, Any]] = []
    aug = torch.Generator().manual_seed(cfg.seed)
    epoch, step, t_train = 0, 0, time.perf_counter()
    while epoch < plan["epochs"]:
        epoch += 1
        t0 = time.perf_counter()
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for b in range(spe):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, t = augment_batch(images[idx.to(device)], [targets[int(i)] for i in idx], aug)
            losses = step_fn(x, t, step)
            sums += torch.stack([losses["loss"].detach(), losses["loc"].detach(), losses["cls"].detach()]).double()
            step += 1
        row = {"epoch": epoch, **{k: round(float(v) / spe, 4) for k, v in zip(("loss", "loc", "cls"), sums)},
               "epoch_s": round(time.perf_counter() - t0, 2)}
        if epoch == 1:  # fit the run into the budget (final validation + certificate reserved)
            left = budget_s - (time.perf_counter() - t_start) - 30.0
            plan["epochs"] = max(1, min(max_epochs, 1 + int(left // max(row["epoch_s"], 1e-3))))
            training.set_total_steps(spe * plan["epochs"])
        if epoch % eval_every == 0 or epoch == plan["epochs"]:
            row["val_map_50"] = round(evaluate(model, val_ds, cfg, device, priors.to(device), mem_format=mem)["map_50"], 4)
            row["tau"] = [round(float(model.cls_heads[t].temperature()), 2) for t in model.taps]
        history.append(row)
        print(f"[{name}] {json.dumps(row)}", flush=True)
    result = {"name": name, "variant": VARIANTS[name], "epochs": plan["epochs"], "steps": step,
              "train_s": round(time.perf_counter() - t_train, 1), "train": cfg.to_dict(), "history": history}
    result.update(calibrated_certificate(model, cfg, train_ds, val_ds, device))
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    meta = {"run": f"sweep-{name}", "arch": cfg.arch, "width": cfg.width,
            "data": {"root": cfg.data_root, "synthetic": True, "val": validation_record(cfg)},
            "epochs": plan["epochs"], "metrics": history[-1], "train": {"by": "scripts/cert_sweep.py", **cfg.to_dict()}}
    save_checkpoint(out / f"{name}.pt", model, meta)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"[{name}] done: {json.dumps(result['certificate'])}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget per variant (all run at once)")
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--limit", type=int, default=0, help="train images (validation: a quarter); 0 = all (dry runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per variant process")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="training autocast precision (lipdet train --precision auto picks bf16 where it is native)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    ap.add_argument("--recertify", type=Path, default=None, metavar="CKPT",
                    help="only calibrate and certify a checkpoint an earlier sweep wrote, print its JSON")
    args = ap.parse_args()
    if args.recertify:
        print(json.dumps(recertify(args.recertify, torch.device(args.device)), indent=1))
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        torch.set_num_threads(args.threads)
        run_variant(args.one, args.out, torch.device(args.device), args.budget_s, args.max_epochs, args.eval_every, args.limit,
                    args.precision)
        return
    cfg = loop_config({}, False)
    load_split(cfg, "train")  # synthesise the data and build the crop cache once, before the variants start
    procs = {}
    for name in names:
        cmd = [sys.executable, __file__, "--out", str(args.out), "--variants", name, "--one", name,
               "--device", args.device, "--budget-s", str(args.budget_s), "--max-epochs", str(args.max_epochs),
               "--eval-every", str(args.eval_every), "--threads", str(args.threads), "--limit", str(args.limit),
               "--precision", args.precision]
        procs[name] = subprocess.Popen(cmd)
    codes = {name: p.wait() for name, p in procs.items()}
    summary = {}
    for name in names:
        f = args.out / f"{name}.json"
        summary[name] = json.loads(f.read_text()) if f.is_file() else {"error": f"exit code {codes[name]}"}
        f.unlink(missing_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=1))
    print("\n| variant | epochs | val map_50 | detected | " + " | ".join(f"cert. @{e}" for e in CERT_EPS)
          + " | median r | max r |")
    print("|---|---:|---:|---:|" + "---:|" * (len(CERT_EPS) + 2))
    for name, r in summary.items():
        c = r.get("certificate")
        if not c:
            print(f"| {name} | failed: {r.get('error')} |")
            continue
        print(f"| {name} | {r['epochs']} | {r['val_map_50']} | {c['detected']} | "
              + " | ".join(f"{100 * c['certified'][str(e)]:.2f}%" for e in CERT_EPS)
              + f" | {c['radius_median']} | {c['radius_max']} |")


if __name__ == "__main__":
    main()
