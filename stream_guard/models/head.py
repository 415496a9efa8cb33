"""Policy compiler: a policy becomes an ONNX classification head. No retraining of the encoder.

SafeVision-style policy following with text-only in-context examples. Each category's
definition and positive examples, embedded by the encoder's text tower, become *prototypes*;
its hard negatives plus the policy's benign ``safe_examples`` become *counter-prototypes*.
The text evidence for category c is the margin

    m_c(x) = max_k cos(x, P_ck) - max_j cos(x, N_cj)

is one feature of a per-category logistic regression whose other features are the embedding
itself, fitted on the policy's own texts (examples, hard negatives, safe examples; margins
leave-one-out) plus any labelled data (``stream-guard head train``). Image evidence is the
strongest detector signal the category lists. The category score is max(text, image); an
upload without text gets no text score.

Graph (opset 17), inputs TEXT_EMBEDDING [B, D] and IMAGE_SIGNALS [B, S], output SCORES [B, C].
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..policy import IMAGE_SIGNALS, Policy

Embed = Callable[[Sequence[str]], np.ndarray]
OPSET = 17
PAD_BIAS = -4.0  # cosine >= -1, so a padded prototype never wins the max


@dataclass(frozen=True)
class Calibration:
    slope: float
    intercept: float
    n_pos: int
    n_neg: int


@dataclass
class CompiledHead:
    policy_id: str
    policy_version: str
    codes: list[str]
    onnx_model: onnx.ModelProto
    calibration: dict[str, Calibration] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.onnx_model.SerializeToString()

    def metadata(self) -> dict[str, object]:
        return {
            "policy_id": self.policy_id,
            "policy_version": self.policy_version,
            "codes": self.codes,
            "calibration": {c: vars(k) for c, k in self.calibration.items()},
        }


def _normalise(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return (m / np.maximum(norms, 1e-12)).astype(np.float32)


def _fit_linear_head(
    x: np.ndarray,
    margins: np.ndarray,
    y: np.ndarray,
    *,
    l2: float = 1e-3,
    pos_weight: float = 3.0,
    iters: int = 1500,
    lr: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-category logistic regression on [embedding, prototype margin], full-batch descent.

    Returns (W [D, C], slope [C], intercept [C]). Positives are up-weighted but the classes are
    not balanced: unsafe uploads are rare, and a balanced prior would push benign text to 0.5.
    """
    n, d = x.shape
    n_cat = y.shape[1]
    w = np.zeros((d, n_cat))
    a = np.ones(n_cat)
    b = np.full(n_cat, -3.0)
    weights = np.where(y > 0, pos_weight, 1.0)
    weights /= weights.mean(axis=0, keepdims=True)
    for _ in range(iters):
        z = x @ w + a * margins + b
        g = (1.0 / (1.0 + np.exp(-z)) - y) * weights / n
        w -= lr * (x.T @ g + l2 * w)
        a -= lr * ((g * margins).sum(axis=0) + l2 * a)
        b -= lr * g.sum(axis=0)
    return w.astype(np.float32), np.maximum(a, 0.0).astype(np.float32), b.astype(np.float32)


def compile_head(
    policy: Policy,
    embed: Embed,
    *,
    extra_texts: Sequence[str] = (),
    extra_labels: np.ndarray | None = None,
) -> CompiledHead:
    """Compile ``policy`` into an ONNX head using ``embed`` (the served text tower).

    ``extra_texts`` / ``extra_labels`` [n, C] add labelled data (``stream-guard head train``) to
    the policy's own examples; without them the head is built from the policy alone.
    """
    codes = policy.codes
    n_cat = len(codes)
    safe = list(policy.safe_examples)
    rows: list[str] = list(safe)
    labels: list[set[str]] = [set() for _ in safe]
    for cat in policy.categories:
        for t in (cat.definition, *cat.examples):
            rows.append(t)
            labels.append({cat.code})
        for t in cat.negative_examples:
            rows.append(t)
            labels.append(set())
    for n, t in enumerate(extra_texts):
        rows.append(t)
        flags = extra_labels[n] if extra_labels is not None else np.zeros(n_cat)
        labels.append({c for c, f in zip(codes, flags, strict=True) if f})
    unique = list(dict.fromkeys(rows))
    vectors = _normalise(np.asarray(embed(unique), dtype=np.float32))
    index = {t: i for i, t in enumerate(unique)}
    row_idx = np.array([index[t] for t in rows])
    x = vectors[row_idx]
    y = np.array([[c in lab for c in codes] for lab in labels], dtype=np.float64)

    pos_sets, neg_sets = [], []
    margins = np.zeros((len(rows), n_cat))
    for c, cat in enumerate(policy.categories):
        pos_idx = np.array([index[t] for t in dict.fromkeys((cat.definition, *cat.examples))])
        neg_texts = list(dict.fromkeys([*cat.negative_examples, *safe]))
        neg_idx = np.array([index[t] for t in neg_texts], dtype=int)
        pos_sets.append(vectors[pos_idx])
        neg_sets.append(vectors[neg_idx] if len(neg_idx) else np.zeros((1, x.shape[1]), np.float32))
        # Leave-one-out: a training row never matches its own prototype.
        pos_sim = np.where(row_idx[:, None] == pos_idx[None], -2.0, x @ vectors[pos_idx].T)
        if len(neg_idx):
            neg_sim = np.where(row_idx[:, None] == neg_idx[None], -2.0, x @ vectors[neg_idx].T)
            margins[:, c] = pos_sim.max(axis=1) - neg_sim.max(axis=1)
        else:
            margins[:, c] = pos_sim.max(axis=1)
    w, slopes, intercepts = _fit_linear_head(x.astype(np.float64), margins, y)
    calib = {
        code: Calibration(
            float(slopes[c]), float(intercepts[c]), int(y[:, c].sum()), int(len(y) - y[:, c].sum())
        )
        for c, code in enumerate(codes)
    }
    model = _build_graph(
        pos_sets,
        neg_sets,
        slopes=slopes,
        intercepts=intercepts,
        signal_map=_signal_matrix(policy),
        trained_weights=w,
        trained_bias=np.zeros(n_cat, np.float32),
    )
    model.metadata_props.add(
        key="stream_guard.policy",
        value=json.dumps(
            {
                "policy_id": policy.policy_id,
                "policy_version": policy.effective_version,
                "codes": codes,
            }
        ),
    )
    return CompiledHead(policy.policy_id, policy.effective_version, codes, model, calib)


def _signal_matrix(policy: Policy) -> np.ndarray:
    g = np.zeros((len(IMAGE_SIGNALS), len(policy.categories)), np.float32)
    for c, cat in enumerate(policy.categories):
        for name in cat.image_signals:
            g[IMAGE_SIGNALS.index(name), c] = 1.0
    return g


def _stack_padded(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """[C][K_c, D] -> transposed prototypes [D, C*K] and a bias [C*K] masking the padding."""
    k = max(len(s) for s in sets)
    dim = sets[0].shape[1]
    protos = np.zeros((len(sets), k, dim), np.float32)
    bias = np.full((len(sets), k), PAD_BIAS, np.float32)
    for c, s in enumerate(sets):
        protos[c, : len(s)] = s
        bias[c, : len(s)] = 0.0
    return protos.reshape(-1, dim).T.copy(), bias.reshape(-1), k


def _build_graph(
    pos_sets: list[np.ndarray],
    neg_sets: list[np.ndarray],
    *,
    slopes: np.ndarray,
    intercepts: np.ndarray,
    signal_map: np.ndarray,
    trained_weights: np.ndarray,
    trained_bias: np.ndarray,
) -> onnx.ModelProto:
    n_cat = len(pos_sets)
    dim = pos_sets[0].shape[1]
    pos_t, pos_b, k_pos = _stack_padded(pos_sets)
    neg_t, neg_b, k_neg = _stack_padded(neg_sets)
    inits = [
        numpy_helper.from_array(pos_t, "pos_protos"),
        numpy_helper.from_array(pos_b, "pos_bias"),
        numpy_helper.from_array(neg_t, "neg_protos"),
        numpy_helper.from_array(neg_b, "neg_bias"),
        numpy_helper.from_array(np.array([-1, n_cat, k_pos], np.int64), "pos_shape"),
        numpy_helper.from_array(np.array([-1, n_cat, k_neg], np.int64), "neg_shape"),
        numpy_helper.from_array(slopes.astype(np.float32), "slopes"),
        numpy_helper.from_array(intercepts.astype(np.float32), "intercepts"),
        numpy_helper.from_array(trained_weights.astype(np.float32), "trained_w"),
        numpy_helper.from_array(trained_bias.astype(np.float32), "trained_b"),
        numpy_helper.from_array(signal_map[None].astype(np.float32), "signal_map"),
        numpy_helper.from_array(np.array(0.25, np.float32), "min_norm2"),
    ]
    n = helper.make_node
    nodes = [
        n("MatMul", ["TEXT_EMBEDDING", "pos_protos"], ["pos_sim"]),
        n("Add", ["pos_sim", "pos_bias"], ["pos_sim_b"]),
        n("Reshape", ["pos_sim_b", "pos_shape"], ["pos_sim_3d"]),
        n("ReduceMax", ["pos_sim_3d"], ["pos_max"], axes=[2], keepdims=0),
        n("MatMul", ["TEXT_EMBEDDING", "neg_protos"], ["neg_sim"]),
        n("Add", ["neg_sim", "neg_bias"], ["neg_sim_b"]),
        n("Reshape", ["neg_sim_b", "neg_shape"], ["neg_sim_3d"]),
        n("ReduceMax", ["neg_sim_3d"], ["neg_max"], axes=[2], keepdims=0),
        n("Sub", ["pos_max", "neg_max"], ["margin"]),
        n("Mul", ["margin", "slopes"], ["margin_scaled"]),
        n("Add", ["margin_scaled", "intercepts"], ["proto_logit"]),
        n("MatMul", ["TEXT_EMBEDDING", "trained_w"], ["trained_logit_raw"]),
        n("Add", ["trained_logit_raw", "trained_b"], ["trained_logit"]),
        n("Add", ["proto_logit", "trained_logit"], ["logit"]),
        n("Sigmoid", ["logit"], ["text_prob_raw"]),
        # An upload without text sends a zero embedding: it gets no text score.
        n("ReduceSumSquare", ["TEXT_EMBEDDING"], ["norm2"], axes=[1], keepdims=1),
        n("Greater", ["norm2", "min_norm2"], ["has_text"]),
        n("Cast", ["has_text"], ["has_text_f"], to=TensorProto.FLOAT),
        n("Mul", ["text_prob_raw", "has_text_f"], ["text_prob"]),
        n("Unsqueeze", ["IMAGE_SIGNALS", "unsq_axes"], ["signals_3d"]),
        n("Mul", ["signals_3d", "signal_map"], ["signals_mapped"]),
        n("ReduceMax", ["signals_mapped"], ["image_prob"], axes=[1], keepdims=0),
        n("Max", ["text_prob", "image_prob"], ["SCORES"]),
    ]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "unsq_axes"))
    graph = helper.make_graph(
        nodes,
        "guard_head",
        [
            helper.make_tensor_value_info("TEXT_EMBEDDING", TensorProto.FLOAT, ["batch", dim]),
            helper.make_tensor_value_info(
                "IMAGE_SIGNALS", TensorProto.FLOAT, ["batch", len(IMAGE_SIGNALS)]
            ),
        ],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["batch", n_cat])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
