"""benchmarks/train_throughput.py: its options and its side-by-side tables, on a tiny run (no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [(["--rounds", "0"], "--rounds must be >= 1"),
                                           (["--target", "0"], "--target must be > 0")])
def test_bad_options_exit_2_with_one_line(args, message):
    out = _run(*args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith(message)


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
