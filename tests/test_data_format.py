"""digitStruct.mat reading and writing (SVHN format 1, MATLAB v7.3 / HDF5)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from lipdet.data.digitstruct import Record, read_digitstruct, write_digitstruct
from lipdet.errors import LipdetError

# (name, [(label, left, top, width, height), ...]) -- labels as MATLAB stores them (10 = digit 0)
MATLAB_RECORDS = [
    ("1.png", [(1, 246, 77, 81, 219), (9, 323, 81, 96, 219)]),
    ("2.png", [(2, 77, 29, 23, 32)]),
    ("3.png", [(10, 17, 5, 8, 15)]),
    ("4.png", [(4, 5, 6, 7, 8), (10, 13, 6, 7, 8), (7, 21, 6, 7, 8)]),
]


def write_matlab_like(path: Path, records, transpose: bool = False) -> None:
    """An independent writer of the official layout, in h5py's high-level API.

    MATLAB keeps the referenced data in ``/#refs#``; names are uint16 columns; a one-digit field
    is a 1x1 double, a multi-digit field a column of references to 1x1 doubles. ``transpose``
    stores the top-level reference arrays 1 x N instead of N x 1.
    """
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        counter = iter(range(10**6))

        def new_name() -> str:
            return f"r{next(counter)}"

        name_refs, bbox_refs = [], []
        for name, digits in records:
            chars = refs.create_dataset(new_name(), data=np.array([[ord(c)] for c in name], np.uint16))
            chars.attrs["MATLAB_class"] = np.bytes_("char")
            name_refs.append(chars.ref)
            g = refs.create_group(new_name())
            for j, key in enumerate(("label", "left", "top", "width", "height")):
                vals = [float(d[j]) for d in digits]
                if len(vals) == 1:
                    g.create_dataset(key, data=np.array([[vals[0]]]))
                else:
                    col = [refs.create_dataset(new_name(), data=np.array([[v]])).ref for v in vals]
                    g.create_dataset(key, data=np.array(col, dtype=h5py.ref_dtype).reshape(-1, 1))
            bbox_refs.append(g.ref)
        top = f.create_group("digitStruct")
        shape = (1, -1) if transpose else (-1, 1)
        top.create_dataset("name", data=np.array(name_refs, dtype=h5py.ref_dtype).reshape(shape))
        top.create_dataset("bbox", data=np.array(bbox_refs, dtype=h5py.ref_dtype).reshape(shape))


def expected_records():
    out = []
    for name, digits in MATLAB_RECORDS:
        d = np.array(digits, np.float64)
        boxes = np.stack([d[:, 1], d[:, 2], d[:, 1] + d[:, 3], d[:, 2] + d[:, 4]], axis=1)
        out.append(Record(name, boxes, d[:, 0].astype(np.int64) % 10))
    return out


@pytest.mark.parametrize("transpose", [False, True], ids=["Nx1", "1xN"])
def test_reads_matlab_layout(tmp_path: Path, transpose: bool) -> None:
    path = tmp_path / "digitStruct.mat"
    write_matlab_like(path, MATLAB_RECORDS, transpose=transpose)
    records = read_digitstruct(path)
    assert records == expected_records()
    assert records[2].labels.tolist() == [0]  # label 10 -> digit 0
    assert records[3].labels.tolist() == [4, 0, 7]
    assert records[0].boxes.dtype == np.float32 and records[0].labels.dtype == np.int64
    np.testing.assert_array_equal(records[1].boxes, [[77, 29, 100, 61]])


def test_write_read_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    records = []
    for i in range(40):
        k = int(rng.integers(1, 6))
        xy = rng.integers(-3, 200, (k, 2)).astype(np.float64) + rng.choice([0.0, 0.5], (k, 2))
        wh = rng.integers(1, 40, (k, 2))
        records.append(Record(f"{i + 1}.png", np.concatenate([xy, xy + wh], 1), rng.integers(0, 10, k)))
    path = tmp_path / "digitStruct.mat"
    write_digitstruct(path, records)
    assert read_digitstruct(path) == records
    # the official layout, readable by a plain h5py reader
    with h5py.File(path, "r") as f:
        assert f["digitStruct/name"].shape == (40, 1)
        assert f["digitStruct/bbox"].shape == (40, 1)
        first = f[f["digitStruct/name"][0, 0]][()]
        assert first.dtype == np.uint16 and "".join(map(chr, first.ravel())) == "1.png"
        assert "#refs#" in f
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    assert not [p for p in tmp_path.iterdir() if p.name != "digitStruct.mat"]  # atomic: no temp left


def test_single_digit_is_scalar_dataset(tmp_path: Path) -> None:
    path = tmp_path / "digitStruct.mat"
    write_digitstruct(
        path, [Record("1.png", [[1, 2, 5, 9]], [0]), Record("2.png", [[1, 2, 5, 9], [6, 2, 9, 9]], [3, 0])]
    )
    with h5py.File(path, "r") as f:
        one = f[f["digitStruct/bbox"][0, 0]]
        assert one["label"].shape == (1, 1) and one["label"][0, 0] == 10.0
        two = f[f["digitStruct/bbox"][1, 0]]
        assert h5py.check_dtype(ref=two["label"].dtype) is not None and two["label"].shape == (2, 1)
        assert f[two["label"][1, 0]][0, 0] == 10.0
        assert f[two["width"][0, 0]][0, 0] == 4.0


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "digitStruct.mat"
    with pytest.raises(LipdetError, match="digitStruct.mat not found") as e:
        read_digitstruct(path)
    assert str(path) in e.value.message and e.value.exit_code == 2


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "digitStruct.mat"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(LipdetError) as e:
        read_digitstruct(path)
    assert str(path) in e.value.message and "\n" not in e.value.message and e.value.exit_code == 2


def test_hdf5_without_digitstruct(tmp_path: Path) -> None:
    path = tmp_path / "digitStruct.mat"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(LipdetError, match="corrupt digitStruct.mat") as e:
        read_digitstruct(path)
    assert str(path) in e.value.message


def test_bad_field_shape(tmp_path: Path) -> None:
    """A referenced digit field holding two numbers instead of one is refused, not misread."""
    path = tmp_path / "digitStruct.mat"
    write_matlab_like(path, MATLAB_RECORDS)
    with h5py.File(path, "r+") as f:
        g = f[f["digitStruct/bbox"][0, 0]]
        ref = g["left"][0, 0]
        target = f[ref].name
        del f[target]
        f[target] = np.array([[1.0, 2.0]])
    with pytest.raises(LipdetError, match="corrupt") as e:
        read_digitstruct(path)
    assert str(path) in e.value.message


def test_bad_label(tmp_path: Path) -> None:
    path = tmp_path / "digitStruct.mat"
    write_matlab_like(path, [("1.png", [(11, 1, 1, 3, 3)])])
    with pytest.raises(LipdetError, match="labels must be integers 0-10"):
        read_digitstruct(path)
