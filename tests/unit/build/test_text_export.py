"""A Hugging Face text encoder and a sequence classifier exported as the guard's text tower.

Tiny random-initialised BERT and RoBERTa checkpoints (with real WordPiece / BPE tokenizers)
are saved to disk, exported by the code `stream-guard model export --kind text` runs, and
compared with PyTorch run text by text (no padding), so batching and padding are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the `export` extra (torch, transformers) is not installed")

from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from stream_guard.build import text_export as tx  # noqa: E402
from stream_guard.build.text_encoder import ExportedTower, served_tower  # noqa: E402
from stream_guard.cli.app import app  # noqa: E402
from stream_guard.policy.compiler import compile_head, tower_layout  # noqa: E402
from stream_guard.policy.model import parse_policy  # noqa: E402

TOLERANCE = 1e-4
TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog and the dog does not mind at all",
    "a",
    "I will find you after school",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "bert": tx.save_tiny_text_checkpoint("bert", root / "bert"),
        "roberta": tx.save_tiny_text_checkpoint("roberta", root / "roberta", seed=1),
        "toxic": tx.save_tiny_text_checkpoint(
            "bert", root / "toxic", classifier_labels=["toxic", "insult"], seed=2
        ),
    }


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    out = {}
    for family in ("bert", "roberta"):
        dest = tmp_path_factory.mktemp(f"{family}-onnx")
        signals = [str(checkpoints["toxic"])] if family == "roberta" else []
        report = tx.export_text_tower(checkpoints[family], dest, signals=signals)
        out[family] = (dest, report)
    return out


def _torch_embedding(src: Path, text: str, prefix: str = "") -> np.ndarray:
    """sentence-transformers' recipe, one text at a time: mean over tokens, L2 normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()
    enc = tok(prefix + text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state[0]
    mean = hidden.mean(0)
    return (mean / mean.norm()).numpy()


def _torch_probs(src: Path, text: str) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():
        return torch.sigmoid(model(**tok(text, return_tensors="pt")).logits[0]).numpy()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_exported_encoder_matches_pytorch_text_by_text(checkpoints, exported, family):
    directory, report = exported[family]
    assert report.model_type == family and report.embed_dim == 32
    assert max(report.max_abs_error.values()) < TOLERANCE
    tower = ExportedTower(directory)
    got = tower.embed(TEXTS)[:, : report.embed_dim]  # batched and padded together
    want = np.stack([_torch_embedding(checkpoints[family], t) for t in TEXTS])
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_a_sequence_classifier_becomes_named_text_signals(checkpoints, exported):
    directory, report = exported["roberta"]
    assert tx.signal_names(report) == ["toxic:toxic", "toxic:insult"]
    assert report.signals[0].activation == "sigmoid"  # a multi-label classifier
    tower = ExportedTower(directory)
    assert tower.signals == ["toxic:toxic", "toxic:insult"] and tower.dim == 34
    got = tower.embed(TEXTS)[:, 32:]
    want = np.stack([_torch_probs(checkpoints["toxic"], t) for t in TEXTS])
    np.testing.assert_allclose(got, want, atol=TOLERANCE)


def test_a_text_prefix_is_part_of_what_is_embedded(checkpoints, tmp_path):
    report = tx.export_text_tower(checkpoints["bert"], tmp_path, prefix="query: ")
    got = ExportedTower(tmp_path).embed(["hello world"])[0]
    want = _torch_embedding(checkpoints["bert"], "hello world", prefix="query: ")
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    assert report.prefix == "query: "


def _config_json(path: Path) -> dict:
    """The config as Triton's get_model_config(as_json=True) returns it."""
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {"config": json_format.MessageToDict(config, preserving_proto_field_name=True)}


def test_written_tower_tells_the_compiler_its_width_and_signals(exported, tmp_path):
    directory, report = exported["roberta"]
    repo = tmp_path / "repo"
    assert tx.write_text_tower(directory, repo) == "text_encoder"
    version = repo / "text_encoder" / "1"
    for name in ("model.py", "model.onnx", "tokenizer.json", "signals/toxic.onnx"):
        assert (version / name).is_file(), name
    listed = json.loads((version / tx.SIGNALS_FILE).read_text())["signals"]
    assert [s["name"] for s in listed] == ["toxic"]
    layout = tower_layout(_config_json(repo / "text_encoder" / "config.pbtxt"))
    assert (layout.width, layout.dim) == (34, 32)
    assert layout.text_signals == ("toxic:toxic", "toxic:insult")

    # what a repository build compiles heads with: the served tower, read back
    embed, signals = served_tower(repo)
    assert signals == ["toxic:toxic", "toxic:insult"] and embed(["hi"]).shape == (1, 34)
    policy = parse_policy(
        """
policy_id: tiny
version: "1"
safe_examples: ["a walk in the park", "hello world"]
categories:
  - code: T
    name: Toxicity
    definition: insults and toxic language aimed at a person
    examples: ["you are a worthless idiot"]
    text_signals: ["toxic:insult"]
"""
    )
    head = compile_head(policy, embed, text_signals=signals)
    assert head.onnx_model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 34


def test_gpu_flavour_refuses_an_exported_text_tower_with_a_reason(exported, tmp_path):
    from stream_guard.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu flavour"):
        tx.write_text_tower(exported["bert"][0], tmp_path, flavour="gpu")


def test_cli_exports_a_text_tower_into_a_repository(checkpoints, tmp_path):
    out, repo = tmp_path / "out", tmp_path / "repo"
    result = CliRunner().invoke(
        app,
        [
            "model",
            "export",
            str(checkpoints["bert"]),
            "--out",
            str(out),
            "--signals",
            str(checkpoints["toxic"]),
            "--repository",
            str(repo),
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["report"]["kind"] == "text"  # --kind auto: a BERT is a text encoder
    assert printed["text_signals"] == ["toxic:toxic", "toxic:insult"]
    assert (repo / "text_encoder" / "1" / "model.onnx").is_file()

    missing = CliRunner().invoke(app, ["model", "export", str(tmp_path / "nope"), "--out", "x"])
    assert missing.exit_code == 1 and "export failed" in missing.stderr
