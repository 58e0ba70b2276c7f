"""Fold a trained detector into plain ops for export.

:func:`fold_model` replaces every module by its ``fold()``: SLL blocks become
``Conv -> ReLU -> Conv -> Sub`` with ``t`` folded into the kernels, spectral / L2 normalisations
become constant kernels (spectral norms iterated to convergence), BatchNorm is folded into the
preceding conv. The result holds only ``nn.Conv2d``, ReLU, ``nn.MaxPool2d``, subtraction, channel
pad/slice and the reshape/permute/cat of the prior layout; it is ONNX-exportable with a dynamic
batch. :func:`build_folded` builds the same structure from a config alone, so
``build_folded(cfg).load_state_dict(fold_model(m).state_dict(), strict=True)`` works.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lipdet.errors import LipdetError
from lipdet.models.config import ModelConfig
from lipdet.models.tinier_ssd import TAPS, TinierSSD, build_folded_from_config


def _fold_module(m: nn.Module) -> nn.Module:
    fold = getattr(m, "fold", None)
    if fold is None:
        raise LipdetError(f"cannot fold module of type {type(m).__name__}")
    out = fold()
    if out is m:
        out = copy.deepcopy(m)
    return out


def fold_model(model: nn.Module) -> TinierSSD:
    """Eval-mode folded copy of ``model`` (a :class:`TinierSSD`, folded or not); ``model`` is unchanged.

    In eval mode both compute the same outputs (to float rounding, 1e-5 relative).
    """
    if not isinstance(model, TinierSSD):
        raise LipdetError(f"fold_model expects a lipdet TinierSSD, got {type(model).__name__}")
    with torch.no_grad():
        trunk = [(name, _fold_module(m)) for name, m in model.trunk.items()]
        locs = [_fold_module(model.loc_heads[t]) for t in model.taps]
        clss = [_fold_module(model.cls_heads[t]) for t in model.taps]
    folded = TinierSSD(copy.deepcopy(model.config), trunk, model.taps, locs, clss, folded=True)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.to(model.priors.device).eval()


def build_folded(cfg: ModelConfig) -> TinierSSD:
    """The folded model structure for ``cfg`` (eval mode), ready for ``load_state_dict``."""
    model = build_folded_from_config(cfg)
    assert model.taps == TAPS
    return model
