"""The typed artifact contracts: ModelCard and PlanSidecar read and write their JSON, and nothing else does.

Cards and sidecars round-trip exactly; the card written by the pre-redesign main (the v0.1-main
fixture) loads into a ModelCard and writes back the same JSON object; an unknown version, a
missing field or a field of the wrong type is a one-line LipdetError that names the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import onnx
import pytest
import torch

from lipdet.artifacts import (
    CARD_KEY,
    LayerBound,
    LipschitzBounds,
    ModelCard,
    PlanSidecar,
    ScaleBound,
    Source,
    TensorRTInfo,
    TrainingData,
    load_checkpoint,
    save_checkpoint,
)
from lipdet.errors import LipdetError
from lipdet.export.tensorrt import make_sidecar
from lipdet.models import build_model, fold_model
from lipdet.models.lipschitz import head_bounds, layer_table
from lipdet.postprocess import PostprocessConfig

FIXTURE = Path(__file__).parent / "fixtures" / "v0.1-main" / "model.onnx"
SIZE = 32
# Every key the export of the current main writes into a card (the fixture's layout).
EXPORT_KEYS = {"format", "version", "lipdet_version", "model", "input", "outputs", "class_names", "priors",
               "variances", "precision", "int8_flavour", "data", "postprocess", "lipschitz", "source",
               "validation", "parity", "opset"}
SIDECAR_KEYS = {"format", "version", "lipdet_version", "built_at", "tensorrt", "gpu", "compute_capability",
                "precision", "int8_flavour", "profile", "max_batch", "input_size", "source_onnx", "workspace_bytes",
                "timing_cache", "parity"}


def d_of(card: ModelCard) -> dict:
    """The card's JSON object as written."""
    return json.loads(card.to_json())


def _fixture_card_text() -> str:
    model = onnx.load(str(FIXTURE), load_external_data=False)
    return next(p.value for p in model.metadata_props if p.key == CARD_KEY)


@pytest.fixture(scope="module")
def folded():
    torch.manual_seed(0)
    return fold_model(build_model("sll-l2", width=0.125, input_size=SIZE).eval())


@pytest.fixture(scope="module")
def full_card(folded) -> ModelCard:
    """A card with every field an export writes, plus per-layer bounds, a ``val`` split and a TensorRT note."""
    bounds = LipschitzBounds.from_heads(head_bounds(folded))
    layers = tuple(LayerBound(name=r.name, norm=float(r.norm), cumulative=float(r.cumulative), measured=float(r.measured))
                   for r in layer_table(folded))
    return ModelCard.for_model(
        folded, precision="int8", int8_flavour="u8u8-asymmetric",
        data=TrainingData(root="/data/svhn", synthetic=False, val={"seed": 0, "count": 400, "from": "train"}),
        postprocess=PostprocessConfig(score_threshold=0.25, iou_threshold=0.3, top_k=10),
        lipschitz=dataclasses.replace(bounds, per_layer=layers),
        source=Source(checkpoint="/runs/r1/model.pt", sha256="ab" * 32),
        validation={"split": "test", "images": 8, "fp32": {"map_50": 0.5, "map": 0.25}},
        parity={"fold": {"rel": 1e-7, "cosine": 1.0, "max_abs": 1e-6}}, opset=18,
        tensorrt=TensorRTInfo(tensorrt="10.9.0.34", gpu="NVIDIA H100", compute_capability="9.0", precision="int8"),
    )


# ----------------------------------------------------------------------------------------------
# ModelCard


def test_card_round_trips_through_json(full_card, folded):
    back = ModelCard.from_json(full_card.to_json(), source="test")
    assert back == full_card
    assert back.to_json() == full_card.to_json()
    assert isinstance(back.lipschitz.per_scale[0], ScaleBound) and len(back.lipschitz.per_layer) > 0
    # head_bounds' measured lower estimates travel beside every bound
    heads = head_bounds(folded)
    assert back.lipschitz.cls_measured == heads["cls_measured"] and back.lipschitz.cls_measured <= back.lipschitz.cls
    assert back.lipschitz.per_scale[0].loc_measured == heads["per_scale"][0]["loc_measured"]
    assert d_of(back)["lipschitz"]["per_scale"][0] == heads["per_scale"][0]
    assert back.data.val == {"seed": 0, "count": 400, "from": "train"}
    assert back.thresholds() == PostprocessConfig(0.25, 0.3, 10)
    d = json.loads(full_card.to_json())
    assert set(d) == EXPORT_KEYS | {"tensorrt"}
    assert d["postprocess"] == {"score_threshold": 0.25, "iou_threshold": 0.3, "top_k": 10, "variances": [0.1, 0.2]}
    assert d["input"] == {"name": "images", "shape": ["N", 3, SIZE, SIZE], "range": [0.0, 1.0],
                          "normalisation": "x - 0.5, inside the graph"}


def test_minimal_card_defaults(folded):
    card = ModelCard.for_model(folded)
    assert card.precision == "fp32" and card.lipschitz is None and card.thresholds() == PostprocessConfig()
    assert ModelCard.from_json(card.to_json()) == card
    assert card.priors == folded.prior_spec and card.model == folded.config


def test_fixture_card_from_the_pre_redesign_main_loads_typed():
    text = _fixture_card_text()
    card = ModelCard.from_json(text, source=str(FIXTURE))
    assert card.model.arch == "sll-spectral" and card.model.input_size == 32 and card.model.width == 0.125
    assert card.priors.feature_sizes == (8, 4, 2, 1) and card.variances == (0.1, 0.2)
    assert card.data == TrainingData(root="/tmp/fixdata", synthetic=True)
    assert card.lipschitz.cls == max(s.cls for s in card.lipschitz.per_scale)
    assert [s.tap for s in card.lipschitz.per_scale] == ["fire8", "fire9", "fire10", "conv12_2"]
    assert card.source.sha256 and card.opset == 18 and card.validation["images"] == 8
    assert json.loads(card.to_json()) == json.loads(text)  # written back: the very same JSON object
    assert set(json.loads(text)) == EXPORT_KEYS


def test_checkpoint_card_is_typed_and_carries_the_val_split(tmp_path):
    model = build_model("naive", width=0.125, input_size=SIZE).eval()
    data = {"root": str(tmp_path), "synthetic": True, "val": {"seed": 0, "count": 4, "from": "train"}}
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "model.pt", model, meta={"data": data}))
    card = ckpt.card(ckpt.build_model())
    assert isinstance(card, ModelCard) and card.source == Source(checkpoint=str((tmp_path / "model.pt").resolve()))
    assert card.data.to_dict() == data


def _refused(obj: dict, match: str) -> str:
    with pytest.raises(LipdetError, match=match) as e:
        ModelCard.from_json(json.dumps(obj), source="m.onnx")
    assert "\n" not in e.value.message and e.value.message.startswith("m.onnx: ")
    return e.value.message


def test_unknown_card_version_is_one_line():
    obj = json.loads(_fixture_card_text())
    obj["version"] = 2
    _refused(obj, r"model card version 2 \(written by lipdet 0.1.0\) is not one this lipdet")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("priors"), r"model card field 'priors' is missing"),
        (lambda c: c["model"].pop("input_size"), r"field 'model.input_size' is missing"),
        (lambda c: c["model"].update(input_size="32"), r"field 'model.input_size' should be an integer, got a string"),
        (lambda c: c["model"].update(arch="resnet"), r"field 'model' is not a valid model config \(unknown arch 'resnet'"),
        (lambda c: c["priors"].update(scales=[0.1, "x"]), r"field 'priors.scales' should hold only numbers, item 1 is a string"),
        (lambda c: c.update(variances=[0.1, 0.2, 0.3]), r"field 'variances' should hold 2 numbers"),
        (lambda c: c["lipschitz"]["per_scale"][1].update(loc=None), r"field 'lipschitz.per_scale\[1\].loc' is missing"),
        (lambda c: c["lipschitz"]["per_scale"][2].update(tap=3), r"field 'lipschitz.per_scale\[2\].tap' should be a string"),
        (lambda c: c["data"].update(synthetic="yes"), r"field 'data.synthetic' should be true/false"),
        (lambda c: c["postprocess"].update(top_k=2.5), r"field 'postprocess.top_k' should be an integer, got a number"),
        (lambda c: c.update(source=["a"]), r"field 'source' should be an object, got a list"),
        (lambda c: c.update(precision=16), r"field 'precision' should be a string"),
    ],
)
def test_malformed_card_is_one_line_naming_the_field(change, message):
    obj = copy.deepcopy(json.loads(_fixture_card_text()))
    change(obj)
    _refused(obj, message)


def test_malformed_card_in_an_onnx_is_refused_by_the_backend(tmp_path):
    from lipdet.deploy.backends import load_backend

    model = onnx.load(str(FIXTURE))
    for p in model.metadata_props:
        if p.key == CARD_KEY:
            obj = json.loads(p.value)
            del obj["model"]["num_classes"]
            p.value = json.dumps(obj)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(LipdetError, match=r"bad.onnx: model card field 'model.num_classes' is missing") as e:
        load_backend(tmp_path / "bad.onnx")
    assert "\n" not in e.value.message


def test_foreign_or_broken_card_json():
    with pytest.raises(LipdetError, match="not valid JSON"):
        ModelCard.from_json("{nope")
    with pytest.raises(LipdetError, match="not a lipdet model card"):
        ModelCard.from_json(json.dumps({"format": "other"}))


# ----------------------------------------------------------------------------------------------
# PlanSidecar


ENV = {"tensorrt": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture()
def sidecar(tmp_path) -> PlanSidecar:
    return make_sidecar(env=ENV, precision="int8", int8_flavour="s8s8-symmetric", input_name="images", input_size=SIZE,
                        min_batch=1, opt_batch=16, max_batch=64, onnx_path=tmp_path / "model.onnx", onnx_sha256="cd" * 32,
                        workspace_bytes=1 << 30, timing_cache=None, parity={"rel": 1e-3, "cosine": 0.9999})


def test_sidecar_round_trips(sidecar, tmp_path):
    plan = tmp_path / "model.plan"
    assert sidecar.write(plan) == tmp_path / "model.plan.json"
    back = PlanSidecar.read(plan)
    assert back == sidecar and back.to_json() == sidecar.to_json()
    d = json.loads((tmp_path / "model.plan.json").read_text())
    assert set(d) == SIDECAR_KEYS and d["profile"]["opt"] == [16, 3, SIZE, SIZE]
    assert d["source_onnx"] == {"path": str((tmp_path / "model.onnx").resolve()), "sha256": "cd" * 32}
    assert back.trt_info() == TensorRTInfo(tensorrt=ENV["tensorrt"], gpu=ENV["gpu"], compute_capability="9.0",
                                           precision="int8")


@pytest.mark.parametrize(
    "text, message",
    [
        ("\x00\x01garbage", "not valid JSON"),
        ("[1, 2]", "not a lipdet plan sidecar"),
        ('{"format": "lipdet-trt-plan", "tensorrt": "10"}', "sidecar is missing gpu, compute_capability"),
    ],
)
def test_sidecar_rejects_garbage_in_one_line(tmp_path, text, message):
    (tmp_path / "m.plan.json").write_text(text)
    with pytest.raises(LipdetError, match=message) as e:
        PlanSidecar.read(tmp_path / "m.plan")
    assert "\n" not in e.value.message


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(version=7), r"plan sidecar version 7 .* is not one this lipdet"),
        (lambda d: d.update(max_batch="64"), r"plan sidecar field 'max_batch' should be an integer, got a string"),
        (lambda d: d["profile"].update(min=[1, 3, "S", 32]), r"field 'profile.min' should hold only integers, item 2 is a string"),
        (lambda d: d["source_onnx"].pop("sha256"), r"field 'source_onnx.sha256' is missing"),
        (lambda d: d.pop("gpu"), r"sidecar is missing gpu"),
    ],
)
def test_malformed_sidecar_is_one_line_naming_the_field(sidecar, tmp_path, change, message):
    d = json.loads(sidecar.to_json())
    change(d)
    (tmp_path / "m.plan.json").write_text(json.dumps(d))
    with pytest.raises(LipdetError, match=message) as e:
        PlanSidecar.read(tmp_path / "m.plan")
    assert "\n" not in e.value.message
