"""PGD throughput vs the raw cost of the twin's forward + backward, in one run.

    python benchmarks/attack.py [--arch naive] [--width 1.0] [--batch 32] [--steps 10] [--repeats 3]
                                [--threads 0] [--device cpu] [--loss multibox]

Measures, on the same random images and ground truth:

* ``raw``: one forward of the folded twin plus one backward to the input, with a plain sum as the
  objective -- the floor any gradient attack pays per step;
* ``raw+loss``: the same with the attack loss (MultiBox matching, hard negative mining) instead of
  the sum;
* ``pgd``: :func:`lipdet.eval.attacks.pgd_l2` with ``--steps`` steps and one restart, per step
  (includes the random start, projections, clamps and the final forward that scores the restart).

Prints a table with images x steps / s and the attack loop's overhead over ``raw`` and
``raw+loss``; the target is < 20 % over ``raw``. The three are timed in ``--repeats`` interleaved
rounds after a warm-up; the minimum is reported (the intrinsic cost on a shared machine), the
median beside it. On the CPU the clock is the process's CPU time by default (``--clock``), which a
busy neighbour does not inflate (use ``--threads 1`` so CPU time equals work).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lipdet.eval.attacks import ATTACK_LOSSES, AttackLoss, pgd_l2
from lipdet.hardware import machine
from lipdet.models import build_model, fold_model


def _targets(n: int, size: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        x1 = torch.rand(k, generator=g) * size * 0.6
        y1 = torch.rand(k, generator=g) * size * 0.4
        w = size * (0.1 + 0.2 * torch.rand(k, generator=g))
        h = size * (0.3 + 0.3 * torch.rand(k, generator=g))
        boxes = torch.stack([x1, y1, (x1 + w).clamp(max=size), (y1 + h).clamp(max=size)], dim=1)
        out.append({"boxes": boxes, "labels": torch.randint(0, 10, (k,), generator=g)})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, cpu_time: bool) -> float:
    clock = time.process_time if cpu_time else time.perf_counter
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="naive")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--loss", default="multibox", choices=ATTACK_LOSSES,
                    help="one attack loss (lipdet eval's default ensemble is one PGD per loss, back to back)")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="cpu = this process's CPU time (stable on a shared machine; auto: cpu on CPU, wall on GPU)")
    args = ap.parse_args()
    print(machine().line())
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    twin = fold_model(build_model(args.arch, width=args.width).eval()).to(device)
    for p in twin.parameters():
        p.requires_grad_(False)
    size = int(twin.config.input_size)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, size, size, generator=g).to(device)
    targets = _targets(args.batch, size, g)
    loss = AttackLoss(args.loss, twin.priors, size)

    def raw() -> None:
        x = images.clone().requires_grad_(True)
        lo, lg = twin(x)
        torch.autograd.grad(lo.sum() + lg.sum(), x)

    def raw_loss() -> None:
        x = images.clone().requires_grad_(True)
        lo, lg = twin(x)
        torch.autograd.grad(loss.batch(lo, lg, targets), x)

    def attack() -> None:
        pgd_l2(twin, images, targets, loss, 0.5, steps=args.steps, restarts=1, seeds=list(range(args.batch)))

    for fn in (raw, raw_loss, attack):  # warm-up (allocator, oneDNN / cuDNN algorithm choice)
        fn()
    # Interleaved rounds, so a noisy neighbour slows all three alike; min = the intrinsic cost, median beside it.
    cpu_time = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu")
    samples: dict[str, list[float]] = {"raw": [], "loss": [], "pgd": []}
    for _ in range(args.repeats):
        samples["raw"].append(_timed(raw, device, cpu_time))
        samples["loss"].append(_timed(raw_loss, device, cpu_time))
        samples["pgd"].append(_timed(attack, device, cpu_time) / args.steps)
    t_raw, t_loss, t_pgd = (min(samples[k]) for k in ("raw", "loss", "pgd"))
    med = {k: statistics.median(v) for k, v in samples.items()}

    n = args.batch
    print(f"device {device}, threads {torch.get_num_threads()}, {args.arch} width {args.width} "
          f"({sum(p.numel() for p in twin.parameters()):,} params), {size}x{size}, batch {n}, "
          f"PGD {args.steps} steps, loss {args.loss}, {'CPU' if cpu_time else 'wall'} time, "
          f"{args.repeats} interleaved rounds (min; median in brackets)")
    print(f"{'':<34}{'ms / step':>10}{'(median)':>10}{'img*steps/s':>13}{'vs raw':>9}")
    rows = [("raw forward+backward (sum)", t_raw, med["raw"]),
            (f"raw forward+{args.loss}+backward", t_loss, med["loss"]),
            ("PGD per step (whole attack loop)", t_pgd, med["pgd"])]
    for name, t, m in rows:
        print(f"{name:<34}{1000 * t:>10.1f}{f'({1000 * m:.1f})':>10}{n / t:>13.1f}{100 * (t / t_raw - 1):>+8.1f}%")
    overhead = t_pgd / t_raw - 1
    print(f"attack-loop overhead over raw forward+backward: {100 * overhead:+.1f}% "
          f"(over raw+loss: {100 * (t_pgd / t_loss - 1):+.1f}%); target < +20%: {'OK' if overhead < 0.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
