"""``lipdet data ...``: make, inspect and download SVHN format-1 data.

The commands raise :class:`~lipdet.errors.LipdetError` for bad input; the top-level ``lipdet``
command turns it into one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lipdet.errors import LipdetError

app = typer.Typer(
    help="Make, inspect and download SVHN format-1 data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
fetch_app = typer.Typer(help="Download a public dataset.", no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(fetch_app, name="fetch")


@app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Argument(help="Folder to write train/ and test/ into (created).")],
    train: Annotated[int, typer.Option("--train", min=0, help="Number of training images.")] = 4000,
    test: Annotated[int, typer.Option("--test", min=0, help="Number of test images.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed: same seed and fonts, same images.")] = 0,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes to render with (output is the same).")
    ] = 1,
) -> None:
    """Generate a synthetic SVHN format-1 dataset of house-number images.

    Writes OUT/train/1.png ... OUT/train/digitStruct.mat and OUT/test/... (SVHN format 1).
    Boxes are the exact ink boxes of the rendered digits.

    \b
    Example:
        lipdet data synth data/synth --train 4000 --test 1000 --seed 0
    """
    from lipdet.data.synth import synthesize

    if train + test == 0:
        raise LipdetError(f"{out}: nothing to generate (--train and --test are both 0)")
    if out.exists() and not out.is_dir():
        raise LipdetError(f"{out}: exists and is not a folder")
    result = synthesize(out, train, test, seed, progress=True, workers=workers)
    for split, records in result.items():
        digits = sum(len(r.labels) for r in records)
        typer.echo(f"{out / split}: {len(records)} images, {digits} digits")


@app.command("show")
def show_command(
    data: Annotated[Path, typer.Argument(help="SVHN format-1 folder (with train/ and/or test/).")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    split: Annotated[str, typer.Option("--split", help="Split sub-folder to draw from.")] = "test",
    n: Annotated[int, typer.Option("--n", min=1, help="Number of samples in the grid.")] = 16,
    input_size: Annotated[int, typer.Option("--input-size", min=8, help="Crop side in pixels.")] = 74,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the crops and the choice of samples.")] = 0,
) -> None:
    """Draw a grid of preprocessed crops with their digit boxes and labels.

    Each cell is one crop as the detector sees it (upscaled 2x).
    Ground-truth boxes are green, with their digit.

    \b
    Example:
        lipdet data show data/synth --split test --n 16 --out grid.png
    """
    from lipdet.data.dataset import SVHNDetection, resolve_data
    from lipdet.data.show import draw_grid

    root = resolve_data(data)
    if not (root / split / "digitStruct.mat").is_file():
        raise LipdetError(f"{root / split}: no digitStruct.mat here (--split {split})")
    if not out.parent.is_dir():
        raise LipdetError(f"--out: folder {out.parent} does not exist")
    dataset = SVHNDetection(root, split=split, input_size=input_size, seed=seed)
    path = draw_grid(dataset, n, out=out, seed=seed)
    typer.echo(f"{path}: {min(n, len(dataset))} samples of {root / split}")


@fetch_app.command("svhn")
def fetch_svhn_command(
    dest: Annotated[Path, typer.Argument(help="Folder to download into; gets DEST/train, DEST/test ...")],
    splits: Annotated[str, typer.Option("--splits", help="Comma-separated: train, test, extra.")] = "train,test",
    url: Annotated[
        str | None,
        typer.Option("--url", help="Base URL of the archives (default $LIPDET_SVHN_URL or the official site)."),
    ] = None,
) -> None:
    """Download the real SVHN format-1 archives and unpack them.

    Fetches <split>.tar.gz (train 404 MB, test 276 MB, extra 1.9 GB); reruns resume a download.
    Each archive is checked, then unpacked into DEST/<split>/.

    \b
    Example:
        lipdet data fetch svhn data/svhn --splits train,test
    """
    from lipdet.data.fetch import fetch_svhn

    names = [s.strip() for s in splits.split(",") if s.strip()]
    fetch_svhn(dest, names, base_url=url, progress=True)
    typer.echo(f"{dest}: SVHN {', '.join(names)} ready")
