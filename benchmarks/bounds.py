"""Time every Lipschitz bound of every architecture: ``layer_table`` + ``head_bounds``, parametrised and folded.

    python benchmarks/bounds.py [--archs naive sll-l2 ...] [--width 1] [--input-size 74] [--target 5]
                                [--threads 0]

For each arch the same randomly initialised model (seed 0; one forward settles the spectral
power-iteration state) is analysed as built and as ``fold_model`` of it: every bound (guaranteed
upper bounds, :mod:`lipdet.models.opnorm`) and every measured lower estimate beside it. The machine
line comes first, then one row per arch and form: wall seconds (and this process's CPU seconds,
which a busy neighbour does not inflate), ``L_loc``, ``L_cls`` and the range of ``bound / measured``
over the trunk layers and the heads. Target (issue #16): every row under ``--target`` seconds.
On a shared machine, ``--threads 1`` avoids losing 10x to thread contention (the row says which).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Row:
    """One analysed model: timings in seconds, the certificate bounds and the bound/measured ratio range."""

    arch: str
    form: str
    wall: float
    cpu: float
    l_loc: float
    l_cls: float
    ratio_min: float
    ratio_max: float


def ratio_range(table: list, heads: dict) -> tuple[float, float]:
    """Smallest and largest ``bound / measured`` over the trunk rows and the per-scale heads."""
    from lipdet.models.lipschitz import bound_ratio

    ratios = [r.ratio for r in table]
    for p in heads["per_scale"]:
        ratios += [bound_ratio(p[f"{k}_head"], p[f"{k}_head_measured"]) for k in ("loc", "cls")]
    known = [r for r in ratios if r is not None]
    return min(known), max(known)


def analyse(arch: str, form: str, model: torch.nn.Module) -> Row:
    """Time ``layer_table`` + ``head_bounds`` of ``model`` (wall and process CPU seconds)."""
    from lipdet.models.lipschitz import head_bounds, layer_table

    wall, cpu = time.perf_counter(), time.process_time()
    table = layer_table(model)
    heads = head_bounds(model, table)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    lo, hi = ratio_range(table, heads)
    return Row(arch, form, wall, cpu, heads["loc"], heads["cls"], lo, hi)


def bench_arch(arch: str, width: float, input_size: int) -> list[Row]:
    from lipdet.models import build_model, fold_model

    torch.manual_seed(0)
    model = build_model(arch, width=width, input_size=input_size)
    with torch.no_grad():
        model.train()(torch.rand(2, 3, input_size, input_size))  # settle u (and BN statistics)
    model.eval()
    return [analyse(arch, "random init", model), analyse(arch, "folded", fold_model(model))]


def parse(argv: list[str] | None) -> argparse.Namespace:
    from lipdet.models.config import ARCHS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (default 1)")
    p.add_argument("--input-size", type=int, default=74, help="input side in pixels (default 74)")
    p.add_argument("--target", type=float, default=5.0, help="seconds allowed per model (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.width <= 0:
        p.error("--width must be > 0")
    if args.target <= 0:
        p.error("--target must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from lipdet.hardware import machine

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine().line())
    print(f"{torch.get_num_threads()} torch threads, width {args.width}, input {args.input_size}; "
          "layer_table + head_bounds (every bound and every measured value)")
    header = (f"| {'arch':<13} | {'model':<11} | {'wall s':>7} | {'cpu s':>7} | {'L_loc':>10} | {'L_cls':>10} "
              f"| {'bound/measured':>19} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    ok = True
    for arch in args.archs:
        for r in bench_arch(arch, args.width, args.input_size):
            print(f"| {r.arch:<13} | {r.form:<11} | {r.wall:>7.2f} | {r.cpu:>7.2f} | {r.l_loc:>10.5g} | "
                  f"{r.l_cls:>10.5g} | {r.ratio_min:>8.5f} - {r.ratio_max:<8.5f} |")
            ok = ok and r.wall < args.target
            sys.stdout.flush()
    print(f"target: every model under {args.target:g} s (wall) -> " + ("met" if ok else "NOT met"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
