"""Draw digit boxes on crops: a PNG grid of dataset samples, and a reusable per-image drawer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lipdet.io import atomic_path

__all__ = ["draw_detections", "draw_grid", "to_pil"]

Color = tuple[int, int, int]
GT_COLOR: Color = (0, 255, 0)
PAD = 4  # pixels between grid cells and around the grid


def to_pil(image: Tensor | np.ndarray) -> Image.Image:
    """A ``(3, H, W)`` float image in ``[0, 1]`` (tensor or array) as an RGB PIL image."""
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    arr = np.clip(np.transpose(arr, (1, 2, 0)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: Tensor | np.ndarray,
    boxes: Tensor | np.ndarray | Sequence[Sequence[float]],
    labels: Tensor | np.ndarray | Sequence[int],
    scores: Tensor | np.ndarray | Sequence[float] | None = None,
    color: Color = GT_COLOR,
    scale: int = 2,
    base: Image.Image | None = None,
) -> Image.Image:
    """Draw boxes with their digit (and score) on an image.

    Args:
        image: float ``(3, S, S)`` in ``[0, 1]``.
        boxes: ``(K, 4)`` xyxy in the image's pixels (``0..S``).
        labels: ``(K,)`` digits 0-9.
        scores: optional ``(K,)`` confidences in ``[0, 1]``, printed after the digit.
        color: RGB box and text colour.
        scale: integer upscaling (nearest) of the image before drawing, for legibility.
        base: draw onto this already-upscaled image instead (to overlay ground truth and
            predictions in two colours); ``image`` is then ignored.

    Returns:
        The RGB image, ``S * scale`` pixels square.
    """
    if base is None:
        pil = to_pil(image)
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    else:
        pil = base.copy()
    draw = ImageDraw.Draw(pil)
    font = _label_font(max(10, 6 * scale))
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
    labs = torch.as_tensor(labels).reshape(-1).tolist()
    scs = None if scores is None else torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()
    for k, (x1, y1, x2, y2) in enumerate(b.tolist()):
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=1)
        text = str(int(labs[k])) if scs is None else f"{int(labs[k])} {scs[k]:.2f}"
        tx, ty = x1 + 1, max(0.0, y1 - getattr(font, "size", 11) - 1)
        left, t, r, bt = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([left - 1, t - 1, r, bt], fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=color, font=font)
    return pil


def draw_grid(dataset: torch.utils.data.Dataset, n: int = 16, *, out: Path, seed: int = 0, scale: int = 2) -> Path:
    """Write a PNG grid of ``n`` random samples of ``dataset`` with their boxes and digits.

    The grid has ``ceil(sqrt(n))`` columns; each cell is the crop upscaled ``scale`` times, cells
    are separated by :data:`PAD` pixels, so the PNG is
    ``cols * (S * scale + PAD) + PAD`` by ``rows * (S * scale + PAD) + PAD`` pixels.

    Args:
        dataset: yields ``(image (3, S, S), target)`` like :class:`~lipdet.data.dataset.SVHNDetection`.
        n: number of samples (at most ``len(dataset)``).
        out: PNG path (written atomically).
        seed: picks the samples.
        scale: upscaling of each crop.

    Returns:
        ``out``.
    """
    n = max(1, min(int(n), len(dataset)))
    picks = np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)
    cells = []
    for i in picks.tolist():
        image, target = dataset[i]
        cells.append(draw_detections(image, target["boxes"], target["labels"], scale=scale))
    cell = cells[0].width
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * (cell + PAD) + PAD, rows * (cell + PAD) + PAD), (40, 40, 40))
    for k, im in enumerate(cells):
        r, c = divmod(k, cols)
        grid.paste(im, (PAD + c * (cell + PAD), PAD + r * (cell + PAD)))
    out = Path(out)
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out
