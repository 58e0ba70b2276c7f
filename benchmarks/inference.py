"""Inference throughput on this CPU: parametrised torch, folded torch, ONNX Runtime fp32 and int8.

For every architecture, the same randomly initialised model is timed four ways, side by side in
one run, at batch 1 and batch 64 (images/s, higher is better):

* ``torch``: the trainable (parametrised) model in eval mode, eager;
* ``folded``: ``fold_model`` of it, eager;
* ``ort fp32``: its exported ONNX in ONNX Runtime (CPU provider);
* ``ort int8``: the int8 QDQ graph for ONNX Runtime (``--int8-target ort``: u8u8, uint8 asymmetric
  activations and uint8 symmetric per-channel weights, Percentile-calibrated as ``lipdet export``
  does; ``trt`` times the symmetric TensorRT flavour instead);
* ``int8 s-fp32``: the same with the sensitive layers (entry conv and heads) kept in fp32, the graph
  ``lipdet export`` writes when the all-int8 one misses parity: what that fallback costs in speed.

The first line names the machine (CPU model, AVX2/AVX512/VNNI/AMX, cores, torch and ONNX Runtime
versions): int8 speed depends on VNNI/AMX, so every int8/fp32 ratio goes with it.

Targets (lipdet's deployment story): ORT fp32 >= 3x parametrised torch at batch 1 for the SLL
archs; int8 >= 1.5x fp32 at batch 64.

Usage::

    python benchmarks/inference.py                       # all archs, width 1
    python benchmarks/inference.py --archs sll-l2 naive --seconds 2 --width 1
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import numpy as np
import torch


def throughput(fn: Callable[[], object], batch: int, seconds: float, min_iters: int = 3) -> float:
    """Images per second of ``fn`` (one call = one batch), after a warm-up, over ~``seconds``."""
    for _ in range(2):
        fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if n >= min_iters and elapsed >= seconds:
            return n * batch / elapsed


COLUMNS = ("torch", "folded", "ort fp32", "ort int8", "int8 s-fp32")


def bench_arch(arch: str, width: float, seconds: float, batches: tuple[int, ...], int8_target: str,
               calib_n: int) -> dict[str, dict[int, float]]:
    from lipdet.export.onnx_export import export_onnx_model, ort_session
    from lipdet.export.precision import quantize_int8, sensitive_layers
    from lipdet.models import build_model, fold_model

    torch.manual_seed(0)
    model = build_model(arch, width=width).eval()
    s = model.config.input_size
    with torch.no_grad():
        model(torch.rand(2, 3, s, s))  # settle power-iteration state before folding
    folded = fold_model(model)
    fp32 = export_onnx_model(folded, s)
    gen = torch.Generator().manual_seed(1)
    calib = torch.rand(calib_n, 3, s, s, generator=gen)
    int8 = quantize_int8(fp32, calib, target=int8_target)
    mixed = quantize_int8(fp32, calib, target=int8_target, fp32_layers=sensitive_layers(fp32))
    sessions = {"ort fp32": ort_session(fp32), "ort int8": ort_session(int8), "int8 s-fp32": ort_session(mixed)}

    results: dict[str, dict[int, float]] = {k: {} for k in COLUMNS}
    for b in batches:
        x = torch.rand(b, 3, s, s, generator=gen)
        xn = x.numpy()
        with torch.inference_mode():
            results["torch"][b] = throughput(lambda: model(x), b, seconds)
            results["folded"][b] = throughput(lambda: folded(x), b, seconds)
        for name, sess in sessions.items():
            results[name][b] = throughput(lambda: sess.run(None, {"images": xn}), b, seconds)
    return results


def main(argv: list[str] | None = None) -> int:
    from lipdet.models.config import ARCHS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of every model (default 1)")
    p.add_argument("--seconds", type=float, default=1.5, help="timing window per measurement")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--int8-target", choices=["ort", "trt"], default="ort", help="int8 flavour to time")
    p.add_argument("--calib-n", type=int, default=32, help="random images to calibrate int8 on (speed only)")
    args = p.parse_args(argv)

    from lipdet.hardware import machine

    print(machine().line())
    print(f"{torch.get_num_threads()} torch threads, width {args.width}, int8 flavour: {args.int8_target}")
    cols = COLUMNS
    header = (f"{'arch':<13} {'batch':>5} " + " ".join(f"{c:>11}" for c in cols)
              + f" {'fp32/torch':>10} {'int8/fp32':>9} {'s-fp32/fp32':>11}")
    print("images/s")
    print(header)
    print("-" * len(header))
    ok = True
    for arch in args.archs:
        r = bench_arch(arch, args.width, args.seconds, tuple(args.batches), args.int8_target, args.calib_n)
        for b in args.batches:
            vals = [r[c][b] for c in cols]
            speedup = r["ort fp32"][b] / r["torch"][b]
            int8 = r["ort int8"][b] / r["ort fp32"][b]
            mixed = r["int8 s-fp32"][b] / r["ort fp32"][b]
            print(f"{arch:<13} {b:>5} " + " ".join(f"{v:>11.1f}" for v in vals)
                  + f" {speedup:>9.2f}x {int8:>8.2f}x {mixed:>10.2f}x")
            if b == 1 and arch != "naive" and speedup < 3.0:
                ok = False
            if b == 64 and int8 < (2.0 if machine().int8_dot else 1.5):
                ok = False
        sys.stdout.flush()
    target = 2.0 if machine().int8_dot else 1.5
    print(f"targets: ORT fp32 >= 3x torch at batch 1 (SLL archs); int8 >= {target:g}x fp32 at batch 64 "
          f"({'VNNI/AMX' if machine().int8_dot else 'no VNNI/AMX'}) -> " + ("met" if ok else "NOT met"))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
