"""Inference throughput on this CPU: parametrised torch, folded torch, ONNX Runtime fp32 and each int8 flavour.

For every architecture, the same randomly initialised model (with the model options ``lipdet train`` uses by
default, e.g. sll-spectral's L2-norm pools) is timed side by side in one run, at
batch 1 and batch 64 (images/s, higher is better):

* ``torch``: the trainable (parametrised) model in eval mode, eager;
* ``folded``: ``fold_model`` of it, eager;
* ``ort fp32``: its exported ONNX in ONNX Runtime (CPU provider);
* ``ort``: the int8 QDQ graph ``lipdet export --precision int8`` writes by default (``u8s8-reduce-range``:
  uint8 activations, int8 weights in [-64, 64]; Percentile-calibrated as export does);
* ``ort-vnni``: ``--target ort-vnni`` (``u8s8-asymmetric``, full 8-bit weights: accurate only with VNNI/AMX);
* ``u8u8``: the previous default flavour (uint8 weights), for the before/after comparison;
* ``trt``: the symmetric flavour TensorRT needs (``s8s8-symmetric``), run here by ONNX Runtime;
* ``s-fp32``: ``ort`` with the sensitive layers (entry conv and heads) kept in fp32, the graph
  ``lipdet export`` writes when the all-int8 one misses parity: what that fallback costs in speed.

Timing is interleaved: each of ``--rounds`` rounds times every column once, one after the other, so a
change of machine load hits all columns alike; a column's figure is its median over the rounds and a
ratio is the median of the per-round ratios. ``--clock cpu`` (with ``--threads 1``) times process CPU
time instead of wall time, which other processes on a loaded machine barely disturb.

After the speed table, one row per arch and int8 flavour: the speed ratio vs ORT fp32 at the largest
batch and the parity vs fp32 (max abs diff relative to the largest fp32 output, cosine) on random
images (random weights: it shows that a flavour computes the same network, not its accuracy on data).

The first line names the machine (CPU model, AVX2/AVX512/VNNI/AMX, cores, torch and ONNX Runtime
versions): int8 speed depends on VNNI/AMX, so every int8/fp32 ratio goes with it.

Targets (lipdet's deployment story): ORT fp32 >= 3x parametrised torch at batch 1 for the SLL
archs; the default int8 graph >= 2x fp32 at batch 64 with VNNI/AMX, >= 1.5x without.

Usage::

    python benchmarks/inference.py                       # all archs, width 1
    python benchmarks/inference.py --archs sll-l2 naive --seconds 2 --batches 64 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

INT8_COLUMNS: dict[str, dict[str, Any]] = {
    "ort": {"target": "ort"},
    "ort-vnni": {"target": "ort-vnni"},
    "u8u8": {"flavour": "u8u8-asymmetric"},
    "trt": {"target": "trt"},
    "s-fp32": {"target": "ort", "sensitive_fp32": True},
}
"""int8 columns: ``quantize_int8`` keyword arguments (``sensitive_fp32``: keep the sensitive layers in fp32)."""
COLUMNS = ("torch", "folded", "ort fp32", *INT8_COLUMNS)


@dataclass(frozen=True)
class Timing:
    """Per column: images/s in each round (``rates[column][round]``)."""

    rates: dict[str, list[float]]

    def median(self, column: str) -> float:
        return statistics.median(self.rates[column])

    def ratio(self, column: str, reference: str) -> float:
        """Median over rounds of ``column``'s rate / ``reference``'s rate in the same round."""
        return statistics.median(a / b for a, b in zip(self.rates[column], self.rates[reference]))


def throughput(fn: Callable[[], object], batch: int, seconds: float, clock: Callable[[], float]) -> float:
    """Images per second of ``fn`` (one call = one batch) over at least ``seconds`` of ``clock`` and 2 calls."""
    n, start = 0, clock()
    while True:
        fn()
        n += 1
        elapsed = clock() - start
        if n >= 2 and elapsed >= seconds:
            return n * batch / elapsed


def interleaved(fns: dict[str, Callable[[], object]], batch: int, seconds: float, rounds: int,
                clock: Callable[[], float]) -> Timing:
    """Time every ``fns`` column once per round, ``seconds / rounds`` each, after one warm-up call each."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            rates[name].append(throughput(fn, batch, seconds / rounds, clock))
    return Timing(rates)


def build_arch(arch: str, width: float, calib_n: int, threads: int) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """The random-init model, its folded twin and ``{column: ORT session}`` for fp32 and every int8 column."""
    from lipdet.export.onnx_export import export_onnx_model, ort_session
    from lipdet.export.precision import quantize_int8, sensitive_layers
    from lipdet.models import build_model, fold_model

    from lipdet.train.trainer import CERTIFIED_TRAINING

    torch.manual_seed(0)
    options = CERTIFIED_TRAINING.get(arch, {}).get("model_options", {})  # as lipdet train builds it (sll-spectral: L2 pool)
    model = build_model(arch, width=width, **options).eval()
    s = model.config.input_size
    with torch.no_grad():
        model(torch.rand(2, 3, s, s))  # settle power-iteration state before folding
    folded = fold_model(model)
    fp32 = export_onnx_model(folded, s)
    calib = torch.rand(calib_n, 3, s, s, generator=torch.Generator().manual_seed(1))
    sessions = {"ort fp32": ort_session(fp32, threads=threads)}
    for column, kw in INT8_COLUMNS.items():
        kw = dict(kw)
        layers = sensitive_layers(fp32) if kw.pop("sensitive_fp32", False) else ()
        sessions[column] = ort_session(quantize_int8(fp32, calib, fp32_layers=layers, **kw), threads=threads)
    return model, folded, sessions


def bench_arch(arch: str, args: argparse.Namespace, clock: Callable[[], float]
               ) -> tuple[dict[int, Timing], dict[str, dict[str, float]]]:
    """``({batch: Timing}, {int8 column: parity vs fp32})`` of one arch."""
    from lipdet.export.onnx_export import run_session
    from lipdet.parity import compare

    model, folded, sessions = build_arch(arch, args.width, args.calib_n, args.threads)
    s = model.config.input_size
    gen = torch.Generator().manual_seed(2)
    probe = torch.rand(16, 3, s, s, generator=gen)
    ref = run_session(sessions["ort fp32"], probe)
    parity = {c: compare(run_session(sessions[c], probe), ref) for c in INT8_COLUMNS}
    timings = {}
    for b in args.batches:
        x = torch.rand(b, 3, s, s, generator=gen)
        xn = x.numpy()
        fns: dict[str, Callable[[], object]] = {"torch": lambda: model(x), "folded": lambda: folded(x)}
        fns.update({name: (lambda sess=sess: sess.run(None, {"images": xn})) for name, sess in sessions.items()})
        with torch.inference_mode():
            timings[b] = interleaved(fns, b, args.seconds, args.rounds, clock)
    return timings, parity


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from lipdet.models.config import ARCHS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of every model (default 1)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing budget per column and batch, over all rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime and torch threads (0: their defaults)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or process CPU time (needs --threads 1: robust on a loaded machine)")
    p.add_argument("--calib-n", type=int, default=32, help="random images to calibrate int8 on (speed only)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (CPU time of several threads includes their spinning)")
    return args


def main(argv: list[str] | None = None) -> int:
    from lipdet.hardware import machine

    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    m = machine()
    print(m.line())
    print(f"{torch.get_num_threads()} torch threads, ONNX Runtime threads {args.threads or 'default'}, width "
          f"{args.width}, {args.clock} clock, {args.rounds} interleaved rounds (medians)")
    header = (f"{'arch':<13} {'batch':>5} " + " ".join(f"{c:>9}" for c in COLUMNS)
              + f" {'fp32/torch':>10} " + " ".join(f"{c + '/fp32':>11}" for c in INT8_COLUMNS))
    print("images/s")
    print(header)
    print("-" * len(header))
    target, ok, rows = (2.0 if m.int8_dot else 1.5), True, []
    for arch in args.archs:
        timings, parity = bench_arch(arch, args, clock)
        for b, t in timings.items():
            speedup = t.ratio("ort fp32", "torch")
            print(f"{arch:<13} {b:>5} " + " ".join(f"{t.median(c):>9.1f}" for c in COLUMNS) + f" {speedup:>9.2f}x "
                  + " ".join(f"{t.ratio(c, 'ort fp32'):>10.2f}x" for c in INT8_COLUMNS))
            ok = ok and not (b == 1 and arch != "naive" and speedup < 3.0)
            ok = ok and not (b == 64 and t.ratio("ort", "ort fp32") < target)
        big = timings[max(timings)]
        rows += [(arch, c, big.ratio(c, "ort fp32"), parity[c]) for c in INT8_COLUMNS]
        sys.stdout.flush()
    print(f"\nint8 flavours at batch {max(args.batches)}: speed vs ORT fp32, parity vs fp32 (random weights and images)")
    print(f"{'arch':<13} {'flavour':<9} {'speed':>7} {'rel':>8} {'cosine':>9}")
    for arch, c, ratio, st in rows:
        print(f"{arch:<13} {c:<9} {ratio:>6.2f}x {st['rel']:>8.4f} {st['cosine']:>9.6f}")
    verdict = ("met" if ok else "NOT met") if {1, 64} <= set(args.batches) else "not measured (needs batches 1 and 64)"
    print(f"targets: ORT fp32 >= 3x torch at batch 1 (SLL archs); default int8 (ort) >= {target:g}x fp32 at batch 64 "
          f"({'VNNI/AMX' if m.int8_dot else 'no VNNI/AMX'}) -> {verdict}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
