"""deploy.images: what POST /v1/detect does to a body (decode, checks, letterbox to S x S, boxes back).

Real PNG/JPEG bytes made with PIL (and two made by hand: a 0x0 PNG PIL cannot write, and a real
20000x20000 bilevel PNG written with zlib, whose header alone must be enough to refuse it).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lipdet.data.dataset import boxes_to_crop
from lipdet.deploy.images import (
    MAX_BODY_BYTES,
    MAX_PIXELS,
    ImageError,
    decode_image,
    letterbox_square,
    prepare,
    to_image_boxes,
)

SIZE = 74


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def handmade_png(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG of ``width x height`` all-zero pixels (grey bilevel when bit_depth=1, color_type=0)."""
    row = 1 + (width * bit_depth * (3 if color_type == 2 else 1) + 7) // 8
    pixels = zlib.compress(bytes(row * height), 1)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def bad_bodies() -> dict[str, tuple[bytes, int, str]]:
    """Every bad-input class of issue #18: name -> (body, HTTP status, words the message must hold)."""
    good = encode(Image.new("RGB", (60, 40), (200, 10, 10)))
    return {
        "not an image": (b"this is plain text, not pixels", 400, "not a PNG or JPEG"),
        "truncated png": (good[: len(good) // 2], 400, "truncated"),
        "0x0 png": (handmade_png(0, 0), 400, "0x0"),
        "20000x20000 png": (handmade_png(20000, 20000, 1, 0), 413, "MAX_PIXELS"),
        "gif": (encode(Image.new("P", (20, 20)), "GIF"), 415, "GIF"),
        "empty body": (b"", 400, "empty"),
        "over the body limit": (b"\x00" * (MAX_BODY_BYTES + 1), 413, "MAX_BODY_BYTES"),
    }


@pytest.mark.parametrize("name", list(bad_bodies()))
def test_every_bad_body_is_one_line_with_its_status(name):
    body, status, words = bad_bodies()[name]
    with pytest.raises(ImageError) as info:
        decode_image(body)
    assert info.value.status == status, info.value.message
    assert words in info.value.message and "\n" not in info.value.message


def test_the_big_png_is_a_real_20000x20000_image():
    """The refusal is about its size: PIL itself reads the header as 20000 x 20000."""
    Image.MAX_IMAGE_PIXELS, old = None, Image.MAX_IMAGE_PIXELS
    try:
        assert Image.open(io.BytesIO(handmade_png(20000, 20000, 1, 0))).size == (20000, 20000)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert 20000 * 20000 > MAX_PIXELS


def test_png_and_jpeg_of_any_mode_decode_to_rgb():
    for img, fmt in [(Image.new("L", (31, 17), 90), "PNG"), (Image.new("RGBA", (5, 9), (1, 2, 3, 4)), "PNG"),
                     (Image.new("RGB", (100, 30), (0, 255, 0)), "JPEG")]:
        out = decode_image(encode(img, fmt))
        assert out.mode == "RGB" and out.size == img.size


def test_an_input_sized_image_passes_through_unchanged():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    p = prepare(decode_image(encode(Image.fromarray(pixels))), SIZE)
    assert p.crop == (0, 0, SIZE)
    assert torch.equal(p.tensor, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0)


@pytest.mark.parametrize("w,h", [(300, 100), (90, 240), (74, 74), (1, 500)])
def test_letterbox_is_a_centred_square_over_the_image(w, h):
    x0, y0, side = letterbox_square(w, h)
    assert side == max(w, h)
    assert x0 <= 0 and y0 <= 0 and x0 + side >= w and y0 + side >= h
    assert abs((x0 + side - w) - (-x0)) <= 1 and abs((y0 + side - h) - (-y0)) <= 1


def test_a_drawn_box_comes_back_in_image_pixels():
    """A white rectangle at a known place in a wide image: found in the 74x74 input, mapped back."""
    w, h, box = 300, 120, (180, 30, 240, 100)  # xyxy
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[box[1]:box[3], box[0]:box[2]] = 255
    p = prepare(decode_image(encode(Image.fromarray(pixels))), SIZE)
    ys, xs = torch.nonzero(p.tensor[0] > 0.5, as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    xywh = to_image_boxes(found, p, SIZE)[0]
    px = w / SIZE  # one input pixel in image pixels
    want = torch.tensor([box[0], box[1], box[2] - box[0], box[3] - box[1]], dtype=torch.float32)
    assert torch.allclose(xywh, want, atol=1.5 * px), (xywh, want)
    assert torch.all(p.tensor[:, : int(-p.crop[1] * SIZE / p.crop[2]) - 1] == 0)  # the pad above is black


def test_boxes_round_trip_and_are_clipped_to_the_image():
    p = prepare(Image.new("RGB", (200, 50)), SIZE)
    xyxy = np.array([[10.0, 5.0, 60.0, 45.0], [150.0, 0.0, 200.0, 50.0]])
    back = to_image_boxes(torch.from_numpy(boxes_to_crop(xyxy, p.crop, SIZE)), p, SIZE)
    want = np.c_[xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]]
    assert np.allclose(back.numpy(), want, atol=1e-3)
    outside = to_image_boxes(torch.tensor([[0.0, 0.0, SIZE, SIZE]]), p, SIZE)[0]  # the whole padded square
    assert outside.tolist() == [0.0, 0.0, 200.0, 50.0]
