"""Detectors: the naive Tinier SSD and its Lipschitz (SLL) variants, plus folding for export.

Public API::

    build_model(arch="naive", **options) -> TinierSSD
    build_from_config(cfg: ModelConfig) -> TinierSSD
    fold_model(model) -> TinierSSD          # plain ops, eval mode
    build_folded(cfg: ModelConfig) -> TinierSSD  # folded structure for load_state_dict
"""

from lipdet.models.config import ARCHS, CLASS_NAMES, NUM_CLASSES, ModelConfig
from lipdet.models.fold import build_folded, fold_model
from lipdet.models.tinier_ssd import TinierSSD, build_from_config, build_model, count_parameters

__all__ = [
    "ARCHS",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "ModelConfig",
    "TinierSSD",
    "build_folded",
    "build_from_config",
    "build_model",
    "count_parameters",
    "fold_model",
]
