"""What the worker and the repository need around the image head: tower preprocessing as the
Hugging Face processors do it, the export description Triton carries, image-head versions in
both repository flavours, and the policy digest following example images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from stream_guard.errors import ConfigError
from stream_guard.media.decode import TowerInput, preprocess_for_tower
from stream_guard.policy.image_head import TowerSpace, compile_image_head
from stream_guard.policy.image_heads import repository_flavour, write_image_head
from stream_guard.policy.model import parse_policy
from stream_guard.triton import ImageGuard, ServedTower, _export_info
from tests.unit.test_image_head import POLICY, embed_texts

SIZES = [(37, 91), (120, 64), (32, 32), (301, 300)]


@pytest.mark.parametrize(("h", "w"), SIZES)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tower_input_matches_the_hugging_face_processor(kind, h, w):
    transformers = pytest.importorskip("transformers", reason="the `export` extra is missing")
    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "clip":
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        tower = TowerInput(32, "shortest_edge", 3)
    else:
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
        tower = TowerInput(32, "squash", 3)
    want = processor(images=rgb, return_tensors="np")["pixel_values"][0]
    mean = np.array(processor.image_mean).reshape(3, 1, 1)
    std = np.array(processor.image_std).reshape(3, 1, 1)
    got = preprocess_for_tower(rgb, tower)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    ours = (got.transpose(2, 0, 1) / 255.0 - mean) / std
    # uint8 rounding of the resized pixels is the only difference: half a grey level
    assert np.abs(ours - want).max() <= 0.51 / 255 / min(processor.image_std) + 1e-6


@pytest.mark.parametrize(
    "bad", [dict(size=0), dict(size=8, resize="stretch"), dict(size=8, resample=9)]
)
def test_tower_input_refuses_what_no_processor_does(bad):
    with pytest.raises(ValueError):
        TowerInput(**bad)


def _served(tmp_path, kind: str = "siglip") -> dict[str, str]:
    pytest.importorskip("torch", reason="the `export` extra (torch, transformers) is missing")
    from stream_guard.build import export as ex
    from tests.tiny_dual_encoder import save_tokenizer

    src = ex.save_tiny_checkpoint(kind, tmp_path / "ckpt")
    save_tokenizer(src)
    ex.export_dual_encoder(src, tmp_path / "onnx", verify=False)
    return ex.write_towers(tmp_path / "onnx", tmp_path / "repo")


def _config(tmp_path, name: str) -> dict:
    cfg = text_format.Parse(
        (tmp_path / "repo" / name / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    return {"config": json_format.MessageToDict(cfg, preserving_proto_field_name=True)}


def test_the_worker_reads_preprocessing_and_identity_from_the_served_config(tmp_path):
    names = _served(tmp_path)
    assert set(names) == {"image", "text", "text_tokenizer", "text_embedder"}
    image = _export_info(names["image"], _config(tmp_path, names["image"]))
    text = _export_info(names["text_embedder"], _config(tmp_path, names["text_embedder"]))
    assert (image["tower"], text["tower"]) == ("image", "text")
    assert image["embed_dim"] == text["embed_dim"] and image["source"] == text["source"]
    guard = ImageGuard(ServedTower(names["image"], "1", image), ServedTower("t", "1", text))
    assert guard.tower_input() == TowerInput(32, "squash", 3)
    assert guard.logit_scale == pytest.approx(10.0)
    assert names["image"] in guard.fingerprint and len(image["sha256"]) == 64


def test_the_tokenizer_step_pads_like_the_model_was_trained(tmp_path):
    names = _served(tmp_path)
    params = _config(tmp_path, names["text_tokenizer"])["config"]["parameters"]
    values = {k: v["string_value"] for k, v in params.items()}
    # SigLIP pools its last position: every text is padded to the full length, no mask; the
    # pad id is the checkpoint's (its text config says 1; the tokenizer names none).
    assert values == {
        "max_length": "64",
        "padding": "max_length",
        "pad_id": "1",
        "attention": "ones",
    }
    ensemble = _config(tmp_path, names["text_embedder"])["config"]
    steps = [s["model_name"] for s in ensemble["ensemble_scheduling"]["step"]]
    assert steps == [names["text_tokenizer"], names["text"]]


def test_a_config_without_the_export_description_is_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="stream-guard model export --repository"):
        _export_info("some_model", {"config": {"parameters": {}}})


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_image_head_versions_are_written_for_either_flavour(tmp_path, flavour):
    head = compile_image_head(parse_policy(POLICY), embed_texts, TowerSpace(20.0, 9, "fp", {}))
    first = write_image_head(tmp_path, head, prefix="guard_image_head", flavour=flavour)
    second = write_image_head(tmp_path, head, prefix="guard_image_head", flavour=flavour)
    assert (first, second) == (1, 2)
    model = tmp_path / "guard_image_head_shapes"
    cfg = text_format.Parse((model / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [list(i.dims) for i in cfg.input] == [[9], [9]]
    assert list(cfg.output[0].dims) == ([2] if flavour == "gpu" else [-1])
    assert (model / "labels.txt").read_text().split() == ["red_triangle", "spam"]
    meta = json.loads((model / "2" / "policy.json").read_text())
    assert meta["towers"]["fingerprint"] == "fp" and meta["image_codes"] == ["red_triangle"]
    served = json.loads(cfg.parameters["stream_guard.image_heads"].string_value)
    assert set(served) == {"1", "2"} and served["2"]["towers"] == "fp"
    assert (model / "2" / "ENGINE_PENDING").exists() == (flavour == "gpu")
    assert (model / "2" / "model.py").exists() == (flavour == "cpu")


def test_the_repository_flavour_follows_its_text_heads(tmp_path):
    (tmp_path / "guard_head_x").mkdir()
    (tmp_path / "guard_head_x" / "config.pbtxt").write_text('platform: "tensorrt_plan"\n')
    assert repository_flavour(tmp_path) == "gpu"
    (tmp_path / "guard_head_x" / "config.pbtxt").write_text('backend: "python"\n')
    assert repository_flavour(tmp_path) == "cpu"


def test_replacing_an_example_image_changes_the_policy_version(tmp_path):
    text = POLICY.replace(
        "    image_negative_descriptions:",
        '    image_examples: ["a.png"]\n    image_negative_examples: ["b.png"]\n'
        "    image_negative_descriptions:",
    )
    (tmp_path / "a.png").write_bytes(b"one")
    (tmp_path / "b.png").write_bytes(b"two")
    before = parse_policy(text, base=tmp_path).effective_version
    (tmp_path / "a.png").write_bytes(b"three")
    assert parse_policy(text, base=tmp_path).effective_version != before


def test_verdicts_name_the_image_models_only_when_they_scored_the_upload():
    from stream_guard.events import UploadEvent, Verdict
    from stream_guard.pipeline.decide import decide
    from stream_guard.pipeline.records import Record
    from stream_guard.policy.model import IMAGE_SIGNALS

    policy = parse_policy(POLICY)
    upload = UploadEvent.model_validate({"upload_id": "u1", "text": {"caption": "x"}})
    record = Record(b"u1", upload.to_bytes(), "guard.uploads", 0, 1)
    signals = np.zeros(len(IMAGE_SIGNALS), np.float32)
    args = (record, upload, policy, ("guard_head_shapes", "1"), np.array([0.9, 0.0]))
    models = [("image_tower", "siglip_image_encoder", "1"), ("image_head", "h", "3")]
    named = decide(*args, signals=signals, signal_names=IMAGE_SIGNALS, image_models=models)
    plain = decide(*args, signals=signals, signal_names=IMAGE_SIGNALS)
    verdict = Verdict.model_validate_json(named.outputs[0].value)
    assert [(m.role, m.name, m.version) for m in verdict.image_models or []] == models
    assert b"image_models" not in plain.outputs[0].value
