#!/usr/bin/env python3
"""Check the layer contract in pyproject.toml (``[tool.importlinter]``) with import-linter.

The stage folders sit at the repository root and install as ``lipdet.train`` ... through
setuptools' ``package-dir``; import-linter (grimp) finds a package's modules by walking its one
folder, so this script lays the installed shape out in a temporary folder (a copy of the sources,
nothing else) and runs ``lint-imports`` on it. Exit code: lint-imports' own (0 = kept).

    python3 scripts/lint_imports.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def stage(dest: Path) -> Path:
    """Copy every ``package-dir`` folder of pyproject.toml to where it installs under ``dest``."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def main() -> int:
    lint = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="lipdet-layers-") as tmp:
        src = stage(Path(tmp) / "src")
        env = {**os.environ, "PYTHONPATH": str(src)}
        return subprocess.call([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
