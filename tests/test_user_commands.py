"""The user's three commands, typed verbatim in a fresh folder, as a new user would.

    lipdet train --workers 2 ; lipdet export --trt ; lipdet eval engine.plan --pgd

Training is shortened for the test with the documented environment variables
``LIPDET_TRAIN_EPOCHS`` (epochs) and ``LIPDET_SYNTH_SIZE`` (size of the built-in synthetic SVHN);
``LIPDET_CACHE`` keeps the generated dataset inside the test's folder. The session's Ray Train knobs
(``tests/conftest.py``: ``RAY_TRAIN_ENV``) reach the commands through the inherited environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LIPDET = str(Path(sys.executable).with_name("lipdet"))


def _lipdet(cwd: Path, env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([LIPDET, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


def test_three_commands_verbatim(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("LIPDET_RUNS", None)
    # 8 test images: `eval --pgd` attacks each with the whole default ensemble (4 losses x 10 steps)
    env.update(LIPDET_TRAIN_EPOCHS="1", LIPDET_SYNTH_SIZE="64,8", LIPDET_CACHE=str(tmp_path / "cache"))
    work = tmp_path / "fresh"
    work.mkdir()

    # Before any training: export says how to start.
    err = _one_line_error(_lipdet(work, env, "export"))
    assert "no training run found" in err and "lipdet train --workers 2" in err

    # 1. lipdet train --workers 2
    r = _lipdet(work, env, "train", "--workers", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    run = work / "runs" / (work / "runs" / "LATEST").read_text().strip()
    assert (run / "model.pt").is_file() and (run / "metrics.jsonl").is_file()
    out = r.stdout + r.stderr
    assert str(Path("runs") / run.name / "model.pt") in out or str(run / "model.pt") in out
    assert "lipdet export" in out
    assert (tmp_path / "cache").is_dir()  # the synthetic SVHN was generated on first use

    # 2. lipdet export --trt: no GPU / TensorRT here -> one line, exit 2, nothing written.
    before = sorted(p.name for p in run.iterdir())
    err = _one_line_error(_lipdet(work, env, "export", "--trt"))
    assert "TensorRT" in err or "GPU" in err
    assert "lipdet[gpu]" in err
    assert sorted(p.name for p in run.iterdir()) == before

    # ... while plain `lipdet export` works and writes next to the model.
    r = _lipdet(work, env, "export")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run / "model.onnx").is_file()
    assert "lipdet eval" in r.stdout + r.stderr

    # 3. lipdet eval engine.plan --pgd: there is no plan on a CPU machine -> a clear error ...
    err = _one_line_error(_lipdet(work, env, "eval", "engine.plan", "--pgd"))
    assert "engine.plan" in err
    (work / "engine.plan").write_bytes(b"not an engine")
    err = _one_line_error(_lipdet(work, env, "eval", "engine.plan", "--pgd"))
    assert "engine.plan.json" in err or "sidecar" in err

    # ... and the same command on the exported ONNX prints the seed-style row.
    r = _lipdet(work, env, "eval", str(run / "model.onnx"), "--pgd")
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout.lower()
    for word in ("clean", "map_50", "adv", "drop"):
        assert word in text, r.stdout
