"""Image evidence compiled from a policy: an ONNX head over a dual encoder's embedding space.

A category with ``image_descriptions`` is judged on images by an exported CLIP / SigLIP image
tower. Its descriptions (what a violating image shows, in words) embedded by the same model's
text tower are the *prototypes*; its ``image_negative_descriptions`` plus the policy's
``image_safe_descriptions`` are the *counter-prototypes*. For an embedding x and one modality,
the evidence is the log-odds the model itself gives between the two sets, at the temperature
(logit scale) it was trained with:

    z(x) = logsumexp_k(s cos(x, P_k)) - logsumexp_j(s cos(x, N_j))

i.e. sigmoid(z) is the zero-shot probability that x matches a violating description rather
than a benign one, which is calibrated by the contrastive training itself. Per category, four
modalities each give a probability sigmoid(a z + b):

* ``image``: the image embedding against the description prototypes;
* ``examples``: the image against few-shot example images (``image_examples`` against
  ``image_negative_examples`` of the category), embedded by the image tower;
* ``caption``: the upload's text, embedded by the dual encoder's text tower, against the
  descriptions (text evidence in the image's space);
* ``joint``: the normalised sum of caption and image embeddings against the descriptions. It
  is the caption-image interaction (ShieldVLM's implicit cross-modal case): because cosine is
  linear before normalisation, its margin adds the evidence of both, so an image that shows
  half of a description and a caption that says the other half match together although
  neither does alone.

The category's image score is the maximum of the four (a benign caption never hides a harmful
image, and the reverse). ``a`` and ``b`` start at (1, 0): the model's own temperature. With
labelled examples (``image_examples`` and ``image_negative_examples``, two or more of each) the
image modality's pair is fitted to them; with two or more descriptions and two or more benign
descriptions the caption modality's pair is fitted on the texts, leave-one-out. Categories
without image descriptions score 0 here: the text head (``compiler.py``) judges them.

Graph (opset 17, operators TensorRT parses): inputs IMAGE_EMBEDDING [B, E] and
CAPTION_EMBEDDING [B, E] (zeros for an upload without text), output IMAGE_SCORES [B, C].
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stream_guard.errors import ConfigError
from stream_guard.policy.model import Category, Policy

__all__ = [
    "CompiledImageHead",
    "EmbedImages",
    "EmbedTexts",
    "IMAGE_HEAD_INPUTS",
    "IMAGE_HEAD_OUTPUT",
    "MODALITIES",
    "Modality",
    "OPSET",
    "TowerSpace",
    "compile_image_head",
    "image_head_examples",
    "image_head_texts",
    "lse_margin",
]

OPSET = 17
IMAGE_HEAD_INPUTS = ("IMAGE_EMBEDDING", "CAPTION_EMBEDDING")
IMAGE_HEAD_OUTPUT = "IMAGE_SCORES"
MODALITIES = ("image", "examples", "caption", "joint")
PAD = -1.0e4  # added to a padded prototype's scaled similarity: exp() of it is exactly 0
MIN_FIT = 2  # labelled items per side before a modality's (a, b) is fitted

EmbedTexts = Callable[[Sequence[str]], np.ndarray]
EmbedImages = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class TowerSpace:
    """The embedding space a head is compiled in: which towers, and the model's temperature.

    ``fingerprint`` names the towers (model names, versions, a digest of the exported file):
    prototypes are only meaningful in the space they were embedded in, so a head compiled for
    other towers is recompiled, never served.
    """

    logit_scale: float
    embed_dim: int
    fingerprint: str
    models: dict[str, str] = field(default_factory=dict)  # role -> "name:version"


@dataclass(frozen=True)
class Modality:
    slope: float = 1.0
    intercept: float = 0.0
    fitted_on: int = 0  # labelled items the pair was fitted on (0: the model's temperature)


@dataclass
class CompiledImageHead:
    policy_id: str
    policy_version: str
    codes: list[str]
    image_codes: list[str]
    space: TowerSpace
    onnx_model: onnx.ModelProto
    calibration: dict[str, dict[str, Modality]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.onnx_model.SerializeToString()

    def metadata(self) -> dict[str, object]:
        return {
            "policy_id": self.policy_id,
            "policy_version": self.policy_version,
            "codes": self.codes,
            "image_codes": self.image_codes,
            "towers": asdict(self.space),
            "calibration": {
                code: {m: asdict(v) for m, v in mods.items()}
                for code, mods in self.calibration.items()
            },
        }


def _negatives(policy: Policy, cat: Category) -> list[str]:
    return list(dict.fromkeys([*cat.image_negative_descriptions, *policy.image_safe_descriptions]))


def image_head_texts(policy: Policy) -> list[str]:
    """Every text the image head embeds with the dual encoder's text tower."""
    texts: list[str] = []
    for cat in policy.categories:
        if cat.has_image_evidence:
            texts += [*cat.image_descriptions, *_negatives(policy, cat)]
    return list(dict.fromkeys(texts))


def image_head_examples(policy: Policy) -> list[str]:
    """Every example image (absolute path or s3:// URI) the image head embeds."""
    uris: list[str] = []
    for cat in policy.categories:
        uris += [*cat.image_examples, *cat.image_negative_examples]
    return list(dict.fromkeys(uris))


def _normalise(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    if m.ndim != 2:
        raise ConfigError(f"embeddings must be [n, dim], got shape {m.shape}")
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def _lse(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def lse_margin(x: np.ndarray, pos: np.ndarray, neg: np.ndarray, scale: float) -> np.ndarray:
    """z(x) of the module docstring for normalised rows ``x`` (numpy reference of the graph)."""
    return _lse(scale * x @ pos.T) - _lse(scale * x @ neg.T)


def _fit_affine(z: np.ndarray, y: np.ndarray, l2: float = 0.1, iters: int = 500) -> Modality:
    """1-D logistic regression sigmoid(a z + b) with an L2 pull towards (1, 0), the model's own
    temperature: a handful of examples refines the zero-shot calibration, never replaces it."""
    a, b = 1.0, 0.0
    n = len(z)
    weights = np.where(y > 0, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * z + b, -30, 30)))
        g = (p - y) * weights
        a -= 0.5 * (float((g * z).sum()) + l2 * (a - 1.0) / n)
        b -= 0.5 * (float(g.sum()) + l2 * b / n)
    return Modality(max(a, 1e-3), b, int(n))


def _caption_calibration(pos: np.ndarray, neg: np.ndarray, scale: float) -> Modality:
    """Leave-one-out margins of the category's own texts: each description against the others,
    each benign description likewise."""
    if len(pos) < MIN_FIT or len(neg) < MIN_FIT:
        return Modality()
    z, y = [], []
    for i in range(len(pos)):
        rest = np.delete(pos, i, axis=0)
        z.append(lse_margin(pos[i : i + 1], rest, neg, scale)[0])
        y.append(1.0)
    for j in range(len(neg)):
        rest = np.delete(neg, j, axis=0)
        z.append(lse_margin(neg[j : j + 1], pos, rest, scale)[0])
        y.append(0.0)
    return _fit_affine(np.array(z), np.array(y))


@dataclass
class _Sets:
    """Per category: normalised prototype sets (``None`` where the category has none)."""

    pos: list[np.ndarray | None]
    neg: list[np.ndarray | None]
    ex_pos: list[np.ndarray | None]
    ex_neg: list[np.ndarray | None]


def _sets(policy: Policy, embed_texts: EmbedTexts, embed_images: EmbedImages | None) -> _Sets:
    texts = image_head_texts(policy)
    vectors = _normalise(embed_texts(texts)) if texts else np.zeros((0, 1))
    index = {t: i for i, t in enumerate(texts)}
    uris = image_head_examples(policy)
    if uris and embed_images is None:
        raise ConfigError(
            f"policy {policy.policy_id} has example images but no image tower to embed them"
        )
    images = _normalise(embed_images(uris)) if uris and embed_images else np.zeros((0, 1))
    where = {u: i for i, u in enumerate(uris)}
    sets = _Sets([], [], [], [])
    for cat in policy.categories:
        if not cat.has_image_evidence:
            for s in (sets.pos, sets.neg, sets.ex_pos, sets.ex_neg):
                s.append(None)
            continue
        sets.pos.append(vectors[[index[t] for t in cat.image_descriptions]])
        sets.neg.append(vectors[[index[t] for t in _negatives(policy, cat)]])
        both = cat.image_examples and cat.image_negative_examples
        sets.ex_pos.append(images[[where[u] for u in cat.image_examples]] if both else None)
        sets.ex_neg.append(
            images[[where[u] for u in cat.image_negative_examples]] if both else None
        )
    return sets


def _calibrate(sets: _Sets, c: int, scale: float) -> dict[str, Modality]:
    pos, neg, ex_pos, ex_neg = sets.pos[c], sets.neg[c], sets.ex_pos[c], sets.ex_neg[c]
    assert pos is not None and neg is not None
    image = Modality()
    examples = Modality()
    if ex_pos is not None and ex_neg is not None:
        labelled = np.concatenate([ex_pos, ex_neg])
        y = np.r_[np.ones(len(ex_pos)), np.zeros(len(ex_neg))]
        if len(ex_pos) >= MIN_FIT and len(ex_neg) >= MIN_FIT:
            image = _fit_affine(lse_margin(labelled, pos, neg, scale), y)
            loo = [
                lse_margin(
                    labelled[i : i + 1],
                    np.delete(ex_pos, i, axis=0) if i < len(ex_pos) else ex_pos,
                    np.delete(ex_neg, i - len(ex_pos), axis=0) if i >= len(ex_pos) else ex_neg,
                    scale,
                )[0]
                for i in range(len(labelled))
            ]
            examples = _fit_affine(np.array(loo), y)
    return {
        "image": image,
        "examples": examples,
        "caption": _caption_calibration(pos, neg, scale),
        "joint": image,
    }


def compile_image_head(
    policy: Policy,
    embed_texts: EmbedTexts,
    space: TowerSpace,
    *,
    embed_images: EmbedImages | None = None,
) -> CompiledImageHead:
    """Compile the image categories of ``policy`` into an ONNX head in ``space``.

    ``embed_texts``: the dual encoder's text tower (as served); ``embed_images``: its image
    tower on example image URIs (needed only when the policy has example images).
    """
    image_codes = policy.image_codes
    if not image_codes:
        raise ConfigError(f"policy {policy.policy_id} has no category with image_descriptions")
    sets = _sets(policy, embed_texts, embed_images)
    dims = {s.shape[1] for s in sets.pos if s is not None}
    if dims != {space.embed_dim}:
        raise ConfigError(
            f"the text tower embeds in {sorted(dims)} dimensions, the image tower in "
            f"{space.embed_dim}: they are not the two towers of one dual encoder"
        )
    calibration = {
        code: _calibrate(sets, c, space.logit_scale)
        for c, code in enumerate(policy.codes)
        if code in image_codes
    }
    model = _Graph(space.embed_dim, space.logit_scale).build(policy, sets, calibration)
    model.metadata_props.add(
        key="stream_guard.policy.image_model",
        value=json.dumps(
            {
                "policy_id": policy.policy_id,
                "policy_version": policy.effective_version,
                "codes": policy.codes,
                "towers": space.fingerprint,
            }
        ),
    )
    return CompiledImageHead(
        policy.policy_id,
        policy.effective_version,
        policy.codes,
        image_codes,
        space,
        model,
        calibration,
    )


# -- the graph ---------------------------------------------------------------------------------


def _stack(sets: list[np.ndarray | None], dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[C][K_c, D] -> prototypes [D, C*K] and a bias [C*K] that masks padding (and categories
    without a set) out of the logsumexp."""
    k = max([len(s) for s in sets if s is not None] + [1])
    protos = np.zeros((len(sets), k, dim), np.float32)
    bias = np.full((len(sets), k), PAD, np.float32)
    for c, s in enumerate(sets):
        if s is not None:
            protos[c, : len(s)] = s
            bias[c, : len(s)] = 0.0
    return protos.reshape(-1, dim).T.copy(), bias.reshape(-1), k


class _Graph:
    def __init__(self, dim: int, scale: float) -> None:
        self.dim = dim
        self.scale = scale
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def lse(self, x: str, protos: str, bias: str, shape: str, out: str) -> str:
        """logsumexp over each category's prototypes of scale * x . p (+ the padding bias),
        as max + log(sum(exp(. - max))): ops every runtime and TensorRT parse."""
        sim = self.node("MatMul", [x, protos], f"{out}_sim")
        scaled = self.node("Mul", [sim, "scale"], f"{out}_scaled")
        biased = self.node("Add", [scaled, bias], f"{out}_biased")
        cube = self.node("Reshape", [biased, shape], f"{out}_3d")
        top = self.node("ReduceMax", [cube], f"{out}_max", axes=[2], keepdims=1)
        shifted = self.node("Sub", [cube, top], f"{out}_shift")
        exps = self.node("Exp", [shifted], f"{out}_exp")
        total = self.node("ReduceSum", [exps, "axis2"], f"{out}_sum", keepdims=0)
        logs = self.node("Log", [total], f"{out}_log")
        flat_top = self.node("Squeeze", [top, "axis2"], f"{out}_top")
        return self.node("Add", [flat_top, logs], out)

    def margin(self, x: str, pos: str, neg: str, out: str) -> str:
        p = self.lse(x, f"{pos}_protos", f"{pos}_bias", f"{pos}_shape", f"{out}_pos")
        n = self.lse(x, f"{neg}_protos", f"{neg}_bias", f"{neg}_shape", f"{out}_neg")
        return self.node("Sub", [p, n], out)

    def prototypes(self, name: str, sets: list[np.ndarray | None], n_cat: int) -> None:
        protos, bias, k = _stack(sets, self.dim)
        self.const(f"{name}_protos", protos)
        self.const(f"{name}_bias", bias)
        self.const(f"{name}_shape", np.array([-1, n_cat, k], np.int64))

    def probability(self, z: str, modality: str, mask: list[str]) -> str:
        scaled = self.node("Mul", [z, f"{modality}_slope"], f"{modality}_az")
        logit = self.node("Add", [scaled, f"{modality}_intercept"], f"{modality}_logit")
        p = self.node("Sigmoid", [logit], f"{modality}_p_raw")
        for m in mask:
            p = self.node("Mul", [p, m], f"{modality}_p_{m}")
        return p

    def unit(self, x: str, out: str) -> str:
        sq = self.node("ReduceSumSquare", [x], f"{out}_sq", axes=[1], keepdims=1)
        norm = self.node("Sqrt", [sq], f"{out}_norm")
        safe = self.node("Max", [norm, "eps"], f"{out}_safe")
        return self.node("Div", [x, safe], out)

    def build(
        self, policy: Policy, sets: _Sets, calibration: dict[str, dict[str, Modality]]
    ) -> onnx.ModelProto:
        n_cat = len(policy.codes)
        self.const("scale", np.array(self.scale, np.float32))
        self.const("axis2", np.array([2], np.int64))
        self.const("eps", np.array(1e-6, np.float32))
        self.const("min_norm2", np.array(0.25, np.float32))
        self.prototypes("pos", sets.pos, n_cat)
        self.prototypes("neg", sets.neg, n_cat)
        self.prototypes("expos", sets.ex_pos, n_cat)
        self.prototypes("exneg", sets.ex_neg, n_cat)
        neutral = Modality()
        for m in MODALITIES:
            mods = [calibration.get(code, {}).get(m, neutral) for code in policy.codes]
            self.const(f"{m}_slope", np.array([v.slope for v in mods], np.float32))
            self.const(f"{m}_intercept", np.array([v.intercept for v in mods], np.float32))
        has_desc = [s is not None for s in sets.pos]
        has_ex = [s is not None for s in sets.ex_pos]
        self.const("has_desc", np.array(has_desc, np.float32))
        self.const("has_examples", np.array(has_ex, np.float32))
        # An upload without text sends a zero caption embedding: no caption or joint evidence.
        norm2 = self.node(
            "ReduceSumSquare", ["CAPTION_EMBEDDING"], "caption_norm2", axes=[1], keepdims=1
        )
        present = self.node("Greater", [norm2, "min_norm2"], "caption_present")
        self.node("Cast", [present], "has_caption", to=TensorProto.FLOAT)
        image = self.unit("IMAGE_EMBEDDING", "image_unit")
        caption = self.unit("CAPTION_EMBEDDING", "caption_unit")
        joint = self.unit(self.node("Add", [image, caption], "joint_sum"), "joint_unit")
        p_image = self.probability(
            self.margin(image, "pos", "neg", "z_image"), "image", ["has_desc"]
        )
        p_examples = self.probability(
            self.margin(image, "expos", "exneg", "z_examples"), "examples", ["has_examples"]
        )
        p_caption = self.probability(
            self.margin(caption, "pos", "neg", "z_caption"), "caption", ["has_desc", "has_caption"]
        )
        p_joint = self.probability(
            self.margin(joint, "pos", "neg", "z_joint"), "joint", ["has_desc", "has_caption"]
        )
        self.node("Max", [p_image, p_examples, p_caption, p_joint], IMAGE_HEAD_OUTPUT)
        graph = helper.make_graph(
            self.nodes,
            "guard_image_head",
            [
                helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", self.dim])
                for n in IMAGE_HEAD_INPUTS
            ],
            [helper.make_tensor_value_info(IMAGE_HEAD_OUTPUT, TensorProto.FLOAT, ["batch", n_cat])],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model
