"""Numerical parity between two runs of a detector: one comparison, one tolerance table.

Every check lipdet makes between two implementations of the same network goes through here:
the folded model against the trained one, ONNX Runtime against torch and reduced precisions
against fp32 (export), the TensorRT engine against ONNX Runtime (export ``--trt``), and the
differentiable twin against the deployed engine (deploy / eval). Outputs are the raw
``(loc, logits)`` pair: ``loc`` ``(N, P, 4)`` and ``logits`` ``(N, P, C)``.

Shared core: imports only torch, numpy and :mod:`lipdet.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lipdet.errors import LipdetError


class ParityError(LipdetError):
    """A verification failed (folding, ONNX Runtime or TensorRT parity): exit code 1, nothing written."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message, exit_code)


TOLERANCES: dict[tuple[str, str], dict[str, float]] = {
    # folded vs trained torch model (real and random inputs): max |a - b| / max |ref|
    ("fold", "fp32"): {"rel": 1e-5},
    # exported graph vs the fp32 reference (ONNX Runtime vs torch for fp32, else vs ORT fp32)
    ("onnx", "fp32"): {"rel": 1e-4, "cosine": 0.999999},
    ("onnx", "fp16"): {"rel": 1e-2, "cosine": 0.9999},
    # int8: the error's energy (relative RMS = 10^(-SQNR/20); 0.1 is 20 dB) and direction, not its largest element
    ("onnx", "int8"): {"rms": 0.1, "cosine": 0.995},
    # TensorRT engine vs ONNX Runtime on the same batch
    ("tensorrt", "fp32"): {"rel": 1e-3, "cosine": 0.99999},
    ("tensorrt", "fp16"): {"rel": 2e-2, "cosine": 0.999},
    ("tensorrt", "int8"): {"rms": 0.1, "cosine": 0.995},
    # differentiable twin vs deployed engine: max |a - b| <= rel * max(max |ref|, 1) (see twin_tolerance)
    ("twin", "fp32"): {"rel": 1e-4},
    ("twin", "fp16"): {"rel": 2e-2},
    ("twin", "int8"): {"rel": 0.25},
}
"""Parity tolerances by ``(check, precision)``: ``rel`` is the largest allowed max abs diff over
the largest reference magnitude (a fraction), ``rms`` the largest allowed relative RMS error
(``||out - ref|| / ||ref||`` per output), ``cosine`` the smallest allowed cosine similarity.

fp32 and fp16 graphs compute the same function up to rounding, so their largest single difference is
bounded. An int8 graph does not: calibrated activation ranges clip rare extreme values, e.g. the most
negative logit of some anchor (-7.03 read back as -5.24 on the trained model of
``test_int8_of_a_trained_model_passes_parity_within_a_point_of_fp32``, rel 0.255, with every
detection and map_50 within 0.6 points unchanged). Its gate is therefore on the relative RMS error
(0.1 = 20 dB SQNR, the unit of ONNX Runtime's ``qdq_loss_debug``) and the cosine; a saturating kernel
(u8s8 with 8-bit weights on AVX2 without VNNI: cosine 0.986) still fails it, and ``max_abs`` / ``rel``
are reported with every check."""


def tolerance(check: str, precision: str) -> dict[str, float]:
    """The :data:`TOLERANCES` entry of ``(check, precision)`` (KeyError if there is none)."""
    return TOLERANCES[(check, precision)]


def within(stats: dict[str, float], check: str, precision: str) -> bool:
    """Whether :func:`compare` stats meet the ``(check, precision)`` tolerance (NaN fails)."""
    tol = tolerance(check, precision)
    ok = all(stats[k] <= tol[k] for k in ("rel", "rms") if k in tol)
    return ok and ("cosine" not in tol or stats["cosine"] >= tol["cosine"])


def compare(out: Sequence[torch.Tensor | np.ndarray], ref: Sequence[torch.Tensor | np.ndarray]) -> dict[str, float]:
    """Agreement of ``(loc, logits)`` pairs: max abs diff, max rel diff (vs max |ref|), max relative RMS
    error, min cosine.

    Cosine and ``rms`` (``||a - b|| / ||b||``) are computed per output over the whole flattened batch;
    ``rel`` divides the max abs diff by the largest reference magnitude of the same output. Each is the
    worst over the outputs.
    """
    max_abs, rel, rms, cos = 0.0, 0.0, 0.0, 1.0
    for a, b in zip(out, ref):
        a64, b64 = _flat64(a), _flat64(b)
        if a64.shape != b64.shape:
            raise LipdetError(f"output shapes differ: {tuple(a64.shape)} vs {tuple(b64.shape)}")
        diff = a64 - b64
        d = float(diff.abs().max()) if diff.numel() else 0.0
        scale = float(b64.abs().max()) if b64.numel() else 0.0
        max_abs = max(max_abs, d)
        rel = max(rel, d / max(scale, 1e-12))
        na, nb = float(a64.norm()), float(b64.norm())
        c = 1.0 if na == 0 and nb == 0 else float(a64 @ b64) / max(na * nb, 1e-300)
        cos = min(cos, c)
        rms = max(rms, float(diff.norm()) / max(nb, 1e-300))  # an empty output: 0 / 1e-300 = 0
    return {"max_abs": max_abs, "rel": rel, "rms": rms, "cosine": cos}


def worst(*stats: dict[str, float]) -> dict[str, float]:
    """The worst of several :func:`compare` results, key by key (largest differences, smallest cosine)."""
    return {k: (min if k == "cosine" else max)(s[k] for s in stats) for k in stats[0]}


def _flat64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.double().flatten()


def format_stats(stats: dict[str, float]) -> str:
    """One line for :func:`compare` stats: max abs diff, its relative size, relative RMS error, cosine."""
    return (f"max abs diff {stats['max_abs']:.3g} (rel {stats['rel']:.3g}), rms {stats['rms']:.3g}, "
            f"cosine {stats['cosine']:.6f}")


# ----------------------------------------------------------------------------------------------
# twin vs engine: an absolute tolerance on the per-image max abs diff


def twin_tolerance(precision: str, reference: Sequence[torch.Tensor]) -> float:
    """Absolute twin tolerance: the ``("twin", precision)`` ``rel`` (fp32's for an unknown
    precision) times the largest reference output magnitude, floored at 1."""
    rel = TOLERANCES.get(("twin", precision), TOLERANCES[("twin", "fp32")])["rel"]
    scale = max(float(t.abs().max()) for t in reference if t.numel())
    return rel * max(scale, 1.0)


def max_abs_per_image(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image max ``|out - ref|`` over every output (float32 on the CPU), shape ``(N,)``."""
    diffs = [(a.float().cpu() - b.float().cpu()).abs().flatten(1).amax(dim=1) for a, b in zip(out, ref)]
    worst = diffs[0]
    for d in diffs[1:]:
        worst = torch.maximum(worst, d)
    return worst


@dataclass(frozen=True)
class Agreement:
    """Twin/engine agreement on a batch: ``per_image`` ``(N,)`` max abs diffs, their ``worst``, the ``tol``."""

    per_image: torch.Tensor
    worst: float
    tol: float

    @property
    def ok(self) -> bool:
        """``worst <= tol`` (NaN fails)."""
        return self.worst <= self.tol


def agreement(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], tol: float) -> Agreement:
    """:func:`max_abs_per_image` of ``out`` vs ``ref`` against the absolute ``tol`` (0 for an empty batch)."""
    per_image = max_abs_per_image(out, ref)
    worst = float(per_image.max()) if per_image.numel() else 0.0
    return Agreement(per_image=per_image, worst=worst, tol=float(tol))
