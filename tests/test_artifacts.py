import os

import pytest
import torch

from lipdet.artifacts import load_checkpoint, load_model, save_checkpoint
from lipdet.errors import LipdetError
from lipdet.io import atomic_path
from lipdet.runs import latest_model, mark_latest, new_run_name


class _Evil:
    """Unpickling this would run a shell command; weights_only=True must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/lipdet-pwned",))


def test_checkpoint_round_trip(tmp_path):
    from lipdet.models import build_model

    model = build_model("sll-l2", width=0.25)
    path = save_checkpoint(tmp_path / "model.pt", model, {"epochs": 3})
    back = load_model(path)
    assert back.config == model.config
    assert load_checkpoint(path).meta == {"epochs": 3}
    x = torch.rand(2, 3, 74, 74)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(x), back(x)):
            torch.testing.assert_close(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp files left


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "checkpoint not found"),
        (lambda p: p.write_bytes(b"\x00garbage" * 100), "not a readable torch checkpoint"),
        (lambda p: torch.save({"weights": torch.zeros(2)}, p), "not a lipdet checkpoint"),
        (lambda p: torch.save({"x": _Evil()}, p), "refused to load (weights_only=True)"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, make, message):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(LipdetError) as err:
        load_checkpoint(path)
    assert message in err.value.message
    assert "\n" not in err.value.message
    assert err.value.exit_code == 2
    assert not os.path.exists("/tmp/lipdet-pwned")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_gives_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_atomic_path_unwritable_folder(tmp_path):
    with pytest.raises(LipdetError, match="does not exist"):
        with atomic_path(tmp_path / "missing" / "x.onnx"):
            pass


def test_latest_run_pointer(tmp_path):
    with pytest.raises(LipdetError, match="lipdet train --workers 2"):
        latest_model(tmp_path)
    run = tmp_path / new_run_name("naive", tmp_path)
    run.mkdir()
    (run / "model.pt").write_bytes(b"x")
    mark_latest(run)
    assert latest_model(tmp_path) == run / "model.pt"
