#!/usr/bin/env python3
"""Training throughput: a plain PyTorch loop vs Ray Train (1 and 2 workers), fp32 vs bf16.

Same model, same data (the first ``--images`` training crops -- the train split less the validation
images, as ``lipdet train`` trains -- of the synthetic SVHN or ``--data``), same global batch, no
augmentation. Images/s counts training steps only:

* plain: one process, ``torch.set_num_threads(cores)``, a minimal hand-written loop over the Ray
  workers' recipe (:func:`lipdet.train.recipe.build_training`: model, fused Adam, MultiBox loss),
  a DataLoader and autocast; fp32 and bf16 side by side, each batch trained by both in alternating
  order (:func:`plain_loops`); timed after ``--warmup`` steps.
* Ray N: ``lipdet.train``'s real TorchTrainer and loop on N workers (cores // N threads each,
  per-worker batch = global / N, DDP over gloo); the loop's own images/s over every epoch but
  the first (warm-up), validation excluded; and the CPU utilisation over those epochs (validation
  included), from ``/proc``: the whole machine's busy share (``/proc/stat``) and the Ray Train worker
  processes' share of every core (``/proc/PID/stat``), with the share of the step time spent waiting
  for data. The issue's target: > 90% on a 2-core machine with 2 workers. Other processes count in
  the machine's share: the table prints the load average to say how idle the machine was.

The first line of the output names the machine (:func:`lipdet.hardware.machine`): CPU model,
instruction sets, cores, torch and ONNX Runtime versions. Figures are ratios measured side by side.

Usage::

    python benchmarks/train_throughput.py              # ~4 minutes on 2 cores
    python benchmarks/train_throughput.py --plain-only # ~35 s: plain loops and the per-operator table
    python benchmarks/train_throughput.py --rounds 3   # medians: Ray and plain runs vary by run
    python benchmarks/train_throughput.py --images 1024 --arch sll-l2 --width 2

The measured window matters: with 384 images x 2 epochs, a bf16 Ray epoch lasts ~2 s and catches the
cluster's start-up work (controller, idle workers importing torch), which read as a 25-35% "Ray
overhead" that a longer window (768 x 3, the default) shows is not there in steady state.
The per-phase and per-operator tables show what bounds the bf16/fp32 ratio: the MultiBox loss and
the optimizer (fp32 in both) do not speed up; inside forward and backward, oneDNN's AMX
convolutions run ~2.6x faster in bf16 for this model (forward and input gradients 3-4x, weight
gradients 1.7-2.4x; ``ONEDNN_VERBOSE=1`` prints each primitive's time), BatchNorm, ReLU and
max-pool 0.9-1.8x. The last lines say how fast the non-convolution rest would have to get for the
step to reach ``--target``.

Ray workers normally run at nice 15; here the local cluster runs them at nice 0
(``RAY_worker_niceness=0``) so that on a busy machine they compete on equal terms with the plain loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Ray starts each 1-CPU worker with OMP_NUM_THREADS=1 before the loop calls torch.set_num_threads;
# give the plain loop the same environment so only the thread count set by torch differs (none).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lipdet.cluster import local_cores as cores  # noqa: E402
from lipdet.cluster import ray_session  # noqa: E402
from lipdet.data.dataset import detection_collate, resolve_data  # noqa: E402
from lipdet.hardware import machine, process_table  # noqa: E402
from lipdet.train.loop import load_split, load_train_state  # noqa: E402
from lipdet.train.recipe import LoopConfig, Training, build_training  # noqa: E402
from lipdet.train.trainer import RunPlan, build_trainer  # noqa: E402


def dataset(args):
    """The data folder and the first ``--images`` training crops (the train split less the
    validation images, as ``lipdet train`` trains on them)."""
    root = Path(resolve_data(args.data)).resolve()
    return root, load_split(LoopConfig(data_root=str(root), synthetic=False), "train", args.images)


PHASES = ("data", "forward", "loss", "backward", "optimizer")
MF = torch.channels_last


def build_runs(args, precisions: list[str]) -> dict[str, Training]:
    """One :class:`Training` per precision: the Ray workers' recipe (same initial weights, fused Adam,
    MultiBox loss, channels_last). The plain loop steps it by hand at a constant lr: no warm-up and
    its scheduler is never stepped, so the lr stays 1e-3 (``lr_factor(0, 1, 0) == 1``)."""
    runs = {}
    for precision in precisions:
        cfg = LoopConfig(arch=args.arch, width=args.width, lr=1e-3, precision=precision, channels_last=True)
        runs[precision] = build_training(cfg, torch.device("cpu"), total_steps=1, warmup_steps=0)
    return runs


def train_once(run: Training, precision: str, x: torch.Tensor, targets: list) -> list[float]:
    """One plain training step; returns ``perf_counter`` marks at its start and after forward,
    loss, backward and optimizer."""
    model, loss_fn, opt = run.model, run.criterion, run.optimizer
    marks = [time.perf_counter()]
    x = x.contiguous(memory_format=MF)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loc, logits = model(x)
    marks.append(time.perf_counter())
    loss = loss_fn(loc, logits, targets)["loss"]
    marks.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(time.perf_counter())
    opt.step()
    marks.append(time.perf_counter())
    return marks


def side_by_side(args, ds, precisions: list[str], steps: int):
    """Yield ``(step, precision, x, targets, data_s)`` for ``steps`` batches, each batch once per
    precision in alternating order; ``data_s`` is the batch's loading time (every precision pays it)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=detection_collate, num_workers=0)
    done = 0
    while True:
        t_data = time.perf_counter()
        for x, targets in loader:
            data_s = time.perf_counter() - t_data
            for precision in precisions if done % 2 == 0 else precisions[::-1]:
                yield done, precision, x, targets, data_s
            done += 1
            if done >= steps:
                return
            t_data = time.perf_counter()


def plain_loops(args, ds, precisions: list[str]) -> dict[str, tuple[float, dict[str, float]]]:
    """Images/s of a single-process loop per precision, and the milliseconds per step spent in each
    of :data:`PHASES` (timed steps only).

    The precisions run side by side: one model, optimizer and loss per precision (same initial
    weights), and every batch is trained by each of them in turn (the order alternates), so a
    slow spell of the machine costs every precision alike. On this shared 2-core machine
    back-to-back runs of the same loop differ by up to 1.5x; interleaved, the ratio is stable.
    """
    runs = build_runs(args, precisions)
    spent = {p: dict.fromkeys(PHASES, 0.0) for p in precisions}
    images = dict.fromkeys(precisions, 0)
    for step, precision, x, targets, data_s in side_by_side(args, ds, precisions, args.warmup + args.steps):
        marks = train_once(runs[precision], precision, x, targets)
        if step >= args.warmup:
            spent[precision]["data"] += data_s
            for phase, a, b in zip(PHASES[1:], marks, marks[1:]):
                spent[precision][phase] += b - a
            images[precision] += x.shape[0]
    return {p: (images[p] / sum(spent[p].values()), {k: 1000 * v / args.steps for k, v in spent[p].items()})
            for p in precisions}


OP_KINDS = (("convolution", ("convolution",)), ("batch norm", ("batch_norm",)),
            ("relu", ("relu", "threshold", "clamp_min")), ("max-pool", ("pool",)))


def op_breakdown(args, ds, precisions: list[str], steps: int) -> dict[str, dict[str, float]]:
    """Milliseconds per step by kind of operator (:data:`OP_KINDS`, the rest is "loss, optimizer,
    other"), from ``torch.profiler``'s self CPU time over ``steps`` side-by-side steps (after two
    warm-up steps): the convolutions are what AMX speeds up, the rest bounds the bf16/fp32 ratio."""
    runs = build_runs(args, precisions)
    ms = {p: {} for p in precisions}
    for step, precision, x, targets, _ in side_by_side(args, ds, precisions, 2 + steps):
        if step < 2:
            train_once(runs[precision], precision, x, targets)
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train_once(runs[precision], precision, x, targets)
        for event in prof.key_averages():
            kind = next((k for k, keys in OP_KINDS if any(key in event.key for key in keys)), "loss, optimizer, other")
            ms[precision][kind] = ms[precision].get(kind, 0.0) + event.self_cpu_time_total / 1000 / steps
    return ms


RAY_WORKER = "ray::RayTrainWorker"
"""How a Ray Train worker process names itself in ``/proc/PID/cmdline`` (Ray's process title)."""


def _proc_stat() -> tuple[int, int]:
    """``(busy, total)`` jiffies of the whole machine since boot (``/proc/stat``'s ``cpu`` line; idle and
    iowait are not busy; guest time is inside user)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _matching_jiffies(match: str) -> dict[int, int]:
    """utime + stime jiffies (all threads) of every process whose ``/proc/PID/cmdline`` contains ``match``."""
    return {pid: ticks for pid, (cmd, _, ticks) in process_table().items() if match in cmd}


@dataclass
class CpuSampler:
    """Samples ``/proc`` every ``period`` seconds in a thread: the machine's busy/total jiffies and the
    jiffies of the processes whose command line contains ``match`` (the Ray Train workers by default).

    :meth:`share` turns two samples into the machine's busy share and those processes' share of all
    the machine's cores over a window (fractions in [0, 1]; 1 = every core busy the whole window).
    """

    match: str = RAY_WORKER
    period: float = 0.25
    samples: list[tuple[float, int, int, dict[int, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), *_proc_stat(), _matching_jiffies(self.match)))
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def share(self, start: float, end: float) -> tuple[float, float]:
        """``(machine busy, matched processes)`` shares between the first sample at or after ``start`` and
        the last at or before ``end`` (unix seconds); NaN when the window holds fewer than two samples."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return float("nan"), float("nan")
        (_, busy0, total0, procs0), (_, busy1, total1, procs1) = inside[0], inside[-1]
        ticks = max(1, total1 - total0)
        mine = sum(procs1[pid] - procs0[pid] for pid in procs1.keys() & procs0.keys())
        return (busy1 - busy0) / ticks, mine / ticks


@dataclass
class RayRun:
    """One Ray Train measurement over its timed epochs (all but the first): images/s, the world size
    it reported, the machine's busy share and the Ray workers' share of every core (from ``/proc``,
    training and validation included), and the share of the step time spent waiting for data."""

    images_per_s: float
    world: int
    machine_busy: float
    workers_busy: float
    data_share: float


def ray_loop(args, root: Path, workers: int, precision: str) -> RayRun:
    """lipdet's Ray Train loop on ``workers`` workers, measured over every epoch but the first (from the
    history in its last checkpoint, with the epochs' start and end times for the CPU window)."""
    with tempfile.TemporaryDirectory(prefix="lipdet-bench-") as tmp:
        loop = LoopConfig(
            arch=args.arch, width=args.width, data_root=str(root), synthetic=False, epochs=args.epochs,
            batch_size=args.batch_size, precision=precision, augment=False, train_limit=args.images,
            val_limit=16, channels_last=True, use_gpu=False,
        )
        plan = RunPlan(name=f"bench-{workers}-{precision}", storage_path=tmp, run_dir=Path(tmp), remote=False,
                       workers=workers, use_gpu=False, max_failures=0, loop=loop, data_root=root, resumed=False)
        with CpuSampler() as cpu:
            result = build_trainer(plan).fit()
        with result.checkpoint.as_directory() as folder:
            history = load_train_state(folder)["history"]
        timed = history[1:] or history  # the first epoch is warm-up
        seconds = sum(m["train_time_s"] for m in timed)
        images = sum(m["images_per_s"] * m["train_time_s"] for m in timed)
        busy, ray_busy = cpu.share(timed[0]["epoch_start_unix_s"], timed[-1]["epoch_end_unix_s"])
        return RayRun(images / seconds, int(result.metrics["world_size"]), busy, ray_busy,
                      sum(m["data_time_s"] for m in timed) / seconds)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="SVHN format-1 folder (default: synthetic SVHN)")
    ap.add_argument("--arch", default="naive")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--images", type=int, default=768, help="train images per epoch")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch")
    ap.add_argument("--epochs", type=int, default=3, help="Ray epochs (all but the first are measured)")
    ap.add_argument("--warmup", type=int, default=2, help="plain-loop warm-up steps")
    ap.add_argument("--steps", type=int, default=0, help="plain-loop timed steps per precision (default: two epochs)")
    ap.add_argument("--plain-only", action="store_true", help="skip the Ray Train runs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every measurement; the table shows medians (Ray runs cannot be interleaved)")
    ap.add_argument("--breakdown-steps", type=int, default=6,
                    help="profiled side-by-side steps for the per-operator table (0: skip it)")
    ap.add_argument("--target", type=float, default=2.5, help="bf16/fp32 ratio the per-operator table is read against")
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.target <= 0:
        ap.error("--target must be > 0")
    if args.steps <= 0:
        args.steps = max(1, 2 * args.images // args.batch_size)
    return args


def measure(args, root: Path, ds, precisions: list[str]):
    """Every round's images/s per ``(setup, precision)``, the plain loop's ms per phase and every
    round's :class:`RayRun` per Ray ``(setup, precision)``."""
    samples: dict[tuple[str, str], list[float]] = {}  # (setup, precision) -> images/s of each round
    phase_runs: dict[str, list[dict[str, float]]] = {}
    cpu_runs: dict[tuple[str, str], list[RayRun]] = {}
    for r in range(args.rounds):
        plain = plain_loops(args, ds, precisions)
        for precision in precisions:
            ips, ms = plain[precision]
            samples.setdefault(("plain PyTorch (1 process)", precision), []).append(ips)
            phase_runs.setdefault(precision, []).append(ms)
            print(f"  [{r + 1}/{args.rounds}] plain {precision}: {ips:.1f} img/s", file=sys.stderr, flush=True)
        for precision in [] if args.plain_only else precisions:
            for workers in (1, 2):
                run = ray_loop(args, root, workers, precision)
                assert run.world == workers
                setup = f"Ray Train, {workers} worker{'s' if workers > 1 else ''}"
                samples.setdefault((setup, precision), []).append(run.images_per_s)
                cpu_runs.setdefault((setup, precision), []).append(run)
                print(f"  [{r + 1}/{args.rounds}] ray x{workers} {precision}: {run.images_per_s:.1f} img/s, "
                      f"machine {run.machine_busy:.0%} busy, workers {run.workers_busy:.0%}", file=sys.stderr, flush=True)
    return samples, phase_runs, cpu_runs


def main() -> None:
    args = parse_args()
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray  # lazy: Ray is heavy / optional

    print(machine().line(), flush=True)
    root, ds = dataset(args)
    c = cores()
    print(f"{args.arch} width {args.width}, {len(ds)} images/epoch, global batch {args.batch_size}, "
          f"{c} cores, torch {torch.__version__}, ray {ray.__version__}", file=sys.stderr)
    precisions = args.precisions.split(",")
    with contextlib.nullcontext() if args.plain_only else ray_session(None, c):  # local Ray, c CPUs
        t_start = time.perf_counter()
        torch.set_num_threads(c)
        samples, phase_runs, cpu_runs = measure(args, root, ds, precisions)
    rows = [(setup, p, statistics.median(v), v) for (setup, p), v in samples.items()]
    phases = {p: {k: statistics.fmean(ms[k] for ms in runs) for k in PHASES} for p, runs in phase_runs.items()}
    by_op = op_breakdown(args, ds, precisions, args.breakdown_steps) if args.breakdown_steps > 0 else {}

    base = {p: ips for name, p, ips, _ in rows if name.startswith("plain")}
    fp32 = {name: ips for name, p, ips, _ in rows if p == "fp32"}
    print()
    if args.rounds > 1:
        print(f"Median of {args.rounds} rounds (min-max in brackets):")
    print("| setup | precision | images/s | vs plain (same precision) | vs fp32 (same setup) |")
    print("|---|---|---:|---:|---:|")
    for name, p, ips, runs in rows:
        vs_plain = ips / base[p] if base.get(p) else float("nan")
        vs_fp32 = ips / fp32[name] if fp32.get(name) else float("nan")
        spread = f" [{min(runs):.1f}-{max(runs):.1f}]" if len(runs) > 1 else ""
        print(f"| {name} | {p} | {ips:.1f}{spread} | {vs_plain:.2f}x | {vs_fp32:.2f}x |")
    print(f"\n({time.perf_counter() - t_start:.0f} s; {c} cores; threads: plain {c}, Ray {c}//workers per worker)")
    if cpu_runs:
        print_cpu(cpu_runs, _load_average())
    # Where a plain step's time goes: the phases that do not speed up with bf16 cap the ratio.
    print("\nPlain loop, ms per step:")
    print("| precision | " + " | ".join(PHASES) + " | total |")
    print("|---|" + "---:|" * (len(PHASES) + 1))
    for precision, ms in phases.items():
        print(f"| {precision} | " + " | ".join(f"{ms[p]:.1f}" for p in PHASES) + f" | {sum(ms.values()):.1f} |")
    if len(phases) > 1 and "fp32" in phases:
        for precision, ms in phases.items():
            if precision != "fp32":
                print(f"speed-up {precision} vs fp32 per phase: " + ", ".join(
                    f"{p} {phases['fp32'][p] / max(ms[p], 1e-9):.2f}x" for p in PHASES))
    if by_op:
        print_breakdown(by_op, args.breakdown_steps, args.target)


def _load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "unknown"


def print_cpu(cpu_runs: dict[tuple[str, str], list[RayRun]], load: str) -> None:
    """CPU utilisation of the Ray runs (medians over rounds): the issue's target is > 90% of a 2-core
    machine during ``lipdet train --workers 2``. The machine share counts every process (other users
    too: the load average says how busy the machine was); the workers' share counts Ray Train's own."""
    print(f"\nCPU utilisation over the timed epochs, from /proc (training + validation; load average {load} "
          "at the end):")
    print("| setup | precision | machine busy | Ray workers (share of all cores) | data wait (share of step time) |")
    print("|---|---|---:|---:|---:|")
    for (setup, precision), runs in cpu_runs.items():
        med = {k: statistics.median(getattr(r, k) for r in runs) for k in ("machine_busy", "workers_busy", "data_share")}
        print(f"| {setup} | {precision} | {med['machine_busy']:.0%} | {med['workers_busy']:.0%} | {med['data_share']:.1%} |")


def print_breakdown(by_op: dict[str, dict[str, float]], steps: int, target: float) -> None:
    """The per-operator table and what it implies for a bf16/fp32 ``target``: the convolutions'
    own ratio caps the step's, and the rest must speed up by at least the printed factor."""
    kinds = [k for k, _ in OP_KINDS] + ["loss, optimizer, other"]
    cols = list(by_op)
    print(f"\nPlain loop, ms per step by operator (torch.profiler self CPU time, {steps} side-by-side steps):")
    print("| operators | " + " | ".join(cols) + " |" + (" bf16 speed-up |" if "fp32" in cols and "bf16" in cols else ""))
    print("|---|" + "---:|" * (len(cols) + ("fp32" in cols and "bf16" in cols)))
    for kind in kinds + ["total"]:
        vals = {p: (sum(by_op[p].values()) if kind == "total" else by_op[p].get(kind, 0.0)) for p in cols}
        extra = f" {vals['fp32'] / max(vals['bf16'], 1e-9):.2f}x |" if "fp32" in vals and "bf16" in vals else ""
        print(f"| {kind} | " + " | ".join(f"{vals[p]:.1f}" for p in cols) + " |" + extra)
    if "fp32" not in by_op or "bf16" not in by_op:
        return
    conv32, conv16 = by_op["fp32"].get("convolution", 0.0), by_op["bf16"].get("convolution", 0.0)
    rest32 = sum(by_op["fp32"].values()) - conv32
    rest16 = sum(by_op["bf16"].values()) - conv16
    allowed = (conv32 + rest32) / target - conv16  # bf16 time the rest may take for a `target` step
    print(f"convolutions alone: {conv32 / max(conv16, 1e-9):.2f}x; the rest: {rest32 / max(rest16, 1e-9):.2f}x "
          f"({rest16:.0f} of {conv16 + rest16:.0f} ms in bf16)")
    if allowed <= 0:
        print(f"a {target:.2f}x step is out of reach even if the rest took no time in bf16")
    else:
        print(f"a {target:.2f}x step needs the rest to run {rest32 / allowed:.2f}x faster in bf16 than in fp32 "
              f"(<= {allowed:.0f} ms)")


if __name__ == "__main__":
    main()
