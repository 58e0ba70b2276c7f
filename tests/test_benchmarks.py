"""benchmarks/train_throughput.py: its options and its side-by-side tables, on a tiny run (no Ray)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def _refused(script: Path, args: list[str], monkeypatch, capsys) -> str:
    """The last stderr line of ``python SCRIPT ARGS``, which must exit 2 before doing any work: run in this
    process as ``python`` would run it (``__main__``, ``sys.argv``), which spares a start of torch."""
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [(["--rounds", "0"], "--rounds must be >= 1"),
                                           (["--target", "0"], "--target must be > 0")])
def test_bad_options_exit_2_with_one_line(args, message, monkeypatch, capsys):
    assert _refused(SCRIPT, args, monkeypatch, capsys).endswith(message)


def test_plain_side_by_side_rounds_and_operator_table(tiny_svhn):
    out = _run("--data", str(tiny_svhn), "--plain-only", "--width", "0.25", "--images", "16", "--batch-size", "8",
               "--warmup", "1", "--steps", "2", "--rounds", "2", "--breakdown-steps", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "Median of 2 rounds (min-max in brackets):" in lines
    plain = [line for line in lines if line.startswith("| plain PyTorch (1 process) |")]
    assert [line.split("|")[2].strip() for line in plain] == ["fp32", "bf16"]
    assert all("[" in line.split("|")[3] for line in plain)  # min-max of the two rounds
    assert not any(line.startswith("| Ray Train") for line in lines)
    table = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and line.count("|") == 5}
    for kind in ("convolution", "batch norm", "relu", "max-pool", "loss, optimizer, other", "total"):
        fp32, bf16 = (float(v) for v in table[kind].split("|")[2:4])
        assert fp32 >= 0 and bf16 >= 0
    assert float(table["convolution"].split("|")[2]) > 0
    assert any(line.startswith("convolutions alone: ") for line in lines)
    assert any(line.startswith("a 2.50x step ") for line in lines)


def test_the_table_starts_with_the_machine(tiny_svhn):
    from lipdet.hardware import machine

    out = _run("--data", str(tiny_svhn), "--plain-only", "--width", "0.25", "--images", "8", "--batch-size", "8",
               "--warmup", "0", "--steps", "1", "--breakdown-steps", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == machine().line(), out.stdout[:500]


_SAMPLER = """
import importlib.util, json, subprocess, sys, time
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = sys.modules["bench"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
busy = subprocess.Popen([sys.executable, "-c", "import time\\nend = time.time() + 3\\nwhile time.time() < end: pass",
                         "lipdet-busy-marker"])
with bench.CpuSampler(match="lipdet-busy-marker", period=0.1) as cpu:
    time.sleep(0.5)
    start = time.time()
    time.sleep(1.5)
    end = time.time()
busy.wait()
print(json.dumps({"share": cpu.share(start, end), "empty": cpu.share(end + 10, end + 20)}))
"""


def test_cpu_sampler_measures_a_busy_process_from_proc():
    """The sampler behind the utilisation table: a process spinning on one core for the whole window counts,
    as at most one core's share (of os.cpu_count() cores: less when others share the machine), and the
    machine is at least that busy."""
    import json
    import os

    out = subprocess.run([sys.executable, "-c", _SAMPLER, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    machine_busy, spinner = res["share"]
    cores = os.cpu_count() or 1
    assert 0.0 < spinner <= 1.0 / cores + 0.05  # found and measured; one core at most (less on a loaded machine)
    assert machine_busy >= spinner - 0.01
    assert all(v != v for v in res["empty"])  # NaN: no samples in a window after the sampling stopped


BOUNDS = Path(__file__).resolve().parents[1] / "benchmarks" / "bounds.py"


def test_bounds_benchmark_times_every_bound_of_one_arch():
    """benchmarks/bounds.py on a tiny naive model: machine line first, one row per form, the folded model's
    certificate bounds equal to the parametrised one's, and every bound above its measured value."""
    out = subprocess.run([sys.executable, str(BOUNDS), "--archs", "naive", "--width", "0.125", "--input-size", "34",
                          "--threads", "1", "--target", "60"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "torch" in lines[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| naive")]
    assert [r[1] for r in rows] == ["random init", "folded"]
    (loc_a, cls_a), (loc_b, cls_b) = ((float(r[4]), float(r[5])) for r in rows)
    assert loc_a == pytest.approx(loc_b, rel=1e-4) and cls_a == pytest.approx(cls_b, rel=1e-4)
    assert loc_a > 1.0 and cls_a > 1.0  # an unconstrained model
    for r in rows:
        assert 0 < float(r[2]) < 60 and float(r[3]) >= 0
        lo, hi = (float(v) for v in r[6].split(" - "))
        assert 1.0 <= lo <= hi < 1.1
    assert lines[-1].endswith("-> met")


def test_bounds_benchmark_rejects_bad_options(monkeypatch, capsys):
    assert _refused(BOUNDS, ["--width", "0"], monkeypatch, capsys).endswith("--width must be > 0")


@pytest.mark.parametrize("args, message", [(["--dtypes", "int16"], "argument --dtypes: invalid choice: 'int16'"),
                                           (["--images", "0"], "--images must be >= 1")])
def test_serve_benchmark_refuses_bad_options(args, message, monkeypatch, capsys):
    """benchmarks/serve.py: an unknown /v1/infer body dtype or a bad count exits 2 with one line, before Ray."""
    assert message in _refused(SCRIPT.parent / "serve.py", args, monkeypatch, capsys)
