"""``lipdet eval``: accuracy, robustness and certificates of the artifact that ships."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Optional

import typer

from lipdet.device import DEVICES
from lipdet.deploy.http_backend import is_url
from lipdet.errors import LipdetError
from lipdet.eval.attacks import ATTACK_CHOICES, ENSEMBLE, ENSEMBLE_LOSSES
from lipdet.eval.evaluate import BLACKBOX_METHODS, EvalSettings, evaluate
from lipdet.eval.results import ResultFiles, result_lines


AttackLoss = enum.Enum("AttackLoss", {n: n for n in ATTACK_CHOICES}, type=str)
"""``--attack-loss`` choices (typer makes a bad value a usage error)."""
Blackbox = enum.Enum("Blackbox", {n: n for n in BLACKBOX_METHODS}, type=str)
"""``--blackbox`` choices."""
Device = enum.Enum("Device", {n: n for n in DEVICES}, type=str)
"""``--device`` choices."""


def parse_eps_list(text: str) -> tuple[float, ...]:
    """``"0,0.25,0.5,1"`` -> ``(0.0, 0.25, 0.5, 1.0)``; a bad value is a one-line LipdetError."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise LipdetError(f"--eps-sweep: {part!r} is not a number (expected e.g. 0,0.25,0.5,1)") from None
        if not v >= 0 or v != v or v == float("inf"):
            raise LipdetError(f"--eps-sweep values must be finite and >= 0, got {part}")
        out.append(v)
    if not out:
        raise LipdetError("--eps-sweep needs at least one value, e.g. 0,0.25,0.5,1")
    return tuple(out)


def command(
    model: str = typer.Argument(..., help="The artifact to evaluate: model.pt, model.onnx or engine.plan, or the "
                                "http://HOST:PORT of a lipdet serve (scored and attacked through HTTP)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="SVHN format-1 root (train/ test/ with digitStruct.mat). Default: the data the model "
        "was trained on (from its model card), else the embedded synthetic set."),
    split: str = typer.Option("test", "--split", help="Dataset split to evaluate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per batch (and per unit of Ray work)."),
    pgd: bool = typer.Option(False, "--pgd", help="L2 PGD attack crafted on the artifact's twin, replayed on the engine."),
    eps: float = typer.Option(0.5, "--eps", help="Attack / certificate radius: L2 over the whole 3xSxS image in [0,1] pixels."),
    steps: int = typer.Option(10, "--steps", help="PGD steps."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="PGD step length (default 2.5*eps/steps)."),
    restarts: int = typer.Option(1, "--restarts", help="PGD random restarts; the per-image worst is kept."),
    attack_loss: AttackLoss = typer.Option(
        ENSEMBLE, "--attack-loss", help=f"{ENSEMBLE} (default): PGD once per loss "
        f"({', '.join(ENSEMBLE_LOSSES)}; {len(ENSEMBLE_LOSSES)}x the cost), keeping per image the adversarial image "
        "worst for the engine (fewest objects detected, then lowest scores of those found, then highest MultiBox loss); the JSON has each loss's mAP."),
    blackbox: Optional[Blackbox] = typer.Option(None, "--blackbox", help="square: query-only L2 random search on the engine."),
    queries: int = typer.Option(100, "--queries", help="Black-box query budget per image."),
    eps_sweep: Optional[str] = typer.Option(None, "--eps-sweep", help="Comma-separated radii for the mAP-vs-eps curve, e.g. 0,0.25,0.5,1."),
    certify: bool = typer.Option(False, "--certify", help="Certified object share at --eps from the artifact's Lipschitz bounds."),
    quant_check: bool = typer.Option(True, "--quant-check/--no-quant-check", help="With --certify on an fp16/int8 "
        "engine: PGD inside each certified object's radius, replayed on the engine, flips counted (skipped for fp32)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all results as one JSON object."),
    save_detections: Optional[Path] = typer.Option(None, "--save-detections", help="Clean detections, COCO results format, original-image pixels; the matching COCO ground truth "
        "(image ids, file names) goes beside it as NAME.gt.json, so pycocotools scores the pair as it is."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write an offline HTML report (index.html + PNGs) into this folder."),
    workers: int = typer.Option(1, "--workers", help="Shard over N Ray workers (same numbers as 1)."),
    address: Optional[str] = typer.Option(
        None, "--address", help="With --workers N: shard over this Ray cluster (HOST:PORT, ray://HOST:PORT or auto; "
        "every node reads the same model and data paths). (default: $RAY_ADDRESS, else a local Ray)",
        show_default=False),
    seed: int = typer.Option(0, "--seed", help="Attack seed (per image index: reproducible for any --workers)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Input side for an ONNX file without a lipdet model card."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N images only."),
    device: Device = typer.Option("auto", "--device", help="Device of the engine and the twin."),
    twin_tol: Optional[float] = typer.Option(None, "--twin-tol", help="Max |twin - engine| on clean inputs before attacking (default by precision)."),
    twin: Optional[Path] = typer.Option(None, "--twin", exists=True, dir_okay=False, help="With an http:// MODEL: "
                                        "the served model's ONNX for --pgd (sha256-checked; default: fetched)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Measure the deployed artifact: clean mAP, PGD / Square attacks, certificates.

    Every backend (torch .pt, ONNX Runtime .onnx, TensorRT .plan) goes through the same
    post-processing; mAP50 is the headline, mAP (0.5:0.95) beside it. Attacks are crafted on the
    artifact's differentiable twin (checked against the engine first) and replayed on the engine;
    --blackbox square queries the engine only. The last lines printed are the seed-style row:
    clean map_50, adversarial map_50 at --eps, drop, certified share (percent).

    Examples:

      lipdet eval runs/latest/model.onnx

      lipdet eval model.onnx --pgd --eps 0.5 --steps 10 --certify --json results.json

      lipdet eval engine.plan --pgd --blackbox square --queries 200 --report report/

      lipdet eval model.pt --eps-sweep 0,0.25,0.5,1 --workers 2 --report report/

      lipdet eval model.pt --workers 8 --address head:6379   # sharded over a running Ray cluster

      lipdet eval foreign.onnx --input-size 74 --data svhn/

      lipdet eval http://127.0.0.1:8000 --pgd --blackbox square   # the live lipdet serve endpoint
    """
    if twin is not None and not is_url(model):
        raise LipdetError("--twin is for a served model (MODEL http://HOST:PORT); a file is its own twin")
    target: str | Path = model if is_url(model) else Path(model)
    settings = EvalSettings(
        split=split, batch_size=batch_size, pgd=pgd, eps=eps, steps=steps, alpha=alpha, restarts=restarts,
        attack_loss=attack_loss.value, blackbox=blackbox.value if blackbox is not None else None, queries=queries,
        eps_sweep=parse_eps_list(eps_sweep) if eps_sweep else (), certify=certify, quant_check=quant_check, seed=seed,
        input_size=input_size, limit=limit, workers=workers, address=address, twin_tol=twin_tol, twin=str(twin) if twin else None, device=device.value,
    ).validate()
    outputs = ResultFiles(json=json_out, detections=save_detections, report=report).check()
    result = evaluate(target, data=data, settings=settings, progress=progress)
    for note in outputs.write(result, target):
        typer.echo(note, err=True)
    sys.stdout.flush()
    for line in result_lines(result.summary):
        typer.echo(line)
