"""Building blocks of lipdet's detectors, each with a Lipschitz bound and a plain "folded" form.

Every module here exposes:

* ``kind`` -- a short label used in Lipschitz tables (``"sll"``, ``"conv-spectral"``, ...);
* ``lipschitz_bound(input_hw=None) -> float`` -- an upper bound of the module's L2 Lipschitz
  constant for inputs of spatial size ``input_hw`` (defaults to the size given at construction);
* ``fold() -> nn.Module`` -- an equivalent module made of plain ops only (``nn.Conv2d``, ReLU,
  max-pool, subtraction, channel pad/slice), used for export.

Tensors are ``(N, C, H, W)`` float; sizes are pixels. Norms are L2 (Euclidean over all of
``C*H*W``). Every normalisation that a guarantee rests on (SLL's ``t``, spectral norms) is computed
in fp32 with autocast disabled, so guarantees hold when training in bf16/fp16.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipdet.errors import LipdetError

CONV_MODES: tuple[str, ...] = ("spectral", "standard", "l2")
"""Modes of the entry/exit convolutions of the Lipschitz architectures."""

# Default accuracy of the "to convergence" operator-norm computation.
NORM_TOL: float = 1e-7
NORM_MAX_MATVECS: int = 1200

HW = tuple[int, int]


def _fp32_context(t: Tensor) -> torch.autocast:
    """A context that disables autocast on ``t``'s device (Lipschitz maths runs in fp32)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _hi(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# Operator norm of a convolution
# --------------------------------------------------------------------------------------------


def conv_output_hw(input_hw: HW, kernel_size: int, stride: int, padding: int) -> HW:
    """Spatial output size of a convolution (floor rule, like ``nn.Conv2d``)."""
    return tuple((s + 2 * padding - kernel_size) // stride + 1 for s in input_hw)  # type: ignore[return-value]


def conv_adjoint(y: Tensor, weight: Tensor, input_hw: HW, stride: int, padding: int) -> Tensor:
    """Apply the adjoint (transpose) of ``x -> conv2d(x, weight, stride, padding)`` to ``y``.

    Args:
        y: ``(N, Cout, Ho, Wo)``.
        weight: ``(Cout, Cin, k, k)``.
        input_hw: the ``(H, W)`` of the convolution's input, which the result has.

    Returns:
        ``(N, Cin, H, W)``; exact for zero padding, including the rows/columns a strided
        convolution never reads (restored with ``output_padding``).
    """
    k_h, k_w = weight.shape[-2:]
    out_pad = tuple(
        int(s - ((o - 1) * stride - 2 * padding + k)) for s, o, k in zip(input_hw, y.shape[-2:], (k_h, k_w))
    )
    return F.conv_transpose2d(y, weight, stride=stride, padding=padding, output_padding=out_pad)


def _lanczos_top_eigen(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    max_matvecs: int,
    tol: float,
    cycle: int = 32,
) -> tuple[float, Tensor]:
    """Largest eigenvalue of a symmetric PSD operator by restarted Lanczos (full reorthogonalisation).

    Lanczos is power iteration's Krylov acceleration: after ``j`` steps its top Ritz value is at
    least the power-iteration estimate after ``j`` steps, and it converges far faster on the dense
    spectra of convolution operators (where plain power iteration needs thousands of steps).
    Like power iteration it never overestimates: the result is a Ritz value, i.e. ``<= lambda_max``.

    Args:
        matvec: the operator, acting on tensors shaped like ``v0``.
        v0: start vector (any shape, non-zero).
        max_matvecs: budget of operator applications.
        tol: stop when the estimate changes by less than ``tol`` (relative) between restarts.
        cycle: Lanczos steps per restart.

    Returns:
        ``(lambda_max estimate, unit Ritz vector shaped like v0)``.
    """
    q = v0 / v0.norm().clamp_min(1e-30)
    theta_prev = -1.0
    theta = 0.0
    used = 0
    n = q.numel()
    m = max(1, min(cycle, n))
    while used < max_matvecs:
        basis = [q]
        alphas: list[Tensor] = []
        betas: list[Tensor] = []
        exhausted = False
        for j in range(m):
            z = matvec(basis[-1])
            used += 1
            alphas.append((z * basis[-1]).sum())
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                for b in basis:
                    z = z - (z * b).sum() * b
            beta = z.norm()
            if j == m - 1 or used >= max_matvecs:
                break
            if beta <= 1e-12 * max(abs(float(alphas[0])), 1e-30):
                exhausted = True  # invariant subspace found: the Ritz values are exact
                break
            betas.append(beta)
            basis.append(z / beta)
        tri = torch.diag(torch.stack(alphas))
        if betas:
            off = torch.stack(betas)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tri)
        theta = float(evals[-1])
        y = evecs[:, -1]
        q = sum(y[i] * basis[i] for i in range(len(basis)))
        q = q / q.norm().clamp_min(1e-30)
        if exhausted or len(basis) >= n:
            break
        if theta_prev > 0 and abs(theta - theta_prev) <= tol * abs(theta):
            break
        theta_prev = theta
    return max(theta, 0.0), q


def conv_operator_norm_and_vector(
    weight: Tensor,
    input_hw: HW,
    stride: int = 1,
    padding: Optional[int] = None,
    iters: int = NORM_MAX_MATVECS,
    tol: float = NORM_TOL,
    u0: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, Tensor]:
    """Like :func:`conv_operator_norm` but also returns the top right-singular vector ``(1, Cin, H, W)``."""
    if padding is None:
        padding = weight.shape[-1] // 2
    with _fp32_context(weight), torch.no_grad():
        w = weight.detach().to(dtype)
        if u0 is None or tuple(u0.shape) != (1, w.shape[1], *input_hw):
            gen = torch.Generator(device="cpu").manual_seed(0)
            u0 = torch.randn((1, w.shape[1], *input_hw), generator=gen, dtype=dtype).to(w.device)
        u0 = u0.detach().to(device=w.device, dtype=dtype)

        def gram(v: Tensor) -> Tensor:
            return conv_adjoint(F.conv2d(v, w, stride=stride, padding=padding), w, input_hw, stride, padding)

        lam, vec = _lanczos_top_eigen(gram, u0, max_matvecs=iters, tol=tol)
    return math.sqrt(lam), vec


def conv_operator_norm(
    weight: Tensor,
    input_hw: HW,
    stride: int = 1,
    padding: Optional[int] = None,
    iters: int = NORM_MAX_MATVECS,
    tol: float = NORM_TOL,
) -> float:
    """Operator (spectral) norm of ``x -> conv2d(x, weight, stride, padding)`` on ``(Cin, H, W)`` inputs.

    The norm of the actual linear map (zero padding, real input size and stride), not of the
    reshaped kernel: power iteration on ``conv`` followed by its adjoint ``conv_transpose``,
    accelerated by restarted Lanczos, in float64, until the estimate changes by less than ``tol``
    (relative) or ``iters`` operator applications were used. The bias does not matter.

    Args:
        weight: ``(Cout, Cin, k, k)``.
        input_hw: input spatial size ``(H, W)`` in pixels.
        stride, padding: as in ``nn.Conv2d`` (``padding=None`` means ``k // 2``).

    Returns:
        the largest singular value (a tight estimate from below; see ``_lanczos_top_eigen``).
    """
    return conv_operator_norm_and_vector(weight, input_hw, stride, padding, iters, tol)[0]


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
        """Operator norm of the convolution (ReLU is 1-Lipschitz)."""
        hw = _need_hw(input_hw, self.input_hw, self)
        c = self.conv
        return conv_operator_norm(c.weight, hw, c.stride[0], int(c.padding[0]))

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
        """Bound of the block computed from its weights alone.

        With the SLL structure (``conv2 = 2 conv1^T``) the Jacobian is ``I - 2 A^T D A`` with ``A``
        = conv1, ``D`` diagonal in [0, 1]: symmetric with eigenvalues in ``[1 - 2||A||^2, 1]``, so the
        bound is 1 when ``||A|| <= 1`` (checked to 1e-4, first with the cheap Gershgorin bound on
        ``A A^T``, then by power iteration) and ``2||A||^2 - 1`` otherwise. Without the structure:
        the triangle bound ``1 + ||conv2|| ||conv1||``.
        """
        hw = _need_hw(input_hw, self.input_hw, self)
        w1 = self.conv1.weight.detach()
        if self.has_sll_structure():
            if gram_norm_bound(w1) <= (1.0 + 1e-4) ** 2:
                return 1.0
            s1 = conv_operator_norm(w1, hw, 1, int(self.conv1.padding[0]))
            return 1.0 if s1 <= 1.0 + 1e-4 else max(1.0, 2.0 * s1 * s1 - 1.0)
        s1 = conv_operator_norm(w1, hw, 1, int(self.conv1.padding[0]))
        s2 = conv_operator_norm(self.conv2.weight, hw, 1, int(self.conv2.padding[0]))
        return 1.0 + s1 * s2

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

    def fold(self) -> "NormPool":
        return NormPool(self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def pool_lipschitz(kernel_size: int, stride: int) -> float:
    """L2 Lipschitz bound of a square max-pool: ``ceil(k/s)`` (see :class:`MaxPool`)."""
    m = math.ceil(kernel_size / stride)
    return math.sqrt(m * m)


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

    def fold(self) -> "ChannelPad":
        return ChannelPad(self.in_channels, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


def _need_hw(input_hw: Optional[HW], default: Optional[HW], module: nn.Module) -> HW:
    hw = input_hw if input_hw is not None else default
    if hw is None:
        raise LipdetError(f"{type(module).__name__}: input size unknown; pass input_hw")
    return (int(hw[0]), int(hw[1]))


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

    def folded_weight_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the conv with the BatchNorm (running statistics, i.e. eval mode) folded in."""
        with torch.no_grad():
            bn = self.bn
            scale = _hi(bn.weight) / torch.sqrt(_hi(bn.running_var) + bn.eps)
            w = _hi(self.conv.weight) * scale[:, None, None, None]
            b = (_hi(self.conv.bias) - _hi(bn.running_mean)) * scale + _hi(bn.bias)
        return w, b

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        """Operator norm of the BN-folded conv (eval mode semantics)."""
        hw = _need_hw(input_hw, self.input_hw, self)
        return conv_operator_norm(self.folded_weight_bias()[0], hw)

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
      ``||conv(u)||`` (differentiable, like ``torch`` spectral norm). Eval, :meth:`fold` and
      :meth:`lipschitz_bound` iterate to convergence (restarted Lanczos from ``u``; cached while the
      weight is unchanged).
    * ``standard``: the plain kernel.
    * ``l2``: every output filter divided by its L2 norm (each output channel is then at most
      ``k``-Lipschitz and the layer at most ``k sqrt(Cout)``; :meth:`lipschitz_bound` reports the
      measured operator norm).

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
        self._sigma_cache: Optional[tuple[tuple[int, int, int], float]] = None

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
        """Operator norm of the raw kernel, iterated to convergence from ``u`` (cached per weight version)."""
        w = self.weight
        key = (w._version, w.data_ptr(), self.u._version)
        if self._sigma_cache is not None and self._sigma_cache[0] == key:
            return self._sigma_cache[1]
        sigma, vec = conv_operator_norm_and_vector(w, self.input_hw, self.stride, self.padding, u0=self.u)
        with torch.no_grad():
            self.u.copy_(vec.to(self.u.dtype))
        self._sigma_cache = ((w._version, w.data_ptr(), self.u._version), sigma)
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
            u = self.u.to(w32.dtype).detach()
            sigma = F.conv2d(u, w32, stride=self.stride, padding=self.padding).norm()
            return w32 / sigma.clamp_min(1e-12)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.effective_weight(), self.effective_bias()
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        return F.conv2d(x, w, b, stride=self.stride, padding=self.padding)

    def lipschitz_bound(self, input_hw: Optional[HW] = None) -> float:
        """Operator norm of the normalised convolution (times ``tau``), measured by power iteration (Lanczos) at ``input_hw``."""
        hw = _need_hw(input_hw, self.input_hw, self)
        w = self.effective_weight(converge=True).detach()
        u0 = self.u if self.mode == "spectral" and hw == self.input_hw else None
        return conv_operator_norm_and_vector(w, hw, self.stride, self.padding, u0=u0)[0]

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
    k = weight.shape[-1]
    gram = F.conv2d(weight, weight, padding=k - 1)  # (Ci, Ci, 2k-1, 2k-1)
    return (gram.abs().sum(dim=(2, 3)) * q[None, :]).sum(dim=1) / q


def gram_norm_bound(weight: Tensor, iters: int = 300) -> float:
    """Cheap rigorous upper bound of ``||A||^2`` for ``A = conv(., weight)`` at any input size.

    With ``M_ij = sum_{dx,dy} |(K * K)_ij|`` (``(Ci, Ci)``, non-negative), the weighted Gershgorin bound
    ``max_i (M q)_i / q_i`` bounds ``||A A^T||`` for every ``q > 0`` (SLL's own argument); its minimum
    over ``q`` is the Perron root of ``M``, approached here with ``q`` from power iteration on ``M``.
    For a folded SLL kernel ``K' = t^-1/2 K`` the vector ``t^1/2 q_learned`` certifies a value <= 1, so
    the Perron vector does too: this recovers the block's guarantee from its weights alone.
    """
    with _fp32_context(weight), torch.no_grad():
        w = weight.detach().double()
        k = w.shape[-1]
        m = F.conv2d(w, w, padding=k - 1).abs().sum(dim=(2, 3))  # (Ci, Ci)
        q = torch.ones(m.shape[0], dtype=torch.float64, device=w.device)
        for _ in range(iters):
            nq = m @ q
            nq = nq / nq.max().clamp_min(1e-300)
            q = nq.clamp_min(1e-12)
        return float(((m @ q) / q).max())


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
        """1: ``diag(t) >= A A^T`` by construction (Gershgorin with weights ``q``)."""
        return 1.0

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
