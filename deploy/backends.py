"""One runtime interface over the three artifacts lipdet produces.

``load_backend(path)`` picks by suffix:

* ``.pt`` -> :class:`TorchBackend` (the checkpoint's parametrised model, eval mode);
* ``.onnx`` -> :class:`OrtBackend` (ONNX Runtime, CUDAExecutionProvider if available else CPU);
* ``.plan`` -> :class:`TrtBackend` (TensorRT; needs the ``.plan.json`` sidecar and the same
  TensorRT version and GPU the plan was built for).

Every backend is called the same way: ``backend(images)`` with ``images`` a float32 CPU tensor
``(N, 3, S, S)`` in ``[0, 1]`` returns raw ``(loc (N, P, 4), logits (N, P, C))`` float32 CPU
tensors, to be post-processed by :mod:`lipdet.postprocess` identically for all backends. Common
attributes: ``name``, ``path``, ``card`` (the :class:`~lipdet.artifacts.ModelCard`, or None for a foreign ONNX),
``input_size``, ``priors`` ``(P, 4)``, ``precision``, ``provider``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from lipdet.artifacts import ModelCard, PlanSidecar, artifact_kind, load_checkpoint
from lipdet.boxes import PriorSpec, feature_sizes_for, make_priors
from lipdet.device import DEVICES, resolve_device
from lipdet.errors import LipdetError



class Backend:
    """Base class: shared attributes, input checking and the call protocol."""

    name: str = "backend"

    def __init__(self, path: Path, card: ModelCard | None, input_size: int, precision: str, provider: str) -> None:
        self.path = Path(path)
        self.card = card
        self.input_size = int(input_size)
        self.precision = precision
        self.provider = provider
        self.priors = priors_from_card(card, self.input_size)
        self.max_batch: int | None = None

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check(images)
        if self.max_batch and len(x) > self.max_batch:
            parts = [self._run(c) for c in x.split(self.max_batch)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return self._run(x)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise LipdetError(f"{self.name} backend expects a torch.Tensor, got {type(images).__name__}")
        s = self.input_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise LipdetError(f"{self.name} backend expects images of shape (N, 3, {s}, {s}), got {tuple(images.shape)}")
        return images.detach().to("cpu", torch.float32).contiguous()

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_classes(self) -> int | None:
        return self.card.model.num_classes if self.card is not None else None

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, {self.provider}) {self.path}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def priors_from_card(card: ModelCard | None, input_size: int) -> torch.Tensor:
    """Priors ``(P, 4)`` from a card's prior spec; the default Tinier SSD layout without a card."""
    spec = card.priors if card is not None else PriorSpec(feature_sizes=feature_sizes_for(input_size))
    return make_priors(spec)


# ----------------------------------------------------------------------------------------------
# torch


class TorchBackend(Backend):
    """The checkpoint's (parametrised) model in eval mode."""

    name = "torch"

    def __init__(self, path: Path, device: str = "auto") -> None:
        ckpt = load_checkpoint(path)
        model = ckpt.build_model()
        dev = resolve_device(device)
        self.model = model.to(dev).eval()
        card = ckpt.card(model)
        super().__init__(path, card, model.config.input_size, "fp32", str(dev))
        self.device = dev

    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, logits = self.model(images.to(self.device))
        return loc.float().cpu(), logits.float().cpu()


# ----------------------------------------------------------------------------------------------
# ONNX Runtime


class OrtBackend(Backend):
    """An ONNX model in ONNX Runtime.

    Provider: ``CUDAExecutionProvider`` when available (``device`` ``auto``/``cuda``), else
    ``CPUExecutionProvider``; the one in use is in ``provider``. An fp16 graph that the CPU
    provider cannot run is refused with a one-line error (never silently replaced). An int8 graph
    whose flavour is inaccurate on this CPU (u8s8 with full-range weights, no VNNI/AMX) loads with
    one warning line on stderr, also kept in ``warning`` (None otherwise).
    """

    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "auto", input_size: int | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        from lipdet.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, get_card, load_onnx, ort_session

        if device not in DEVICES:
            raise LipdetError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
        model = load_onnx(path)
        card = get_card(model, source=str(path))
        size = _input_size(path, card, input_size)
        precision = card.precision if card is not None else _guess_precision(model)
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise LipdetError(
                "device 'cuda': onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu: "
                "pip install 'lipdet[gpu]')"
            )
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        try:
            self.session = ort_session(model, providers, threads=threads)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = " (fp16 graphs are meant for TensorRT: lipdet export --precision fp16 --trt)" if precision == "fp16" else ""
            raise LipdetError(f"{path}: ONNX Runtime cannot load this graph: {first[:200]}{hint}") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise LipdetError(f"{path}: expected input 'images' and outputs 'loc', 'logits'; got {inputs} -> {outputs}")
        super().__init__(path, card, size, precision, self.session.get_providers()[0])
        self._input, self._outputs = INPUT_NAME, list(OUTPUT_NAMES)
        self.warning = _int8_cpu_warning(model, self.provider)
        if self.warning:
            print(f"{path}: {self.warning}", file=sys.stderr)

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            loc, logits = self.session.run(self._outputs, {self._input: images.numpy()})
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LipdetError(f"{self.path}: ONNX Runtime failed to run the graph: {first[:200]}") from None
        return torch.from_numpy(loc).float(), torch.from_numpy(logits).float()


def _int8_cpu_warning(model: Any, provider: str) -> str | None:
    """The one-line warning for an int8 graph whose flavour is not accurate on this CPU (u8s8 with full-range
    weights without VNNI/AMX: :func:`lipdet.export.precision.saturation_warning`); None otherwise or off the CPU."""
    from lipdet.export.precision import int8_flavour, saturation_warning
    from lipdet.hardware import machine

    if provider != "CPUExecutionProvider":
        return None
    return saturation_warning(int8_flavour(model), machine())


def _input_size(path: Path, card: ModelCard | None, input_size: int | None) -> int:
    """The input side (pixels): the card's, else ``input_size``; a one-line LipdetError if they differ or neither is known."""
    if card is not None:
        size = card.model.input_size
        if input_size is not None and int(input_size) != size:
            raise LipdetError(f"{path}: input size {input_size} given, but the model card says {size}")
        return size
    if input_size is None:
        raise LipdetError(f"{path} has no lipdet model card; pass its input_size (e.g. 74)")
    return int(input_size)


def _guess_precision(model: Any) -> str:
    ops = {n.op_type for n in model.graph.node}
    if "DequantizeLinear" in ops:
        return "int8"
    if any(i.data_type == 10 for i in model.graph.initializer):  # FLOAT16
        return "fp16"
    return "fp32"


# ----------------------------------------------------------------------------------------------
# TensorRT


class TrtBackend(Backend):
    """A TensorRT plan, checked against its sidecar before TensorRT loads it."""

    name = "tensorrt"

    def __init__(self, path: Path, device: str = "auto", input_size: int | None = None) -> None:
        from lipdet.export.onnx_export import get_card
        from lipdet.export.tensorrt import TrtRunner, check_sidecar, current_env, source_onnx

        if device == "cpu":
            raise LipdetError(f"{path}: a TensorRT plan runs on a GPU only (device 'cpu' asked)")
        side = PlanSidecar.read(path)
        check_sidecar(side, current_env(), plan=path)
        onnx_path = source_onnx(side, path)
        card = get_card(onnx_path)
        size = _input_size(path, card, input_size if side.input_size is None else side.input_size)
        self.sidecar: PlanSidecar = side
        self.onnx_path = onnx_path
        self.runner = TrtRunner(path)
        super().__init__(path, card, size, side.precision, f"TensorRT {side.tensorrt} on {side.gpu}")
        self.max_batch = self.runner.max_batch

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner.run(images)


# ----------------------------------------------------------------------------------------------


def load_backend(path: Path | str, device: str = "auto", input_size: int | None = None) -> Backend:
    """The backend for ``path`` by suffix (``.pt``, ``.onnx``, ``.plan``); one-line LipdetError on problems."""
    kind = artifact_kind(path)
    path = Path(path)
    if kind == "checkpoint":
        return TorchBackend(path, device)
    if kind == "onnx":
        return OrtBackend(path, device, input_size)
    return TrtBackend(path, device, input_size)
