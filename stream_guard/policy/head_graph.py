"""The compiled head's arithmetic twice: in numpy (to train it) and as the ONNX graph Triton serves.

Both compute the same features from a *bank*: the head's training texts embedded by the served
text tower (``vectors`` [N, D]) with their labels [N, C], and per category the rows that are its
positive and negative prototypes. For an embedding e (cosines, since both sides are L2-normalised):

- ``pos`` / ``neg`` [C]: the mean of the top ``TOP_PROTOS`` cosines with the category's positive /
  negative prototypes (a mean, not a max, so one stray prototype does not decide);
- ``near`` / ``far`` [C]: label votes of the ``K_NEAR`` / ``K_FAR`` nearest bank rows, weighted by
  softmax(cosine / ``VOTE_TEMPERATURE``) (a kNN estimate of P(category | text));
- ``others`` [C]: the mean of the top ``TOP_PROTOS`` cosines with bank rows *not* labelled with
  the category: what a category written in words is contrasted with.

Trained categories take ``mlp([e, pos, neg, near, far, text signals])`` (one ReLU hidden layer) as
their raw score; categories with too little labelled data take ``pos - others`` (the *words*
path). A per-category piecewise-linear map (``apply_maps``) turns the raw score into a logit:
knees at the raw scores calibration put on the allow and block thresholds, gentler slopes beyond
them so the tails never saturate to 0 or 1 (scores stay rankable after verdicts round them).
Text scores are zeroed for an all-zero embedding (an upload without text); each category's
score is the maximum of its text score, the text signals it lists and the image signals it
lists.

Graph (opset 17): TEXT_EMBEDDING [B, D + S_text] (the text tower's embedding, then any text
signals it serves), IMAGE_SIGNALS [B, S_image] -> SCORES [B, C].
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "Bank",
    "Features",
    "HeadParams",
    "apply_maps",
    "K_FAR",
    "K_NEAR",
    "OPSET",
    "PAD",
    "TOP_PROTOS",
    "VOTE_TEMPERATURE",
    "bank_features",
    "build_graph",
    "head_scores",
    "mlp_logits",
    "mlp_inputs",
]

OPSET = 17
PAD = -4.0  # added to a masked cosine (>= -1): it never counts as a real neighbour
TOP_PROTOS = 3
FEATURE_CHUNK = 1024  # rows whose bank similarities are held at once while compiling
K_NEAR = 20
K_FAR = 50
VOTE_TEMPERATURE = 0.1
MIN_TEXT_NORM2 = 0.25  # a real embedding has norm 1; an upload without text sends zeros


@dataclass
class Bank:
    """Embedded training rows and, per category, the indices of its prototype rows."""

    vectors: np.ndarray  # [N, D], L2-normalised
    labels: np.ndarray  # [N, C] in {0, 1}
    pos: list[np.ndarray]  # per category: indices into vectors
    neg: list[np.ndarray]

    def subset(self, keep: np.ndarray) -> Bank:
        """The bank restricted to rows ``keep`` (bool [N]); prototypes follow their rows."""
        new_index = np.cumsum(keep) - 1

        def remap(idx: np.ndarray) -> np.ndarray:
            return new_index[idx[keep[idx]]] if len(idx) else idx

        return Bank(
            self.vectors[keep],
            self.labels[keep],
            [remap(i) for i in self.pos],
            [remap(i) for i in self.neg],
        )


@dataclass
class Features:
    pos: np.ndarray  # [B, C]
    neg: np.ndarray
    near: np.ndarray
    far: np.ndarray
    others: np.ndarray


def _top_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Mean of the top-k entries over the last axis, counting only real (unpadded) ones."""
    k = min(k, sims.shape[-1])
    top = -np.partition(-sims, k - 1, axis=-1)[..., :k] if k else sims[..., :0]
    valid = top > PAD / 2
    return (top * valid).sum(-1) / np.maximum(valid.sum(-1), 1)


def _votes(sims: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, sims.shape[1])
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sims, idx, 1) / VOTE_TEMPERATURE
    w = np.exp(top - top.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("bk,bkc->bc", w, labels[idx])


def _gathered(sims: np.ndarray, sets: list[np.ndarray]) -> np.ndarray:
    """[B, N] cosines -> [B, C, K] cosines with each category's set, padded with PAD."""
    k = max([len(s) for s in sets] + [1])
    out = np.full((len(sims), len(sets), k), PAD, np.float32)
    for c, s in enumerate(sets):
        out[:, c, : len(s)] = sims[:, s]
    return out


def bank_features(
    bank: Bank, e: np.ndarray, exclude: np.ndarray | None = None, words: bool = True
) -> Features:
    """Features of embeddings ``e`` [B, D]; ``exclude`` [B] (bank row of each text, -1 for none)
    leaves a text's own row out, so training rows look like unseen texts. Computed in chunks
    of FEATURE_CHUNK rows: the [B, N] similarities of a whole pack against itself would take
    hundreds of MB in the worker that compiles a head."""
    if len(e) > FEATURE_CHUNK:
        parts = [
            bank_features(
                bank,
                e[i : i + FEATURE_CHUNK],
                None if exclude is None else exclude[i : i + FEATURE_CHUNK],
                words,
            )
            for i in range(0, len(e), FEATURE_CHUNK)
        ]
        return Features(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Features))
        )
    sims = e.astype(np.float32) @ bank.vectors.T.astype(np.float32)
    if exclude is not None:
        rows = np.nonzero(exclude >= 0)[0]
        sims[rows, exclude[rows]] = PAD
    pos = _top_mean(_gathered(sims, bank.pos), TOP_PROTOS)
    neg = _top_mean(_gathered(sims, bank.neg), TOP_PROTOS)
    near = _votes(sims, bank.labels, K_NEAR)
    far = _votes(sims, bank.labels, K_FAR)
    others = np.zeros_like(pos)
    if words:
        for c in range(bank.labels.shape[1]):
            others[:, c] = _top_mean(sims + PAD * bank.labels[None, :, c], TOP_PROTOS)
    return Features(pos, neg, near, far, others)


def mlp_inputs(e: np.ndarray, f: Features, signals: np.ndarray) -> np.ndarray:
    return np.hstack([e, f.pos, f.neg, f.near, f.far, signals]).astype(np.float32)


def mlp_logits(x: np.ndarray, w1, b1, w2, b2) -> np.ndarray:
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def apply_maps(maps: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Raw scores [B, C] -> logits through each category's piecewise-linear map [6, C]."""
    z_allow, z_block, logit_allow, lo, mid, top = maps
    d = raw - z_allow
    return (
        logit_allow
        + lo * np.minimum(d, 0.0)
        + mid * np.clip(d, 0.0, z_block - z_allow)
        + top * np.maximum(raw - z_block, 0.0)
    )


@dataclass
class HeadParams:
    """Everything the graph holds. ``trained`` [C] selects the MLP logit, else the words path."""

    bank: Bank
    n_text_signals: int
    trained: np.ndarray  # [C] bool
    maps: np.ndarray  # [6, C]: ScoreMap fields per category (training.MAP_FIELDS order)
    mlp: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    image_map: np.ndarray  # [S_image, C]
    text_map: np.ndarray  # [S_text, C]

    @property
    def dim(self) -> int:
        return int(self.bank.vectors.shape[1])

    @property
    def n_categories(self) -> int:
        return int(self.bank.labels.shape[1])


def head_scores(p: HeadParams, text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """What the graph computes, in numpy (the reference the graph is tested against)."""
    e, sig = text[:, : p.dim], text[:, p.dim :]
    f = bank_features(p.bank, e, words=not p.trained.all())
    raw = f.pos - f.others
    if p.mlp is not None:
        raw = np.where(p.trained, mlp_logits(mlp_inputs(e, f, sig), *p.mlp), raw)
    logit = apply_maps(p.maps, raw)
    has_text = (np.square(e).sum(axis=1, keepdims=True) > MIN_TEXT_NORM2).astype(np.float64)
    prob = has_text / (1.0 + np.exp(-logit))
    for signals, mapping in ((sig, p.text_map), (image, p.image_map)):
        if mapping.shape[0]:
            prob = np.maximum(prob, (signals[:, :, None] * mapping[None]).max(axis=1))
    return prob.astype(np.float32)


# -- the ONNX graph ------------------------------------------------------------------------------


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, array: np.ndarray, name: str, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def top(self, x: str, k: int, name: str) -> tuple[str, str]:
        vals, idx = self.op("TopK", [x, self.const(np.array([k]), name, np.int64)], 2, axis=-1)
        return vals, idx

    def top_mean(self, sims3d: str, k: int, name: str) -> str:
        vals, _ = self.top(sims3d, k, name)
        valid = self.op("Cast", [self.op("Greater", [vals, "half_pad"])], to=TensorProto.FLOAT)
        total = self.op("ReduceSum", [self.op("Mul", [vals, valid]), "last_axis"], keepdims=0)
        count = self.op("ReduceSum", [valid, "last_axis"], keepdims=0)
        return self.op("Div", [total, self.op("Max", [count, "one"])])


def _padded_set(g: _Graph, e: str, p: HeadParams, sets: list[np.ndarray], name: str) -> str:
    """[B, C] top-k mean cosine with each category's prototype set."""
    k = max([len(s) for s in sets] + [1])
    n_cat, dim = p.n_categories, p.dim
    protos = np.zeros((n_cat, k, dim), np.float32)
    bias = np.full((n_cat, k), PAD, np.float32)
    for c, s in enumerate(sets):
        protos[c, : len(s)] = p.bank.vectors[s]
        bias[c, : len(s)] = 0.0
    sims = g.op("MatMul", [e, g.const(protos.reshape(-1, dim).T, f"{name}_protos")])
    sims = g.op("Add", [sims, g.const(bias.reshape(-1), f"{name}_bias")])
    shape = g.const(np.array([-1, n_cat, k]), f"{name}_shape", np.int64)
    return g.top_mean(g.op("Reshape", [sims, shape]), min(TOP_PROTOS, k), f"{name}_k")


def _votes_graph(g: _Graph, sims: str, p: HeadParams) -> tuple[str, str]:
    n = len(p.bank.vectors)
    far_k, near_k = min(K_FAR, n), min(K_NEAR, n)
    vals, idx = g.top(sims, far_k, "far_k")
    labels = g.const(p.bank.labels, "bank_labels")
    out = []
    for k in (near_k, far_k):
        v = vals
        i = idx
        if k < far_k:
            start, end = (
                g.const(np.array([0]), "near_s", np.int64),
                g.const(np.array([k]), "near_e", np.int64),
            )
            axis = g.const(np.array([1]), "near_a", np.int64)
            v = g.op("Slice", [vals, start, end, axis])
            i = g.op("Slice", [idx, start, end, axis])
        w = g.op("Softmax", [g.op("Mul", [v, "inv_temp"])], axis=1)
        w3 = g.op("Unsqueeze", [w, "axis_2"])
        gathered = g.op("Gather", [labels, i], axis=0)  # [B, k, C]
        out.append(g.op("ReduceSum", [g.op("Mul", [gathered, w3]), "axis_1"], keepdims=0))
    return out[0], out[1]


def _others_graph(g: _Graph, sims: str, p: HeadParams) -> str:
    """[B, C] top-k mean cosine with bank rows not labelled with each category."""
    mask = (PAD * p.bank.labels.T).astype(np.float32)  # [C, N]
    sims3d = g.op("Add", [g.op("Unsqueeze", [sims, "axis_1"]), g.const(mask, "others_mask")])
    return g.top_mean(sims3d, min(TOP_PROTOS, len(p.bank.vectors)), "others_k")


def _raw_score(g: _Graph, e: str, sig: str | None, p: HeadParams) -> str:
    pos = _padded_set(g, e, p, p.bank.pos, "pos")
    sims = g.op("MatMul", [e, g.const(p.bank.vectors.T, "bank_t")])
    margin = None
    if not p.trained.all():
        margin = g.op("Sub", [pos, _others_graph(g, sims, p)])
    if p.mlp is None:
        assert margin is not None
        return margin
    neg = _padded_set(g, e, p, p.bank.neg, "neg")
    near, far = _votes_graph(g, sims, p)
    x = g.op("Concat", [e, pos, neg, near, far, *([sig] if sig else [])], axis=1)
    w1, b1, w2, b2 = p.mlp
    hidden = g.op("Add", [g.op("MatMul", [x, g.const(w1, "mlp_w1")]), g.const(b1, "mlp_b1")])
    h = g.op("Relu", [hidden])
    mlp = g.op("Add", [g.op("MatMul", [h, g.const(w2, "mlp_w2")]), g.const(b2, "mlp_b2")])
    if margin is None:
        return mlp
    return g.op("Where", [g.const(p.trained, "trained", np.bool_), mlp, margin])


def _mapped(g: _Graph, raw: str, maps: np.ndarray) -> str:
    """``apply_maps`` as nodes: L + lo*d + (mid - lo)*relu(d) + (top - mid)*relu(raw - z_block)."""
    z_allow, z_block, logit_allow, lo, mid, top = maps
    d = g.op("Sub", [raw, g.const(z_allow, "map_z_allow")])
    above_block = g.op("Relu", [g.op("Sub", [raw, g.const(z_block, "map_z_block")])])
    terms = [
        g.op("Mul", [d, g.const(lo, "map_lo")]),
        g.op("Mul", [g.op("Relu", [d]), g.const(mid - lo, "map_mid")]),
        g.op("Mul", [above_block, g.const(top - mid, "map_top")]),
    ]
    out = g.const(logit_allow, "map_logit_allow")
    for t in terms:
        out = g.op("Add", [out, t])
    return out


def _signal_max(g: _Graph, signals: str, mapping: np.ndarray, name: str) -> str:
    s3 = g.op("Unsqueeze", [signals, "axis_2"])
    return g.op(
        "ReduceMax", [g.op("Mul", [s3, g.const(mapping[None], name)])], axes=[1], keepdims=0
    )


def build_graph(p: HeadParams, n_image_signals: int) -> onnx.ModelProto:
    g = _Graph()
    for name, value, dtype in (
        ("half_pad", PAD / 2, np.float32),
        ("one", 1.0, np.float32),
        ("inv_temp", 1.0 / VOTE_TEMPERATURE, np.float32),
        ("min_norm2", MIN_TEXT_NORM2, np.float32),
        ("last_axis", [-1], np.int64),
        ("axis_1", [1], np.int64),
        ("axis_2", [2], np.int64),
    ):
        g.const(np.array(value), name, dtype)
    e, sig = "TEXT_EMBEDDING", None
    if p.n_text_signals:
        width = p.dim + p.n_text_signals
        axis = g.const(np.array([1]), "split_axis", np.int64)
        e = g.op(
            "Slice",
            [
                "TEXT_EMBEDDING",
                g.const(np.array([0]), "e_s", np.int64),
                g.const(np.array([p.dim]), "e_e", np.int64),
                axis,
            ],
        )
        sig = g.op(
            "Slice",
            [
                "TEXT_EMBEDDING",
                g.const(np.array([p.dim]), "s_s", np.int64),
                g.const(np.array([width]), "s_e", np.int64),
                axis,
            ],
        )
    prob = g.op("Sigmoid", [_mapped(g, _raw_score(g, e, sig, p), p.maps)])
    norm2 = g.op("ReduceSumSquare", [e], axes=[1], keepdims=1)
    has_text = g.op("Cast", [g.op("Greater", [norm2, "min_norm2"])], to=TensorProto.FLOAT)
    score = g.op("Mul", [prob, has_text])
    if sig is not None and p.text_map.any():
        score = g.op("Max", [score, _signal_max(g, sig, p.text_map, "text_map")])
    score = g.op("Max", [score, _signal_max(g, "IMAGE_SIGNALS", p.image_map, "image_map")])
    g.nodes.append(helper.make_node("Identity", [score], ["SCORES"]))
    width = p.dim + p.n_text_signals
    graph = helper.make_graph(
        g.nodes,
        "guard_head",
        [
            helper.make_tensor_value_info("TEXT_EMBEDDING", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info(
                "IMAGE_SIGNALS", TensorProto.FLOAT, ["batch", n_image_signals]
            ),
        ],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["batch", p.n_categories])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
