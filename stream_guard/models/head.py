"""Policy compiler: a policy becomes an ONNX classification head. No retraining of the encoder.

SafeVision-style policy following with text-only in-context examples. Each category's
definition and positive examples, embedded by the encoder's text tower, become *prototypes*;
its hard negatives plus the policy's benign ``safe_examples`` become *counter-prototypes*.
The text evidence for category c is the margin

    m_c(x) = max_k cos(x, P_ck) - max_j cos(x, N_cj)

calibrated per category into a probability with a 1-D logistic fit on leave-one-out margins
of the policy's own examples. An optional trained linear term (``stream-guard head train``)
adds to the logit. Image evidence is the strongest detector signal the category lists. The
category score is max(text, image); an upload without text gets no text score.

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


def _fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-2) -> tuple[float, float]:
    """1-D logistic regression by Newton's method, slope kept positive (margin up = risk up)."""
    a, b = 10.0, 0.0
    pos_w = 0.5 / max(y.sum(), 1)
    neg_w = 0.5 / max((1 - y).sum(), 1)
    w = np.where(y > 0, pos_w, neg_w)  # balance classes: the policy has few positives
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(a * x + b)))
        g = np.array([np.sum(w * (p - y) * x) + l2 * a, np.sum(w * (p - y))])
        s = w * p * (1 - p)
        h = np.array([[np.sum(s * x * x) + l2, np.sum(s * x)], [np.sum(s * x), np.sum(s) + 1e-9]])
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-6:
            break
    return max(float(a), 1.0), float(b)


def _max_sim(x: np.ndarray, protos: np.ndarray, exclude_self: np.ndarray | None = None) -> np.ndarray:
    sims = x @ protos.T
    if exclude_self is not None:
        sims[exclude_self] = -2.0
    return sims.max(axis=1)


def _loo_margins(
    pos: np.ndarray, neg: np.ndarray, x: np.ndarray, x_in_pos: list[int], x_in_neg: list[int]
) -> np.ndarray:
    """Margins of x against (pos, neg), leaving out each row's own prototype."""
    pos_mask = np.zeros((len(x), len(pos)), dtype=bool)
    neg_mask = np.zeros((len(x), len(neg)), dtype=bool)
    for row, idx in enumerate(x_in_pos):
        if idx >= 0:
            pos_mask[row, idx] = True
    for row, idx in enumerate(x_in_neg):
        if idx >= 0:
            neg_mask[row, idx] = True
    return _max_sim(x, pos, pos_mask) - _max_sim(x, neg, neg_mask)


def compile_head(
    policy: Policy,
    embed: Embed,
    *,
    trained_weights: np.ndarray | None = None,
    trained_bias: np.ndarray | None = None,
) -> CompiledHead:
    """Compile ``policy`` into an ONNX head using ``embed`` (the served text tower)."""
    codes = policy.codes
    n_cat = len(codes)
    texts: list[str] = list(policy.safe_examples)
    for cat in policy.categories:
        texts += [cat.definition, *cat.examples, *cat.negative_examples]
    unique = list(dict.fromkeys(texts))
    vectors = _normalise(np.asarray(embed(unique), dtype=np.float32))
    index = {t: i for i, t in enumerate(unique)}
    dim = vectors.shape[1]

    def rows(items: Sequence[str]) -> np.ndarray:
        return vectors[[index[t] for t in items]] if items else np.zeros((0, dim), np.float32)

    safe = list(policy.safe_examples)
    pos_sets, neg_sets, calib = [], [], {}
    for cat in policy.categories:
        pos_texts = [cat.definition, *cat.examples]
        neg_texts = list(dict.fromkeys([*cat.negative_examples, *safe]))
        pos, neg = rows(pos_texts), rows(neg_texts)
        if len(neg) == 0:
            neg = np.zeros((1, dim), np.float32)  # no contrast: margin = max cosine
        others = [e for o in policy.categories if o.code != cat.code for e in o.examples]
        others = [t for t in dict.fromkeys(others) if t not in pos_texts and t not in neg_texts]
        x_texts = list(cat.examples) + neg_texts + others
        y = np.array([1.0] * len(cat.examples) + [0.0] * (len(neg_texts) + len(others)))
        in_pos = [pos_texts.index(t) for t in cat.examples] + [-1] * (len(neg_texts) + len(others))
        in_neg = [-1] * len(cat.examples) + list(range(len(neg_texts))) + [-1] * len(others)
        margins = _loo_margins(pos, neg, rows(x_texts), in_pos, in_neg)
        slope, intercept = _fit_logistic(margins, y)
        calib[cat.code] = Calibration(slope, intercept, int(y.sum()), int(len(y) - y.sum()))
        pos_sets.append(pos)
        neg_sets.append(neg)

    model = _build_graph(
        pos_sets,
        neg_sets,
        slopes=np.array([calib[c].slope for c in codes], np.float32),
        intercepts=np.array([calib[c].intercept for c in codes], np.float32),
        signal_map=_signal_matrix(policy),
        trained_weights=trained_weights
        if trained_weights is not None
        else np.zeros((dim, n_cat), np.float32),
        trained_bias=trained_bias if trained_bias is not None else np.zeros(n_cat, np.float32),
    )
    model.metadata_props.add(key="stream_guard.policy", value=json.dumps(
        {"policy_id": policy.policy_id, "policy_version": policy.effective_version, "codes": codes}
    ))
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
