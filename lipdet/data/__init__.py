"""SVHN format-1 data: annotation I/O, a synthetic generator, the 74x74 crop dataset, drawing, download.

Modules: :mod:`~lipdet.data.digitstruct` (``digitStruct.mat``), :mod:`~lipdet.data.synth`
(synthetic house numbers), :mod:`~lipdet.data.dataset` (:class:`SVHNDetection`),
:mod:`~lipdet.data.split` (:class:`ValSplit`, the validation images held out of train),
:mod:`~lipdet.data.show` (box drawing), :mod:`~lipdet.data.fetch` (official archives),
:mod:`~lipdet.data.cli` (``lipdet data``). Names below are imported lazily, so that
``import lipdet.data`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Record": "digitstruct",
    "read_digitstruct": "digitstruct",
    "write_digitstruct": "digitstruct",
    "synthesize": "synth",
    "ensure_synthetic": "synth",
    "SVHNDetection": "dataset",
    "detection_collate": "dataset",
    "resolve_data": "dataset",
    "carve_validation": "dataset",
    "ValSplit": "split",
    "boxes_from_crop": "dataset",
    "draw_detections": "show",
    "draw_grid": "show",
    "fetch_svhn": "fetch",
}

__all__ = [
    "Record",
    "SVHNDetection",
    "ValSplit",
    "boxes_from_crop",
    "carve_validation",
    "detection_collate",
    "draw_detections",
    "draw_grid",
    "ensure_synthetic",
    "fetch_svhn",
    "read_digitstruct",
    "resolve_data",
    "synthesize",
    "write_digitstruct",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lipdet.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lipdet.data' has no attribute {name!r}")
