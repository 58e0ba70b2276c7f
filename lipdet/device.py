"""The one device resolver: ``auto`` | ``cpu`` | ``cuda`` -> a torch device, or a one-line refusal."""

from __future__ import annotations

import torch

from lipdet.errors import LipdetError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def cuda_visible() -> bool:
    """Whether torch sees at least one CUDA GPU."""
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU", not a crash
        return False


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when visible, else the CPU; ``cuda`` without a GPU is a LipdetError."""
    if device not in DEVICES:
        raise LipdetError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "cuda" and not cuda_visible():
        raise LipdetError("device 'cuda': no CUDA GPU is visible to torch")
    if device == "auto":
        return torch.device("cuda" if cuda_visible() else "cpu")
    return torch.device(device)
