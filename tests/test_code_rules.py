"""Code rules the suite enforces: the layer contract (import-linter) and ruff, both from pyproject.toml."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stages_flow_one_way():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "stages flow one way KEPT" in r.stdout and "0 broken" in r.stdout


def test_a_back_edge_breaks_the_contract(tmp_path, monkeypatch):
    """The check is not vacuous: a core module importing a stage is reported."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lint_imports
    finally:
        sys.path.pop(0)
    src = lint_imports.stage(tmp_path / "src")
    (src / "lipdet" / "boxes.py").write_text((src / "lipdet" / "boxes.py").read_text() + "\nimport lipdet.eval.cli\n")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(src), "PATH": ""})
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout[-2000:]


def test_ruff_check_passes():
    """The lint rules chosen in pyproject.toml ([tool.ruff.lint]) hold for the whole tree."""
    ruff = Path(sys.executable).with_name("ruff")
    r = subprocess.run([str(ruff), "check", "--output-format", "concise", "."], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
