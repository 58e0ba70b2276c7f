"""The evaluation engine: dataset -> deployed backend -> shared post-processing -> mAP, attacks, certificates.

Everything is measured on the artifact that ships: clean and adversarial detections always come
from the deployed backend (``lipdet.deploy.backends.load_backend``: torch ``.pt``, ONNX Runtime
``.onnx`` or TensorRT ``.plan``) through :func:`lipdet.postprocess.postprocess`. Gradients for PGD
come from the artifact's differentiable twin (``lipdet.deploy.twin.load_twin``), which must agree
with the engine on clean inputs before any attack runs; adversarial images crafted on the twin are
replayed on the engine. The Square-style random search queries only the engine.

Work is split into fixed batches of consecutive dataset indices (``batch_size``), each processed by
:meth:`Evaluator.run_batch` into raw per-image records (ground truth, detections, losses, twin/engine
differences, certificates). Random draws are seeded per image index. Records are gathered and mAP
is computed once, on the driver (:func:`summarise`), so sharding the batches over Ray workers
(:mod:`lipdet.eval.distributed`) gives the same result as one process.

Public API::

    settings = EvalSettings(pgd=True, eps=0.5, certify=True)
    result = evaluate("runs/x/model.onnx", data=None, settings=settings)
    result.to_dict()                         # the --json object
    result.coco_detections()                 # --save-detections (original-image pixels)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from lipdet.cluster import check_address
from lipdet.data.dataset import SVHNDetection, detection_collate, resolve_data, resolve_training_data
from lipdet.device import resolve_device
from lipdet.errors import LipdetError
from lipdet.io import portable_path
from lipdet.eval.attacks import (
    ENSEMBLE, SELECTION_RULE, AttackLoss, attack_losses, image_harm, image_seed, pgd_l2, scoring_loss, square_l2,
    worst_per_image,
)
from lipdet.certificates import AnchorBounds
from lipdet.eval.certify import (
    CERTIFIED_DEFINITION, binding_summary, certified_objects, certified_share, certify_image, flipped,
)
from lipdet.metrics import DetectionMAP
from lipdet.parity import agreement, max_abs_per_image
from lipdet.postprocess import PostprocessConfig, postprocess

BLACKBOX_METHODS: tuple[str, ...] = ("square",)



# ----------------------------------------------------------------------------------------------
# settings


@dataclass
class EvalSettings:
    """Everything that decides an evaluation's numbers (recorded under ``settings`` in the JSON).

    Attributes:
        split: dataset split (``test``).
        batch_size: images per batch (also the unit of work of a Ray worker).
        pgd: run the L2 PGD attack at ``eps``.
        eps: L2 radius over the whole ``3 x S x S`` input in ``[0, 1]`` pixel units.
        steps, alpha, restarts: PGD parameters (``alpha`` default ``2.5 * eps / steps``).
        attack_loss: ``ensemble`` (PGD with every loss of :data:`lipdet.eval.attacks.ENSEMBLE_LOSSES`, the
            per-image worst on the engine kept) or one of :data:`lipdet.eval.attacks.ATTACK_LOSSES`.
        blackbox: ``"square"`` to run the gradient-free random search on the engine, or None.
        queries: query budget per image of the black-box attack.
        eps_sweep: radii for the adversarial-mAP curve (one PGD per radius).
        certify: compute per-anchor certificates and the certified object share at ``eps``.
        quant_check: with ``certify`` on an engine whose precision is not fp32 (fp16 / int8 ONNX, TensorRT
            plans), attack every certified object inside its own radius and count flips on the engine
            (:meth:`Evaluator._quant_check`); skipped, with the reason in the JSON, for fp32 engines.
        seed: attack seed (per image index, so independent of batching and workers).
        input_size: input side for artifacts without a model card.
        limit: evaluate the first ``limit`` images only.
        workers: Ray workers (1 = in this process).
        address: with ``workers`` > 1, the Ray cluster to shard over (``HOST:PORT``, ``ray://HOST:PORT``
            or ``auto``); None = ``$RAY_ADDRESS``, else a local Ray started for the call.
        twin_tol: max |twin - engine| on clean raw outputs; None = ``lipdet.deploy.twin``'s default
            for the engine's precision (relative to the outputs' magnitude).
        device: ``auto`` | ``cpu`` | ``cuda`` for the backend and the twin.
        twin: for a served model (MODEL ``http://HOST:PORT``): its ONNX file as the twin, refused unless its
            sha256 is the one the server reports; None = fetch it from the server.
        samples: images kept (clean + adversarial) for the report's figures.
        score_threshold, iou_threshold, top_k: post-processing overrides (None = the model
            card's ``postprocess`` values, else the reference 0.2 / 0.3 / 20).
    """

    split: str = "test"
    batch_size: int = 32
    pgd: bool = False
    eps: float = 0.5
    steps: int = 10
    alpha: float | None = None
    restarts: int = 1
    attack_loss: str = ENSEMBLE
    blackbox: str | None = None
    queries: int = 100
    eps_sweep: tuple[float, ...] = ()
    certify: bool = False
    quant_check: bool = True
    seed: int = 0
    input_size: int | None = None
    limit: int | None = None
    workers: int = 1
    address: str | None = None
    twin_tol: float | None = None
    device: str = "auto"
    twin: str | None = None
    samples: int = 4
    score_threshold: float | None = None
    iou_threshold: float | None = None
    top_k: int | None = None

    def validate(self) -> "EvalSettings":
        """Check every value; a bad one raises a one-line :class:`LipdetError`. Returns self."""
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps)) or self.eps < 0:
            raise LipdetError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.steps < 1:
            raise LipdetError(f"steps must be >= 1, got {self.steps}")
        if self.alpha is not None and not self.alpha > 0:
            raise LipdetError(f"alpha must be > 0, got {self.alpha}")
        if self.restarts < 1:
            raise LipdetError(f"restarts must be >= 1, got {self.restarts}")
        attack_losses(self.attack_loss)  # the one check of the name (LipdetError if unknown)
        if self.blackbox is not None and self.blackbox not in BLACKBOX_METHODS:
            raise LipdetError(f"unknown blackbox {self.blackbox!r}; choose one of: {', '.join(BLACKBOX_METHODS)}")
        if self.queries < 1:
            raise LipdetError(f"queries must be >= 1, got {self.queries}")
        for e in self.eps_sweep:
            if not math.isfinite(e) or e < 0:
                raise LipdetError(f"eps_sweep values must be finite and >= 0, got {e}")
        if self.batch_size < 1:
            raise LipdetError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise LipdetError(f"limit must be >= 1, got {self.limit}")
        if self.workers < 1:
            raise LipdetError(f"workers must be >= 1, got {self.workers}")
        if self.address is not None:
            if self.workers < 2:
                raise LipdetError("address is for sharded evaluation: give workers >= 2 (one worker runs here)")
            check_address(self.address)
        if self.input_size is not None and self.input_size < 8:
            raise LipdetError(f"input_size must be >= 8, got {self.input_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise LipdetError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.twin_tol is not None and not self.twin_tol > 0:
            raise LipdetError(f"twin_tol must be > 0, got {self.twin_tol}")
        return self

    @property
    def pgd_alpha(self) -> float:
        return 2.5 * self.eps / self.steps if self.alpha is None else float(self.alpha)

    @property
    def needs_twin(self) -> bool:
        """PGD (at any eps > 0) and certificates need the differentiable twin; Square does not."""
        return (self.pgd and self.eps > 0) or any(e > 0 for e in self.eps_sweep) or self.certify

    def sweep_eps(self) -> list[float]:
        """Distinct sweep radii in the order given."""
        out: list[float] = []
        for e in self.eps_sweep:
            if float(e) not in out:
                out.append(float(e))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eps_sweep"] = list(self.eps_sweep)
        d["alpha"] = self.pgd_alpha if (self.pgd or self.eps_sweep) else self.alpha
        return d


# ----------------------------------------------------------------------------------------------
# data


def resolve_eval_data(data: str | Path | None, backend: Any) -> tuple[Path, str]:
    """The data root to evaluate on and a short note on where it came from.

    ``data`` if given; else the dataset the model was trained on (the model card's ``data``: every
    backend has one, a ``.pt`` one from its checkpoint), else the embedded synthetic set.
    """
    if data is not None:
        return Path(resolve_data(Path(data))), f"--data {data}"
    card = getattr(backend, "card", None)
    return resolve_training_data(card.data.to_dict() if card is not None and card.data is not None else None)


def open_dataset(root: Path, split: str, input_size: int) -> Any:
    return SVHNDetection(root, split=split, input_size=input_size, seed=0)


def _collate(items: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
    images, targets = detection_collate(list(items))
    return images.float().contiguous(), list(targets)


# ----------------------------------------------------------------------------------------------
# per-image records


Dets = dict[str, Tensor]


@dataclass
class ImageRecord:
    """Raw outputs for one image, produced by a worker and gathered on the driver.

    Detections are ``{"boxes" (D, 4) xyxy input px, "scores" (D,), "labels" (D,) digits}`` from the
    deployed engine. ``pgd`` / ``sweep[eps]`` / ``square`` are the engine's detections on the
    attacked image; ``*_diff`` are max |twin - engine| over raw outputs; ``loss`` holds the attack
    loss (on the twin for a single-loss PGD, on the engine for the ensemble and Square; for the ensemble
    also ``pgd:NAME``, each loss's candidate); ``cert`` the per-object certificate.
    ``pgd_by_loss[name]`` are the engine's detections on the image PGD crafted with loss ``name`` (one
    entry per loss the attack ran) and ``pgd_winner`` the loss whose image ``pgd`` is.
    """

    index: int
    image_id: int
    name: str
    crop: list[float]
    target: dict[str, Tensor]
    clean: Dets
    clean_diff: float | None = None
    pgd: Dets | None = None
    pgd_diff: float | None = None
    pgd_by_loss: dict[str, Dets] = field(default_factory=dict)
    pgd_winner: str | None = None
    sweep: dict[float, Dets] = field(default_factory=dict)
    sweep_diff: dict[float, float | None] = field(default_factory=dict)
    square: Dets | None = None
    loss: dict[str, float] = field(default_factory=dict)
    cert: dict[str, Any] | None = None  # lipdet.eval.certify.certify_image's result
    quant: dict[str, Any] | None = None  # Evaluator._quant_check's per-image counts
    image: Tensor | None = None
    adv_image: Tensor | None = None


def _split_dets(dets: list[Dets]) -> list[Dets]:
    return [{k: v.detach().cpu() for k, v in d.items()} for d in dets]


# ----------------------------------------------------------------------------------------------
# the per-process engine


class TwinBackend:
    """Adapter that runs a twin (or any ``nn.Module`` detector) behind the Backend interface."""

    precision = "fp32"
    provider = "torch"

    def __init__(self, model: torch.nn.Module, name: str = "twin", device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.name = name
        self.path = None
        self.card = getattr(model, "card", None)
        self.priors = model.priors.detach().float().cpu()
        self.input_size = int(model.config.input_size)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        lo, lg = self.model(images.to(self.device))
        return lo.float().cpu(), lg.float().cpu()


def _resolve_device(device: str) -> str:
    """:func:`lipdet.device.resolve_device` as the string the evaluator keeps ("cpu" / "cuda")."""
    return resolve_device(device).type


def load_eval_backend(model: Any, settings: EvalSettings) -> Any:
    """``model`` if it already is a backend object, else ``load_backend(path)`` (errors are one line)."""
    if not isinstance(model, (str, Path)):
        return model
    from lipdet.deploy.backends import load_backend
    from lipdet.deploy.http_backend import HttpBackend, is_url

    if is_url(model):  # a lipdet serve endpoint: scored, and Square-attacked, through HTTP
        return HttpBackend(str(model), twin_file=Path(settings.twin) if settings.twin else None)
    path = Path(model)
    if not path.exists():
        raise LipdetError(f"model not found: {path}")
    return load_backend(path, device=settings.device, input_size=settings.input_size)


def load_eval_twin(model: Any, backend: Any, settings: EvalSettings) -> torch.nn.Module:
    """The differentiable twin of the artifact, on the evaluation device, gradients off for weights."""
    why = "pgd/eps_sweep" if (settings.pgd or settings.eps_sweep) else "certify"
    if isinstance(model, TwinBackend):
        twin = model.model
    elif isinstance(model, (str, Path)) and not hasattr(backend, "twin"):  # a served model brings its own
        from lipdet.deploy.twin import load_twin

        try:
            twin = load_twin(Path(model))
        except LipdetError as e:
            raise LipdetError(
                f"{why} cannot run: the differentiable twin needs the artifact's lipdet model card ({e.message})"
            ) from None
    elif hasattr(backend, "twin"):
        twin = backend.twin
    else:
        raise LipdetError(f"{why} cannot run: no differentiable twin for backend {getattr(backend, 'name', backend)!r}")
    twin = twin.eval().to(_resolve_device(settings.device))
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def postprocess_config(backend: Any, settings: EvalSettings) -> PostprocessConfig:
    """Thresholds: settings overrides, else the model card's ``postprocess``, else the reference defaults."""
    card = getattr(backend, "card", None)
    base = card.thresholds() if card is not None else PostprocessConfig()
    vals = {"score_threshold": base.score_threshold, "iou_threshold": base.iou_threshold, "top_k": base.top_k}
    for k in vals:
        if getattr(settings, k) is not None:
            vals[k] = getattr(settings, k)
    return PostprocessConfig(float(vals["score_threshold"]), float(vals["iou_threshold"]), int(vals["top_k"]))


@dataclass
class _Batch:
    """One batch of an evaluation: dataset indices, images ``(N, 3, S, S)``, ground truth, clean outputs."""

    indices: list[int]
    images: Tensor
    gt: list[dict[str, Tensor]]
    clean_out: tuple[Tensor, Tensor]
    tick: Callable[[int], None]
    clean_diffs: Tensor | None = None  # per image max |twin - engine| on the clean batch, once measured


@dataclass
class _Attacked:
    """Adversarial images of one batch and the engine's view of them.

    ``adv (N, 3, S, S)`` CPU images in [0, 1]; ``eng`` the engine's raw ``(loc, logits)`` on them;
    ``dets`` its post-processed detections; ``diffs (N,)`` max |twin - engine| per image (None
    without a twin); ``loss (N,)`` the attack loss recorded for the image.
    """

    adv: Tensor
    eng: tuple[Tensor, Tensor]
    dets: list[Dets]
    diffs: Tensor | None
    loss: Tensor


class Evaluator:
    """Holds a backend, the twin (if attacks need it) and the dataset; turns batches into records.

    One per process: the driver builds one, and so does every Ray worker (from the same model path,
    data root and settings).
    """

    def __init__(
        self, model: Any, data_root: Path, settings: EvalSettings, backend: Any = None,
        bounds: dict[str, Any] | None = None, twin: torch.nn.Module | None = None,
    ) -> None:
        self.settings = settings.validate()
        self.model_ref = model
        self.backend = backend if backend is not None else load_eval_backend(model, settings)
        self.input_size = int(self.backend.input_size)
        self.priors = self.backend.priors.detach().float().cpu()
        self.pp = postprocess_config(self.backend, settings)
        self.dataset = open_dataset(Path(data_root), settings.split, self.input_size)
        self.device = _resolve_device(settings.device)
        if twin is None and settings.needs_twin:
            twin = load_eval_twin(model, self.backend, settings)
        self.twin = twin
        self.precision = str(getattr(self.backend, "precision", "fp32") or "fp32")
        self.gate_tol: float | None = None  # tolerance of the clean twin check before attacking (reported)
        self.loss = AttackLoss(scoring_loss(settings.attack_loss), self.priors, self.input_size)
        self.pgd_losses = {name: self.loss if name == self.loss.name else AttackLoss(name, self.priors, self.input_size)
                              for name in attack_losses(settings.attack_loss)}
        self.bounds: dict[str, Any] | None = bounds
        self.table: Any = None
        self.anchor_bounds: AnchorBounds | None = None
        if settings.certify:
            from lipdet.models.lipschitz import head_bounds, layer_table

            assert self.twin is not None
            if self.bounds is None:  # power iterations on every layer: computed once, shared with Ray workers
                self.table = layer_table(self.twin)
                self.bounds = head_bounds(self.twin, self.table)
            card = getattr(self.backend, "card", None) or getattr(self.twin, "card", None)
            fs = card.priors.feature_sizes if card is not None else None
            # per-anchor head rows (tighter than the whole head convolution): see lipdet.certificates
            self.anchor_bounds = AnchorBounds.of_model(self.twin, self.priors.shape[0], fs, self.bounds)

    # -- pieces ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        n = len(self.dataset)
        return min(n, self.settings.limit) if self.settings.limit else n

    def batches(self) -> list[list[int]]:
        """Consecutive index batches: the fixed units of work (independent of the worker count)."""
        n, b = len(self), self.settings.batch_size
        return [list(range(i, min(i + b, n))) for i in range(0, n, b)]

    def load(self, indices: Sequence[int]) -> tuple[Tensor, list[dict[str, Any]]]:
        return _collate([self.dataset[i] for i in indices])

    def engine(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The deployed backend on CPU float32 images."""
        lo, lg = self.backend(images.detach().float().cpu().contiguous())
        return lo.float().cpu(), lg.float().cpu()

    def twin_fn(self, images: Tensor) -> tuple[Tensor, Tensor]:
        assert self.twin is not None
        return self.twin(images)

    def detect(self, outputs: tuple[Tensor, Tensor]) -> list[Dets]:
        return _split_dets(postprocess(outputs[0], outputs[1], self.priors, self.input_size, self.pp))

    def units_per_image(self) -> int:
        """Progress units per image: 1 clean pass + PGD steps (per attack run and loss) + Square queries."""
        s = self.settings
        runs = int(s.pgd) + sum(1 for e in s.sweep_eps() if not (s.pgd and e == s.eps))
        return 1 + runs * len(self.pgd_losses) * s.steps * s.restarts + (s.queries if s.blackbox else 0)

    def twin_tol(self, reference: tuple[Tensor, Tensor]) -> float:
        """The twin/engine tolerance for a batch: ``settings.twin_tol`` or the deploy stage's default."""
        if self.settings.twin_tol is not None:
            return float(self.settings.twin_tol)
        from lipdet.deploy.twin import default_tolerance

        return float(default_tolerance(self.precision, reference))

    def check_twin_agrees(self, images: Tensor) -> float:
        """The gate before any attack: ``check_twin`` on clean ``images`` (LipdetError beyond tolerance)."""
        from lipdet.deploy.twin import check_twin

        assert self.twin is not None
        images = images.float().cpu()
        self.gate_tol = self.twin_tol(self.engine(images))
        return float(check_twin(self.twin, self.backend, images, self.gate_tol))

    # -- one batch --------------------------------------------------------------------------------

    def run_batch(self, indices: Sequence[int], progress: Callable[[int], None] | None = None) -> list[ImageRecord]:
        """Evaluate the images ``indices`` (clean, attacks, certificates) into raw records.

        ``progress(units)`` is called as work completes (see :meth:`units_per_image`).
        """
        tick = progress or (lambda k: None)
        images, targets = self.load(indices)
        b = _Batch(list(indices), images, [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets],
                   self.engine(images), tick)
        records = self._clean_records(b, targets)
        if self.settings.pgd or self.settings.sweep_eps():
            self._run_pgd(b, records)
        if self.settings.blackbox == "square":
            self._run_square(b, records)
        return records

    def _clean_records(self, b: "_Batch", targets: Sequence[dict[str, Any]]) -> list[ImageRecord]:
        """Records with the clean detections, loss, twin gap and certificates of batch ``b``."""
        s = self.settings
        clean_dets = self.detect(b.clean_out)
        records = [
            ImageRecord(
                index=int(i),
                image_id=int(t["image_id"]) if not isinstance(t["image_id"], Tensor) else int(t["image_id"].item()),
                name=str(t.get("name", "")),
                crop=[float(v) for v in (t["crop"].tolist() if isinstance(t["crop"], Tensor) else t["crop"])],
                target=b.gt[j],
                clean=clean_dets[j],
            )
            for j, (i, t) in enumerate(zip(b.indices, targets))
        ]
        for j, r in enumerate(records):
            if r.index < s.samples:
                r.image = b.images[j].clone()
        b.tick(len(b.indices))
        clean_loss = self.loss.per_image(b.clean_out[0], b.clean_out[1], b.gt)
        for j, r in enumerate(records):
            r.loss["clean"] = float(clean_loss[j])
        if self.twin is not None:
            b.clean_diffs = self._clean_diffs(b.images, b.clean_out)
            for j, r in enumerate(records):
                r.clean_diff = float(b.clean_diffs[j])
        if s.certify:
            assert self.anchor_bounds is not None
            for j, r in enumerate(records):
                r.cert = certify_image(b.clean_out[0][j], b.clean_out[1][j], self.priors, self.input_size,
                                       clean_dets[j], b.gt[j], self.anchor_bounds)
            if quant_skip_reason(s, self.precision) is None:
                for j, r in enumerate(records):
                    r.quant = self._quant_check(b, j, r)
        return records

    def _quant_check(self, b: "_Batch", j: int, r: ImageRecord) -> dict[str, Any]:
        """Attack image ``j`` of ``b`` inside its certified objects' radii; count flips on engine and twin.

        ``eps_i`` = (smallest certified radius among the image's objects with radius > 0) * (1 - 1e-6), capped
        at ``sqrt(3) * S`` (no perturbation of an image in [0, 1] is longer); PGD with every loss of
        ``--attack-loss`` (``steps``, ``restarts``, alpha ``2.5 * eps_i / steps``) through the twin, each
        adversarial image replayed on the engine. An object flips (:func:`~lipdet.eval.certify.flipped`) if it
        does for any loss. Returns ``{"checked", "flipped_engine", "flipped_twin": int, "max_logit_gap": float}``
        (the gap: max |engine - twin| over the checked anchors' logits on the adversarial images; None if none).
        """
        s = self.settings
        assert r.cert is not None and self.twin is not None
        radius, anchors, labels, boxes = certified_objects(r.cert, b.gt[j])
        out: dict[str, Any] = {"checked": int(radius.numel()), "flipped_engine": 0, "flipped_twin": 0,
                               "max_logit_gap": None}
        if radius.numel() == 0:
            return out
        eps = min(float(radius.min()) * (1 - 1e-6), math.sqrt(3.0) * self.input_size)
        flip_eng = torch.zeros(radius.numel(), dtype=torch.bool)
        flip_twin = torch.zeros_like(flip_eng)
        gap = 0.0
        for name, loss in self.pgd_losses.items():
            res = pgd_l2(self.twin_fn, b.images[j : j + 1].to(self.device), [b.gt[j]], loss, eps, s.steps,
                         restarts=s.restarts, seeds=[image_seed(s.seed, r.index, f"quant:{name}")])
            assert res.outputs is not None
            eng = self.engine(res.adv.detach().float().cpu())
            flip_eng |= flipped(eng[0][0], eng[1][0], self.priors, self.input_size, anchors, labels, boxes)
            flip_twin |= flipped(res.outputs[0][0], res.outputs[1][0], self.priors, self.input_size, anchors, labels,
                                 boxes)
            gap = max(gap, float((eng[1][0][anchors] - res.outputs[1][0][anchors]).abs().max()))
        out.update(flipped_engine=int(flip_eng.sum()), flipped_twin=int(flip_twin.sum()), max_logit_gap=gap)
        return out

    def _pgd(self, b: "_Batch", eps: float, tag: str, name: str) -> _Attacked:
        """PGD on the twin with loss ``name`` at ``eps``, replayed on the engine (one candidate of an ensemble)."""
        s, n = self.settings, len(b.indices)
        loss = self.pgd_losses[name]
        if eps == 0:  # nothing to craft: the clean images themselves go through the engine again
            adv = b.images.clone()
            eng = self.engine(adv)
            b.tick(n * s.steps * s.restarts)
            return _Attacked(adv, eng, self.detect(eng), b.clean_diffs, loss.per_image(eng[0], eng[1], b.gt))
        res = pgd_l2(
            self.twin_fn, b.images.to(self.device), b.gt, loss, eps, s.steps,
            alpha=(2.5 * eps / s.steps if s.alpha is None else s.alpha), restarts=s.restarts,
            seeds=[image_seed(s.seed, i, f"{tag}:{eps!r}") for i in b.indices],
            on_step=lambda: b.tick(n),
        )
        adv = res.adv.detach().float().cpu()
        eng = self.engine(adv)
        assert res.outputs is not None
        return _Attacked(adv, eng, self.detect(eng), max_abs_per_image(res.outputs, eng), res.loss)

    def _attack(self, b: "_Batch", eps: float, tag: str) -> tuple[_Attacked, dict[str, _Attacked], list[str]]:
        """PGD at ``eps`` with every loss of ``--attack-loss``: (the kept images, every loss's own candidates,
        the loss kept per image). One loss is kept as is; for the ensemble each image keeps the candidate
        :func:`worst_per_image` picks by :func:`image_harm` on the engine, and every ``loss`` (kept and
        per loss) is then the engine's :data:`~lipdet.eval.attacks.SELECTION_LOSS`.

        Every loss starts from the same per-image random point (seeds by image index, as a single-loss run),
        so each candidate is exactly what ``--attack-loss NAME`` alone crafts and the ensemble is, per image,
        never better for the model than any of them.
        """
        names = list(self.pgd_losses)
        runs = [self._pgd(b, eps, tag, name) for name in names]
        if len(runs) == 1:
            return runs[0], {names[0]: runs[0]}, names * len(b.indices)
        for r in runs:
            r.loss = self.loss.per_image(r.eng[0], r.eng[1], b.gt)
        harms = [image_harm(r.dets, b.gt, r.loss) for r in runs]
        pick = worst_per_image(harms).tolist()

        def take(per_run: list[Any]) -> list[Any]:  # image j of the run picked for it
            return [per_run[k][j] for j, k in enumerate(pick)]

        diffs = [r.diffs for r in runs]
        kept = _Attacked(
            adv=torch.stack(take([r.adv for r in runs])),
            eng=(torch.stack(take([r.eng[0] for r in runs])), torch.stack(take([r.eng[1] for r in runs]))),
            dets=take([r.dets for r in runs]),
            diffs=None if any(d is None for d in diffs) else torch.stack(take(diffs)),
            loss=torch.stack(take([h[:, -1] for h in harms])).float(),
        )
        return kept, dict(zip(names, runs)), [names[k] for k in pick]

    def _run_pgd(self, b: "_Batch", records: list[ImageRecord]) -> None:
        """``--pgd`` at ``eps`` and every ``--eps-sweep`` radius into ``records`` (the same attack reused)."""
        s = self.settings
        if s.pgd:
            att, by_loss, winners = self._attack(b, s.eps, "pgd")
            for j, r in enumerate(records):
                r.pgd, r.pgd_diff = att.dets[j], (None if att.diffs is None else float(att.diffs[j]))
                r.pgd_by_loss = {name: run.dets[j] for name, run in by_loss.items()}
                r.pgd_winner = winners[j]
                r.loss["pgd"] = float(att.loss[j])
                if len(by_loss) > 1:  # each candidate's engine loss, the ensemble's tie-break
                    r.loss.update({f"pgd:{name}": float(run.loss[j]) for name, run in by_loss.items()})
                if r.index < s.samples:
                    r.adv_image = att.adv[j].clone()
        for eps in s.sweep_eps():
            if s.pgd and eps == s.eps:  # the same attack (same seeds): reuse it
                for r in records:
                    assert r.pgd is not None
                    r.sweep[eps], r.sweep_diff[eps] = r.pgd, r.pgd_diff
            else:
                att, _, _ = self._attack(b, eps, "pgd")
                for j, r in enumerate(records):
                    r.sweep[eps], r.sweep_diff[eps] = att.dets[j], (None if att.diffs is None else float(att.diffs[j]))

    def _run_square(self, b: "_Batch", records: list[ImageRecord]) -> None:
        """``--blackbox square``: query-only L2 random search on the engine into ``records``."""
        s, n = self.settings, len(b.indices)
        res = square_l2(
            self.engine, b.images, b.gt, self.loss, s.eps, s.queries,
            seeds=[image_seed(s.seed, i, f"square:{s.eps!r}") for i in b.indices],
            clean_outputs=b.clean_out, on_query=lambda: b.tick(n),
        )
        b.tick(n * max(s.queries - res.queries, 0))
        assert res.outputs is not None
        sq = self.detect(res.outputs)
        for j, r in enumerate(records):
            r.square = sq[j]
            r.loss["square"] = float(res.loss[j])
            if r.index < s.samples and r.adv_image is None:
                r.adv_image = res.adv[j].detach().float().cpu().clone()

    def _clean_diffs(self, images: Tensor, clean_out: tuple[Tensor, Tensor]) -> Tensor:
        """Per image max |twin - engine| on the clean batch, ``(N,)``; LipdetError beyond :meth:`twin_tol`.

        The same comparison as ``check_twin`` (:func:`lipdet.parity.agreement`), on outputs already computed.
        """
        assert self.twin is not None
        with torch.no_grad():
            tw = self.twin(images.to(self.device))
        agr = agreement(tw, clean_out, self.twin_tol(clean_out))
        if not agr.ok:
            raise LipdetError(
                f"the differentiable twin disagrees with the {getattr(self.backend, 'name', 'deployed')} model on clean "
                f"inputs (max abs diff {agr.worst:.4g} > tolerance {agr.tol:.4g}); refusing to attack -- pass a larger twin_tol to override"
            )
        return agr.per_image


# ----------------------------------------------------------------------------------------------
# the result


@dataclass
class EvalResult:
    """Everything an evaluation produced: summary numbers (``summary``) and the raw records."""

    summary: dict[str, Any]
    records: list[ImageRecord]
    lipschitz_table: Any = None
    head_bounds: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object (plain JSON types; mAP values in [0, 1], torchmetrics key names)."""
        return _jsonable(self.summary)

    def with_paths_relative_to(self, base: str | Path) -> "EvalResult":
        """This result with the model and data paths named as a file written into ``base`` should
        name them (:func:`lipdet.io.portable_path`): no absolute paths of this machine."""
        s = copy.deepcopy(self.summary)
        if isinstance(s.get("model"), str):
            s["model"] = portable_path(s["model"], base)
        if isinstance((s.get("backend") or {}).get("path"), str):
            s["backend"]["path"] = portable_path(s["backend"]["path"], base)
        data = s.get("data") or {}
        if isinstance(data.get("root"), str):
            root = data["root"]
            data["root"] = portable_path(root, base)
            data["source"] = str(data.get("source", "")).replace(root, data["root"])
        return dataclasses.replace(self, summary=s)

    @property
    def clean_map50(self) -> float:
        return float(self.summary["clean"]["map_50"])

    def coco_detections(self, which: str = "clean") -> list[dict[str, Any]]:
        """Detections in COCO results format, boxes in ORIGINAL-image pixels.

        ``image_id`` is the dataset's image id, ``category_id`` the digit (0-9), ``bbox``
        ``[x, y, w, h]`` mapped back through the crop: ``orig = crop_xy + box * side / S``.
        ``which``: ``clean`` | ``pgd`` | ``square``.
        """
        size = int(self.summary["backend"]["input_size"])
        out = []
        for r in self.records:
            dets = getattr(r, which)
            if dets is None:
                continue
            boxes = to_original(dets["boxes"], r.crop, size)
            for b, sc, lab in zip(boxes.tolist(), dets["scores"].tolist(), dets["labels"].tolist()):
                out.append({
                    "image_id": r.image_id,
                    "category_id": int(lab),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": float(sc),
                })
        return out

    def coco_ground_truth(self) -> dict[str, Any]:
        """The evaluated images' ground truth as a COCO dataset dict (original-image pixels).

        ``images[i]["id"]`` is the same ``image_id`` as in :meth:`coco_detections` and
        ``file_name`` the image's file in its split folder, so ``COCO(gt).loadRes(dets)`` scores
        the pair as written by ``--save-detections``.
        """
        size = int(self.summary["backend"]["input_size"])
        images, anns = [], []
        for r in self.records:
            images.append({"id": r.image_id, "file_name": r.name})
            boxes = to_original(r.target["boxes"], r.crop, size)
            for b, lab in zip(boxes.tolist(), r.target["labels"].tolist()):
                w, h = b[2] - b[0], b[3] - b[1]
                anns.append({
                    "id": len(anns) + 1, "image_id": r.image_id, "category_id": int(lab),
                    "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0,
                })
        cats = [{"id": d, "name": str(d)} for d in range(10)]
        return {"images": images, "annotations": anns, "categories": cats}


def ground_truth_path(detections: str | Path) -> Path:
    """Where ``--save-detections dets.json`` puts its COCO ground truth: ``dets.gt.json`` beside it."""
    p = Path(detections)
    return p.with_name(f"{p.stem}.gt{p.suffix or '.json'}")


def to_original(boxes: Tensor, crop: Sequence[float], input_size: int) -> Tensor:
    """Map xyxy boxes from the ``input_size`` crop back to original-image pixels (float64)."""
    x0, y0, side = (float(v) for v in crop[:3])
    b = boxes.detach().double().cpu().reshape(-1, 4)
    scale = side / input_size
    return torch.stack([x0 + b[:, 0] * scale, y0 + b[:, 1] * scale, x0 + b[:, 2] * scale, y0 + b[:, 3] * scale], dim=1)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _map(records: Iterable[ImageRecord], get: Callable[[ImageRecord], Dets | None]) -> dict[str, Any]:
    m = DetectionMAP(class_metrics=True)
    preds, tgts = [], []
    for r in records:
        d = get(r)
        if d is None:
            continue
        preds.append(d)
        tgts.append(r.target)
    if preds:
        m.update(preds, tgts)
    out = m.compute()
    per = out.pop("per_class_map", None)
    out["per_class"] = per or {}
    return out


def summarise(
    records: list[ImageRecord],
    settings: EvalSettings,
    model: str,
    backend_info: dict[str, Any],
    data_info: dict[str, Any],
    bounds: dict[str, Any] | None,
    anchor_bounds: AnchorBounds | None,
) -> dict[str, Any]:
    """Compute every metric once from the gathered records (the driver's job)."""
    s = settings
    records = sorted(records, key=lambda r: r.index)
    clean = _map(records, lambda r: r.clean)
    diffs_clean = [r.clean_diff for r in records if r.clean_diff is not None]
    clean["max_twin_engine_diff"] = max(diffs_clean) if diffs_clean else None
    clean["mean_loss"] = _mean(r.loss.get("clean") for r in records)
    summary: dict[str, Any] = {
        "model": model,
        "backend": backend_info,
        "data": data_info,
        "settings": s.to_dict(),
        "clean": clean,
        "pgd": None,
        "blackbox": None,
        "certify": None,
        "sweep": [],
    }
    if s.pgd:
        summary["pgd"] = _pgd_summary(records, s, clean)
    if s.blackbox:
        bb = _map(records, lambda r: r.square)
        summary["blackbox"] = {
            "method": s.blackbox, "eps": s.eps, "queries": s.queries, "loss": scoring_loss(s.attack_loss),
            "map_50": bb["map_50"], "map": bb["map"],
            "drop_map_50": clean["map_50"] - bb["map_50"], "drop_map": clean["map"] - bb["map"],
            "mean_loss_clean": clean["mean_loss"], "mean_loss_adv": _mean(r.loss.get("square") for r in records),
            # A query-only attack beating the twin-crafted PGD at the same eps is the signature of gradient
            # masking or of a twin that does not behave like the engine.
            "stronger_than_pgd": (bb["map_50"] < summary["pgd"]["map_50"] - 1e-9) if summary["pgd"] else None,
        }
    for eps in s.sweep_eps():
        m = _map(records, lambda r, e=eps: r.sweep.get(e))
        summary["sweep"].append({
            "eps": eps, "map_50": m["map_50"], "map": m["map"],
            "max_twin_engine_diff": _max_or_none(r.sweep_diff.get(eps) for r in records),
        })
    if s.certify:
        radii = torch.cat([r.cert["radius"] for r in records if r.cert is not None] or [torch.zeros(0, dtype=torch.float64)])
        det = torch.cat([r.cert["detected"] for r in records if r.cert is not None] or [torch.zeros(0, dtype=torch.bool)])
        top = max([2 * s.eps, *s.sweep_eps(), 0.1])
        grid = sorted({0.0, s.eps, *s.sweep_eps(), *[round(top * k / 40, 6) for k in range(1, 41)]})
        finite = radii[det & torch.isfinite(radii)]
        summary["certify"] = {
            "eps": s.eps,
            "objects": int(radii.numel()),
            "detected_share": float(det.double().mean()) if det.numel() else 0.0,
            "certified_share": certified_share(radii, det, s.eps),
            "median_radius_detected": float(finite.median()) if finite.numel() else 0.0,
            "curve": [{"eps": e, "certified_share": certified_share(radii, det, e)} for e in grid],
            "bounds": {
                "loc": float(bounds["loc"]) if bounds else None,
                "cls": float(bounds["cls"]) if bounds else None,
                "per_scale": anchor_bounds.per_scale if anchor_bounds else [],
            },
            "definition": CERTIFIED_DEFINITION,
            **binding_summary([r.cert for r in records if r.cert is not None], grid),
            "quantised_check": quantised_summary(records, s, str(backend_info.get("precision") or "fp32")),
        }
    return summary


QUANT_EPS_RULE = ("per image: eps_i = (smallest certified radius among the image's objects certified at a radius "
                  "> 0) * (1 - 1e-6), so every such object is attacked inside its own radius")


def quant_skip_reason(s: EvalSettings, precision: str) -> str | None:
    """Why the quantisation check does not run for these settings and engine precision (None: it runs)."""
    if not s.certify:
        return "no --certify"
    if not s.quant_check:
        return "--no-quant-check"
    if precision == "fp32":
        return ("fp32 engine: only fp16/int8 engines are checked (fp32 engine rounding is not covered by the "
                "certificate either, see README 'What is certified')")
    return None


def quantised_summary(records: list[ImageRecord], s: EvalSettings, precision: str) -> dict[str, Any]:
    """``certify.quantised_check``: certified objects attacked inside their radius, flips on engine / twin.

    Keys ``engine_precision``, ``objects_checked``, ``flipped_engine``, ``flipped_twin``, ``max_logit_gap`` (max
    |engine - twin| logit of a checked anchor on the adversarial images), ``eps_rule``, ``attack``, ``skipped``
    (the reason, or None; when skipped the counts are None).
    """
    skipped = quant_skip_reason(s, precision)
    q = [r.quant for r in records if r.quant is not None]
    gaps = [g["max_logit_gap"] for g in q if g["max_logit_gap"] is not None]
    return {
        "engine_precision": precision,
        "objects_checked": None if skipped else sum(g["checked"] for g in q),
        "flipped_engine": None if skipped else sum(g["flipped_engine"] for g in q),
        "flipped_twin": None if skipped else sum(g["flipped_twin"] for g in q),
        "max_logit_gap": max(gaps) if gaps else None,
        "eps_rule": QUANT_EPS_RULE,
        "attack": {"method": "pgd_l2 through the twin, replayed on the engine", "losses": list(attack_losses(s.attack_loss)),
                   "steps": s.steps, "restarts": s.restarts, "alpha": "2.5 * eps_i / steps"},
        "skipped": skipped,
    }


def quant_line(q: dict[str, Any] | None) -> str | None:
    """The one line on the quantisation check (closing lines and report), or None without a check."""
    if not q:
        return None
    if q.get("skipped"):
        return f"{q['engine_precision']} engine: quantisation check skipped ({q['skipped']})"
    return (f"{q['engine_precision']} engine: {q['flipped_engine']} of {q['objects_checked']} certified objects "
            f"flipped inside their radius (twin: {q['flipped_twin']})")


def _pgd_summary(records: list[ImageRecord], s: EvalSettings, clean: dict[str, Any]) -> dict[str, Any]:
    """The ``pgd`` section: what the attack (for ``ensemble``, the per-image worst over ``losses``) achieved,
    plus ``per_loss[name]``: each loss's own adversarial mAP and the images whose kept candidate it crafted.

    ``mean_loss_clean`` / ``mean_loss_adv`` are ``mean_loss_name`` (the attack loss, or MultiBox for the
    ensemble) measured ``mean_loss_adv_on`` the twin (one loss: the loss PGD ascended) or the engine (ensemble).
    """
    adv = _map(records, lambda r: r.pgd)
    names = attack_losses(s.attack_loss)
    per_loss = {}
    for name in names:
        m = adv if len(names) == 1 else _map(records, lambda r, n=name: r.pgd_by_loss.get(n))
        per_loss[name] = {"map_50": m["map_50"], "map": m["map"], "images_won": sum(r.pgd_winner == name for r in records)}
    return {
        "eps": s.eps, "steps": s.steps, "alpha": s.pgd_alpha, "restarts": s.restarts, "loss": s.attack_loss,
        "losses": list(names), "per_loss": per_loss, "selection": SELECTION_RULE if len(names) > 1 else None,
        "map_50": adv["map_50"], "map": adv["map"], "map_75": adv["map_75"],
        "drop_map_50": clean["map_50"] - adv["map_50"], "drop_map": clean["map"] - adv["map"],
        "max_twin_engine_diff": _max_or_none(r.pgd_diff for r in records),
        "mean_loss_clean": clean["mean_loss"], "mean_loss_adv": _mean(r.loss.get("pgd") for r in records),
        "mean_loss_name": scoring_loss(s.attack_loss), "mean_loss_adv_on": "engine" if len(names) > 1 else "twin",
        "per_class": adv["per_class"],
    }


def _max_or_none(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


# ----------------------------------------------------------------------------------------------
# the driver


def backend_info(backend: Any, input_size: int) -> dict[str, Any]:
    return {
        "name": str(getattr(backend, "name", type(backend).__name__)),
        "path": str(getattr(backend, "path", "") or ""),
        "precision": getattr(backend, "precision", None),
        "provider": getattr(backend, "provider", None),
        "input_size": int(input_size),
        "has_card": getattr(backend, "card", None) is not None,
    }


def evaluate(
    model: Any,
    data: str | Path | None = None,
    settings: EvalSettings | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate a deployed model: clean mAP, and the attacks / certificates ``settings`` asks for.

    Args:
        model: path to ``.pt`` / ``.onnx`` / ``.plan`` (or a backend object, e.g. :class:`TwinBackend`).
        data: SVHN format-1 root; None = the model's training data, else the embedded synthetic set.
        settings: see :class:`EvalSettings`.
        progress: tqdm progress bar on stderr.
        log: where to send one-line notes (default: stderr).
    """
    settings = (settings or EvalSettings()).validate()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    # Everything that can refuse the request is loaded before the data, which may be generated.
    backend = load_eval_backend(model, settings)
    _resolve_device(settings.device)
    twin = load_eval_twin(model, backend, settings) if settings.needs_twin else None
    root, note = resolve_eval_data(data, backend)
    ev = Evaluator(model, root, settings, backend=backend, twin=twin)
    say(f"lipdet eval: {getattr(backend, 'name', 'backend')} on {note} ({root}, split {settings.split}, {len(ev)} images)")
    batches = ev.batches()
    if not batches:
        raise LipdetError(f"no images in split {settings.split!r} of {root}")
    if ev.twin is not None:
        # Gate: the twin must agree with the engine on clean inputs before any attack runs.
        images, _ = ev.load(batches[0])
        ev.check_twin_agrees(images)

    total = len(ev) * ev.units_per_image()
    bar = _progress_bar(total, progress)
    try:
        if settings.workers > 1:
            from lipdet.eval.distributed import run_sharded

            records = run_sharded(
                model, root, settings, batches, bounds=ev.bounds,
                on_batch=lambda b: bar.update(len(b) * ev.units_per_image()),
            )
        else:
            records = []
            for b in batches:
                records.extend(ev.run_batch(b, progress=bar.update))
    finally:
        bar.close()

    table, heads = ev.table, ev.bounds  # the report fills them in if it needs them and they are missing
    data_info = {"root": str(root), "source": note, "split": settings.split, "images": len(records),
                 "objects": int(sum(r.target["labels"].numel() for r in records))}
    summary = summarise(
        records, settings, str(model) if isinstance(model, (str, Path)) else getattr(backend, "name", "model"),
        backend_info(backend, ev.input_size), data_info, ev.bounds, ev.anchor_bounds,
    )
    summary["postprocess"] = asdict(ev.pp)
    summary["clean"]["twin_tolerance"] = ev.gate_tol
    return EvalResult(summary=summary, records=records, lipschitz_table=table, head_bounds=heads)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="img-step", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def seed_row(summary: dict[str, Any]) -> str:
    """The seed-style result row (percent, like the seed's table): clean map_50, adversarial map_50 at eps,
    drop, certified object share; "-" for what was not run. Two lines: header, row."""
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * float(v):.2f}"

    clean = summary["clean"]["map_50"]
    pgd = summary.get("pgd") or {}
    eps = summary["settings"]["eps"]
    cert = summary.get("certify") or {}
    head = (f"{'model':<28} {'clean map_50 %':>14} {f'adv map_50 % (eps {eps:g})':>25} {'drop':>7} "
            f"{f'certified % @{eps:g}':>17}")
    name = Path(str(summary.get("model", ""))).name[:28]
    row = (f"{name:<28} {pct(clean):>14} {pct(pgd.get('map_50')):>25} {pct(pgd.get('drop_map_50')):>7} "
           f"{pct(cert.get('certified_share')):>17}")
    return head + "\n" + row


__all__ = [
    "BLACKBOX_METHODS",
    "EvalResult",
    "EvalSettings",
    "Evaluator",
    "ImageRecord",
    "TwinBackend",
    "evaluate",
    "resolve_eval_data",
    "seed_row",
    "summarise",
    "to_original",
]
