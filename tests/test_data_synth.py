"""The synthetic SVHN generator: format, exact ground truth, determinism, the cached default set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lipdet.data.digitstruct import read_digitstruct
from lipdet.data.synth import ensure_synthetic, find_fonts, render_sample, synth_sizes, synthesize
from lipdet.errors import LipdetError


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    truth = synthesize(out, 24, 8, seed=5, progress=False)
    return out, truth


def test_layout_and_round_trip(synth) -> None:
    out, truth = synth
    assert sorted(truth) == ["test", "train"]
    for split, n in (("train", 24), ("test", 8)):
        records = read_digitstruct(out / split / "digitStruct.mat")
        assert records == truth[split]  # the reader gives back exactly the boxes and labels drawn
        assert [r.name for r in records] == [f"{i}.png" for i in range(1, n + 1)]
        assert sorted(p.name for p in (out / split).glob("*.png")) == sorted(r.name for r in records)


def test_boxes_are_ink_boxes_inside_images(synth) -> None:
    out, truth = synth
    widths = []
    for rec in truth["train"]:
        img = np.asarray(Image.open(out / "train" / rec.name).convert("RGB"))
        h, w, _ = img.shape
        widths.append(w)
        assert 1 <= len(rec.labels) <= 5
        assert rec.labels.min() >= 0 and rec.labels.max() <= 9
        b = rec.boxes
        assert np.all(b == np.round(b))  # SVHN-style whole-pixel boxes
        assert np.all(b[:, :2] >= 1) and np.all(b[:, 2] <= w - 1) and np.all(b[:, 3] <= h - 1)
        assert np.all(b[:, 2:] - b[:, :2] >= 2)
        # the box holds visible ink: pixels inside differ from the image mean more than a flat patch
        for x1, y1, x2, y2 in b.astype(int):
            assert img[y1:y2, x1:x2].std() > 3
    assert 20 <= min(widths) and max(widths) <= 320


def test_deterministic_and_independent_of_workers(tmp_path: Path, synth) -> None:
    out, truth = synth
    again = synthesize(tmp_path / "a", 6, 0, seed=5, progress=False)
    pooled = synthesize(tmp_path / "b", 6, 0, seed=5, progress=False, workers=2)
    assert again["train"] == truth["train"][:6] == pooled["train"]
    assert not (tmp_path / "a" / "test").exists()
    for i in range(1, 7):
        ref = np.asarray(Image.open(out / "train" / f"{i}.png"))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "train" / f"{i}.png")), ref)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "train" / f"{i}.png")), ref)
    other = synthesize(tmp_path / "c", 3, 0, seed=6, progress=False)
    assert other["train"] != truth["train"][:3]


def test_render_sample_with_builtin_font() -> None:
    img, rec = render_sample(np.random.default_rng(1), fonts=("",))
    assert img.mode == "RGB" and len(rec.labels) == len(rec.boxes) >= 1
    assert len(find_fonts()) >= 1


def test_synth_sizes_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIPDET_SYNTH_SIZE", raising=False)
    assert synth_sizes() == (4000, 1000)
    monkeypatch.setenv("LIPDET_SYNTH_SIZE", "12,5")
    assert synth_sizes() == (12, 5)
    assert synth_sizes(7, None) == (7, 5)
    monkeypatch.setenv("LIPDET_SYNTH_SIZE", "lots")
    with pytest.raises(LipdetError, match="LIPDET_SYNTH_SIZE"):
        synth_sizes()


def test_ensure_synthetic_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPDET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LIPDET_SYNTH_SIZE", "5,3")
    root = ensure_synthetic(progress=False)
    assert root == tmp_path / "cache" / "synth-svhn-5-3-0"
    assert len(read_digitstruct(root / "train" / "digitStruct.mat")) == 5
    assert len(read_digitstruct(root / "test" / "digitStruct.mat")) == 3
    stamp = (root / "train" / "digitStruct.mat").stat().st_mtime_ns
    assert ensure_synthetic(progress=False) == root  # reused, not regenerated
    assert (root / "train" / "digitStruct.mat").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temp folder left


def test_ensure_synthetic_replaces_incomplete(tmp_path: Path) -> None:
    final = tmp_path / "synth-svhn-4-2-1"
    (final / "train").mkdir(parents=True)
    (final / "train" / "1.png").write_bytes(b"half")
    root = ensure_synthetic(tmp_path, 4, 2, seed=1, progress=False)
    assert root == final and len(read_digitstruct(final / "train" / "digitStruct.mat")) == 4
    assert sorted(os.listdir(tmp_path)) == [final.name]


def test_negative_count(tmp_path: Path) -> None:
    with pytest.raises(LipdetError, match=str(tmp_path)):
        synthesize(tmp_path, -1, 2, 0, progress=False)
