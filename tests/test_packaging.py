"""`pip install .` and `pip install -e .` give the same importable lipdet modules."""

import importlib.util
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lipdet

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["train", "export", "deploy", "eval"]


def _source_modules() -> set[str]:
    mods = {f"lipdet.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "lipdet")])}
    mods |= {"lipdet.data." + m.name for m in pkgutil.iter_modules([str(ROOT / "lipdet" / "data")])}
    mods |= {"lipdet.models." + m.name for m in pkgutil.iter_modules([str(ROOT / "lipdet" / "models")])}
    for stage in STAGES:
        mods.add(f"lipdet.{stage}")
        mods |= {f"lipdet.{stage}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / stage)])}
    return mods


def test_stage_folders_are_lipdet_subpackages():
    for stage in STAGES:
        spec = importlib.util.find_spec(f"lipdet.{stage}")
        assert spec is not None and Path(spec.origin).parent == ROOT / stage


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    has_setuptools = importlib.util.find_spec("setuptools") is not None
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    if has_setuptools:
        cmd.insert(5, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True)
    wheel = next(tmp_path.glob("lipdet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert _source_modules() <= in_wheel, _source_modules() - in_wheel
    assert not any(n.startswith(("tests/", "train/", "eval/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    assert f"lipdet-{lipdet.__version__}.dist-info/METADATA" in names
