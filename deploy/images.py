"""Arbitrary PNG/JPEG images to the model's square input, and detections back to the image's pixels.

What ``POST /v1/detect`` does to a request body before and after the engine:

1. :func:`decode_image` checks the bytes (size limit, PNG/JPEG only, dimensions within
   :data:`MAX_PIXELS`, no 0x0 image, not truncated) and decodes them; every refusal is an
   :class:`ImageError` with one line of text and the HTTP status to answer with.
2. :func:`prepare` letterboxes the image into a square of side ``max(width, height)`` centred on it
   (the part outside the image is black: the reference preprocessing's rule for a square larger
   than the image), then resizes it to ``S x S`` with PIL bilinear, as the SVHN reader does, and
   scales to float32 ``[0, 1]``. An image that already is ``S x S`` passes through unchanged.
3. :func:`to_image_boxes` maps ``(D, 4)`` xyxy boxes in input pixels back through that square
   (:func:`lipdet.data.dataset.boxes_from_crop`), clips them to the image and returns COCO
   ``[x, y, w, h]`` in the image's own pixels.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lipdet.data.dataset import boxes_from_crop
from lipdet.errors import LipdetError

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body accepted (bytes): 8 MiB, far above any PNG/JPEG of MAX_PIXELS a camera makes."""
MAX_PIXELS = 4096 * 4096
"""Largest image accepted (width x height): 16.8 megapixels; checked on the header, before decoding."""
FORMATS = ("PNG", "JPEG")
"""Image formats accepted by ``POST /v1/detect``."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(LipdetError):
    """A request body that is not a usable image: one-line message plus the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = int(status)


def check_body_size(n_bytes: int) -> None:
    """Refuse a body of ``n_bytes`` over :data:`MAX_BODY_BYTES` (413) or an empty one (400)."""
    if n_bytes > MAX_BODY_BYTES:
        raise ImageError(f"request body of {n_bytes} bytes is over the {MAX_BODY_BYTES // (1024 * 1024)} MiB "
                         f"limit (MAX_BODY_BYTES = {MAX_BODY_BYTES})", 413)
    if n_bytes == 0:
        raise ImageError("empty request body: send the PNG or JPEG bytes of one image")


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR chunk, or None when ``data`` is not a PNG."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _check_dimensions(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image is {width}x{height} pixels: nothing to detect in")
    if width * height > MAX_PIXELS:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS} "
                         f"(MAX_PIXELS, 4096x4096)", 413)


def decode_image(data: bytes) -> Image.Image:
    """Check and decode a PNG/JPEG body into an RGB PIL image (dimensions checked before decoding).

    Raises:
        ImageError: 413 for a body over :data:`MAX_BODY_BYTES` or an image over :data:`MAX_PIXELS`;
            415 for an image in another format; 400 for bytes that are no image, a truncated or
            corrupt file, or a 0-pixel image.
    """
    check_body_size(len(data))
    header = _png_header_size(data)
    if header is not None:
        _check_dimensions(*header)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has more pixels than the limit of {MAX_PIXELS} (MAX_PIXELS)", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        raise ImageError("body is not a PNG or JPEG image") from None
    if img.format not in FORMATS:
        raise ImageError(f"{img.format or 'unknown'} images are not accepted: send PNG or JPEG", 415)
    _check_dimensions(*img.size)
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
        why = "truncated" if "truncated" in str(e) else "corrupt"
        raise ImageError(f"{img.format} image is {why} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


@dataclass(frozen=True)
class Prepared:
    """One image ready for the engine.

    Attributes:
        tensor: ``(3, S, S)`` float32 in ``[0, 1]``.
        crop: ``(x0, y0, side)``: the square, in the image's pixels, that was resized to ``S x S``.
        width, height: the image's size in pixels.
    """

    tensor: Tensor
    crop: tuple[int, int, int]
    width: int
    height: int


def letterbox_square(width: int, height: int) -> tuple[int, int, int]:
    """The square ``(x0, y0, side)`` of side ``max(width, height)`` centred on a ``width x height`` image."""
    side = max(width, height)
    return -((side - width) // 2), -((side - height) // 2), side


def prepare(img: Image.Image, size: int) -> Prepared:
    """An RGB image of any size and aspect -> the model's ``(3, size, size)`` input (module steps 2)."""
    w, h = img.size
    x0, y0, side = letterbox_square(w, h)
    patch = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
    tensor = torch.from_numpy(np.asarray(patch, np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return Prepared(tensor=tensor, crop=(x0, y0, side), width=w, height=h)


def to_image_boxes(boxes: Tensor, prepared: Prepared, size: int) -> Tensor:
    """``(D, 4)`` xyxy boxes in input pixels -> ``(D, 4)`` COCO ``[x, y, w, h]`` in the image's pixels (clipped)."""
    b = boxes_from_crop(boxes, prepared.crop, size)
    b[:, 0::2] = b[:, 0::2].clamp(0, prepared.width)
    b[:, 1::2] = b[:, 1::2].clamp(0, prepared.height)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1)
