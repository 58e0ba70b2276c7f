"""SVHNDetection: the square crops, their boxes, bad input, skipped records and the cache; the
validation split held out of the train split (ValSplit)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lipdet.data.dataset import (
    SVHNDetection,
    boxes_from_crop,
    boxes_to_crop,
    carve_validation,
    detection_collate,
    resolve_data,
    square_crop,
)
from lipdet.data.digitstruct import Record, write_digitstruct
from lipdet.data.show import draw_detections, draw_grid
from lipdet.data.split import ValSplit
from lipdet.data.synth import synthesize
from lipdet.errors import LipdetError

S = 74


@pytest.fixture(autouse=True)
def _cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPDET_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("svhn")
    synthesize(root, 20, 10, seed=0, progress=False)
    return root


@pytest.fixture()
def data(tmp_path: Path, synth_root: Path) -> Path:
    """A private copy of the synthetic dataset (tests below modify it)."""
    root = tmp_path / "svhn"
    shutil.copytree(synth_root, root)
    return root


def make_split(root: Path, images: list[tuple[int, int]], records: list[Record], split: str = "train") -> Path:
    """Write a split with noise images of the given (w, h) sizes and the given annotations."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for (w, h), rec in zip(images, records):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / rec.name)
    write_digitstruct(folder / "digitStruct.mat", records)
    return root


# ---------------------------------------------------------------------------------------------
# geometry (property tests)


@st.composite
def image_and_boxes(draw):
    w = draw(st.integers(8, 400))
    h = draw(st.integers(8, 400))
    k = draw(st.integers(1, 5))
    boxes = []
    for _ in range(k):
        x1 = draw(st.integers(0, w - 2))
        y1 = draw(st.integers(0, h - 2))
        x2 = draw(st.integers(x1 + 1, w))
        y2 = draw(st.integers(y1 + 1, h))
        boxes.append((x1, y1, x2, y2))
    slide = draw(st.floats(0, 1))
    return w, h, np.array(boxes, np.float32), slide


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(image_and_boxes())
def test_square_crop_properties(case) -> None:
    w, h, boxes, slide = case
    union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
    x0, y0, side = square_crop(union, w, h, slide)
    long_side = max(union[2] - union[0], union[3] - union[1])
    assert side >= long_side - 1 and side <= 1.3 * long_side + 2
    # covers the union (to the pixel)
    assert x0 <= union[0] + 1e-6 or side >= w
    assert y0 <= union[1] + 1e-6 or side >= h
    assert x0 + side >= union[2] - 1 and y0 + side >= union[3] - 1
    if long_side <= min(w, h):  # a square fits: the crop lies inside the image
        assert 0 <= x0 and 0 <= y0 and x0 + side <= w and y0 + side <= h
    crop_boxes = boxes_to_crop(boxes, (x0, y0, side), S)
    assert np.all(crop_boxes >= 0) and np.all(crop_boxes <= S)
    back = boxes_from_crop(torch.from_numpy(crop_boxes), torch.tensor([x0, y0, side], dtype=torch.float32), S)
    inside = (boxes[:, 0] >= x0) & (boxes[:, 1] >= y0) & (boxes[:, 2] <= x0 + side) & (boxes[:, 3] <= y0 + side)
    np.testing.assert_allclose(back.numpy()[inside], boxes[inside], atol=1e-3)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(image_and_boxes(), st.integers(0, 3))
def test_dataset_crops_property(tmp_path_factory: pytest.TempPathFactory, case, seed: int) -> None:
    w, h, boxes, _ = case
    root = tmp_path_factory.mktemp("prop")
    labels = np.arange(len(boxes)) % 10
    make_split(root, [(w, h)], [Record("1.png", boxes, labels)])
    ds = SVHNDetection(root, "train", input_size=S, seed=seed, cache=False)
    image, target = ds[0]
    assert image.shape == (3, S, S) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    b = target["boxes"]
    assert b.shape == (len(boxes), 4) and torch.all(b >= 0) and torch.all(b <= S)
    assert torch.equal(target["labels"], torch.as_tensor(labels))
    x0, y0, side = target["crop"].tolist()
    inside = (boxes[:, 0] >= x0) & (boxes[:, 1] >= y0) & (boxes[:, 2] <= x0 + side) & (boxes[:, 3] <= y0 + side)
    back = boxes_from_crop(b, target["crop"], S).numpy()
    np.testing.assert_allclose(back[inside], boxes[inside], atol=1e-3)


def test_crop_pixels_match_original(tmp_path: Path) -> None:
    """The crop shows the right part of the image: a white square lands where its box says."""
    img = np.zeros((120, 200, 3), np.uint8)
    img[40:70, 90:110] = 255
    folder = tmp_path / "train"
    folder.mkdir()
    Image.fromarray(img).save(folder / "1.png")
    write_digitstruct(folder / "digitStruct.mat", [Record("1.png", [[90, 40, 110, 70]], [3])])
    image, target = SVHNDetection(tmp_path, "train", cache=False)[0]
    x1, y1, x2, y2 = target["boxes"][0].round().int().tolist()
    arr = image.numpy()
    assert arr[:, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].min() > 0.9
    assert arr[:, :, : x1 - 2].max() < 0.1 and arr[:, :, x2 + 2 :].max() < 0.1
    assert arr[:, : y1 - 2].max() < 0.1 and arr[:, y2 + 2 :].max() < 0.1
    assert target["crop"][2] == 40  # 30 * 1.3 = 39 px, centred at a half pixel: covered by 40


# ---------------------------------------------------------------------------------------------
# the dataset on synthetic data


def test_items_and_collate(data: Path) -> None:
    ds = SVHNDetection(data, "train")
    assert len(ds) == 20 and ds.skipped == 0 and len(ds.records) == 20
    image, target = ds[3]
    assert image.shape == (3, S, S) and image.dtype == torch.float32
    assert set(target) == {"boxes", "labels", "image_id", "crop", "name"}
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["image_id"] == 3 and target["name"] == "4.png" and target["crop"].shape == (3,)
    np.testing.assert_allclose(
        boxes_from_crop(target["boxes"], target["crop"], S).numpy(), ds.records[3].boxes, atol=1e-3
    )
    images, targets = detection_collate([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, S, S) and [t["image_id"] for t in targets] == [0, 1, 2]
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=detection_collate)
    assert sum(len(t) for _, t in loader) == 20
    with pytest.raises(IndexError):
        ds[20]


def test_deterministic_per_seed(data: Path) -> None:
    a = SVHNDetection(data, "test", seed=1, cache=False)
    b = SVHNDetection(data, "test", seed=1, cache=False)
    c = SVHNDetection(data, "test", seed=2, cache=False)
    assert np.array_equal(a.crops, b.crops)
    assert torch.equal(a[0][0], b[0][0])
    assert not np.array_equal(a.crops, c.crops)  # the square slides differently


def test_other_input_size(data: Path) -> None:
    ds = SVHNDetection(data, "test", input_size=32)
    image, target = ds[0]
    assert image.shape == (3, 32, 32) and torch.all(target["boxes"] <= 32)


# ---------------------------------------------------------------------------------------------
# bad input: one LipdetError naming the path, exit code 2


def _err(fn, *args, **kwargs) -> LipdetError:
    with pytest.raises(LipdetError) as e:
        fn(*args, **kwargs)
    assert e.value.exit_code == 2 and "\n" not in e.value.message
    return e.value


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert str(missing) in _err(SVHNDetection, missing, "train").message


def test_missing_split(data: Path) -> None:
    assert str(data / "extra") in _err(SVHNDetection, data, "extra").message


def test_missing_digitstruct(data: Path) -> None:
    (data / "train" / "digitStruct.mat").unlink()
    assert str(data / "train" / "digitStruct.mat") in _err(SVHNDetection, data, "train").message


def test_corrupt_digitstruct(data: Path) -> None:
    mat = data / "train" / "digitStruct.mat"
    mat.write_bytes(np.random.default_rng(1).bytes(2000))
    assert str(mat) in _err(SVHNDetection, data, "train").message


def test_missing_image(data: Path) -> None:
    (data / "train" / "7.png").unlink()
    msg = _err(SVHNDetection, data, "train").message
    assert str(data / "train" / "7.png") in msg and "not found" in msg


def test_unreadable_image(data: Path) -> None:
    (data / "train" / "7.png").write_bytes(b"not a png at all")
    msg = _err(SVHNDetection, data, "train").message
    assert str(data / "train" / "7.png") in msg and "cannot read image" in msg


def test_truncated_image(data: Path) -> None:
    path = data / "train" / "7.png"
    path.write_bytes(path.read_bytes()[:200])
    assert str(path) in _err(SVHNDetection, data, "train").message


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    write_digitstruct(tmp_path / "train" / "digitStruct.mat", [])
    msg = _err(SVHNDetection, tmp_path, "train").message
    assert str(tmp_path / "train" / "digitStruct.mat") in msg and "empty" in msg


def test_skipped_records_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [
        Record("1.png", [[2, 3, 12, 20]], [1]),
        Record("2.png", [[-1, 3, 12, 20], [14, 3, 22, 20]], [2, 3]),  # negative coordinate
        Record("3.png", [[2, 3, 12, 20]], [4]),
        Record("4.png", [[30, 3, 45, 20]], [5]),  # beyond the 40 px wide image
        Record("5.png", [[5, 5, 5, 9]], [6]),  # zero width
    ]
    make_split(tmp_path, [(40, 30)] * 5, records)
    with caplog.at_level(logging.WARNING, logger="lipdet.data.dataset"):
        ds = SVHNDetection(tmp_path, "train")
    assert len(ds) == 2 and ds.skipped == 3
    assert [r.name for r in ds.records] == ["1.png", "3.png"]
    assert [ds[i][1]["name"] for i in range(2)] == ["1.png", "3.png"]
    assert any("skipped 3 of 5" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lipdet.data.dataset"):
        again = SVHNDetection(tmp_path, "train")  # from the cache: still counted and reported
    assert again.from_cache and again.skipped == 3
    assert any("skipped 3 of 5" in r.getMessage() for r in caplog.records)


def test_all_records_invalid(tmp_path: Path) -> None:
    make_split(tmp_path, [(20, 20)], [Record("1.png", [[-5, 0, 4, 4]], [1])])
    assert "usable boxes" in _err(SVHNDetection, tmp_path, "train").message


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_written_reused_and_invalidated(data: Path) -> None:
    first = SVHNDetection(data, "test")
    assert not first.from_cache
    assert first.cache_path == data / "test" / f".lipdet-cache-{S}-0.npz"
    second = SVHNDetection(data, "test")
    assert second.from_cache and np.array_equal(second.crops, first.crops)
    assert torch.equal(second[4][0], first[4][0]) and torch.equal(second[4][1]["boxes"], first[4][1]["boxes"])

    mat = data / "test" / "digitStruct.mat"
    os.utime(mat, ns=(mat.stat().st_atime_ns, mat.stat().st_mtime_ns + 10**9))  # touch
    assert not SVHNDetection(data, "test").from_cache
    assert SVHNDetection(data, "test").from_cache

    # a changed annotation is picked up
    records = list(second.records)
    records[0] = Record(records[0].name, records[0].boxes[:1], [9])
    write_digitstruct(mat, records)
    third = SVHNDetection(data, "test")
    assert not third.from_cache and third.records[0].labels.tolist() == [9]

    # a replaced image is picked up too
    img = data / "test" / "2.png"
    Image.open(img).transpose(Image.FLIP_TOP_BOTTOM).save(img)
    assert not SVHNDetection(data, "test").from_cache

    # other input size / seed: separate caches
    assert not SVHNDetection(data, "test", seed=3).from_cache
    assert not SVHNDetection(data, "test", cache=False).from_cache


def test_corrupt_cache_is_rebuilt(data: Path) -> None:
    ds = SVHNDetection(data, "test")
    ds.cache_path.write_bytes(b"garbage")
    again = SVHNDetection(data, "test")
    assert not again.from_cache and len(again) == len(ds)
    assert SVHNDetection(data, "test").from_cache


def test_unwritable_data_folder_uses_user_cache(data: Path, tmp_path: Path) -> None:
    # the cache file's name is taken by a folder, so nothing can be written next to the data
    (data / "test" / f".lipdet-cache-{S}-0.npz").mkdir()
    ds = SVHNDetection(data, "test")
    assert ds.cache_path is not None and ds.cache_path.is_relative_to(tmp_path / "user-cache")
    assert SVHNDetection(data, "test").from_cache


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_uses_user_cache(data: Path, tmp_path: Path) -> None:
    folder = data / "test"
    folder.chmod(0o555)
    try:
        ds = SVHNDetection(data, "test")
        assert ds.cache_path.is_relative_to(tmp_path / "user-cache")
        assert SVHNDetection(data, "test").from_cache
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# resolve_data and drawing


def test_resolve_data(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data(data) == data
    assert str(tmp_path / "x") in _err(resolve_data, tmp_path / "x").message
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _err(resolve_data, empty).message
    assert msg == (f"{empty} is not an SVHN format-1 folder (expected train/digitStruct.mat or test/digitStruct.mat)")
    monkeypatch.setenv("LIPDET_SYNTH_SIZE", "3,2")
    root = resolve_data(None)
    assert root == tmp_path / "user-cache" / "synth-svhn-3-2-0"
    assert len(SVHNDetection(root, "test")) == 2


def test_draw_grid_png(data: Path, tmp_path: Path) -> None:
    ds = SVHNDetection(data, "test")
    out = draw_grid(ds, 6, out=tmp_path / "grid.png", seed=1)
    with Image.open(out) as im:
        cols, rows, cell = 3, 2, S * 2
        assert im.format == "PNG" and im.size == (cols * (cell + 4) + 4, rows * (cell + 4) + 4)
    # n larger than the dataset: every sample once
    with Image.open(draw_grid(ds, 50, out=tmp_path / "all.png")) as im:
        assert im.size == (4 * (cell + 4) + 4, 3 * (cell + 4) + 4)


def test_draw_detections_marks_boxes() -> None:
    image = torch.zeros(3, S, S)
    pil = draw_detections(image, [[10, 10, 30, 40]], [7], scores=[0.9], color=(255, 0, 0), scale=2)
    arr = np.asarray(pil)
    assert pil.size == (2 * S, 2 * S)
    assert tuple(arr[50, 20]) == (255, 0, 0)  # left edge of the box (x = 10 * 2)
    assert arr[60:70, 30:50].max() == 0  # inside stays black


# ---------------------------------------------------------------------------------------------
# the validation split held out of train (lipdet.data.split.ValSplit)


def _base_indices(subset: torch.utils.data.Subset) -> list[int]:
    return [int(i) for i in subset.indices]


def test_val_split_is_disjoint_and_covers_the_train_split(tiny_svhn: Path) -> None:
    base = SVHNDetection(tiny_svhn, "train")
    train, val = carve_validation(base, ValSplit())
    assert len(base) == 40 and len(val) == 4 and len(train) == 36  # the default 10%
    t, v = _base_indices(train), _base_indices(val)
    assert not set(t) & set(v) and sorted(t + v) == list(range(len(base)))
    names = [r.name for r in base.records]
    assert not {names[i] for i in t} & {names[i] for i in v}
    # the items are the base's images, not copies that could drift
    for k, i in enumerate(v):
        assert torch.equal(val[k][0], base[i][0])
    assert len(carve_validation(base, ValSplit(count=7))[1]) == 7
    assert len(carve_validation(base, ValSplit(fraction=0.25))[1]) == 10


def test_val_split_is_deterministic_and_seeded(tiny_svhn: Path) -> None:
    """The same seed gives the same images from a fresh build, from the cache and in any record
    order; another seed gives other images."""
    fresh = SVHNDetection(tiny_svhn, "train", cache=False)
    cached = SVHNDetection(tiny_svhn, "train")
    names = [r.name for r in fresh.records]
    assert [r.name for r in cached.records] == names
    split = ValSplit(seed=5, count=8)
    held = {names[i] for i in split.held_out(names)}
    assert {names[i] for i in split.held_out([r.name for r in cached.records])} == held
    backwards = names[::-1]
    assert {backwards[i] for i in split.held_out(backwards)} == held
    others = [{names[i] for i in ValSplit(seed=s, count=8).held_out(names)} for s in (6, 7, 8)]
    assert all(o != held for o in others)


def test_val_split_is_the_same_in_another_process() -> None:
    """Every Ray worker computes the split itself: another interpreter, with another string-hash
    seed, must hold out the same images."""
    import subprocess
    import sys

    names = [f"{i}.png" for i in range(1, 301)]
    code = ("from lipdet.data.split import ValSplit; "
            f"print(ValSplit(seed=3).held_out({names!r}))")
    out = {}
    for hash_seed in ("0", "12345"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": hash_seed})
        out[hash_seed] = r.stdout.strip()
    here = str(ValSplit(seed=3).held_out(names))
    assert out["0"] == out["12345"] == here and len(ValSplit(seed=3).held_out(names)) == 30


def test_val_split_record_names_the_exact_images(tiny_svhn: Path) -> None:
    import hashlib

    names = [r.name for r in SVHNDetection(tiny_svhn, "train").records]
    split = ValSplit(seed=2, fraction=0.2)
    rec = split.record(names)
    held = sorted(names[i] for i in split.held_out(names))
    assert rec["from"] == "train" and rec["seed"] == 2 and rec["fraction"] == 0.2
    assert rec["count"] == 8 and rec["of"] == 40
    assert rec["names_sha256"] == hashlib.sha256("\n".join(held).encode()).hexdigest()
    assert ValSplit.from_dict(split.to_dict()) == split
    assert split.describe(8) == "validation (8 images held out of train, seed 2)"
    assert split.describe(8, 3) == "validation (first 3 of 8 images held out of train, seed 2)"


@pytest.mark.parametrize(
    "split, n, message",
    [
        (ValSplit(fraction=0.0), 40, "fraction must be > 0 and < 1, got 0.0"),
        (ValSplit(fraction=1.0), 40, "fraction must be > 0 and < 1, got 1.0"),
        (ValSplit(fraction=-0.5), 40, "fraction must be > 0 and < 1, got -0.5"),
        (ValSplit(count=-1), 40, "count must be >= 1"),
        (ValSplit(count=40), 40, "holds out 40 images, but the train split has only 40"),
        (ValSplit(count=41), 40, "holds out 41 images, but the train split has only 40"),
        (ValSplit(fraction=0.5), 1, "holds out 1 images, but the train split has only 1"),
    ],
)
def test_val_split_refuses_bad_values(split: ValSplit, n: int, message: str) -> None:
    with pytest.raises(LipdetError) as exc:
        split.size(n)
    assert message in exc.value.message and "\n" not in exc.value.message
