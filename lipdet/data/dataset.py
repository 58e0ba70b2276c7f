"""SVHN format 1 as a detection dataset of square digit crops (the reference's 74x74 input).

Preprocessing of image ``i`` (deterministic for ``(seed, i)``):

1. take the union box of all its digits;
2. grow it to a square, sliding it by a random fraction of the slack along the short side;
3. shift the square into the image; if it is larger than the image along an axis (a wide number
   in a flat image, say) centre it on the image along that axis -- the part outside the image is
   filled with black;
4. expand the square by 30% about its centre if the result stays inside the image, else try
   15%, 7.5%, ... (5 halvings), else no expansion;
5. round to whole pixels (covering the square), crop, resize to ``input_size`` (PIL bilinear);
6. map the boxes into the crop (``(box - [x0, y0, x0, y0]) * S / side``), clipped to ``[0, S]``.

Crops and parsed annotations are cached in ``<split>/.lipdet-cache-<S>-<seed>.npz`` (or under
:func:`lipdet.io.cache_dir` when the data folder is read-only), keyed on the size and mtime of
``digitStruct.mat``, a hash of the split folder's file names, sizes and mtimes, ``S`` and ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from lipdet.data.digitstruct import Record, read_digitstruct
from lipdet.data.split import ValSplit
from lipdet.errors import LipdetError
from lipdet.io import atomic_path, cache_dir

__all__ = [
    "SVHNDetection",
    "boxes_from_crop",
    "boxes_to_crop",
    "carve_validation",
    "detection_collate",
    "resolve_data",
    "square_crop",
    "valid_boxes",
]

log = logging.getLogger(__name__)

EXPAND = 0.3  # growth of the square crop, as a fraction of its side
_HALVINGS = 5
_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# geometry


def square_crop(union: Sequence[float], img_w: int, img_h: int, slide: float) -> tuple[int, int, int]:
    """The square crop of the reference preprocessing (steps 2-5 of the module docstring).

    Args:
        union: ``(x1, y1, x2, y2)`` union box of the digits, original-image pixels.
        img_w, img_h: image size, pixels.
        slide: in ``[0, 1]``: where the square sits along the short side of ``union``
            (0 = the square starts at the union's left/top edge, 1 = it ends at the union's
            right/bottom edge).

    Returns:
        ``(x0, y0, side)`` in whole original-image pixels. The crop covers ``union`` (up to one
        pixel where the image is barely larger than the square) and lies inside the image whenever
        a square of the union's long side fits in the image.
    """
    x1, y1, x2, y2 = (float(v) for v in union)
    w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
    side = max(w, h, 1.0)
    sx = x1 - slide * (side - w)
    sy = y1 - slide * (side - h)

    def place(start: float, dim: int) -> float:
        if side <= dim:
            return min(max(start, 0.0), dim - side)
        return (dim - side) / 2  # larger than the image along this axis: centre, pad outside

    sx, sy = place(sx, img_w), place(sy, img_h)
    grow = EXPAND * side
    for _ in range(_HALVINGS + 1):
        ex, ey, es = sx - grow / 2, sy - grow / 2, side + grow
        if ex >= 0 and ey >= 0 and ex + es <= img_w and ey + es <= img_h:
            sx, sy, side = ex, ey, es
            break
        grow /= 2

    # whole pixels: the smallest integer square that covers the float square
    ix, iy = math.floor(sx + 1e-6), math.floor(sy + 1e-6)
    iside = max(1, math.ceil(max(sx + side - ix, sy + side - iy) - 1e-6))
    if side <= min(img_w, img_h):  # it fitted: keep it inside the image
        iside = min(iside, img_w, img_h)
        ix = min(max(ix, 0), img_w - iside)
        iy = min(max(iy, 0), img_h - iside)
    return ix, iy, iside


def boxes_to_crop(boxes: np.ndarray, crop: Sequence[float], size: int) -> np.ndarray:
    """Map ``(K, 4)`` xyxy boxes from original-image pixels into a ``size`` x ``size`` crop.

    ``crop`` is ``(x0, y0, side)`` in original pixels. The result is clipped to ``[0, size]``.
    """
    x0, y0, side = (float(v) for v in crop)
    out = (np.asarray(boxes, np.float64).reshape(-1, 4) - [x0, y0, x0, y0]) * (size / side)
    return np.clip(out, 0, size).astype(np.float32)


def boxes_from_crop(boxes: Tensor | np.ndarray, crop: Tensor | Sequence[float], size: int) -> Tensor:
    """Inverse of :func:`boxes_to_crop`: crop pixels -> original pixels, ``crop_xy + box * side / S``.

    Args:
        boxes: ``(K, 4)`` xyxy in crop pixels (``0..size``).
        crop: ``(3,)`` ``[x0, y0, side]`` as in ``target["crop"]``.
        size: the crop side ``S`` in pixels.

    Returns:
        ``(K, 4)`` float32 tensor of xyxy boxes in original-image pixels.
    """
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    c = torch.as_tensor(crop, dtype=torch.float32)
    offset = torch.stack([c[0], c[1], c[0], c[1]])
    return offset + b * (c[2] / size)


def valid_boxes(boxes: np.ndarray, img_w: int, img_h: int) -> bool:
    """Whether a record's boxes are usable: at least one, all of positive size, inside the image."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(b) == 0:
        return False
    return bool(
        np.all(b[:, :2] >= 0) and np.all(b[:, 2] <= img_w) and np.all(b[:, 3] <= img_h) and np.all(b[:, 2:] > b[:, :2])
    )


# ---------------------------------------------------------------------------------------------
# dataset


class SVHNDetection(torch.utils.data.Dataset):
    """SVHN format 1 (``root/<split>/*.png`` + ``digitStruct.mat``) as square crops with digit boxes.

    Args:
        root: the SVHN folder holding ``train/``, ``test/`` ...
        split: sub-folder to read.
        input_size: side ``S`` of the crops, pixels.
        seed: seeds the random square placement (per image, with its index).
        cache: read/write the preprocessing cache.

    Attributes:
        records: the annotations of the usable images (index-aligned with the dataset), boxes in
            original-image pixels.
        skipped: number of records dropped for negative, zero-size or out-of-image boxes.
        crops: ``(N, 3)`` int64 ``[x0, y0, side]`` per item, original-image pixels.
        cache_path: where the cache was read or written (None without cache).
        from_cache: whether this instance was loaded from the cache.

    Item ``i`` is ``(image, target)``: ``image`` float32 ``(3, S, S)`` in ``[0, 1]``; ``target`` has
    ``boxes`` float32 ``(K, 4)`` xyxy in crop pixels ``[0, S]``, ``labels`` int64 ``(K,)`` digits 0-9,
    ``image_id`` (int, = i), ``crop`` float32 ``(3,)`` ``[x0, y0, side]`` so that
    ``original = crop_xy + box * side / S``, and ``name`` (the image file name).
    """

    def __init__(
        self,
        root: Path,
        split: str = "train",
        input_size: int = 74,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.input_size = int(input_size)
        self.seed = int(seed)
        if self.input_size < 1:
            raise LipdetError(f"{self.root}: input size must be positive, got {input_size}")
        if not self.root.is_dir():
            raise LipdetError(f"{self.root}: data folder not found")
        self.folder = self.root / split
        if not self.folder.is_dir():
            raise LipdetError(f"{self.folder}: split folder not found")
        self.mat_path = self.folder / "digitStruct.mat"
        if not self.mat_path.is_file():
            raise LipdetError(f"{self.mat_path}: digitStruct.mat not found")

        self.cache_path: Path | None = None
        self.from_cache = False
        key = self._cache_key() if cache else None
        data = self._load_cache(key) if key is not None else None
        if data is None:
            data = self._build()
            if key is not None:
                self._save_cache(key, data)
        else:
            self.from_cache = True
        self._set(data)
        if self.skipped:
            log.warning(
                "%s: skipped %d of %d records with negative, zero-size or out-of-image boxes",
                self.mat_path,
                self.skipped,
                self.skipped + len(self),
            )

    # -- building ------------------------------------------------------------------------------

    def _build(self) -> dict[str, np.ndarray]:
        records = read_digitstruct(self.mat_path)
        if not records:
            raise LipdetError(f"{self.mat_path}: empty split '{self.split}' (no annotated images)")
        s = self.input_size
        images, crops, indices, kept = [], [], [], []
        bar = tqdm(records, desc=f"preparing {self.split} crops", unit="img", file=sys.stderr, delay=2.0)
        for index, rec in enumerate(bar):
            path = self.folder / rec.name
            img = _open_image(path)
            if not valid_boxes(rec.boxes, *img.size):
                continue
            b = rec.boxes
            union = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
            slide = float(np.random.default_rng([self.seed, index]).random())
            x0, y0, side = square_crop(union, img.size[0], img.size[1], slide)
            try:
                patch = img.convert("RGB").crop((x0, y0, x0 + side, y0 + side)).resize((s, s), Image.BILINEAR)
            except OSError as exc:
                raise LipdetError(f"{path}: cannot read image ({exc})") from None
            images.append(np.asarray(patch, np.uint8))
            crops.append((x0, y0, side))
            indices.append(index)
            kept.append(rec)
        bar.close()
        if not kept:
            raise LipdetError(f"{self.mat_path}: none of the {len(records)} records has usable boxes")
        counts = np.array([len(r.labels) for r in kept], np.int64)
        return {
            "images": np.stack(images),
            "crops": np.array(crops, np.int64),
            "indices": np.array(indices, np.int64),
            "names": np.array([r.name for r in kept], dtype=np.str_),
            "counts": counts,
            "boxes": np.concatenate([r.boxes for r in kept]).astype(np.float32),
            "labels": np.concatenate([r.labels for r in kept]).astype(np.int64),
            "skipped": np.array(len(records) - len(kept), np.int64),
        }

    def _set(self, data: dict[str, np.ndarray]) -> None:
        self._images: np.ndarray = data["images"]
        self.crops: np.ndarray = data["crops"]
        self.indices: np.ndarray = data["indices"]
        self.skipped = int(data["skipped"])
        splits = np.cumsum(data["counts"])[:-1]
        names = [str(n) for n in data["names"]]
        boxes = np.split(data["boxes"], splits)
        labels = np.split(data["labels"], splits)
        self.records = [Record(n, b, lab) for n, b, lab in zip(names, boxes, labels)]
        self._crop_boxes = [boxes_to_crop(b, c, self.input_size) for b, c in zip(boxes, self.crops)]

    # -- cache ---------------------------------------------------------------------------------

    def _cache_key(self) -> str:
        st = self.mat_path.stat()
        h = hashlib.sha256()
        with os.scandir(self.folder) as it:
            entries = sorted(
                (e.name, e.stat().st_size, e.stat().st_mtime_ns)
                for e in it
                if e.is_file() and not e.name.startswith(".") and e.name != "digitStruct.mat"
            )
        for name, size, mtime in entries:
            h.update(f"{name}\0{size}\0{mtime}\n".encode())
        return json.dumps(
            {
                "version": _CACHE_VERSION,
                "input_size": self.input_size,
                "seed": self.seed,
                "expand": EXPAND,
                "mat_size": st.st_size,
                "mat_mtime_ns": st.st_mtime_ns,
                "files_sha256": h.hexdigest(),
            },
            sort_keys=True,
        )

    def _cache_paths(self) -> list[Path]:
        name = f".lipdet-cache-{self.input_size}-{self.seed}.npz"
        tag = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:16]
        return [self.folder / name, cache_dir() / "datasets" / f"{tag}-{self.split}" / name]

    def _load_cache(self, key: str) -> dict[str, np.ndarray] | None:
        for path in self._cache_paths():
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    if str(z["key"]) != key:
                        continue
                    data = {k: z[k] for k in z.files if k != "key"}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                continue  # unreadable or stale cache: rebuild
            self.cache_path = path
            return data
        return None

    def _save_cache(self, key: str, data: dict[str, np.ndarray]) -> None:
        for path in self._cache_paths():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, key=np.array(key), **data)
            except (OSError, LipdetError):
                continue  # read-only data folder: fall back to the user cache
            self.cache_path = path
            return
        log.warning("%s: could not write the preprocessing cache anywhere", self.folder)

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = int(i) % len(self)
        image = torch.from_numpy(self._images[i]).permute(2, 0, 1).float().div_(255.0)
        rec = self.records[i]
        target = {
            "boxes": torch.from_numpy(self._crop_boxes[i].copy()),
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": i,
            "crop": torch.tensor(self.crops[i], dtype=torch.float32),
            "name": rec.name,
        }
        return image, target

    def __repr__(self) -> str:
        return (
            f"SVHNDetection(root={str(self.root)!r}, split={self.split!r}, input_size={self.input_size}, "
            f"seed={self.seed}, items={len(self)}, skipped={self.skipped})"
        )


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise LipdetError(f"{path}: annotated image not found")
    try:
        with Image.open(path) as img:
            img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise LipdetError(f"{path}: cannot read image ({type(exc).__name__})") from None


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
    """Stack images to ``(N, 3, S, S)``; keep the targets (variable numbers of boxes) as a list."""
    images = torch.stack([img for img, _ in batch])
    return images, [t for _, t in batch]


def carve_validation(base: SVHNDetection, split: ValSplit) -> tuple[torch.utils.data.Subset, torch.utils.data.Subset]:
    """``(train part, validation part)`` of the train split ``base``, by ``split``'s rule on the image
    names (:meth:`ValSplit.parts`): disjoint, together every usable image of ``base``."""
    train, val = split.parts([r.name for r in base.records])
    return torch.utils.data.Subset(base, train), torch.utils.data.Subset(base, val)


def resolve_data(data: Path | None) -> Path:
    """The SVHN folder to use: the embedded synthetic dataset when ``data`` is None.

    Raises:
        LipdetError: ``data`` is not a folder with ``train/digitStruct.mat`` or
            ``test/digitStruct.mat``.
    """
    if data is None:
        from lipdet.data.synth import ensure_synthetic

        return ensure_synthetic()
    data = Path(data)
    if not data.is_dir():
        raise LipdetError(f"{data}: data folder not found")
    if not any((data / s / "digitStruct.mat").is_file() for s in ("train", "test")):
        raise LipdetError(
            f"{data} is not an SVHN format-1 folder (expected train/digitStruct.mat or test/digitStruct.mat)"
        )
    return data


def resolve_training_data(recorded: "dict | str | None") -> tuple[Path, str]:
    """The dataset a model was trained on, as recorded in its checkpoint meta / model card ``data``.

    ``recorded`` is ``{"root": ..., "synthetic": bool}`` (or a bare path). Returns the folder and a
    short note on where it came from; falls back to the embedded synthetic SVHN when nothing is
    recorded or the recorded folder is missing or no longer SVHN format 1.
    """
    if isinstance(recorded, str):
        recorded = {"root": recorded}
    root = (recorded or {}).get("root") if isinstance(recorded, dict) else None
    synthetic = bool((recorded or {}).get("synthetic")) if isinstance(recorded, dict) else False
    if root and Path(root).is_dir():
        try:
            return resolve_data(Path(root)), ("training data (synthetic) " if synthetic else "training data ") + str(root)
        except LipdetError:
            pass
    note = "embedded synthetic data" + (f" (training data {root} not available here)" if root else "")
    return resolve_data(None), note
