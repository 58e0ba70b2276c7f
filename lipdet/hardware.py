"""What this machine computes fast: the CPU and its instruction sets, and the precision ``auto`` picks.

lipdet runs on 2-core machines that differ: some CPUs have native bf16 (AMX, or AVX512-BF16's
``vdpbf16ps``), where bf16 training is about 2x fp32; others only AVX2, where torch emulates bf16 and
a bf16 matrix multiply runs ~0.1x fp32. :func:`choose_precision` turns ``auto`` into bf16 only where
the CPU has native bf16 *and* a short probe measures it faster (or on a GPU that supports bf16), and
turns an explicit ``bf16`` on a CPU where it is slower into a warning with the measured ratio.
:func:`machine` names the machine for benchmarks (every figure lipdet prints comes with it).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

PRECISION_CHOICES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
"""Training precisions: ``auto`` resolves to one of the others through :func:`choose_precision`."""

BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of native bf16 arithmetic."""

INT8_DOT_FLAGS: tuple[str, ...] = ("amx_int8", "avx512_vnni", "avx_vnni")
"""/proc/cpuinfo flags of int8 dot-product instructions (VNNI / AMX), used by ONNX Runtime's int8 kernels."""

MIN_BF16_SPEEDUP = 1.2
"""``auto`` picks bf16 on a CPU only when the probe's bf16 matmul is at least this much faster than fp32."""


@dataclass(frozen=True)
class Machine:
    """This machine as benchmarks report it.

    Attributes:
        cpu: CPU model name (``/proc/cpuinfo`` ``model name``, else ``platform.processor()``).
        capability: torch's dispatch level, ``torch.backends.cpu.get_cpu_capability()`` (``AVX2``, ``AVX512``, ...).
        flags: the CPU's instruction-set flags (empty where ``/proc/cpuinfo`` is unreadable).
        cores: CPUs this process may run on.
        gpu: the first CUDA device's name, or None.
    """

    cpu: str
    capability: str
    flags: frozenset[str]
    cores: int
    gpu: str | None = None

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8_dot(self) -> bool:
        return any(f in self.flags for f in INT8_DOT_FLAGS)

    def isa(self) -> str:
        """The instruction sets that matter to lipdet, e.g. ``AVX512 + VNNI + AMX`` or ``AVX2``."""
        base = "AVX512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags else self.capability
        extras = [name for name, flags in (("VNNI", ("avx512_vnni", "avx_vnni")), ("BF16", ("avx512_bf16",)),
                                           ("AMX", ("amx_bf16", "amx_int8"))) if any(f in self.flags for f in flags)]
        return " + ".join([base, *extras])

    def line(self) -> str:
        """One line naming the machine and the library versions, printed first by every benchmark."""
        try:
            import onnxruntime

            ort = f", onnxruntime {onnxruntime.__version__}"
        except ImportError:
            ort = ""
        gpu = f", GPU {self.gpu}" if self.gpu else ""
        return (f"machine: {self.cpu} ({self.isa()}; torch capability {self.capability}), {self.cores} cores{gpu}; "
                f"torch {torch.__version__}{ort}")


def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    name, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return name or platform.processor() or platform.machine(), flags


@functools.lru_cache(maxsize=1)
def machine() -> Machine:
    """This machine (read once per process)."""
    cpu, flags = _cpuinfo()
    gpu = None
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        gpu = torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Machine(cpu, torch.backends.cpu.get_cpu_capability(), flags, cores, gpu)


@functools.lru_cache(maxsize=1)
def bf16_matmul_speedup(size: int = 256, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a ``size x size`` matrix multiply on the CPU (best of ``repeats``; > 1: bf16 faster).

    Takes well under a second even where bf16 is emulated (~0.1 s at 256 on an AVX2-only CPU).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up (oneDNN primitive creation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a, b) / max(best(a.bfloat16(), b.bfloat16()), 1e-9)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses, why, and a warning when the user asked for a slow one."""

    precision: str
    reason: str
    warning: str | None = None


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """Resolve ``requested`` (one of :data:`PRECISION_CHOICES`) for training on ``device``.

    ``auto``: on CUDA, bf16 where ``torch.cuda.is_bf16_supported()``, else fp32; on the CPU, bf16 only
    with native bf16 (:data:`BF16_FLAGS`) and a measured matmul speed-up of at least
    :data:`MIN_BF16_SPEEDUP`, else fp32. An explicit ``bf16`` on a CPU where the probe measures it
    slower than fp32 is kept, with a one-line warning that says so. Other values pass through.
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISION_CHOICES)}")
    if device.type == "cuda":
        if requested != "auto":
            return PrecisionChoice(requested, "as requested")
        ok = torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if ok else "fp32", "the GPU supports bf16" if ok else "the GPU has no bf16")
    if requested not in ("auto", "bf16"):
        return PrecisionChoice(requested, "as requested")
    return cpu_precision(requested, machine(), bf16_matmul_speedup())


def cpu_precision(requested: str, m: Machine, speedup: float) -> PrecisionChoice:
    """The CPU half of :func:`choose_precision` for ``auto`` / ``bf16``, given the machine and the measured
    bf16 matmul speed-up (:func:`bf16_matmul_speedup`)."""
    measured = f"a bf16 matmul ran {speedup:.2f}x fp32 here"
    if requested == "bf16":
        if speedup >= 1.0:
            return PrecisionChoice("bf16", f"as requested ({measured})")
        native = "native bf16" if m.native_bf16 else "no native bf16 (no AMX/AVX512-BF16)"
        return PrecisionChoice("bf16", "as requested",
                               f"warning: bf16 is slower than fp32 on this CPU ({m.isa()}: {native}; {measured}); "
                               "--precision auto or fp32 would train faster")
    if m.native_bf16 and speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice("bf16", f"auto: native bf16 ({m.isa()}), {measured}")
    why = "no native bf16 (no AMX/AVX512-BF16)" if not m.native_bf16 else "native bf16 but not faster"
    return PrecisionChoice("fp32", f"auto: {why} on {m.isa()}, {measured}")


def process_table() -> dict[int, tuple[str, int, int]]:
    """``{pid: (cmdline, ppid, cpu)}`` of every process readable in ``/proc`` ({} without it): the command
    line with NULs as spaces, the parent pid and ``utime + stime`` in clock ticks (all threads;
    ``os.sysconf("SC_CLK_TCK")`` per second). Processes that end while it reads are left out."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        entries = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return out
    for entry in entries:
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry.name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # the fields after "(command name)"
            out[int(entry.name)] = (cmd, int(rest[1]), int(rest[11]) + int(rest[12]))  # ppid; utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return out
