"""Hardware-aware precision: the machine description and the bf16 decision on CPUs that differ."""

from __future__ import annotations

import pytest
import torch

from lipdet.hardware import (
    PRECISION_CHOICES,
    Machine,
    bf16_matmul_speedup,
    choose_precision,
    cpu_precision,
    machine,
)

AVX2_EPYC = Machine("AMD EPYC (AVX2 only)", "AVX2", frozenset({"avx2", "fma"}), 2)
AMX_XEON = Machine("Intel Xeon (AMX)", "AVX512", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                                             "amx_bf16", "amx_int8"}), 2)


def test_this_machine_is_named_with_its_instruction_sets_and_versions():
    m = machine()
    line = m.line()
    assert m.cores >= 1 and m.cpu
    assert m.capability == torch.backends.cpu.get_cpu_capability()
    assert line.startswith("machine: ") and f"{m.cores} cores" in line and torch.__version__ in line
    assert m.isa().split(" + ")[0] in line


def test_isa_names_what_matters():
    assert AVX2_EPYC.isa() == "AVX2" and not AVX2_EPYC.native_bf16 and not AVX2_EPYC.int8_dot
    assert AMX_XEON.isa() == "AVX512 + VNNI + BF16 + AMX" and AMX_XEON.native_bf16 and AMX_XEON.int8_dot


def test_auto_is_fp32_without_native_bf16_and_bf16_with_it():
    # speed-ups measured on the two machine kinds of this project (issue #17: 0.10x on the EPYC, ~2-3x with AMX)
    slow = cpu_precision("auto", AVX2_EPYC, 0.1)
    assert slow.precision == "fp32" and "no native bf16" in slow.reason and "0.10x" in slow.reason
    assert slow.warning is None
    fast = cpu_precision("auto", AMX_XEON, 3.0)
    assert fast.precision == "bf16" and "AMX" in fast.reason
    # native flags but the probe says it is not faster (e.g. a throttled or emulating CPU): fp32
    assert cpu_precision("auto", AMX_XEON, 1.0).precision == "fp32"


def test_explicit_bf16_where_it_is_slower_warns_with_the_measured_ratio():
    choice = cpu_precision("bf16", AVX2_EPYC, 0.1)
    assert choice.precision == "bf16"
    assert choice.warning is not None and "slower than fp32" in choice.warning and "0.10x" in choice.warning
    assert "\n" not in choice.warning
    assert cpu_precision("bf16", AMX_XEON, 2.5).warning is None


def test_choose_precision_on_this_cpu_agrees_with_the_probe():
    speedup = bf16_matmul_speedup()
    assert speedup > 0
    choice = choose_precision("auto", torch.device("cpu"))
    assert choice.precision in ("fp32", "bf16")
    assert choice == cpu_precision("auto", machine(), speedup)  # the probe is measured once per process
    for p in ("fp32", "fp16"):
        assert choose_precision(p, torch.device("cpu")).precision == p
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        choose_precision("int4", torch.device("cpu"))
    assert PRECISION_CHOICES[0] == "auto"


def test_process_table_reads_this_process():
    """/proc's view of this process: its command line, its parent, and CPU ticks that grow with work."""
    import os
    import sys
    import time

    from lipdet.hardware import process_table

    if not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    cmd, ppid, ticks = process_table()[os.getpid()]
    assert ppid == os.getppid() and ("python" in cmd or sys.executable in cmd)
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    assert process_table()[os.getpid()][2] > ticks
