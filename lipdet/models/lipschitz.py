"""Per-layer Lipschitz analysis of a detector (parametrised or folded).

Bounds are for the L2 norm over whole tensors, input pixels in the model's input units (images in
``[0, 1]``). The trunk is a chain, so the product of per-layer bounds up to a tap bounds the map
input -> tap; times a head's bound it bounds input -> that scale's head output. A certificate for
one anchor uses the max over scales (``head_bounds(...)["cls"]`` / ``["loc"]``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from lipdet.errors import LipdetError
from lipdet.models.layers import HW, conv_operator_norm, pool_lipschitz

__all__ = [
    "LayerBound",
    "conv_operator_norm",
    "empirical_lipschitz",
    "head_bounds",
    "layer_table",
    "module_bound",
    "plot_bounds",
]


@dataclass
class LayerBound:
    """One row of a Lipschitz table.

    Attributes:
        name: module name (``trunk.<name>`` key, or ``loc_heads.<tap>`` for heads).
        kind: module kind (``sll``, ``conv-spectral``, ``maxpool``, ...).
        norm: Lipschitz bound of the module alone (operator norm for linear layers).
        cumulative: product of the bounds from the input up to and including this module.
    """

    name: str
    kind: str
    norm: float
    cumulative: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_bound(module: nn.Module, input_hw: HW) -> tuple[str, float]:
    """``(kind, bound)`` for one module whose input has spatial size ``input_hw``.

    Uses the module's own ``lipschitz_bound`` when it has one (every lipdet layer); plain torch
    modules are handled too: ``nn.Conv2d`` (operator norm), ``nn.MaxPool2d`` (``ceil(k/s)``),
    ``nn.BatchNorm2d`` (``max |gamma| / sqrt(var + eps)``), ReLU / Identity (1),
    ``nn.Sequential`` (product, shapes traced).
    """
    if hasattr(module, "lipschitz_bound"):
        return str(getattr(module, "kind", type(module).__name__)), float(module.lipschitz_bound(input_hw))
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise LipdetError("only plain zero-padded convolutions are supported in Lipschitz analysis")
        return "conv", conv_operator_norm(module.weight, input_hw, module.stride[0], int(module.padding[0]))
    if isinstance(module, nn.MaxPool2d):
        k, s = module.kernel_size, module.stride
        k = k if isinstance(k, int) else k[0]
        s = s if isinstance(s, int) else s[0]
        return "maxpool", pool_lipschitz(int(k), int(s))
    if isinstance(module, nn.BatchNorm2d):
        g = module.weight if module.weight is not None else torch.ones_like(module.running_var)
        return "batchnorm", float((g.abs() / torch.sqrt(module.running_var + module.eps)).max())
    if isinstance(module, (nn.ReLU, nn.Identity)):
        return "relu" if isinstance(module, nn.ReLU) else "identity", 1.0
    raise LipdetError(f"no Lipschitz bound known for module type {type(module).__name__}")


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes.items():
            m.training = t


def _trace_input_hw(model: nn.Module) -> dict[str, HW]:
    """Input spatial size of every trunk module and head, from one forward at the config's size."""
    shapes: dict[str, HW] = {}
    hooks = []
    for prefix, container in (("trunk", model.trunk), ("loc_heads", model.loc_heads), ("cls_heads", model.cls_heads)):
        for name, m in container.items():
            def hook(mod: nn.Module, args: tuple, key: str = f"{prefix}.{name}") -> None:
                shapes[key] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

            hooks.append(m.register_forward_pre_hook(hook))
    s = model.config.input_size
    device = model.priors.device
    dtype = next(model.parameters()).dtype
    try:
        with _eval_no_grad(model):
            model(torch.zeros(1, 3, s, s, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _check_model(model: nn.Module) -> None:
    for attr in ("trunk", "loc_heads", "cls_heads", "taps", "config"):
        if not hasattr(model, attr):
            raise LipdetError(f"not a lipdet detector (missing .{attr}): {type(model).__name__}")


def layer_table(model: nn.Module) -> list[LayerBound]:
    """Per-module bounds along the trunk in forward order, with cumulative products.

    Works on parametrised and folded models (folded from weights alone). The input shift
    (``x - 0.5``) is 1-Lipschitz and not listed.
    """
    _check_model(model)
    shapes = _trace_input_hw(model)
    rows: list[LayerBound] = []
    cum = 1.0
    with _eval_no_grad(model):
        for name, m in model.trunk.items():
            kind, norm = module_bound(m, shapes[f"trunk.{name}"])
            cum *= norm
            rows.append(LayerBound(name, kind, norm, cum))
    return rows


def head_bounds(model: nn.Module, table: Optional[list[LayerBound]] = None) -> dict[str, Any]:
    """Bounds of input -> head outputs.

    Returns:
        ``{"loc": L_loc, "cls": L_cls, "per_scale": [{"feature_size", "tap", "trunk", "loc_head",
        "cls_head", "loc", "cls"}, ...]}`` where ``per_scale[i]["cls"] = trunk bound to the tap x the
        class head's norm`` and ``"cls"``/``"loc"`` are the max over scales: the per-anchor bounds
        used for certification (an anchor's outputs belong to one scale).
    """
    _check_model(model)
    table = layer_table(model) if table is None else table
    cum = {row.name: row.cumulative for row in table}
    shapes = _trace_input_hw(model)
    per_scale = []
    with _eval_no_grad(model):
        for tap, size in zip(model.taps, model.prior_spec.feature_sizes):
            _, loc_n = module_bound(model.loc_heads[tap], shapes[f"loc_heads.{tap}"])
            _, cls_n = module_bound(model.cls_heads[tap], shapes[f"cls_heads.{tap}"])
            trunk = cum[tap]
            per_scale.append({
                "feature_size": int(size),
                "tap": tap,
                "trunk": trunk,
                "loc_head": loc_n,
                "cls_head": cls_n,
                "loc": trunk * loc_n,
                "cls": trunk * cls_n,
            })
    return {
        "loc": max(p["loc"] for p in per_scale),
        "cls": max(p["cls"] for p in per_scale),
        "per_scale": per_scale,
    }


def plot_bounds(table: list[LayerBound], heads: dict[str, Any], out_png: str | Path) -> Path:
    """Bar chart of per-layer bounds with the cumulative bound as a line (log scale), like the seed's Figure 4.

    Trunk layers first, then each scale's loc / cls head (bar = head norm, marker = input -> head bound).
    Uses matplotlib's Agg canvas directly (no global backend change). Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.name for r in table]
    norms = [r.norm for r in table]
    cums = [r.cumulative for r in table]
    head_names, head_norms, head_totals = [], [], []
    for p in heads["per_scale"]:
        for key in ("loc", "cls"):
            head_names.append(f"{key}@{p['feature_size']}")
            head_norms.append(p[f"{key}_head"])
            head_totals.append(p[key])
    fig = Figure(figsize=(max(8.0, 0.45 * (len(names) + len(head_names))), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(names)))
    hx = list(range(len(names), len(names) + len(head_names)))
    floor = 1e-3
    ax.bar(xs, [max(n, floor) for n in norms], color="#4c72b0", label="layer bound")
    ax.bar(hx, [max(n, floor) for n in head_norms], color="#dd8452", label="head bound")
    ax.plot(xs, [max(c, floor) for c in cums], "k.-", label="cumulative (input -> layer)")
    ax.plot(hx, [max(c, floor) for c in head_totals], "rD", label="input -> head output")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(xs + hx)
    ax.set_xticklabels(names + head_names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("Lipschitz bound (L2)")
    ax.set_title(f"Lipschitz bounds: L_loc={heads['loc']:.4g}, L_cls={heads['cls']:.4g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=120)
    return out



def empirical_lipschitz(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    power_iters: int = 30,
    ascent_steps: int = 30,
    pairs: int = 8,
    seed: int = 0,
) -> float:
    """A measured LOWER bound of ``fn``'s L2 Lipschitz constant around ``x`` (attempts to break a bound).

    The max of: random input pairs (near and far), power iteration on the Jacobian at ``x``
    (``J^T J`` via forward- and reverse-mode autograd) and gradient ascent on
    ``||fn(x) - fn(y)|| / ||x - y||`` starting from the top Jacobian direction. Norms are over whole
    tensors; ``fn`` must be deterministic (put models in eval mode).
    """
    from torch.func import jvp, vjp

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn_like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (fn(a) - fn(b)).norm() / (a - b).norm().clamp_min(1e-30)

    x = x.detach()
    best = 0.0
    with torch.no_grad():
        for i in range(pairs):
            scale = 10.0 ** (-3 + 3 * i / max(1, pairs - 1))
            y = x + scale * randn_like(x)
            best = max(best, float(ratio(x, y)))
            best = max(best, float(ratio(randn_like(x), randn_like(x))))
    # Jacobian power iteration at x
    v = randn_like(x)
    v = v / v.norm()
    _, vjp_fn = vjp(fn, x)
    for _ in range(power_iters):
        _, jv = jvp(fn, (x,), (v,))
        (v,) = vjp_fn(jv)
        v = v.detach() / v.norm().clamp_min(1e-30)
    _, jv = jvp(fn, (x,), (v,))
    best = max(best, float(jv.detach().norm()))
    # gradient ascent on the difference quotient
    if ascent_steps > 0:
        xa = x.clone().requires_grad_(True)
        d = (1e-2 * v).detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([xa, d], lr=1e-2)
        for _ in range(ascent_steps):
            opt.zero_grad()
            r = (fn(xa + d) - fn(xa)).norm() / d.norm().clamp_min(1e-30)
            best = max(best, float(r.detach()))
            (-r).backward()
            opt.step()
    return best
