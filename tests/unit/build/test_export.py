"""`stream-guard model export` on tiny random-initialised CLIP and SigLIP checkpoints (no hub).

The checkpoints go through the same loading code a hub id takes (``from_pretrained`` on a
directory holding config.json, weights and preprocessor_config.json). Tolerance: 1e-4 absolute
on L2-normalised embeddings and on the image-text logits (float32 ONNX vs float32 PyTorch;
measured errors are around 1e-6).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the `export` extra (torch, transformers) is not installed")
pytest.importorskip("transformers", reason="the `export` extra is not installed")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from stream_guard.build import export as ex  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["clip", "siglip"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = ex.save_tiny_checkpoint(request.param, root / "checkpoint")
    report = ex.export_dual_encoder(src, root / "onnx")
    return request.param, src, root / "onnx", report


def test_export_matches_pytorch_within_tolerance(exported):
    kind, _, _, report = exported
    assert report.kind == kind
    assert report.opset >= 17
    assert set(report.max_abs_error) == {"image_embedding", "text_embedding", "scores"}
    assert max(report.max_abs_error.values()) < TOLERANCE, report.max_abs_error


def test_export_detects_the_family_from_the_checkpoint(exported):
    kind, src, _, _ = exported
    assert ex.detect_kind(str(src)) == kind


def test_exported_towers_take_any_batch_size_and_text_length(exported):
    import onnxruntime as ort

    _, src, out, report = exported
    model, _ = ex.load_dual_encoder(str(src))
    prep = ex.load_preprocessing(str(src), model, report.kind)
    image = ort.InferenceSession(str(out / ex.IMAGE_FILE), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / ex.TEXT_FILE), providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 3), (5, 12)):
        images, ids, mask = ex.random_inputs(report, batch=batch, seq=seq, seed=batch)
        ref = ex.torch_reference(model, prep, images, ids, mask)
        (img,) = image.run(["EMBEDDING"], {"IMAGE": images})
        (txt,) = text.run(["EMBEDDING"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
        assert img.shape == (batch, report.embed_dim)
        assert np.abs(img - ref["image"]).max() < TOLERANCE
        assert np.abs(txt - ref["text"]).max() < TOLERANCE
        assert np.abs(ex.scores(report, img, txt) - ref["scores"]).max() < TOLERANCE
        assert np.allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)


def test_export_report_records_preprocessing_and_scores(exported):
    kind, _, out, report = exported
    saved = json.loads((out / ex.REPORT_FILE).read_text())
    assert saved["logit_scale"] == pytest.approx(10.0, rel=1e-5)
    assert saved["logit_bias"] == pytest.approx(-2.5 if kind == "siglip" else 0.0)
    assert saved["preprocessing"]["image_size"] == 32
    assert saved["preprocessing"]["image_mean"] == list(ex._DEFAULT_NORM[kind][0])


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_tower_configs_parse_and_carry_the_onnx_tensor_names(exported, tmp_path, flavour):
    import onnx

    kind, _, out, report = exported
    names = ex.write_towers(out, tmp_path, flavour=flavour)
    assert names == {"image": f"{kind}_image_encoder", "text": f"{kind}_text_encoder"}
    for tower, name in names.items():
        cfg = text_format.Parse(
            (tmp_path / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        graph = onnx.load(str(tmp_path / name / "1" / "model.onnx")).graph
        assert [i.name for i in cfg.input] == [i.name for i in graph.input]
        assert [o.name for o in cfg.output] == [o.name for o in graph.output]
        assert list(cfg.output[0].dims) == [report.embed_dim]
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size > 0
        if flavour == "cpu":
            assert cfg.backend == "python"
            assert (tmp_path / name / "1" / "model.py").is_file()
        else:
            assert cfg.platform == "onnxruntime_onnx"
            assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        if tower == "image":
            assert list(cfg.input[0].dims) == [32, 32, 3]


def test_missing_processor_config_falls_back_to_family_defaults(tmp_path):
    src = ex.save_tiny_checkpoint("siglip", tmp_path / "ckpt")
    (src / "preprocessor_config.json").unlink()
    model, kind = ex.load_dual_encoder(str(src))
    prep = ex.load_preprocessing(str(src), model, kind)
    assert (prep.image_mean, prep.image_std) == ([0.5] * 3, [0.5] * 3)


def test_cli_export_writes_towers_and_reports_errors(tmp_path):
    from typer.testing import CliRunner

    from stream_guard.cli.app import app

    src = ex.save_tiny_checkpoint("clip", tmp_path / "ckpt")
    result = CliRunner().invoke(
        app,
        [
            "model",
            "export",
            str(src),
            "--out",
            str(tmp_path / "onnx"),
            "--repository",
            str(tmp_path / "repo"),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["models"]["text"] == "clip_text_encoder"
    assert max(payload["report"]["max_abs_error"].values()) < TOLERANCE
    assert (tmp_path / "repo" / "clip_image_encoder" / "1" / "model.onnx").is_file()
