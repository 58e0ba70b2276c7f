"""Operator norms of convolutions: guaranteed upper bounds, and lower estimates to check them.

The map is ``x -> conv2d(x, weight, stride, padding)`` on ``(Cin, H, W)`` inputs with zero padding
(``weight (Cout, Cin, kh, kw)``; sizes in pixels; norms L2 over whole tensors). The bias does not
matter. Three numbers:

* :func:`conv_operator_norm_upper` -- a **guaranteed upper bound**, the only one that enters a
  certificate: the exact norm by a dense eigenvalue computation when the operator is small
  (``min(Cin H W, Cout Ho Wo) <= DENSE_MAX``), else the circulant embedding below; inflated by
  a rounding margin for the float64 arithmetic (below).
* :func:`conv_operator_norm` -- restarted Lanczos to convergence (tol 1e-7): a Ritz value, i.e. an
  estimate **from below** (never a bound).
* :func:`conv_norm_estimates` -- the bound and a cheap lower estimate (``measured``: the dense
  computation's lower end, or float32 Lanczos on a small budget started from the circulant's top
  singular vector) in one pass.

**Circulant embedding** (Sedghi et al., ICLR 2019). Let ``A_1`` be the stride-1 conv with the same
padding ``p``. On a circular grid of length ``N >= max(H + p, Ho_1)`` per dimension (the input
zero-extended from ``H`` to ``N`` pixels), every output ``i < Ho_1`` reads input indices
``i + a - p`` in ``[-p, H + p - 1]``; those outside ``[0, H)`` land, modulo ``N``, in the zero
extension ``[H, N)``. So ``A_1 = P C E`` with ``E`` the isometric zero extension, ``C`` the circular
convolution and ``P`` a crop (norm <= 1): ``||A_1|| <= ||C||``. The same holds for the
``theta``-twisted circular convolution (extension ``x[n + N] = e^{2 pi i theta} x[n]``), whose wrapped
terms also read zeros. ``C`` is block-diagonalised by the Fourier modes ``e^{i w n}``,
``w = 2 pi (m + theta) / N``: ``||C|| = max_w ||K(w)||_2`` with ``K(w) = sum_ab w_ab e^{-i(w1 a + w2 b)}``
the ``Cout x Cin`` symbol. Every ``(N, theta)`` gives a valid bound; the minimum over
``theta in {0, 1/2}^2`` is taken on small grids. A stride-``s`` conv keeps every ``s``-th output of
``A_1`` (a coordinate restriction, norm <= 1), so ``||A_s|| <= ||A_1||``: strided convolutions get
the stride-1 bound (loose, exact only through the dense path). Ratios bound / exact measured on
random 3x3 kernels: 1 + 2e-4 at 74x74, 1e-3 at 37x37, 3e-3 at 18x18, 1-2% at 9x9; smaller maps
take the dense path (exact).

**Rounding margin** (``u = 2^-53``, float64 unit roundoff; inputs are fp32/fp64 kernels, converted
exactly). (1) Symbol: ``K(w)`` is a dot product of length ``kh kw`` with explicit exponentials
(phase in turns reduced mod 1, then ``2 pi`` times it: absolute error of each exponential
``<= 48 u``), so ``|dK_oc(w)| <= c_dft u ||w_oc||_1`` with ``c_dft = 2 (48 + kh kw)`` (a factor 2 over
first order), and ``||dK(w)||_2 <= ||dK(w)||_F <= c_dft u ||S||_F``, ``S_oc = ||w_oc||_1``. (2) Gram:
``G = K^H K`` (``r x r``, ``r`` the smaller side, inner length ``m``): ``||dG||_2 <= 2 (m + 2) u ||K||_F^2
<= 2 (m + 2) r u ||G||_2``. (3) ``eigvalsh``: backward stable, ``lambda_hat = lambda(G + E)`` with
``||E||_2 <= 16 r^2 u ||G||_2`` (the normwise model of Householder tridiagonalisation; the constant a
few times above its ``O(r^2)`` worst case). With ``rho = (2 (m + 2) r + 16 r^2) u``:
``sigma <= sqrt(lambda_hat (1 + rho) / (1 - rho)) + c_dft u ||S||_F``, times ``1 + 8u`` for the few
scalar operations after. The dense path builds the operator's matrix from basis vectors (each
entry a single kernel weight: exact) and uses (2)-(3) with ``r, m`` the matrix's sides. The margin
is 1e-11 relative or less for the layers of lipdet's detectors (at most 4e-9 on the dense path,
whose matrices have ``r <= 1024`` and ``m r <= 8 * 1024^2``), far below fp32's 6e-8. Computations
run on the CPU in float64.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lipdet.errors import LipdetError

HW = tuple[int, int]

U64: float = 2.0**-53
"""Unit roundoff of float64."""

NORM_TOL: float = 1e-7
NORM_MAX_MATVECS: int = 1200
"""Accuracy and budget of :func:`conv_operator_norm` (the "to convergence" lower estimate)."""

MEASURED_TOL: float = 1e-4
MEASURED_MAX_MATVECS: int = 32
"""Accuracy and budget of the ``measured`` lower estimate (check column only)."""

DENSE_MAX: int = 1024
"""Largest ``min(Cin H W, Cout Ho Wo)`` whose norm is computed densely (exact up to the margin)."""

TWIST_MAX_FREQS: int = 400
"""Circular grids up to this many frequencies (maps up to 19x19) also try the half-shifted (twisted) grids."""


class NormEstimate(NamedTuple):
    """``bound``: a guaranteed upper bound; ``measured``: a lower estimate of the same quantity."""

    bound: float
    measured: float


# --------------------------------------------------------------------------------------------
# Geometry and the adjoint
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


def _check_geometry(weight: Tensor, input_hw: HW, stride: int, padding: int) -> HW:
    """The stride-1 output size; a one-line error for a shape no ``nn.Conv2d`` accepts."""
    if weight.dim() != 4 or stride < 1 or padding < 0:
        raise LipdetError(f"not a conv geometry: weight {tuple(weight.shape)}, stride {stride}, padding {padding}")
    out = conv_output_hw(input_hw, int(weight.shape[-1]), 1, padding)
    if min(input_hw) < 1 or min(out) < 1 or weight.shape[-1] != weight.shape[-2]:
        raise LipdetError(f"kernel {tuple(weight.shape[-2:])} with padding {padding} does not fit input {input_hw}")
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run LAPACK on many small matrices single-threaded: threads gain nothing there and, on a busy
    machine, lose 10-50x to contention (measured on a loaded 2-core host)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Upper bounds
# --------------------------------------------------------------------------------------------


def _gram_interval(lam_hat: float, r: int, m: int) -> tuple[float, float]:
    """Guaranteed ``(upper, lower)`` bounds of ``sqrt(lambda_max(B^T B))`` from the computed top
    eigenvalue of ``fl(B^T B)``; ``B`` is ``m x r`` with exact entries (rounding model (2)-(3) above)."""
    rho = (2.0 * (m + 2) * r + 16.0 * r * r) * U64
    if rho >= 0.5:
        raise LipdetError(f"operator too large for the rounding model (r={r}, m={m})")
    lam = max(lam_hat, 0.0)
    return math.sqrt(lam * (1.0 + rho) / (1.0 - rho)), math.sqrt(lam * (1.0 - rho) / (1.0 + rho)) * (1.0 - 8 * U64)


def _dense_matrix(w64: Tensor, input_hw: HW, stride: int, padding: int) -> Tensor:
    """The operator's matrix ``B`` (tall: ``m x r``, ``r = min(n_in, n_out)``), with ``B^T B`` having
    the operator's squared singular values; built from basis vectors (each entry one weight: exact)."""
    co, ci = int(w64.shape[0]), int(w64.shape[1])
    ho, wo = conv_output_hw(input_hw, int(w64.shape[-1]), stride, padding)
    n_in, n_out = ci * input_hw[0] * input_hw[1], co * ho * wo
    if n_in <= n_out:
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, ci, *input_hw)
        return F.conv2d(eye, w64, stride=stride, padding=padding).reshape(n_in, n_out).T
    eye = torch.eye(n_out, dtype=torch.float64).reshape(n_out, co, ho, wo)
    return conv_adjoint(eye, w64, input_hw, stride, padding).reshape(n_out, n_in).T


def _dense_interval(w64: Tensor, input_hw: HW, stride: int, padding: int) -> tuple[float, float]:
    """Guaranteed ``(upper, lower)`` bounds of the operator norm from its dense matrix."""
    b = _dense_matrix(w64, input_hw, stride, padding)
    with _one_thread():
        lam = float(torch.linalg.eigvalsh(b.T @ b)[-1])
    return _gram_interval(lam, r=int(b.shape[1]), m=int(b.shape[0]))


def _is_dense(weight: Tensor, input_hw: HW, stride: int, padding: int) -> bool:
    co, ci = int(weight.shape[0]), int(weight.shape[1])
    ho, wo = conv_output_hw(input_hw, int(weight.shape[-1]), stride, padding)
    n_in, n_out = ci * input_hw[0] * input_hw[1], co * ho * wo
    return min(n_in, n_out) <= DENSE_MAX and n_in * n_out <= 8 * DENSE_MAX * DENSE_MAX


def _phases(n: int, k: int, twist: float, half: bool) -> Tensor:
    """``(k, F)`` phases in turns, ``a (m + twist) / n`` mod 1, for taps ``a < k`` and frequencies ``m``
    (``m <= n // 2`` when ``half``); integer parts reduced exactly."""
    m = torch.arange(n // 2 + 1 if half else n, dtype=torch.int64)
    a = torch.arange(k, dtype=torch.int64)[:, None]
    return (torch.remainder(a * m[None], n).double() + a.double() * twist) / n


def _symbol(w64: Tensor, grid: HW, twist: tuple[float, float]) -> Tensor:
    """``(F, Cout, Cin)`` complex symbol ``K(w)`` on the twisted grid: all ``w1``, half of ``w2``
    (``K(-w) = conj K(w)`` for real kernels and twists in ``{0, 1/2}``: same singular values)."""
    kh, kw = int(w64.shape[-2]), int(w64.shape[-1])
    p1 = _phases(grid[0], kh, twist[0], half=False)  # (kh, F1)
    p2 = _phases(grid[1], kw, twist[1], half=True)  # (kw, F2)
    turns = torch.remainder(p1[:, None, :, None] + p2[None, :, None, :], 1.0)  # (kh, kw, F1, F2)
    angle = (-2.0 * math.pi) * turns.reshape(kh * kw, -1)
    flat = w64.reshape(-1, kh * kw)  # (Co Ci, kh kw)
    sym = torch.complex(flat @ torch.cos(angle), flat @ torch.sin(angle))  # (Co Ci, F)
    return sym.T.reshape(-1, w64.shape[0], w64.shape[1])


def _circulant_top(w64: Tensor, grid: HW, twist: tuple[float, float]) -> tuple[float, int, Tensor]:
    """``(lambda_hat, argmax frequency, symbol)``: the largest computed eigenvalue of the per-frequency Gram."""
    sym = _symbol(w64, grid, twist)
    gram = sym.mH @ sym if sym.shape[2] <= sym.shape[1] else sym @ sym.mH
    with _one_thread():
        top = torch.linalg.eigvalsh(gram)[:, -1]
    idx = int(top.argmax())
    return float(top[idx]), idx, sym


def _circulant_grid(input_hw: HW, k: int, padding: int) -> HW:
    """Smallest circular grid without wrap-around for the stride-1 conv (module docstring)."""
    return tuple(max(n + padding, n + 2 * padding - k + 1) for n in input_hw)  # type: ignore[return-value]


class _Circulant(NamedTuple):
    bound: float
    grid: HW
    twist: tuple[float, float]
    freq: int
    symbol: Tensor


def _circulant(w64: Tensor, input_hw: HW, padding: int, enough: float = 0.0) -> _Circulant:
    """The circulant-embedding bound (with margin), minimised over the twists tried (stopping once it
    is ``<= enough``), and where its max sits."""
    grid = _circulant_grid(input_hw, int(w64.shape[-1]), padding)
    twists = [(0.0, 0.0)]
    if grid[0] * grid[1] <= TWIST_MAX_FREQS:
        twists += [(0.0, 0.5), (0.5, 0.0), (0.5, 0.5)]
    co, ci, kh, kw = (int(s) for s in w64.shape)
    s_norm = float(w64.abs().sum(dim=(2, 3)).norm())
    dft = 2.0 * (48 + kh * kw) * U64 * s_norm
    best: Optional[_Circulant] = None
    for twist in twists:
        lam, idx, sym = _circulant_top(w64, grid, twist)
        ub = (_gram_interval(lam, r=min(co, ci), m=max(co, ci))[0] + dft) * (1.0 + 8 * U64)
        if best is None or ub < best.bound:
            best = _Circulant(ub, grid, twist, idx, sym)
        if best.bound <= enough:
            break
    assert best is not None
    return best


def conv_operator_norm_upper(
    weight: Tensor, input_hw: HW, stride: int = 1, padding: Optional[int] = None, *, enough: float = 0.0
) -> float:
    """A guaranteed upper bound of the operator norm of ``x -> conv2d(x, weight, stride, padding)``.

    Args:
        weight: ``(Cout, Cin, k, k)``, any float dtype and device (computed in float64 on the CPU).
        input_hw: input spatial size ``(H, W)`` in pixels.
        stride, padding: as in ``nn.Conv2d`` (``padding=None`` means ``k // 2``); zero padding.
        enough: stop refining (over twisted grids) once the bound is ``<= enough`` (for yes/no checks).

    Returns:
        ``>= ||conv||_2`` for the exact values of ``weight``: dense (exact) on small operators, the
        circulant embedding (stride-1 bound) otherwise, plus the float64 rounding margin (module docstring).
    """
    w64 = weight.detach().to(device="cpu", dtype=torch.float64)
    padding = int(w64.shape[-1]) // 2 if padding is None else int(padding)
    hw = (int(input_hw[0]), int(input_hw[1]))
    _check_geometry(w64, hw, stride, padding)
    if not bool(w64.any()):
        return 0.0
    if _is_dense(w64, hw, stride, padding):
        return _dense_interval(w64, hw, stride, padding)[0]
    return _circulant(w64, hw, padding, enough).bound


# --------------------------------------------------------------------------------------------
# Lower estimates
# --------------------------------------------------------------------------------------------


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
    Like power iteration it never overestimates: the result is a Ritz value, i.e. ``<= lambda_max``
    (up to rounding): a lower estimate, never a bound.

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
    with torch.autocast(device_type=weight.device.type, enabled=False), torch.no_grad():
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
    """Operator norm of ``x -> conv2d(x, weight, stride, padding)`` estimated FROM BELOW.

    Restarted Lanczos on ``conv`` followed by its adjoint ``conv_transpose`` at the real input size,
    padding and stride, in float64, until the estimate changes by less than ``tol`` (relative) or
    ``iters`` operator applications were used. A Ritz value: ``<=`` the norm, typically within
    ``tol``. Never use it as a bound: that is :func:`conv_operator_norm_upper`.

    Args:
        weight: ``(Cout, Cin, k, k)``.
        input_hw: input spatial size ``(H, W)`` in pixels.
        stride, padding: as in ``nn.Conv2d`` (``padding=None`` means ``k // 2``).
    """
    return conv_operator_norm_and_vector(weight, input_hw, stride, padding, iters, tol)[0]


def _plane_wave(circ: _Circulant, input_hw: HW) -> Tensor:
    """``(1, Cin, H, W)``: the circulant's top singular mode ``Re(v e^{i w.n})`` under a sine window.

    Near the zero-padded operator's top singular vector, so Lanczos from it converges in a few steps.
    """
    sym = circ.symbol[circ.freq]  # (Cout, Cin)
    _, vecs = torch.linalg.eigh(sym.mH @ sym)
    v = vecs[:, -1].conj()  # conv2d is a correlation: its response to v e^{i w n} is conj(K(w)) v
    f2 = circ.grid[1] // 2 + 1
    m1, m2 = divmod(circ.freq, f2)
    out = v[:, None, None]
    for dim, (m, n, twist) in enumerate(zip((m1, m2), circ.grid, circ.twist)):
        pos = torch.arange(input_hw[dim], dtype=torch.float64)
        wave = torch.exp(2j * math.pi * (m + twist) / n * pos) * torch.sin(math.pi * (pos + 1) / (input_hw[dim] + 1))
        out = out * (wave[:, None] if dim == 0 else wave[None, :])
    return out.real[None]


def conv_norm_estimates(
    weight: Tensor, input_hw: HW, stride: int = 1, padding: Optional[int] = None
) -> NormEstimate:
    """:func:`conv_operator_norm_upper` and a lower estimate of the same norm, in one pass.

    ``measured``: on the dense path, the guaranteed lower end of the same computation (exact up to
    the margin); otherwise ``||A v|| / ||v||`` in float64 for the Ritz vector ``v`` of float32 Lanczos
    (on ``weight``'s device, :data:`MEASURED_TOL` / :data:`MEASURED_MAX_MATVECS`, started from the
    circulant's top singular mode): below the norm up to float64 rounding.
    """
    w64 = weight.detach().to(device="cpu", dtype=torch.float64)
    padding = int(w64.shape[-1]) // 2 if padding is None else int(padding)
    hw = (int(input_hw[0]), int(input_hw[1]))
    _check_geometry(w64, hw, stride, padding)
    if not bool(w64.any()):
        return NormEstimate(0.0, 0.0)
    if _is_dense(w64, hw, stride, padding):
        return NormEstimate(*_dense_interval(w64, hw, stride, padding))
    circ = _circulant(w64, hw, padding)
    _, vec = conv_operator_norm_and_vector(weight, hw, stride, padding, MEASURED_MAX_MATVECS, MEASURED_TOL,
                                           u0=_plane_wave(circ, hw), dtype=torch.float32)
    with torch.no_grad():  # the Ritz vector's ratio ||A v|| / ||v||, in float64: <= ||A|| up to ~1e-15
        v = vec.double()
        measured = float(F.conv2d(v, weight.detach().double(), stride=stride, padding=padding).norm() / v.norm())
    return NormEstimate(circ.bound, measured)


def jacobian_norm(fn: Callable[[Tensor], Tensor], x: Tensor, iters: int, seed: int = 0) -> tuple[float, Tensor]:
    """``||J v||`` after ``iters`` power iterations on ``J^T J`` of ``fn`` at ``x``, and the unit ``v``.

    ``J`` is ``fn``'s Jacobian at ``x`` (forward- and reverse-mode autograd, norms over whole tensors).
    Any ``||J(x) v||`` with ``||v|| = 1`` is a lower estimate of ``fn``'s L2 Lipschitz constant (where
    ``fn`` is differentiable at ``x``). ``fn`` must be deterministic (eval mode). ``v`` has ``x``'s shape.
    """
    from torch.func import jvp, vjp

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.detach()
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    v = v / v.norm().clamp_min(1e-30)
    _, vjp_fn = vjp(fn, x)
    for _ in range(iters):
        _, jv = jvp(fn, (x,), (v,))
        (v,) = vjp_fn(jv)
        v = v.detach() / v.norm().clamp_min(1e-30)
    _, jv = jvp(fn, (x,), (v,))
    return float(jv.detach().norm()), v


# --------------------------------------------------------------------------------------------
# The SLL Gram bound
# --------------------------------------------------------------------------------------------


def gram_abs(weight: Tensor) -> Tensor:
    """``M_ij = sum_{dx,dy} |(K * K)_ij|`` ``(Ci, Ci)`` for a kernel ``(Ci, C, k, k)``, in ``weight``'s dtype.

    ``(K * K)_ij`` is the ``(2k-1) x (2k-1)`` kernel of ``A A^T`` (``A = conv(., K)``) between rows
    ``i`` and ``j``.
    """
    k = weight.shape[-1]
    return F.conv2d(weight, weight, padding=k - 1).abs().sum(dim=(2, 3))


def gram_norm_bound(weight: Tensor, iters: int = 300) -> float:
    """Rigorous upper bound of ``||A||^2`` for ``A = conv(., weight)``, zero padding, any input size.

    ``A`` is a compression of a circular convolution ``C`` (module docstring), so ``||A||^2 <= ||C C^T||``,
    and every row of ``C C^T`` sums (in absolute value) at most ``M``'s (:func:`gram_abs`): the weighted
    Gershgorin bound ``max_i (M q)_i / q_i`` holds for every ``q > 0`` (SLL's own argument); its minimum
    over ``q`` is the Perron root of ``M``, approached with ``q`` from power iteration. For a folded
    SLL kernel ``K' = t^-1/2 K`` the vector ``t^1/2 q_learned`` certifies a value <= 1, so the Perron
    vector does too: this recovers the block's guarantee from its weights alone.

    Rounding (float64): ``M`` is computed from sums of ``n = C k^2`` products per tap, so
    ``M <= fl(M) + 2 n u |K| * |K|`` entrywise, and ``sum_taps (|K| * |K|)_ij = (S S^T)_ij`` with
    ``S_ic = ||K_ic||_1``; the final row sums of positive terms add a factor ``1 + 2 (Ci + 2) u``.
    """
    with torch.autocast(device_type=weight.device.type, enabled=False), torch.no_grad():
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        n = w.shape[1] * w.shape[2] * w.shape[3]
        s = w.abs().sum(dim=(2, 3))
        m = gram_abs(w) + (2.0 * n * U64) * (s @ s.T)
        q = torch.ones(m.shape[0], dtype=torch.float64)
        for _ in range(iters):
            nq = m @ q
            nq = nq / nq.max().clamp_min(1e-300)
            q = nq.clamp_min(1e-12)
        return float(((m @ q) / q).max()) * (1.0 + 2.0 * (m.shape[0] + 2) * U64)
