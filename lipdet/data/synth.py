"""A synthetic stand-in for SVHN format 1: house-number-like images with exact digit boxes.

:func:`synthesize` writes ``out/train/1.png, 2.png, ..., digitStruct.mat`` (and ``out/test``) in the
official layout, so every tool that reads SVHN reads it. Each image shows a 1-5 digit number in a
TrueType font (size, colour, contrast, spacing, stroke weight, slight rotation all varied) over a
background made of gradients, textures, stripes, a plaque and clutter, then blurred and noised.
The ground-truth box of a digit is the tight box of its rendered ink (pixels with coverage above
25% after rotation), in the SVHN convention ``x2 = left + width`` (integers).

Every image draws its parameters from its own generator seeded by ``(seed, split, index)``, so the
output depends only on the seed and the installed fonts, never on the number of worker processes.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import glob
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from lipdet.data.digitstruct import Record, write_digitstruct
from lipdet.errors import LipdetError
from lipdet.io import cache_dir

__all__ = ["ensure_synthetic", "find_fonts", "render_sample", "synth_sizes", "synthesize"]

#: split name -> the number mixed into each image's seed
_SPLIT_CODE = {"train": 1, "test": 2, "extra": 3}
#: how many digits a house number has (SVHN is mostly 2-3 digits)
_NDIGITS_P = np.array([0.18, 0.38, 0.30, 0.11, 0.03])
_INK_THRESHOLD = 64  # mask value (of 255) above which a pixel counts as ink
_MAX_SIDE = 320
_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)

DEFAULT_TRAIN = 4000
DEFAULT_TEST = 1000


# ---------------------------------------------------------------------------------------------
# fonts


@functools.lru_cache(maxsize=1)
def find_fonts() -> tuple[str, ...]:
    """Paths of usable TrueType/OpenType fonts, sorted; ``("",)`` means Pillow's built-in font.

    DejaVu fonts are preferred (they are on nearly every Linux system); other fonts under the
    usual system folders are used only when no DejaVu font is found. A font is usable when it
    loads and draws every digit with non-empty ink.
    """
    files: list[str] = []
    for folder in _FONT_DIRS:
        root = os.path.expanduser(folder)
        if os.path.isdir(root):
            for ext in ("ttf", "otf", "TTF", "OTF"):
                files += glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True)
    files = sorted(set(files))
    dejavu = [f for f in files if "dejavu" in os.path.basename(f).lower()]
    candidates = dejavu or files[:64]
    usable = tuple(f for f in candidates if _font_ok(f))
    return usable or ("",)


def _font_ok(path: str) -> bool:
    try:
        if os.path.getsize(path) > 20_000_000:  # huge CJK/emoji fonts: slow and pointless here
            return False
        font = ImageFont.truetype(path, 32)
        return all(_glyph_width(font, d) > 4 for d in "0123456789")
    except (OSError, ValueError):
        return False


def _glyph_width(font: ImageFont.FreeTypeFont, text: str) -> int:
    x0, _, x1, _ = font.getbbox(text)
    return x1 - x0


@functools.lru_cache(maxsize=1024)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    if path:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)  # type: ignore[return-value]
    except TypeError:  # Pillow < 10.1: no scalable built-in font
        return ImageFont.load_default()  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# rendering


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 255], biased towards the muted colours of walls and plates."""
    h = rng.random()
    s = rng.beta(1.2, 3.0) if rng.random() < 0.8 else rng.uniform(0.5, 1.0)
    v = rng.uniform(0.05, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A ``(h, w, 3)`` float32 background in [0, 255]: flat, gradient, texture or stripes."""
    base = _colour(rng)
    kind = rng.choice(4, p=[0.2, 0.3, 0.3, 0.2])
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:  # flat
        bg = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient between two colours
        other = np.clip(base + rng.normal(0, 60, 3), 0, 255)
        theta = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(theta) / max(w, 1) + yy * np.sin(theta) / max(h, 1)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == 2:  # low-frequency texture (walls, wood, stone)
        gw, gh = int(rng.integers(2, 12)), int(rng.integers(2, 12))
        lum = rng.normal(0, rng.uniform(10, 45), (gh, gw, 1))
        grid = (lum + rng.normal(0, rng.uniform(0, 10), (gh, gw, 3))).astype(np.float32)
        tex = np.stack(
            [np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)],
            axis=-1,
        )
        bg = base + tex
    else:  # stripes: siding, bricks, fences
        period = rng.uniform(4, max(6.0, h / 2))
        along = yy if rng.random() < 0.7 else xx
        phase = rng.uniform(0, period)
        stripe = ((along + phase) % period) < rng.uniform(1, max(1.5, period / 3))
        darker = base * rng.uniform(0.55, 0.9)
        bg = np.where(np.broadcast_to(stripe, (h, w))[..., None], darker, base)
    return np.asarray(bg, np.float32)


def _clutter(rng: np.random.Generator, img: Image.Image, keep_out: tuple[float, float, float, float]) -> None:
    """Draw lines, frames and blobs on ``img`` (mostly away from the ``keep_out`` text box)."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(0, 5))):
        col = tuple(int(v) for v in _colour(rng))
        kind = rng.integers(3)
        x0, x1 = sorted(rng.uniform(-0.2 * w, 1.2 * w, 2))
        y0, y1 = sorted(rng.uniform(-0.2 * h, 1.2 * h, 2))
        # keep clutter from crossing the digits: push it to one side of the text box
        kx0, ky0, kx1, ky1 = keep_out
        side = rng.integers(4)
        if side == 0:
            x1 = min(x1, kx0 - 2)
        elif side == 1:
            x0 = max(x0, kx1 + 2)
        elif side == 2:
            y1 = min(y1, ky0 - 2)
        else:
            y0 = max(y0, ky1 + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        width = int(rng.integers(1, 4))
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=col, width=width)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], outline=col, width=width)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=col)


def _rotated_extent(w: float, h: float, angle_deg: float) -> tuple[float, float]:
    a = math.radians(abs(angle_deg))
    return w * math.cos(a) + h * math.sin(a), w * math.sin(a) + h * math.cos(a)


def render_sample(rng: np.random.Generator, fonts: Sequence[str] | None = None) -> tuple[Image.Image, Record]:
    """Render one house-number image.

    Args:
        rng: the image's own generator (all randomness comes from it).
        fonts: font paths to pick from (default :func:`find_fonts`; ``""`` = Pillow's font).

    Returns:
        The RGB image and its annotation (``name`` left empty): boxes float32 ``(K, 4)`` xyxy in
        image pixels (integers, ``x2`` exclusive), labels int64 ``(K,)`` digits 0-9.
    """
    fonts = tuple(fonts) if fonts is not None else find_fonts()
    for _attempt in range(20):
        out = _try_render(rng, fonts)
        if out is not None:
            return out
    raise RuntimeError("could not render a sample in 20 attempts")  # pragma: no cover


@dataclass
class _Text:
    """A laid-out number: glyphs on one line (font units from the text origin), rotated by ``angle``."""

    digits: np.ndarray  # (K,) int
    font: Any
    stroke: int
    xs: list  # glyph x offsets
    digit_h: float  # digit height, px
    box: tuple[float, float, float, float]  # unrotated text box (x0, y0, w, h), font units
    angle: float  # degrees
    extent: tuple[float, float]  # rotated width, height


def _try_render(rng: np.random.Generator, fonts: Sequence[str]) -> tuple[Image.Image, Record] | None:
    """One sample, or None when the draw does not fit (the caller draws again). Random draws in a fixed order."""
    text = _layout(rng, fonts)
    geometry = _canvas_geometry(rng, text)
    if geometry is None:
        return None
    w, h, cx, cy = geometry
    drawn = _glyph_masks(text, w, h, cx, cy)
    if drawn is None:
        return None
    boxes, alpha = drawn
    img = _paint(rng, text, w, h, cx, cy, boxes, alpha)
    out = _camera(rng, img, w, h)
    return out, Record("", np.array(boxes, np.float32), text.digits.astype(np.int64))


def _layout(rng: np.random.Generator, fonts: Sequence[str]) -> _Text:
    """Digits, font, stroke and tracking, and the glyphs laid out on a line."""
    k = int(rng.choice(5, p=_NDIGITS_P)) + 1
    digits = rng.integers(0, 10, k)
    if k > 1 and digits[0] == 0 and rng.random() < 0.9:
        digits[0] = rng.integers(1, 10)
    font_path = fonts[int(rng.integers(len(fonts)))]
    digit_h = float(np.exp(rng.uniform(np.log(10), np.log(64))))  # digit height, px
    font = _font(font_path, max(8, round(digit_h / 0.72)))
    stroke = int(rng.integers(0, max(1, int(digit_h / 14)) + 1)) if rng.random() < 0.3 else 0
    tracking = rng.uniform(-0.04, 0.35) * digit_h
    xs, x = [], 0.0
    boxes_unrot = []
    for d in digits:
        xs.append(x)
        gx0, gy0, gx1, gy1 = font.getbbox(str(int(d)), stroke_width=stroke)
        boxes_unrot.append((x + gx0, gy0, x + gx1, gy1))
        x += font.getlength(str(int(d))) + 2 * stroke + tracking
    ub = np.array(boxes_unrot, np.float32)
    tx0, ty0 = ub[:, 0].min(), ub[:, 1].min()
    tw, th = ub[:, 2].max() - tx0, ub[:, 3].max() - ty0
    angle = float(np.clip(rng.normal(0, 4), -10, 10)) if rng.random() < 0.7 else 0.0
    extent = _rotated_extent(float(tw), float(th), angle)
    return _Text(digits, font, stroke, xs, digit_h, (tx0, ty0, tw, th), angle, extent)


def _canvas_geometry(rng: np.random.Generator, text: _Text) -> tuple[int, int, float, float] | None:
    """Canvas ``(w, h)`` and the text centre on it: margins sized like SVHN's street-view crops."""
    rw, rh = text.extent
    digit_h = text.digit_h
    ml, mr = rng.uniform(0.1, 1.6, 2) * digit_h
    mt, mb = rng.uniform(0.1, 0.9, 2) * digit_h
    if rng.random() < 0.8:  # mostly, like SVHN, enough context around the number for a square crop
        need = max(rw, rh) * rng.uniform(1.0, 1.4)
        short_x, short_y = need - (rw + ml + mr), need - (rh + mt + mb)
        tx, ty = rng.random(2)
        if short_x > 0:
            ml, mr = ml + tx * short_x, mr + (1 - tx) * short_x
        if short_y > 0:
            mt, mb = mt + ty * short_y, mb + (1 - ty) * short_y
    scale = min(1.0, (_MAX_SIDE - rw - 4) / max(ml + mr, 1e-6), (_MAX_SIDE - rh - 4) / max(mt + mb, 1e-6))
    if scale <= 0:
        return None
    ml, mr, mt, mb = ml * scale, mr * scale, mt * scale, mb * scale
    w = math.ceil(rw + ml + mr) + 2
    h = math.ceil(rh + mt + mb) + 2
    return w, h, ml + 1 + rw / 2, mt + 1 + rh / 2


def _glyph_masks(text: _Text, w: int, h: int, cx: float, cy: float) -> tuple[list, np.ndarray] | None:
    """Exact ink boxes (xyxy, ``x2`` exclusive) and the text's alpha ``(h, w)`` in [0, 1]; None if a glyph
    vanished or touches the border."""
    tx0, ty0, tw, th = text.box
    ox, oy = cx - (tx0 + tw / 2), cy - (ty0 + th / 2)  # text origin on the canvas
    masks = []
    for d, gx in zip(text.digits, text.xs):
        m = Image.new("L", (w, h), 0)
        ImageDraw.Draw(m).text((ox + gx, oy), str(int(d)), font=text.font, fill=255, stroke_width=text.stroke,
                               stroke_fill=255)
        if text.angle:
            m = m.rotate(text.angle, resample=Image.BILINEAR, center=(cx, cy))
        masks.append(np.asarray(m))
    boxes = []
    for m in masks:
        ink = m > _INK_THRESHOLD
        cols, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
        if len(cols) == 0 or cols[0] == 0 or rows[0] == 0 or cols[-1] == w - 1 or rows[-1] == h - 1:
            return None
        boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
    return boxes, np.max(np.stack(masks), axis=0).astype(np.float32) / 255.0


def _paint(rng: np.random.Generator, text: _Text, w: int, h: int, cx: float, cy: float, boxes: list,
           alpha: np.ndarray) -> np.ndarray:
    """Background, clutter, a plaque half of the time, then the text at a drawn contrast: ``(h, w, 3)`` float."""
    rw, rh = text.extent
    bg = _background(rng, w, h)
    text_box = (cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    _clutter(rng, canvas, text_box)
    if rng.random() < 0.5:
        pad = rng.uniform(0.1, 0.5) * text.digit_h
        col = tuple(int(v) for v in _colour(rng))
        ImageDraw.Draw(canvas).rectangle(
            [text_box[0] - pad, text_box[1] - pad, text_box[2] + pad, text_box[3] + pad],
            fill=col,
            outline=tuple(int(v) for v in _colour(rng)) if rng.random() < 0.5 else None,
            width=int(rng.integers(1, 4)),
        )
    bg = np.asarray(canvas, np.float32)
    bb = np.array(boxes, np.int64)
    x0, y0 = bb[:, :2].min(0)
    x1, y1 = bb[:, 2:].max(0)
    under = bg[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    contrast = rng.uniform(0.18, 0.9) * 255
    text_col = _colour(rng)
    target = _luma(under) + contrast if _luma(under) < 128 else _luma(under) - contrast
    text_col = np.clip(text_col + (np.clip(target, 0, 255) - _luma(text_col)), 0, 255)
    if rng.random() < 0.3:  # drop shadow
        sx, sy = rng.integers(1, max(2, int(text.digit_h / 12)) + 1, 2)
        shadow = np.zeros_like(alpha)
        shadow[sy:, sx:] = alpha[: h - sy, : w - sx]
        bg = bg * (1 - 0.6 * shadow[..., None])
    return bg * (1 - alpha[..., None]) + text_col * alpha[..., None]


def _camera(rng: np.random.Generator, img: np.ndarray, w: int, h: int) -> Image.Image:
    """Uneven light, resolution loss, blur and sensor noise on an ``(h, w, 3)`` image."""
    if rng.random() < 0.5:
        gx, gy = rng.normal(0, 0.4, 2)
        light = 1 + gx * (np.arange(w, dtype=np.float32)[None, :] / w - 0.5)
        light = light + gy * (np.arange(h, dtype=np.float32)[:, None] / h - 0.5)
        img = img * light[..., None]
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        f = rng.uniform(0.45, 0.85)
        out = out.resize((max(4, int(w * f)), max(4, int(h * f))), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    radius = rng.uniform(0, 1.3) if rng.random() < 0.6 else 0.0
    if radius > 0.15:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    sigma = rng.uniform(0, 6)
    arr = np.asarray(out, np.float32) + np.float32(sigma) * rng.standard_normal((h, w, 3), np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# datasets


def _render_to_file(args: tuple[Path, str, int, int, tuple[str, ...]]) -> Record:
    folder, split, seed, index, fonts = args
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    img, rec = render_sample(rng, fonts)
    rec.name = f"{index + 1}.png"
    img.save(folder / rec.name, compress_level=1)
    return rec


def synthesize(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, list[Record]]:
    """Write a synthetic SVHN format-1 dataset to ``out/train`` and ``out/test``.

    Args:
        out: destination folder (created; existing files with the same names are overwritten).
        n_train, n_test: number of images per split (a split with 0 images is not written).
        seed: the dataset seed; image ``i`` of a split is fully determined by ``(seed, split, i)``.
        progress: show a tqdm bar on stderr.
        workers: processes to render with (1 = in this process); the output does not depend on it.

    Returns:
        ``{split: records}``: the ground truth written to each ``digitStruct.mat``.
    """
    if n_train < 0 or n_test < 0:
        raise LipdetError(f"{out}: image counts must be >= 0 (got train={n_train}, test={n_test})")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LipdetError(f"{out}: cannot create output folder ({exc.strerror})") from None
    fonts = find_fonts()
    result: dict[str, list[Record]] = {}
    bar = tqdm(total=n_train + n_test, desc="synth", unit="img", file=sys.stderr, disable=not progress)
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:  # spawn: safe even when the parent runs threads (torch, tqdm)
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")))
        for split, n in (("train", n_train), ("test", n_test)):
            if n == 0:
                continue
            folder = out / split
            folder.mkdir(exist_ok=True)
            jobs = [(folder, split, seed, i, fonts) for i in range(n)]
            it = pool.map(_render_to_file, jobs, chunksize=16) if pool else map(_render_to_file, jobs)
            records = []
            for rec in it:
                records.append(rec)
                bar.update(1)
            write_digitstruct(folder / "digitStruct.mat", records)
            result[split] = records
    bar.close()
    return result


def synth_sizes(n_train: int | None = None, n_test: int | None = None) -> tuple[int, int]:
    """The sizes of the default synthetic dataset.

    Explicit arguments win; otherwise ``$LIPDET_SYNTH_SIZE`` (``"TRAIN,TEST"``), otherwise
    ``(4000, 1000)``.
    """
    env = os.environ.get("LIPDET_SYNTH_SIZE", "").strip()
    d_train, d_test = DEFAULT_TRAIN, DEFAULT_TEST
    if env:
        try:
            a, b = (int(v) for v in env.split(","))
            if a <= 0 or b <= 0:
                raise ValueError
        except ValueError:
            raise LipdetError(
                f"LIPDET_SYNTH_SIZE must be 'TRAIN,TEST' with two positive integers, got {env!r}"
            ) from None
        d_train, d_test = a, b
    return (d_train if n_train is None else n_train, d_test if n_test is None else n_test)


def ensure_synthetic(
    root: Path | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """The embedded default dataset: generated once, then reused.

    The dataset lives in ``root/synth-svhn-<n_train>-<n_test>-<seed>`` (``root`` defaults to
    :func:`lipdet.io.cache_dir`). It is rendered into a temporary folder beside it and renamed
    into place when complete, so an interrupted run never leaves a half dataset behind.

    Args:
        root: folder to keep the dataset in.
        n_train, n_test: sizes; default 4000 / 1000, or ``$LIPDET_SYNTH_SIZE`` ("TRAIN,TEST").
        seed: dataset seed.
        progress: show a progress bar while generating.

    Returns:
        The SVHN format-1 folder (with ``train/`` and ``test/``).
    """
    n_train, n_test = synth_sizes(n_train, n_test)
    if n_train <= 0 or n_test <= 0:
        raise LipdetError(f"synthetic dataset sizes must be positive (got train={n_train}, test={n_test})")
    root = Path(root) if root is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"synth-svhn-{n_train}-{n_test}-{seed}"
    if (final / "train" / "digitStruct.mat").is_file() and (final / "test" / "digitStruct.mat").is_file():
        return final
    if progress:
        print(
            f"generating the synthetic SVHN dataset ({n_train} train / {n_test} test images) in {final}",
            file=sys.stderr,
        )
    if final.exists():  # an incomplete leftover (e.g. files deleted by hand): start over
        shutil.rmtree(final)
    workers = 1 if n_train + n_test < 1000 else min(4, os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        synthesize(tmp, n_train, n_test, seed, progress=progress, workers=workers)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "test" / "digitStruct.mat").is_file():  # not a concurrent winner
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
