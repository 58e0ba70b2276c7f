"""``lipdet experiment``: the seed's table regenerated on deployed artifacts, with one command.

For each architecture: train (Ray Train) -> export (fold -> ONNX per precision, plan with ``--trt``)
-> eval (clean, L2 PGD, certify) on the exported files, then one table (Markdown + JSON) with, per
row: parameters, clean and adversarial map_50, drop, certified share, per-head Lipschitz bounds and
latency per image on the deployed backend.

The test split enters only the eval stage, i.e. the final table: training validates, calibrates
and reports on images held out of the train split (``lipdet train --val-fraction``), and nothing
here picks a model, an epoch or a setting by a test-split score.

Every stage runs the stage's own command (``lipdet train`` / ``export`` / ``eval``) in a child
process, so an experiment is exactly what a user would get typing them, and each stage's output
file marks it done: an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from lipdet.errors import LipdetError
from lipdet.hardware import PRECISION_CHOICES
from lipdet.io import portable_path, write_text_atomic
from lipdet.models.config import ARCHS

PRECISIONS = ("fp32", "fp16", "int8")


def _lipdet(args: list[str], log: Path) -> None:
    """Run one ``lipdet`` stage command, teeing its output into ``log``; a failure stops the experiment."""
    cmd = [sys.executable, "-m", "lipdet.cli", *args]
    typer.echo("$ lipdet " + " ".join(args), err=True)
    with open(log, "a") as f:
        f.write("$ lipdet " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            sys.stderr.write(line)
        rc = proc.wait()
    if rc != 0:
        raise LipdetError(f"stage failed (exit {rc}): lipdet {' '.join(args)} -- see {log}", exit_code=rc)


def _latency_ms(artifact: Path, n: int = 50) -> float:
    """Median wall time (ms) of one image through the deployed backend, batch 1."""
    import torch

    from lipdet.deploy.backends import load_backend

    backend = load_backend(artifact)
    x = torch.rand(1, 3, backend.input_size, backend.input_size)
    for _ in range(5):
        backend(x)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        backend(x)
        times.append(time.perf_counter() - t0)
    return 1000.0 * sorted(times)[len(times) // 2]


def _param_count(checkpoint: Path) -> int:
    from lipdet.artifacts import load_model

    return sum(p.numel() for p in load_model(checkpoint).parameters())


def run_experiment(
    archs: list[str],
    out: Path,
    data: Optional[Path] = None,
    workers: int = 2,
    epochs: Optional[int] = None,
    precisions: tuple[str, ...] = ("fp32",),
    trt: bool = False,
    width: Optional[float] = None,
    eval_limit: Optional[int] = None,
    pgd_steps: int = 10,
    extra_train: tuple[str, ...] = (),
    train_precision: str = "auto",
) -> list[dict[str, Any]]:
    """Run (or resume) the experiment into ``out``; returns the table rows. ``train_precision`` is
    ``lipdet train --precision`` (``auto``: resolved per machine; a resumed run keeps its own)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    log = out / "experiment.log"
    rows: list[dict[str, Any]] = []
    for arch in archs:
        run = runs / arch
        ckpt = run / "model.pt"
        if not ckpt.is_file():
            args = ["train", "--arch", arch, "--workers", str(workers), "--out", str(runs), "--no-progress",
                    "--precision", train_precision]
            args += ["--resume", arch] if run.is_dir() else ["--name", arch]
            if data is not None:
                args += ["--data", str(data)]
            if epochs is not None:
                args += ["--epochs", str(epochs)]
            if width is not None:
                args += ["--width", str(width)]
            _lipdet(args + list(extra_train), log)
        for prec in precisions:
            onnx = run / f"model-{prec}.onnx"
            plan = onnx.with_suffix(".plan")
            if not onnx.is_file() or (trt and not plan.is_file()):
                args = ["export", str(ckpt), "--out", str(onnx), "--precision", prec]
                _lipdet(args + (["--trt"] if trt else []), log)
            artifact = plan if trt else onnx
            result = run / f"eval-{prec}.json"
            if not result.is_file():
                args = ["eval", str(artifact), "--pgd", "--eps", "0.5", "--steps", str(pgd_steps), "--certify",
                        "--json", str(result), "--report", str(run / f"report-{prec}"), "--no-progress"]
                if data is not None:
                    args += ["--data", str(data)]
                if eval_limit is not None:
                    args += ["--limit", str(eval_limit)]
                _lipdet(args, log)
            res = json.loads(result.read_text())
            bounds = (res.get("certify") or {}).get("bounds") or {}
            rows.append({
                "arch": arch,
                "precision": prec,
                "backend": res.get("backend"),
                "params": _param_count(ckpt),
                "clean_map_50": res["clean"]["map_50"],
                "adv_map_50": res["pgd"]["map_50"],
                "drop": res["clean"]["map_50"] - res["pgd"]["map_50"],
                "certified_share": (res.get("certify") or {}).get("certified_share"),
                "median_radius": (res.get("certify") or {}).get("median_radius_detected"),
                "lipschitz_loc": bounds.get("loc"),
                "lipschitz_cls": bounds.get("cls"),
                "latency_ms": _latency_ms(artifact),
                "artifact": portable_path(artifact, out),
            })
    write_text_atomic(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(out / "results.md", to_markdown(rows) + "\n")
    return rows


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.3g}" if v < 1000 else f"{v:.3e}")


def _radius(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The seed-style table: mAP figures in percent (IoU 0.5), eps 0.5 L2 PGD."""
    head = ("| arch | precision | params | clean mAP50 | adv mAP50 (eps 0.5) | drop | certified @0.5 (%) "
            "| median cert. radius | L loc | L cls | latency (ms/img) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['precision']} | {r['params']:,} | {_pct(r['clean_map_50'])} | {_pct(r['adv_map_50'])} "
            f"| {_pct(r['drop'])} | {_pct(r['certified_share'])} | {_radius(r.get('median_radius'))} "
            f"| {_num(r['lipschitz_loc'])} | {_num(r['lipschitz_cls'])} "
            f"| {r['latency_ms']:.2f} |"
        )
    return "\n".join(lines)


def command(
    archs: str = typer.Option(",".join(ARCHS), "--archs", help="Comma-separated architectures, one table row each."),
    data: Optional[Path] = typer.Option(None, "--data", help="SVHN format-1 folder (default: built-in synthetic SVHN)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Ray Train workers per training run."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs per training run (default: lipdet train's)."),
    precision: str = typer.Option("fp32", "--precision", help="Comma-separated export precisions: fp32,fp16,int8."),
    train_precision: str = typer.Option("auto", "--train-precision", help="lipdet train --precision for every run: "
                                        f"{', '.join(PRECISION_CHOICES)} (auto: bf16 only where it is native and faster)."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT plans and evaluate the plans."),
    width: Optional[float] = typer.Option(None, "--width", help="Channel multiplier for every arch."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N test images only."),
    steps: int = typer.Option(10, "--steps", min=1, help="PGD steps."),
    out: Path = typer.Option(Path("experiment"), "--out", help="Experiment folder (resumable)."),
) -> None:
    """Regenerate the seed's table (clean vs L2-PGD eps 0.5 mAP) on deployed artifacts.

    \b
    Examples:
      lipdet experiment
      lipdet experiment --archs naive,sll-l2 --precision fp32,int8 --epochs 20 --out exp1
      lipdet experiment --trt --out exp-gpu        # on a CUDA + TensorRT machine
    """
    arch_list = [a.strip() for a in archs.split(",") if a.strip()]
    bad = [a for a in arch_list if a not in ARCHS]
    if not arch_list or bad:
        raise LipdetError(f"unknown --archs {','.join(bad) or archs!r}; choose from: {', '.join(ARCHS)}")
    precs = tuple(p.strip() for p in precision.split(",") if p.strip())
    badp = [p for p in precs if p not in PRECISIONS]
    if not precs or badp:
        raise LipdetError(f"unknown --precision {','.join(badp) or precision!r}; choose from: {', '.join(PRECISIONS)}")
    if train_precision not in PRECISION_CHOICES:
        raise LipdetError(f"unknown --train-precision {train_precision!r}; choose from: {', '.join(PRECISION_CHOICES)}")
    if data is not None and not data.is_dir():
        raise LipdetError(f"data folder not found: {data}")
    if data is not None:
        from lipdet.data.dataset import resolve_data

        resolve_data(data)  # an SVHN format-1 folder, or a one-line refusal before anything trains
    if out.exists() and not out.is_dir():
        raise LipdetError(f"--out {out} exists and is not a folder")
    if trt:
        from lipdet.export.tensorrt import require_trt

        require_trt()  # before the first run trains, not after
    rows = run_experiment(arch_list, out, data, workers, epochs, precs, trt, width, limit, steps,
                          train_precision=train_precision)
    typer.echo(to_markdown(rows))
    typer.echo(f"\ntable: {out / 'results.md'}  json: {out / 'results.json'}")
