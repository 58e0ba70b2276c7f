#!/usr/bin/env python3
"""Set up lipdet in a local virtual environment and run its main job or its tests.

    python3 scripts/dev.py demo   # train (Ray, 2 workers) -> export -> eval --pgd on synthetic SVHN
    python3 scripts/dev.py test   # the whole test suite

Needs only Python 3.10+ and pip. The environment lives in ./.venv (override with LIPDET_VENV) and is
(re)installed whenever pyproject.toml changes. Any extra arguments after ``test`` go to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LIPDET_VENV") or ROOT / ".venv")
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    rc = subprocess.call([str(c) for c in cmd], **kw)
    if rc != 0:
        sys.exit(rc)


def ensure_env() -> None:
    """Create ./.venv and install lipdet[dev] into it (editable) unless it is already current."""
    if sys.version_info < (3, 10):
        sys.exit("lipdet needs Python 3.10 or newer")
    stamp = VENV / ".lipdet-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    _run([PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run([PY, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]"])
    stamp.write_text(want + "\n")


def demo() -> None:
    """The main job end to end on the built-in synthetic SVHN, as a user types it."""
    lipdet = str(BIN / "lipdet")
    work = Path(os.environ.get("LIPDET_DEMO_DIR") or ROOT / "demo")
    work.mkdir(parents=True, exist_ok=True)
    _run([lipdet, "train", "--workers", "2"], cwd=work)
    _run([lipdet, "export"], cwd=work)
    run = work / "runs" / (work / "runs" / "LATEST").read_text().strip()
    _run([lipdet, "eval", str(run / "model.onnx"), "--pgd", "--certify",
          "--json", str(run / "eval.json"), "--report", str(run / "report")], cwd=work)
    print(f"\nreport: {run / 'report' / 'index.html'}")


def test(args: list[str]) -> None:
    """The whole test suite; pytest's exit 5 (no tests ran) is a failure like any non-zero code."""
    _run([PY, "-m", "pytest", "-q", *args], cwd=ROOT)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in {"demo", "test", "env"}:
        sys.exit(__doc__)
    ensure_env()
    if sys.argv[1] == "demo":
        demo()
    elif sys.argv[1] == "test":
        test(sys.argv[2:])


if __name__ == "__main__":
    main()
