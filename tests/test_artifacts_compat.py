"""Artifacts written before the redesign still load, and an unknown version is a one-line refusal.

``tests/fixtures/v0.1-main/`` holds a checkpoint and its exported ONNX (sll-spectral, width 1/8,
32 px, untrained) written by lipdet's main branch before the one-way-stages redesign (commit
b4246d7), with that commit's own code. Keep them: they are the compatibility contract.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch

from lipdet.artifacts import CARD_KEY, load_checkpoint, load_model
from lipdet.errors import LipdetError

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1-main"


def test_old_checkpoint_loads_and_builds_its_model():
    ckpt = load_checkpoint(FIXTURES / "model.pt")
    assert ckpt.config.arch == "sll-spectral" and ckpt.config.input_size == 32
    model = load_model(FIXTURES / "model.pt")
    loc, logits = model(torch.rand(2, 3, 32, 32))
    assert loc.shape[0] == 2 and logits.shape[:2] == loc.shape[:2]


def test_old_onnx_evaluates_attacks_and_certifies(tiny_svhn):
    from lipdet.deploy.backends import load_backend
    from lipdet.deploy.twin import check_twin, load_twin
    from lipdet.eval.evaluate import EvalSettings, evaluate

    backend = load_backend(FIXTURES / "model.onnx")
    assert backend.card.model.arch == "sll-spectral" and backend.precision == "fp32"
    x = torch.rand(4, 3, 32, 32)
    assert check_twin(load_twin(FIXTURES / "model.onnx"), backend, x) < 1e-4
    result = evaluate(FIXTURES / "model.onnx", data=tiny_svhn,
                      settings=EvalSettings(pgd=True, steps=2, certify=True, limit=4, batch_size=4))
    assert result.summary["backend"]["has_card"] and result.summary["certify"]["objects"] > 0


def test_unknown_card_version_is_one_line(tmp_path):
    from lipdet.deploy.backends import load_backend

    model = onnx.load(str(FIXTURES / "model.onnx"))
    for p in model.metadata_props:
        if p.key == CARD_KEY:
            p.value = p.value.replace('"version": 1', '"version": 99')
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(LipdetError, match=r"model card version 99 .* is not one this lipdet"):
        load_backend(tmp_path / "future.onnx")


def test_unknown_checkpoint_version_is_one_line(tmp_path):
    obj = torch.load(FIXTURES / "model.pt", weights_only=True)
    obj["version"] = 7
    torch.save(obj, tmp_path / "model.pt")
    with pytest.raises(LipdetError, match="checkpoint version 7") as e:
        load_checkpoint(tmp_path / "model.pt")
    assert "\n" not in e.value.message
    shutil.rmtree(tmp_path)
