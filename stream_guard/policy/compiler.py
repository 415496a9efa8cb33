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
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stream_guard.policy.model import IMAGE_SIGNALS, Policy
from stream_guard.policy.packs import PackRow, load_pack

__all__ = [
    "Calibration",
    "CompiledHead",
    "Embed",
    "OPSET",
    "PAD_BIAS",
    "compile_head",
    "head_texts",
]

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


# Prototypes per category taken from a pack's train split (bounded graph size).
MAX_PACK_POS = 150
MAX_PACK_NEG = 150
MAX_SHARED_NEG = 100
# Calibration targets on the pack's calib split: block precision, and the share of rows not
# labelled with a category that may reach its escalation band (per category: over 14 categories
# this keeps a benign-heavy mix near 5 % escalated).
BLOCK_PRECISION = 0.9
NEG_ESCALATE_SHARE = 0.004
MIN_CALIB_POSITIVES = 8


@dataclass
class _Data:
    """Training rows and the prototype sets of each category."""

    rows: list[str]
    labels: list[set[str]]
    pos: list[list[str]]
    neg: list[list[str]]


def _gather(
    policy: Policy, train: Sequence[PackRow], extra: Sequence[tuple[str, set[str]]]
) -> _Data:
    codes = policy.codes
    safe = list(policy.safe_examples)
    rows: list[str] = list(safe)
    labels: list[set[str]] = [set() for _ in safe]
    pos, neg = [], []
    shared = [r.text for r in train if not r.labels and not _owner(r.id, codes)][:MAX_SHARED_NEG]
    for cat in policy.categories:
        for t in (cat.definition, *cat.examples):
            rows.append(t)
            labels.append({cat.code})
        rows += cat.negative_examples
        labels += [set() for _ in cat.negative_examples]
        mine = [r for r in train if _owner(r.id, codes) == cat.code]
        pack_pos = [r.text for r in train if cat.code in r.labels][:MAX_PACK_POS]
        pack_neg = [r.text for r in mine if not r.labels][:MAX_PACK_NEG]
        pos.append(list(dict.fromkeys([cat.definition, *cat.examples, *pack_pos])))
        neg.append(list(dict.fromkeys([*cat.negative_examples, *safe, *pack_neg, *shared])))
    for r in train:
        rows.append(r.text)
        labels.append(set(r.labels))
    for t, lab in extra:
        rows.append(t)
        labels.append(lab)
    return _Data(rows, labels, pos, neg)


def _owner(row_id: str, codes: Sequence[str]) -> str | None:
    """The category whose file a pack row came from (ids look like ``S1-n-001``)."""
    head = row_id.split("-", 1)[0]
    return head if head in codes else None


def _margins(x, row_idx, pos_idx, neg_idx, vectors) -> np.ndarray:
    # Leave-one-out: a training row never matches its own prototype.
    pos_sim = np.where(row_idx[:, None] == pos_idx[None], -2.0, x @ vectors[pos_idx].T)
    if not len(neg_idx):
        return pos_sim.max(axis=1)
    neg_sim = np.where(row_idx[:, None] == neg_idx[None], -2.0, x @ vectors[neg_idx].T)
    return pos_sim.max(axis=1) - neg_sim.max(axis=1)


def compile_head(
    policy: Policy,
    embed: Embed,
    *,
    extra_texts: Sequence[str] = (),
    extra_labels: np.ndarray | None = None,
    use_pack: bool = True,
) -> CompiledHead:
    """Compile ``policy`` into an ONNX head using ``embed`` (the served text tower).

    The policy's own texts, its pack's train split (when it names a pack) and ``extra_texts``
    / ``extra_labels`` [n, C] (``stream-guard head train``) are the training data; the pack's
    calib split then sets each category's score scale so the policy's thresholds hit the
    calibration targets. Without a pack the head is built from the policy alone.
    """
    codes = policy.codes
    n_cat = len(codes)
    pack = load_pack(Path(policy.pack), codes) if (use_pack and policy.pack) else None
    train = pack.split("train") if pack else []
    calib = pack.split("calib") if pack else []
    extra = []
    for n, t in enumerate(extra_texts):
        flags = extra_labels[n] if extra_labels is not None else np.zeros(n_cat)
        extra.append((t, {c for c, f in zip(codes, flags, strict=True) if f}))
    data = _gather(policy, train, extra)
    unique = list(
        dict.fromkeys(
            [*data.rows, *[r.text for r in calib], *(t for s in (*data.pos, *data.neg) for t in s)]
        )
    )
    vectors = _normalise(np.asarray(embed(unique), dtype=np.float32))
    index = {t: i for i, t in enumerate(unique)}
    row_idx = np.array([index[t] for t in data.rows])
    x = vectors[row_idx]
    y = np.array([[c in lab for c in codes] for lab in data.labels], dtype=np.float64)
    pos_idx = [np.array([index[t] for t in s]) for s in data.pos]
    neg_idx = [np.array([index[t] for t in s], dtype=int) for s in data.neg]
    margins = np.stack(
        [_margins(x, row_idx, pos_idx[c], neg_idx[c], vectors) for c in range(n_cat)], axis=1
    )
    w, slopes, intercepts = _fit_linear_head(x.astype(np.float64), margins, y)
    if calib:
        cx = vectors[[index[r.text] for r in calib]]
        cidx = np.full(len(calib), -1)
        cm = np.stack(
            [_margins(cx, cidx, pos_idx[c], neg_idx[c], vectors) for c in range(n_cat)], axis=1
        )
        logits = cx @ w + slopes * cm + intercepts
        cy = np.array([[c in r.labels for c in codes] for r in calib])
        w, slopes, intercepts = _calibrate(policy, logits, cy, w, slopes, intercepts)
    calib_info = {
        code: Calibration(
            float(slopes[c]), float(intercepts[c]), int(y[:, c].sum()), int(len(y) - y[:, c].sum())
        )
        for c, code in enumerate(codes)
    }
    pos_sets = [vectors[i] for i in pos_idx]
    neg_sets = [vectors[i] if len(i) else np.zeros((1, x.shape[1]), np.float32) for i in neg_idx]
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
        key="stream_guard.policy.model",
        value=json.dumps(
            {
                "policy_id": policy.policy_id,
                "policy_version": policy.effective_version,
                "codes": codes,
            }
        ),
    )
    return CompiledHead(policy.policy_id, policy.effective_version, codes, model, calib_info)


def head_texts(policy: Policy, *, use_pack: bool = True) -> list[str]:
    """Every text ``compile_head`` may embed for ``policy`` (to embed them in one go)."""
    texts = list(policy.safe_examples)
    for cat in policy.categories:
        texts += [cat.definition, *cat.examples, *cat.negative_examples]
    if use_pack and policy.pack:
        pack = load_pack(Path(policy.pack), policy.codes)
        texts += [r.text for r in pack.rows if r.split != "heldout"]
    return list(dict.fromkeys(texts))


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def _operating_points(z: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(allow logit, block logit) for one category on calibration rows, or None without data."""
    if y.sum() < MIN_CALIB_POSITIVES or (~y).sum() < 20:
        return None
    order = np.argsort(-z)
    tp = np.cumsum(y[order])
    precision = tp / np.arange(1, len(z) + 1)
    ok = np.nonzero(precision >= BLOCK_PRECISION)[0]
    z_block = float(z[order][ok.max()]) if len(ok) else float(z.max()) + 1.0
    negatives = np.sort(z[~y])
    z_allow = float(negatives[int(np.ceil((1 - NEG_ESCALATE_SHARE) * len(negatives))) - 1])
    return min(z_allow, z_block - 0.5), z_block


def _calibrate(policy, logits, y, w, slopes, intercepts):
    """Per category, an affine map of the logit that puts the calibration split's operating
    points on the policy's thresholds: block precision >= BLOCK_PRECISION at ``block``, at most
    NEG_ESCALATE_SHARE of the category's negatives at or above ``allow``. Folded into the head's
    weights, so the graph is unchanged."""
    w, slopes, intercepts = w.copy(), slopes.copy(), intercepts.copy()
    for c, cat in enumerate(policy.categories):
        points = _operating_points(logits[:, c], y[:, c].astype(bool))
        if points is None:
            continue
        z_allow, z_block = points
        t = policy.thresholds_for(cat)
        a = (_logit(t.block) - _logit(t.allow)) / (z_block - z_allow)
        b = _logit(t.block) - a * z_block
        w[:, c] *= a
        slopes[c] *= a
        intercepts[c] = intercepts[c] * a + b
    return w, np.maximum(slopes, 0.0), intercepts


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
