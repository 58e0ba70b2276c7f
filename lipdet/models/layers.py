"""Building blocks of lipdet's detectors, each with a Lipschitz bound and a plain "folded" form.

Every module here exposes:

* ``kind`` -- a short label used in Lipschitz tables (``"sll"``, ``"conv-spectral"``, ...);
* ``lipschitz_bound(input_hw=None) -> float`` -- a guaranteed upper bound of the module's L2
  Lipschitz constant for inputs of spatial size ``input_hw`` (defaults to the size given at
  construction), computed from the weights alone (convolutions: :mod:`lipdet.models.opnorm`);
* ``lipschitz_estimates(input_hw=None) -> NormEstimate`` -- that bound and ``measured``, a lower
  estimate of the same quantity (Lanczos, a Jacobian power iteration or an exact value), for the
  check / ratio column of Lipschitz tables: never used in a certificate;
* ``fold() -> nn.Module`` -- an equivalent module made of plain ops only (``nn.Conv2d``, ReLU,
  max-pool, subtraction, channel pad/slice), used for export.

Tensors are ``(N, C, H, W)`` float; sizes are pixels. Norms are L2 (Euclidean over all of
``C*H*W``). Every normalisation that a guarantee rests on (SLL's ``t``, spectral norms) is computed
in fp32 with autocast disabled, so guarantees hold when training in bf16/fp16.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipdet.errors import LipdetError
from lipdet.models.opnorm import (
    NORM_MAX_MATVECS,
    NORM_TOL,
    U64,
    NormEstimate,
    conv_adjoint,
    conv_norm_estimates,
    conv_operator_norm,
    conv_operator_norm_and_vector,
    conv_operator_norm_upper,
    conv_output_hw,
    gram_abs,
    gram_norm_bound,
    jacobian_norm,
)

__all__ = [  # the operator-norm names are re-exported: they lived here before lipdet.models.opnorm
    "CONV_MODES", "NORM_MAX_MATVECS", "NORM_TOL", "ChannelPad", "ConvBNAct", "FoldedConv", "FoldedSLL", "MaxPool",
    "NormConv2d", "NormEstimate", "NormPool", "SLLConv2d", "conv_adjoint", "conv_norm_estimates", "conv_operator_norm",
    "conv_operator_norm_and_vector", "conv_operator_norm_upper", "conv_output_hw", "gram_norm_bound", "pool_lipschitz",
]

CONV_MODES: tuple[str, ...] = ("spectral", "standard", "l2")
"""Modes of the entry/exit convolutions of the Lipschitz architectures."""

HW = tuple[int, int]


def _fp32_context(t: Tensor) -> torch.autocast:
    """A context that disables autocast on ``t``'s device (Lipschitz maths runs in fp32)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _hi(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# Plain (folded) modules
# --------------------------------------------------------------------------------------------


class FoldedConv(nn.Module):
    """A plain ``nn.Conv2d`` optionally followed by ReLU: the folded form of every conv layer.

    Input ``(N, Cin, H, W)`` -> output ``(N, Cout, Ho, Wo)``. State dict keys: ``conv.weight``,
    ``conv.bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, bias: bool = True, relu: bool = False,
                 input_hw: Optional[HW] = None) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.relu = relu
        self.input_hw = input_hw

    @property
    def kind(self) -> str:
        return "conv-relu" if self.relu else "conv"

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        """Guaranteed upper bound of the convolution's operator norm (ReLU is 1-Lipschitz)."""
        hw = _need_hw(input_hw, self.input_hw, self)
        c = self.conv
        return conv_operator_norm_upper(c.weight, hw, c.stride[0], int(c.padding[0]))

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """The bound and a lower estimate of the convolution's operator norm (ReLU counted as 1 in both)."""
        hw = _need_hw(input_hw, self.input_hw, self)
        c = self.conv
        return conv_norm_estimates(c.weight, hw, c.stride[0], int(c.padding[0]))

    def fold(self) -> "FoldedConv":
        return self


class FoldedSLL(nn.Module):
    """Folded SLL block ``y = x - conv2(relu(conv1(x)))``, shapes ``(N, C, H, W) -> (N, C, H, W)``.

    ``conv1``: C -> inner channels with bias; ``conv2``: inner -> C without bias. For a block folded
    from :class:`SLLConv2d`, ``conv2``'s kernel is exactly twice the adjoint of ``conv1``'s
    (in/out swapped, spatially flipped) and ``conv1`` has operator norm <= 1.
    """

    kind = "sll-folded"

    def __init__(self, channels: int, inner_channels: int, kernel_size: int = 3,
                 input_hw: Optional[HW] = None) -> None:
        super().__init__()
        p = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, inner_channels, kernel_size, padding=p, bias=True)
        self.conv2 = nn.Conv2d(inner_channels, channels, kernel_size, padding=kernel_size - 1 - p, bias=False)
        self.input_hw = input_hw

    def forward(self, x: Tensor) -> Tensor:
        return x - self.conv2(F.relu(self.conv1(x)))

    def has_sll_structure(self, rtol: float = 1e-6) -> bool:
        """Whether ``conv2`` is (to ``rtol``) twice the adjoint of ``conv1`` with matching padding."""
        c1, c2 = self.conv1, self.conv2
        k = c1.kernel_size[0]
        if c2.bias is not None or c1.stride != (1, 1) or c2.stride != (1, 1):
            return False
        if int(c2.padding[0]) != k - 1 - int(c1.padding[0]) or c1.kernel_size != c2.kernel_size:
            return False
        expected = 2.0 * c1.weight.detach().transpose(0, 1).flip(2, 3)
        if expected.shape != c2.weight.shape:
            return False
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        return bool(torch.allclose(c2.weight.detach(), expected, rtol=rtol, atol=rtol * max(scale, 1e-30)))

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        """Guaranteed upper bound of the block's Lipschitz constant, from its weights alone.

        ``f(x) - f(y) = (I - B D A)(x - y)`` with ``A`` = conv1, ``B`` = conv2 and ``D`` diagonal in
        ``[0, 1]`` (ReLU's difference quotients). With the SLL structure (``B = 2 A^T``, checked to 1e-6)
        ``I - 2 A^T D A`` is symmetric with eigenvalues in ``[1 - 2 s^2, 1]`` for any ``s >= ||A||``, so
        the bound is 1 when ``s <= 1`` and ``2 s^2 - 1`` otherwise; ``s^2`` is the rigorous Gershgorin
        bound (:func:`gram_norm_bound`, size-independent) or, when that exceeds 1, the smaller of it
        and the squared operator-norm upper bound at ``input_hw``. The structure's defect
        ``B - 2 A^T`` (zero for a block folded from :class:`SLLConv2d`, whose ``conv2`` is exactly twice
        the rounded ``conv1``) adds ``||B - 2 A^T|| s``. Without the structure: ``1 + ||B|| ||A||``.
        """
        hw = _need_hw(input_hw, self.input_hw, self)
        w1, p1 = self.conv1.weight.detach(), int(self.conv1.padding[0])
        if not self.has_sll_structure():
            s2 = conv_operator_norm_upper(self.conv2.weight, hw, 1, int(self.conv2.padding[0]))
            return (1.0 + s2 * conv_operator_norm_upper(w1, hw, 1, p1)) * (1.0 + 4 * U64)
        sq = gram_norm_bound(w1)
        if sq > 1.0:
            sq = min(sq, conv_operator_norm_upper(w1, hw, 1, p1, enough=1.0 - 4 * U64) ** 2 * (1.0 + 2 * U64))
        bound = 1.0 if sq <= 1.0 else (2.0 * sq - 1.0) * (1.0 + 2 * U64)
        defect = self.conv2.weight.detach().double() - 2.0 * w1.double().transpose(0, 1).flip(2, 3)
        if bool(defect.any()):
            d = conv_operator_norm_upper(defect, hw, 1, int(self.conv2.padding[0]))
            bound = (bound + d * math.sqrt(sq)) * (1.0 + 4 * U64)
        return bound

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """The bound and the block's Jacobian norm at a seeded random input (a lower estimate)."""
        hw = _need_hw(input_hw, self.input_hw, self)
        return NormEstimate(self.lipschitz_bound(hw), _jacobian_measured(self, self.conv1.in_channels, hw))

    def fold(self) -> "FoldedSLL":
        return self


class MaxPool(nn.MaxPool2d):
    """``nn.MaxPool2d`` (no padding) with a Lipschitz bound.

    Bound: ``sqrt(m_h * m_w)`` with ``m = ceil(k / s)`` per spatial dimension, i.e. ``ceil(k/s)`` for
    square pools: 1 for non-overlapping pools (k = s), 2 for 3x3 stride 2. Proof: an output is the
    max of its window and ``|max a - max b| <= max |a - b| <= ||(a - b)_window||_2``; summing the
    squares over windows counts each input pixel at most ``m_h * m_w`` times (the number of
    windows covering it), so ``||f(x) - f(y)||^2 <= m_h m_w ||x - y||^2``.
    """

    kind = "maxpool"

    def __init__(self, kernel_size: int, stride: int, ceil_mode: bool = False) -> None:
        super().__init__(kernel_size, stride=stride, padding=0, ceil_mode=ceil_mode)

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        return pool_lipschitz(int(self.kernel_size), int(self.stride))  # type: ignore[arg-type]

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """The bound and the exact constant at ``input_hw`` (:func:`pool_attained`)."""
        k, s = int(self.kernel_size), int(self.stride)  # type: ignore[arg-type]
        return NormEstimate(pool_lipschitz(k, s), pool_attained(k, s, _need_hw(input_hw, None, self), self.ceil_mode))

    def fold(self) -> "MaxPool":
        return MaxPool(int(self.kernel_size), int(self.stride), self.ceil_mode)  # type: ignore[arg-type]


class NormPool(nn.Module):
    """L2-norm pooling: each output is the (smoothed) L2 norm of its ``k x k`` window, per channel.

    ``(N, C, H, W) -> (N, C, H', W')`` with max-pool geometry (no padding, floor mode).
    ``y = sqrt(sum_window x^2 + delta^2) - delta`` with ``delta`` = :attr:`DELTA` (smooth at 0, so
    gradients stay finite; ``y = 0`` on an all-zero window). ``v -> sqrt(||v||^2 + delta^2)`` is
    1-Lipschitz, so the bound is the max-pool one, ``ceil(k/s)`` (1 for non-overlapping windows).
    Unlike a max-pool, which keeps one pixel of a window (about half the norm of a smooth 2x2
    window), it keeps the window's whole norm: the image-dependent signal of a 1-Lipschitz stack
    does not halve at every downsampling. Computed in float32 under autocast. Folded: the same
    module (plain Mul / AveragePool / Add / Sqrt / Sub ops in ONNX).
    """

    kind = "normpool"
    DELTA = 1e-3

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        k = self.kernel_size
        energy = F.avg_pool2d(x * x, k, self.stride) * float(k * k)
        return torch.sqrt(energy + self.DELTA**2) - self.DELTA

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        return pool_lipschitz(self.kernel_size, self.stride)

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """The bound and the supremum at ``input_hw`` (:func:`pool_attained`: one large pixel, ``x -> inf``)."""
        k, s = self.kernel_size, self.stride
        return NormEstimate(pool_lipschitz(k, s), pool_attained(k, s, _need_hw(input_hw, None, self)))

    def fold(self) -> "NormPool":
        return NormPool(self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def pool_lipschitz(kernel_size: int, stride: int) -> float:
    """L2 Lipschitz bound of a square max-pool: ``ceil(k/s)`` (see :class:`MaxPool`)."""
    m = math.ceil(kernel_size / stride)
    return math.sqrt(m * m)


def pool_attained(kernel_size: int, stride: int, input_hw: HW, ceil_mode: bool = False) -> float:
    """The exact L2 Lipschitz constant of a square max-pool (no padding) on ``input_hw``: ``sqrt(c_h c_w)``.

    ``c`` is the largest number of windows that cover one pixel, per dimension (``<= ceil(k/s)``).
    The counting proof of :class:`MaxPool` gives ``<=``; one pixel raised by ``t`` from an all-zero
    input, inside ``c_h c_w`` windows, moves each of their outputs by ``t``: ``=``.
    """

    def most(n: int) -> int:
        num = n - kernel_size
        outs = (-(-num // stride) if ceil_mode else num // stride) + 1
        cover = [0] * n
        for j in range(max(outs, 0)):
            for i in range(j * stride, min(j * stride + kernel_size, n)):
                cover[i] += 1
        return max(cover, default=0)

    return math.sqrt(most(int(input_hw[0])) * most(int(input_hw[1])))


class ChannelPad(nn.Module):
    """Change the channel count 1-Lipschitzly: zero-pad channels up or keep the first ones down.

    ``(N, Cin, H, W) -> (N, Cout, H, W)``. Both maps have operator norm 1 (an isometric embedding,
    resp. an orthogonal projection), so the bound is 1 (0 would only hold for ``Cout = 0``).
    """

    kind = "channel-pad"

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.out_channels > self.in_channels:
            return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))
        return x[:, : self.out_channels]

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        return 1.0

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """Exact: ``(1, 1)``."""
        return NormEstimate(1.0, 1.0)

    def fold(self) -> "ChannelPad":
        return ChannelPad(self.in_channels, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


def _need_hw(input_hw: Optional[HW], default: Optional[HW], module: nn.Module) -> HW:
    hw = input_hw if input_hw is not None else default
    if hw is None:
        raise LipdetError(f"{type(module).__name__}: input size unknown; pass input_hw")
    return (int(hw[0]), int(hw[1]))


JACOBIAN_ITERS: int = 8
"""Power iterations of the ``measured`` Jacobian norm of nonlinear blocks (check column only)."""


def _jacobian_measured(module: nn.Module, channels: int, input_hw: HW) -> float:
    """``module``'s Jacobian norm at a seeded ``N(0, 1)`` input ``(1, channels, H, W)``: a lower estimate
    of its Lipschitz constant (:func:`lipdet.models.opnorm.jacobian_norm`)."""
    p = next(module.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((1, channels, *input_hw), generator=gen).to(device=p.device, dtype=p.dtype)
    with _fp32_context(p):
        return jacobian_norm(module, x, JACOBIAN_ITERS)[0]


# --------------------------------------------------------------------------------------------
# The naive baseline's block
# --------------------------------------------------------------------------------------------


class ConvBNAct(nn.Module):
    """3x3 conv (pad 1, bias) + BatchNorm + optional ReLU: Tinier SSD's layer and head.

    ``(N, Cin, H, W) -> (N, Cout, H, W)``. Keys ``conv.*`` and ``bn.*``.
    """

    def __init__(self, in_channels: int, out_channels: int, input_hw: Optional[HW] = None,
                 kernel_size: int = 3, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu
        self.input_hw = input_hw

    @property
    def kind(self) -> str:
        return "conv-bn-relu" if self.relu else "conv-bn"

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        # In place: BatchNorm's backward needs its input, not its output; one memory pass less.
        return F.relu(x, inplace=True) if self.relu else x

    def folded_weight_bias(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the conv with the BatchNorm (running statistics, i.e. eval mode) folded in.

        In ``dtype`` (default: at least fp32, like the parameters).
        """
        def cast(x: Tensor) -> Tensor:
            return _hi(x) if dtype is None else x.to(dtype)

        with torch.no_grad():
            bn = self.bn
            scale = cast(bn.weight) / torch.sqrt(cast(bn.running_var) + bn.eps)
            w = cast(self.conv.weight) * scale[:, None, None, None]
            b = (cast(self.conv.bias) - cast(bn.running_mean)) * scale + cast(bn.bias)
        return w, b

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        """Guaranteed upper bound of the BN-folded conv's operator norm (eval mode semantics).

        The folded kernel is computed in float64: each entry within ``5u`` (relative) of the exact
        ``w gamma / sqrt(var + eps)``, which moves the norm by at most ``5u sum_taps ||w_tap||_F``
        (a tap is a shift times a channel matrix), added.
        """
        w64, slack = self._kernel64()
        hw = _need_hw(input_hw, self.input_hw, self)
        return (conv_operator_norm_upper(w64, hw) + slack) * (1.0 + 2 * U64)

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """The bound and a lower estimate (Lanczos) of the BN-folded conv's operator norm."""
        w64, slack = self._kernel64()
        est = conv_norm_estimates(w64, _need_hw(input_hw, self.input_hw, self))
        return NormEstimate((est.bound + slack) * (1.0 + 2 * U64), est.measured)

    def _kernel64(self) -> tuple[Tensor, float]:
        """The float64 folded kernel (CPU) and the rounding slack of its norm (:meth:`lipschitz_bound`)."""
        w64 = self.folded_weight_bias(torch.float64)[0].cpu()
        return w64, 5 * U64 * float(w64.flatten(0, 1).norm(dim=0).sum())

    def fold(self) -> FoldedConv:
        w, b = self.folded_weight_bias()
        out = FoldedConv(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size[0],
                         relu=self.relu, input_hw=self.input_hw)
        _copy_conv(out.conv, w, b)
        return out.to(self.conv.weight.device)


def _copy_conv(conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor]) -> None:
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if bias is not None:
            assert conv.bias is not None
            conv.bias.copy_(bias.to(conv.bias.dtype))


# --------------------------------------------------------------------------------------------
# Entry / exit convolutions of the Lipschitz architectures
# --------------------------------------------------------------------------------------------


class NormConv2d(nn.Module):
    """A convolution whose kernel is normalised according to ``mode``.

    * ``spectral``: kernel divided by the operator norm of the actual convolution at ``input_hw``
      (zero padding, stride): the layer is 1-Lipschitz. Training runs ``train_iters`` power
      iterations per forward on a persistent buffer ``u`` ``(1, Cin, H, W)`` and divides by
      ``||conv(u)||`` (differentiable, like ``torch`` spectral norm; an estimate from below). Eval
      and :meth:`fold` divide by a guaranteed upper bound of the norm
      (:func:`~lipdet.models.opnorm.conv_operator_norm_upper`, cached while the weight is unchanged),
      so the evaluated and folded layers are 1-Lipschitz by construction (exactly 1 on maps small
      enough for the dense path; within the circulant bound's slack, e.g. 2e-4 at 74x74, below 1 on
      larger ones).
    * ``standard``: the plain kernel.
    * ``l2``: every output filter divided by its L2 norm (each output channel is then at most
      ``k``-Lipschitz and the layer at most ``k sqrt(Cout)``; :meth:`lipschitz_bound` reports a
      guaranteed upper bound of the operator norm).

    :meth:`lipschitz_bound` never trusts the normalisation: it bounds the operator norm of the
    effective kernel (the one the layer and its fold apply) from above, at ``input_hw``.

    Optional output temperature ``tau`` (``temperature`` > 0, ``None`` = none): the layer computes
    ``tau * (conv(x, W_mode) + b)``, i.e. ``tau`` is part of the effective kernel and bias. The
    normalised map ``x -> conv(x, W_mode)`` keeps its guarantee (1-Lipschitz in spectral mode) and
    the layer's bound is ``tau`` times it: :meth:`lipschitz_bound`, :meth:`fold` and therefore
    ``head_bounds`` of both the parametrised and the folded model include ``tau`` automatically. It
    lets 1-Lipschitz class logits reach softmax scores above a detection threshold; certified radii
    (margin / (sqrt(2) L)) do not depend on it, since margin and bound scale together.
    ``learn_temperature=True`` makes ``log(tau)`` a parameter ``log_temperature`` (init
    ``log(temperature)``); otherwise ``tau`` is a constant from the config.

    Input ``(N, Cin, H, W)`` -> ``(N, Cout, Ho, Wo)``. Parameters ``weight``, ``bias`` (+ buffer ``u``
    in spectral mode, + ``log_temperature`` when learnt).
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str, input_hw: HW, kernel_size: int = 3,
                 stride: int = 1, padding: Optional[int] = None, bias: bool = True, train_iters: int = 1,
                 temperature: Optional[float] = None, learn_temperature: bool = False) -> None:
        super().__init__()
        if mode not in CONV_MODES:
            raise LipdetError(f"unknown conv mode {mode!r}; choose one of: {', '.join(CONV_MODES)}")
        if temperature is not None and not float(temperature) > 0:
            raise LipdetError(f"temperature must be > 0, got {temperature}")
        if learn_temperature and temperature is None:
            temperature = 1.0
        self.in_channels, self.out_channels = in_channels, out_channels
        self.mode = mode
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.train_iters = train_iters
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)
        if mode == "spectral":
            u = torch.randn(1, in_channels, *self.input_hw)
            self.register_buffer("u", u / u.norm())
        self._fixed_temperature: Optional[float] = None
        self.log_temperature: Optional[nn.Parameter] = None
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(float(temperature))))
        elif temperature is not None:
            self._fixed_temperature = float(temperature)
        self._sigma_cache: Optional[tuple[tuple[int, int], float]] = None

    @property
    def kind(self) -> str:
        return f"conv-{self.mode}"

    # -- temperature --------------------------------------------------------------------------

    @property
    def has_temperature(self) -> bool:
        return self.log_temperature is not None or self._fixed_temperature is not None

    def temperature_tensor(self) -> Optional[Tensor]:
        """``tau`` as an fp32 scalar tensor (differentiable when learnt), or None without temperature."""
        if self.log_temperature is not None:
            return torch.exp(_hi(self.log_temperature))
        if self._fixed_temperature is not None:
            return torch.tensor(self._fixed_temperature, dtype=torch.float32, device=self.weight.device)
        return None

    def temperature(self) -> float:
        """``tau`` (1.0 without temperature)."""
        t = self.temperature_tensor()
        return 1.0 if t is None else float(t.detach())

    def effective_bias(self) -> Optional[Tensor]:
        """``tau * b`` (``b`` without temperature; None without bias)."""
        if self.bias is None:
            return None
        t = self.temperature_tensor()
        if t is None:
            return self.bias
        with _fp32_context(self.bias):
            return _hi(self.bias) * t

    # -- normalisation ------------------------------------------------------------------------

    def _power_step(self, w32: Tensor, iters: int) -> None:
        """``iters`` power iterations on conv/adjoint, updating ``u`` in place (no grad)."""
        with torch.no_grad():
            u = self.u.to(w32.dtype)
            for _ in range(iters):
                v = F.conv2d(u, w32, stride=self.stride, padding=self.padding)
                u = conv_adjoint(v, w32, self.input_hw, self.stride, self.padding)
                u = u / u.norm().clamp_min(1e-12)
            self.u.copy_(u)

    def converged_sigma(self) -> float:
        """A guaranteed upper bound of the raw kernel's operator norm at ``input_hw`` (cached per weight version).

        Dividing by it makes the evaluated / folded spectral layer 1-Lipschitz by construction.
        """
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._sigma_cache is not None and self._sigma_cache[0] == key:
            return self._sigma_cache[1]
        sigma = conv_operator_norm_upper(w, self.input_hw, self.stride, self.padding)
        self._sigma_cache = (key, sigma)
        return sigma

    def effective_weight(self, converge: Optional[bool] = None) -> Tensor:
        """The normalised kernel ``(Cout, Cin, k, k)`` in fp32, times the temperature if any.

        Args:
            converge: spectral mode only: use the converged norm (default: when not training)
                instead of a few differentiable power iterations.
        """
        w = self.normalised_weight(converge)
        t = self.temperature_tensor()
        if t is None:
            return w
        with _fp32_context(w):
            return w * t

    def normalised_weight(self, converge: Optional[bool] = None) -> Tensor:
        """The normalised kernel ``(Cout, Cin, k, k)`` in fp32, without the temperature."""
        with _fp32_context(self.weight):
            w32 = _hi(self.weight)
            if self.mode == "standard":
                return w32
            if self.mode == "l2":
                norms = w32.flatten(1).norm(dim=1).clamp_min(1e-12)
                return w32 / norms[:, None, None, None]
            if converge is None:
                converge = not self.training
            if converge:
                return w32 / self.converged_sigma()
            self._power_step(w32.detach(), self.train_iters)
            u = self.u.to(w32.dtype).detach().clone()  # a later power step updates self.u in place
            sigma = F.conv2d(u, w32, stride=self.stride, padding=self.padding).norm()
            return w32 / sigma.clamp_min(1e-12)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.effective_weight(), self.effective_bias()
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        return F.conv2d(x, w, b, stride=self.stride, padding=self.padding)

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        """Guaranteed upper bound of the effective (normalised, times ``tau``) kernel's operator norm at ``input_hw``."""
        hw = _need_hw(input_hw, self.input_hw, self)
        return conv_operator_norm_upper(self.effective_weight(converge=True).detach(), hw, self.stride, self.padding)

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """The bound and a lower estimate (Lanczos) of the effective kernel's operator norm."""
        hw = _need_hw(input_hw, self.input_hw, self)
        return conv_norm_estimates(self.effective_weight(converge=True).detach(), hw, self.stride, self.padding)

    def fold(self) -> FoldedConv:
        with torch.no_grad():
            w = self.effective_weight(converge=True).detach()
            b = self.effective_bias()
        out = FoldedConv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         bias=self.bias is not None, relu=False, input_hw=self.input_hw)
        _copy_conv(out.conv, w, None if b is None else b.detach())
        return out.to(self.weight.device)

    def extra_repr(self) -> str:
        extra = f", temperature={self.temperature():.4g}" if self.has_temperature else ""
        return (f"{self.in_channels}, {self.out_channels}, mode={self.mode}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, input_hw={self.input_hw}{extra}")


# --------------------------------------------------------------------------------------------
# SLL residual block
# --------------------------------------------------------------------------------------------


def _gram_abs_rowsum(weight: Tensor, q: Tensor) -> Tensor:
    """``t_i = sum_j sum_{dx,dy} |(K * K)_{ij}| q_j / q_i`` for a kernel ``(Ci, C, k, k)``.

    ``(K * K)_{ij}`` is the ``(2k-1) x (2k-1)`` kernel of ``A A^T`` (``A = conv(., K)``) between
    inner channels ``i`` and ``j``. Returns ``(Ci,)``.
    """
    return (gram_abs(weight) * q[None, :]).sum(dim=1) / q


class SLLConv2d(nn.Module):
    """SDP-based Lipschitz residual block (Araujo et al., ICLR 2023), convolutional form.

    ``y = x - 2 conv_transpose(t^-1 * relu(conv(x, K) + b), K)`` with ``K`` of shape
    ``(inner, C, k, k)`` (odd ``k``, padding ``k // 2`` in both convs) and
    ``t_i = sum_j |K * K|_{ij} q_j / q_i``, ``q = exp(q_param)``. Then ``diag(t) >= A A^T`` and the
    block is 1-Lipschitz. ``(N, C, H, W) -> (N, C, H, W)``.
    """

    kind = "sll"

    def __init__(self, channels: int, inner_channels: Optional[int] = None, kernel_size: int = 3,
                 eps: float = 1e-6, input_hw: Optional[HW] = None) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise LipdetError(f"SLL kernel size must be odd, got {kernel_size}")
        inner = channels if inner_channels is None else inner_channels
        self.channels, self.inner_channels, self.kernel_size = channels, inner, kernel_size
        self.padding = kernel_size // 2
        self.eps = eps
        self.input_hw = input_hw
        self.weight = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
        nn.init.xavier_normal_(self.weight)
        bound = 1.0 / math.sqrt(channels * kernel_size * kernel_size)
        self.bias = nn.Parameter(torch.empty(inner).uniform_(-bound, bound))
        self.q_param = nn.Parameter(torch.zeros(inner))

    def t(self) -> Tensor:
        """The diagonal ``t`` ``(inner,)`` in fp32 (autocast disabled)."""
        with _fp32_context(self.weight):
            w = _hi(self.weight)
            q = torch.exp(_hi(self.q_param))
            return _gram_abs_rowsum(w, q) + self.eps

    def forward(self, x: Tensor) -> Tensor:
        t = self.t()[None, :, None, None]
        z = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding)) / t
        if not torch.is_autocast_enabled(x.device.type):
            z = z.to(x.dtype)
        return x - 2.0 * F.conv_transpose2d(z, self.weight, padding=self.padding)

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        """1 by construction (``diag(t) >= A A^T``, Gershgorin with weights ``q``), verified from the weights.

        The block is ``x - 2 B^T relu(B x + t^-1/2 b)`` with ``B = t^-1/2 A`` for the ``t`` the forward
        uses (fp32, ``eps`` = 1e-6 of slack over its rounding). Its bound is 1 when ``||B|| <= 1`` and
        ``2 ||B||^2 - 1`` otherwise (:meth:`FoldedSLL.lipschitz_bound`); ``||B||^2`` is bounded by
        :func:`gram_norm_bound` of ``t^-1/2 K`` formed in float64 (entries within ``3u``, hence the
        factor ``1 + 8u``). Size-independent.
        """
        with torch.no_grad():
            w = self.weight.detach().double() * self.t().detach().double().rsqrt()[:, None, None, None]
        sq = gram_norm_bound(w) * (1.0 + 8 * U64)
        return 1.0 if sq <= 1.0 else (2.0 * sq - 1.0) * (1.0 + 2 * U64)

    def lipschitz_estimates(self, input_hw: Optional[HW] = None) -> NormEstimate:
        """The bound and the block's Jacobian norm at a seeded random input (a lower estimate)."""
        hw = _need_hw(input_hw, self.input_hw, self)
        return NormEstimate(self.lipschitz_bound(hw), _jacobian_measured(self, self.channels, hw))

    def fold(self) -> FoldedSLL:
        """``Conv -> ReLU -> Conv -> Sub`` with ``t`` folded into the kernels.

        ``t^-1 relu(z) = t^-1/2 relu(t^-1/2 z)``, so with ``K' = t^-1/2 K`` and ``b' = t^-1/2 b`` the block is
        ``x - 2 conv_transpose(relu(conv(x, K') + b'), K')``; the transposed conv is a plain conv with
        kernel ``2 K'`` in/out swapped and flipped spatially, padding ``k - 1 - p``.
        """
        with torch.no_grad():
            s = self.t().rsqrt()
            w1 = _hi(self.weight) * s[:, None, None, None]
            b1 = _hi(self.bias) * s
            w2 = 2.0 * w1.transpose(0, 1).flip(2, 3)
        out = FoldedSLL(self.channels, self.inner_channels, self.kernel_size, input_hw=self.input_hw)
        _copy_conv(out.conv1, w1, b1)
        _copy_conv(out.conv2, w2, None)
        return out.to(self.weight.device)

    def extra_repr(self) -> str:
        return f"{self.channels}, inner={self.inner_channels}, kernel_size={self.kernel_size}"
