"""Run folders and the "latest run" pointer, so ``lipdet export`` finds what ``lipdet train`` made.

Layout: ``runs/<name>/model.pt`` (+ metrics, plots, exported artifacts); ``runs/LATEST`` is a text
file holding the latest run's folder name (a file rather than a symlink so it works everywhere).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from lipdet.errors import LipdetError
from lipdet.io import write_text_atomic

DEFAULT_RUNS_DIR = Path("runs")
LATEST = "LATEST"


def new_run_name(arch: str, root: Path) -> str:
    """A fresh run name: ``<arch>-<YYYYmmdd-HHMMSS>`` with a counter if it exists already."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{arch}-{stamp}"
    i = 1
    while (root / name).exists():
        i += 1
        name = f"{arch}-{stamp}-{i}"
    return name


def mark_latest(run_dir: Path) -> None:
    """Record ``run_dir`` as the latest run of its parent folder."""
    write_text_atomic(run_dir.parent / LATEST, run_dir.name + "\n")


def runs_root(root: Path | None = None) -> Path:
    """The runs folder: ``root`` if given, else ``$LIPDET_RUNS``, else ``./runs``."""
    return Path(root) if root is not None else Path(os.environ.get("LIPDET_RUNS") or DEFAULT_RUNS_DIR)


def latest_run(root: Path | None = None) -> Path:
    """The latest run folder under ``root``; a LipdetError saying how to start one if none."""
    root = runs_root(root)
    pointer = root / LATEST
    if pointer.is_file():
        run = root / pointer.read_text().strip()
        if (run / "model.pt").is_file():
            return run
    raise LipdetError(
        f"no training run found under {root}/ -- start one with: lipdet train --workers 2"
    )


def latest_model(root: Path | None = None) -> Path:
    """``model.pt`` of the latest run."""
    return latest_run(root) / "model.pt"
