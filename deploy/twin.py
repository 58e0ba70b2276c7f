"""The differentiable twin of a deployed artifact, rebuilt from the artifact's own weights.

An ONNX Runtime session or a TensorRT engine has no gradients, so attacks craft perturbations on
a torch model with the same weights and replay them on the engine. "The same weights" means the
ones in the deployed file, not the checkpoint's:

* ``.onnx``: ``build_folded(card.model)`` loaded from the ONNX values named like the folded
  ``state_dict`` keys -- fp32 initialisers as they are, fp16 ones cast to float32, int8 ones
  dequantised exactly as the runtime does (``scale * (q - zero_point)``, per channel). A bias the
  graph does not hold is zero: ``torch.onnx.export(optimize=True)`` removes an all-zero bias input
  (the convolution then has none), and that is the only weight it may drop; the twin-vs-engine gate
  (:func:`check_twin`) confirms the result on real inputs before anything is attacked.
* ``.plan``: the source ONNX named in the sidecar (refused if its sha256 changed).
* ``.pt``: ``fold_model`` of the checkpoint's model.

The twin carries ``.card`` (a :class:`~lipdet.artifacts.ModelCard`), ``.config`` and ``.priors``. What it does not reproduce: the
activation rounding of an int8 engine and the fp16 arithmetic of an fp16 one -- so compare before
attacking with :func:`check_twin`, whose default tolerance depends on the precision.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lipdet.artifacts import ModelCard, PlanSidecar, artifact_kind, load_checkpoint
from lipdet.errors import LipdetError
from lipdet.parity import agreement, twin_tolerance


def load_twin(path: Path | str) -> nn.Module:
    """The eval-mode, folded torch twin of a ``.pt``, ``.onnx`` or ``.plan`` artifact."""
    kind = artifact_kind(path)
    path = Path(path)
    if kind == "checkpoint":
        return _twin_from_checkpoint(path)
    if kind == "onnx":
        return twin_from_onnx(path)
    from lipdet.export.tensorrt import source_onnx

    side = PlanSidecar.read(path)
    twin = twin_from_onnx(source_onnx(side, path))
    twin.card = dataclasses.replace(twin.card, tensorrt=side.trt_info())
    return twin


def _twin_from_checkpoint(path: Path) -> nn.Module:
    from lipdet.models import fold_model

    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    twin = fold_model(model)
    twin.card = ckpt.card(model)
    return _finish(twin)


def twin_from_onnx(path: Path | str) -> nn.Module:
    """Rebuild the folded model from an exported ONNX file's card and weights (see module docstring)."""
    from lipdet.export.onnx_export import get_card, load_onnx

    path = Path(path)
    model = load_onnx(path)
    card = get_card(model, source=str(path))
    if card is None:
        raise LipdetError(f"{path} has no lipdet model card, so its architecture is unknown; only ONNX files "
                          "written by 'lipdet export' can be turned into a differentiable twin")
    return twin_from_proto(model, card, source=str(path))


def twin_from_proto(model: Any, card: ModelCard, source: str = "ONNX model") -> nn.Module:
    """:func:`twin_from_onnx` for an in-memory ``onnx.ModelProto`` and its card."""
    from lipdet.export.precision import onnx_constants
    from lipdet.models import build_folded

    cfg = card.model
    twin = build_folded(cfg)
    consts = onnx_constants(model)
    state = {}
    missing = []
    for key, ref in twin.state_dict().items():
        arr = consts.get(key)
        if arr is None and key.endswith(".bias"):
            arr = np.zeros(tuple(ref.shape), np.float32)  # the exporter's optimiser drops all-zero biases
        if arr is None:
            missing.append(key)
            continue
        if tuple(arr.shape) != tuple(ref.shape):
            raise LipdetError(f"{source}: weight {key} has shape {tuple(arr.shape)}, the {cfg.arch} card expects {tuple(ref.shape)}")
        state[key] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).to(ref.dtype)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LipdetError(f"{source}: weight {missing[0]}{more} of the {cfg.arch} architecture is not in the ONNX graph")
    try:
        twin.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LipdetError(f"{source}: ONNX weights do not fit the {cfg.arch} architecture ({str(e).splitlines()[0][:200]})") from None
    twin.card = card
    return _finish(twin)


def _finish(twin: nn.Module) -> nn.Module:
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def default_tolerance(precision: str, reference: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Absolute twin tolerance: the ``("twin", precision)`` entry of :data:`lipdet.parity.TOLERANCES`
    times the largest reference output magnitude (floored at 1; :func:`lipdet.parity.twin_tolerance`)."""
    return twin_tolerance(precision, reference)


@torch.no_grad()
def check_twin(twin: nn.Module, backend: Any, images: torch.Tensor, tol: float | None = None) -> float:
    """Max abs difference between ``twin`` and ``backend`` on ``images``; LipdetError beyond ``tol``.

    ``tol`` is absolute; by default it is relative to the backend outputs' magnitude, per
    precision (:func:`default_tolerance`): a twin of an int8 engine is only close, not equal,
    because the engine also rounds its activations.
    """
    ref = backend(images)
    dev = next(twin.parameters()).device
    out = twin(images.to(dev, torch.float32))
    if tol is None:
        tol = default_tolerance(getattr(backend, "precision", "fp32"), ref)
    agr = agreement(out, ref, tol)
    if not agr.ok:  # also catches NaN
        raise LipdetError(
            f"the differentiable twin disagrees with the {getattr(backend, 'name', 'deployed')} model "
            f"({getattr(backend, 'precision', '?')}): max abs diff {agr.worst:.4g} > tolerance {agr.tol:.4g}; "
            "attacks crafted on it would not transfer faithfully"
        )
    return agr.worst
