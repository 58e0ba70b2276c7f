"""``lipdet lipschitz``: per-layer Lipschitz table of a checkpoint or an exported ONNX model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from torch import nn

from lipdet.artifacts import artifact_kind, load_model
from lipdet.deploy.twin import load_twin


def _load(model: Path) -> nn.Module:
    """The parametrised model of a checkpoint, or the folded twin of a deployed ``.onnx`` / ``.plan``."""
    if artifact_kind(model) == "checkpoint":
        return load_model(model)
    return load_twin(model)


def lipschitz_report(model: nn.Module) -> dict[str, Any]:
    """The JSON-able report: config, per-layer table and head bounds."""
    from lipdet.models.lipschitz import head_bounds, layer_table

    table = layer_table(model)
    heads = head_bounds(model, table)
    return {
        "model": model.config.to_dict(),
        "folded": bool(getattr(model, "folded", False)),
        "norm": "L2, input pixels in [0, 1]",
        "layers": [r.to_dict() for r in table],
        "heads": heads,
    }


def _print_report(report: dict[str, Any], source: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        typer.echo(f"{'layer':<14} {'kind':<14} {'operator norm':>14} {'cumulative':>14}")
        for r in report["layers"]:
            typer.echo(f"{r['name']:<14} {r['kind']:<14} {r['norm']:>14.6g} {r['cumulative']:>14.6g}")
        for p in report["heads"]["per_scale"]:
            typer.echo(f"scale {p['feature_size']:>2}: loc {p['loc']:.6g}  cls {p['cls']:.6g}")
    else:
        console = Console()
        cfg = report["model"]
        table = Table(title=f"{source}: {cfg['arch']} width {cfg['width']} input {cfg['input_size']}")
        for col, just in (("layer", "left"), ("kind", "left"), ("operator norm", "right"), ("cumulative", "right")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for r in report["layers"]:
            table.add_row(r["name"], r["kind"], f"{r['norm']:.6g}", f"{r['cumulative']:.6g}")
        console.print(table)
        heads = Table(title="input -> head output bounds")
        for col in ("scale", "tap", "trunk", "loc head", "cls head", "L loc", "L cls"):
            heads.add_column(col, justify="right")
        for p in report["heads"]["per_scale"]:
            heads.add_row(str(p["feature_size"]), p["tap"], f"{p['trunk']:.6g}", f"{p['loc_head']:.6g}",
                          f"{p['cls_head']:.6g}", f"{p['loc']:.6g}", f"{p['cls']:.6g}")
        console.print(heads)
    h = report["heads"]
    typer.echo(f"global bound (max over scales): loc {h['loc']:.6g}  cls {h['cls']:.6g}")


def lipschitz_command(
    model: Path = typer.Argument(..., help="A lipdet checkpoint (model.pt) or an exported .onnx model."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder to write lipschitz.png (bar chart) and lipschitz.json into."),
) -> None:
    """Print the per-layer Lipschitz bounds of MODEL and the bound of each head.

    Each row gives the layer's operator norm (L2, measured by power iteration on the real
    convolution at its input size) and the cumulative bound from the input pixels up to that
    layer; the heads' bounds (max over the four scales) are what per-anchor certificates use.
    An .onnx model is analysed through its folded PyTorch twin.

    Example: lipdet lipschitz runs/sll-l2/model.pt --out runs/sll-l2/lipschitz
    """
    from lipdet.io import write_text_atomic
    from lipdet.models.lipschitz import LayerBound, plot_bounds

    net = _load(model)
    report = lipschitz_report(net)
    _print_report(report, model.name)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table = [LayerBound(**r) for r in report["layers"]]
        plot_bounds(table, report["heads"], out / "lipschitz.png")
        write_text_atomic(out / "lipschitz.json", json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {out / 'lipschitz.png'} and {out / 'lipschitz.json'}")
