"""Per-layer Lipschitz analysis of a detector (parametrised or folded).

Bounds are for the L2 norm over whole tensors, input pixels in the model's input units (images in
``[0, 1]``). The trunk is a chain, so the product of per-layer bounds up to a tap bounds the map
input -> tap; times a head's bound it bounds input -> that scale's head output. A certificate for
one anchor uses the max over scales (``head_bounds(...)["cls"]`` / ``["loc"]``).

Every bound is a guaranteed upper bound computed from the weights (:mod:`lipdet.models.opnorm` for
convolutions, including its float64 rounding margin). Beside each one sits ``measured``: a lower
estimate of the same per-layer quantity (Lanczos on the convolution, a Jacobian power iteration
on an SLL block, the exact value of a pool / pad / BatchNorm), and products of those for the
heads. ``bound / measured >= 1`` is the slack of the per-layer bounds; the product of per-layer
constants may itself exceed the whole map's constant, which neither number measures.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from lipdet.errors import LipdetError
from lipdet.models.layers import HW, pool_attained, pool_lipschitz
from lipdet.models.opnorm import U64, NormEstimate, conv_norm_estimates, conv_operator_norm, jacobian_norm

__all__ = [
    "LayerBound",
    "NormEstimate",
    "bound_ratio",
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
        norm: guaranteed upper bound of the module's Lipschitz constant (operator norm for linear layers).
        cumulative: product of the bounds from the input up to and including this module.
        measured: a lower estimate of the quantity ``norm`` bounds (see the module docstring).
        cumulative_measured: product of ``measured`` from the input up to and including this module.
    """

    name: str
    kind: str
    norm: float
    cumulative: float
    measured: float = 0.0
    cumulative_measured: float = 0.0

    @property
    def ratio(self) -> Optional[float]:
        """``norm / measured`` (>= 1 up to rounding; 1 when both are 0; None when only ``measured`` is 0)."""
        return bound_ratio(self.norm, self.measured)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerBound":
        """Inverse of :meth:`to_dict` (derived and unknown keys ignored; old rows without ``measured`` load)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def bound_ratio(bound: float, measured: float) -> Optional[float]:
    """``bound / measured`` (1 when both are 0; None when only ``measured`` is 0)."""
    if measured > 0:
        return bound / measured
    return 1.0 if bound == 0 else None


def module_bound(module: nn.Module, input_hw: HW) -> tuple[str, NormEstimate]:
    """``(kind, (bound, measured))`` for one module whose input has spatial size ``input_hw``.

    Uses the module's own ``lipschitz_estimates`` when it has one (every lipdet layer); plain torch
    modules are handled too: ``nn.Conv2d`` (operator norm), ``nn.MaxPool2d`` (``ceil(k/s)``; measured:
    the exact constant at ``input_hw``), ``nn.BatchNorm2d`` (``max |gamma| / sqrt(var + eps)``, exact,
    float64 with its rounding margin), ReLU / Identity (1, exact).
    """
    if hasattr(module, "lipschitz_estimates"):
        kind = str(getattr(module, "kind", type(module).__name__))
        return kind, NormEstimate(*(float(v) for v in module.lipschitz_estimates(input_hw)))
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise LipdetError("only plain zero-padded convolutions are supported in Lipschitz analysis")
        return "conv", conv_norm_estimates(module.weight, input_hw, module.stride[0], int(module.padding[0]))
    if isinstance(module, nn.MaxPool2d):
        k, s = (v if isinstance(v, int) else v[0] for v in (module.kernel_size, module.stride))
        return "maxpool", NormEstimate(pool_lipschitz(int(k), int(s)),
                                       pool_attained(int(k), int(s), input_hw, module.ceil_mode))
    if isinstance(module, nn.BatchNorm2d):
        return "batchnorm", _batchnorm_estimate(module)
    if isinstance(module, (nn.ReLU, nn.Identity)):
        return ("relu" if isinstance(module, nn.ReLU) else "identity"), NormEstimate(1.0, 1.0)
    raise LipdetError(f"no Lipschitz bound known for module type {type(module).__name__}")


def _batchnorm_estimate(bn: nn.BatchNorm2d) -> NormEstimate:
    """``max |gamma| / sqrt(var + eps)`` in float64 (3 roundings: bound times ``1 + 4u``); exact up to them."""
    with torch.no_grad():
        var = bn.running_var.double()
        g = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        value = float((g.abs() / torch.sqrt(var + bn.eps)).max())
    return NormEstimate(value * (1.0 + 4 * U64), value)


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
    cum, cum_measured = 1.0, 1.0
    with _eval_no_grad(model):
        for name, m in model.trunk.items():
            kind, est = module_bound(m, shapes[f"trunk.{name}"])
            cum *= est.bound * (1.0 + 2 * U64)  # the product rounded up: still an upper bound
            cum_measured *= est.measured
            rows.append(LayerBound(name, kind, est.bound, cum, est.measured, cum_measured))
    return rows


def head_bounds(model: nn.Module, table: Optional[list[LayerBound]] = None) -> dict[str, Any]:
    """Bounds of input -> head outputs, with the measured (lower-estimate) products beside them.

    Returns:
        ``{"loc": L_loc, "cls": L_cls, "loc_measured", "cls_measured", "per_scale": [{"feature_size",
        "tap", "trunk", "loc_head", "cls_head", "loc", "cls", "trunk_measured", "loc_head_measured",
        "cls_head_measured", "loc_measured", "cls_measured"}, ...]}`` where ``per_scale[i]["cls"] =
        trunk bound to the tap x the class head's bound`` and ``"cls"``/``"loc"`` are the max over
        scales: the per-anchor bounds used for certification (an anchor's outputs belong to one
        scale). All un-suffixed values are guaranteed upper bounds; ``*_measured`` are the same
        products of the per-layer lower estimates (never used in a certificate).
    """
    _check_model(model)
    table = layer_table(model) if table is None else table
    cum = {row.name: (row.cumulative, row.cumulative_measured) for row in table}
    shapes = _trace_input_hw(model)
    up = 1.0 + 2 * U64  # rounding of each product, upwards
    per_scale = []
    with _eval_no_grad(model):
        for tap, size in zip(model.taps, model.prior_spec.feature_sizes):
            _, loc = module_bound(model.loc_heads[tap], shapes[f"loc_heads.{tap}"])
            _, cls = module_bound(model.cls_heads[tap], shapes[f"cls_heads.{tap}"])
            trunk, trunk_m = cum[tap]
            per_scale.append({
                "feature_size": int(size),
                "tap": tap,
                "trunk": trunk,
                "loc_head": loc.bound,
                "cls_head": cls.bound,
                "loc": trunk * loc.bound * up,
                "cls": trunk * cls.bound * up,
                "trunk_measured": trunk_m,
                "loc_head_measured": loc.measured,
                "cls_head_measured": cls.measured,
                "loc_measured": trunk_m * loc.measured,
                "cls_measured": trunk_m * cls.measured,
            })
    return {
        "loc": max(p["loc"] for p in per_scale),
        "cls": max(p["cls"] for p in per_scale),
        "loc_measured": max(p["loc_measured"] for p in per_scale),
        "cls_measured": max(p["cls_measured"] for p in per_scale),
        "per_scale": per_scale,
    }


def plot_bounds(table: list[LayerBound], heads: dict[str, Any], out_png: str | Path) -> Path:
    """Bar chart of per-layer bounds with the cumulative bound as a line (log scale), like the seed's Figure 4.

    Trunk layers first, then each scale's loc / cls head (bar = head bound, marker = input -> head
    bound); small black ticks mark each bar's ``measured`` lower estimate where the table has one.
    Uses matplotlib's Agg canvas directly (no global backend change). Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.name for r in table]
    norms = [r.norm for r in table]
    cums = [r.cumulative for r in table]
    measured = [r.measured for r in table]
    head_names, head_norms, head_totals = [], [], []
    for p in heads["per_scale"]:
        for key in ("loc", "cls"):
            head_names.append(f"{key}@{p['feature_size']}")
            head_norms.append(p[f"{key}_head"])
            head_totals.append(p[key])
            measured.append(float(p.get(f"{key}_head_measured", 0.0)))
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
    mx = [x for x, m in zip(xs + hx, measured) if m > 0]
    if mx:
        ax.plot(mx, [max(m, floor) for m in measured if m > 0], "k_", ms=12, label="measured (lower estimate)")
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
    jac, v = jacobian_norm(fn, x, power_iters, seed=seed + 1)
    best = max(best, jac)
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
