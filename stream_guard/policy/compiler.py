"""Policy compiler: a policy becomes an ONNX classification head. No retraining of the encoder.

SafeVision-style policy following. The policy's texts (definitions, examples, hard negatives,
safe examples), its labelled pack (train and calib splits, never held-out), any labelled data
from ``stream-guard head train`` and a background of everyday benign text are embedded by the
served text tower and become the head's *bank* (``head_graph.py``). Each category is scored one
of two ways:

- **trained** (enough labelled positives, ``MIN_TRAINED_POSITIVES``): a one-hidden-layer MLP over
  the embedding, prototype cosines and kNN label votes (``training.py``), fitted by K-fold
  cross-fitting: each fold's model scores the rows it did not see, those out-of-fold scores set
  the category's calibration (block precision >= ``BLOCK_PRECISION`` at the block threshold, at
  most ``NEG_ESCALATE_SHARE`` of its negatives at or above allow), and the head serves the
  average of the fold models;
- **words** (a category written in words, a few examples): the margin between the cosines with
  its own examples and with everything else in the bank, anchored on the policy's texts without
  labelled data: unlabelled rows reach the allow threshold only above the quantile that leaves
  ``WORDS_ESCALATE_SHARE`` of them (shared between the words categories), and the median of its
  own examples (each left out of its own prototypes) lies at or beyond the block threshold.

Image evidence is the strongest detector signal a category lists; text signals (a sequence
classifier served beside the text tower) enter the MLP and, when a category lists them, its
score like image signals. The category score is the maximum of the three.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from stream_guard.errors import PolicyError
from stream_guard.policy.datasets import DATASETS_ENV, dataset_rows, file_digest
from stream_guard.policy.head_graph import (
    Bank,
    HeadParams,
    bank_features,
    build_graph,
    mlp_inputs,
    mlp_logits,
)
from stream_guard.policy.model import IMAGE_SIGNALS, Policy
from stream_guard.policy.packs import BUILTIN_PACKS, PackRow, load_pack
from stream_guard.policy.training import (
    MAP_FIELDS,
    MlpConfig,
    fit_mlp,
    operating_points,
    score_map,
)

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK_PRECISION",
    "COMPILER_VERSION",
    "Calibration",
    "CompiledHead",
    "Embed",
    "FOLDS",
    "MIN_TRAINED_POSITIVES",
    "NEG_ESCALATE_SHARE",
    "TowerLayout",
    "compile_head",
    "head_texts",
    "tower_layout",
]

Embed = Callable[[Sequence[str]], np.ndarray]
# Bumped when the same policy would compile to a different head: a repository's head compiled
# by an older compiler is then recompiled (heads.py, repository.py compare it).
COMPILER_VERSION = "3"

# Calibration targets: block precision, and the share of rows not labelled with a category that
# may reach its escalation band (per category: over 14 categories this keeps a benign-heavy mix
# near 5 % escalated).
BLOCK_PRECISION = 0.9
NEG_ESCALATE_SHARE = 0.004
MIN_CALIB_POSITIVES = 8
MIN_TRAINED_POSITIVES = 30  # labelled positives (pack + head train) before a category is trained
FOLDS = 4
# Share of everyday benign text all words categories together may escalate (split between them).
WORDS_ESCALATE_SHARE = 0.03
WORDS_SPREAD = 1.5  # block no nearer than this many benign standard deviations above allow
DATASET_SHARE = 0.1  # public datasets' total training weight, relative to the policy's rows
# Prototypes per category taken from labelled rows (bounded graph size).
MAX_PACK_POS = 150
MAX_PACK_NEG = 150
MAX_SHARED_NEG = 100
BACKGROUND = BUILTIN_PACKS / "llama_guard_4" / "benign.jsonl"
MLP = MlpConfig()


@dataclass(frozen=True)
class Calibration:
    method: str  # "trained" (cross-fitted MLP) or "words" (anchored on the policy's texts)
    z_allow: float  # the raw score placed on the allow threshold
    z_block: float  # ... and on the block threshold
    n_pos: int  # rows the placement saw: the category's positives
    n_neg: int  # and the rest (words: the unlabelled rows)


@dataclass
class CompiledHead:
    policy_id: str
    policy_version: str
    codes: list[str]
    onnx_model: onnx.ModelProto
    calibration: dict[str, Calibration] = field(default_factory=dict)
    text_signals: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return self.onnx_model.SerializeToString()

    def metadata(self) -> dict[str, object]:
        return {
            "policy_id": self.policy_id,
            "policy_version": self.policy_version,
            "compiler": COMPILER_VERSION,
            "codes": self.codes,
            "text_signals": self.text_signals,
            "calibration": {c: vars(k) for c, k in self.calibration.items()},
        }


@dataclass
class _Row:
    text: str
    labels: set[str]
    fold: int | None  # None: a policy or background text, in every fold's training data
    owner: str | None  # the pack file's category (its hard negatives are that category's)


def _fold(key: str) -> int:
    return int(hashlib.sha256(f"fold:{key}".encode()).hexdigest()[:8], 16) % FOLDS


def _owner(row_id: str, codes: Sequence[str]) -> str | None:
    """The category whose file a pack row came from (ids look like ``S1-n-001``)."""
    head = row_id.split("-", 1)[0]
    return head if head in codes else None


def _background() -> list[str]:
    """Everyday benign texts every policy is contrasted with (the builtin pack's benign rows,
    never its held-out split)."""
    pack = load_pack(BACKGROUND.parent, [])
    return [r.text for r in pack.rows if r.id.startswith("benign") and r.split != "heldout"]


def _policy_rows(policy: Policy) -> list[_Row]:
    rows = [_Row(t, set(), None, None) for t in policy.safe_examples]
    for cat in policy.categories:
        rows += [_Row(t, {cat.code}, None, cat.code) for t in (cat.definition, *cat.examples)]
        rows += [_Row(t, set(), None, cat.code) for t in cat.negative_examples]
    return rows


def _labelled_rows(policy: Policy, pack: Sequence[PackRow], extra) -> list[_Row]:
    codes = policy.codes
    rows = [_Row(r.text, set(r.labels), _fold(r.id), _owner(r.id, codes)) for r in pack]
    return rows + [_Row(t, lab, _fold(t), None) for t, lab in extra]


@dataclass(frozen=True)
class _Public:
    """Embedded train/calib rows of the policy's public datasets. They train the MLP only:
    they are no prototypes, no kNN neighbours (a tweet is not the policy's benign background,
    and the served head stays small) and no calibration rows (their easy negatives would move
    the escalation band the policy's own rows place)."""

    vectors: np.ndarray
    sig: np.ndarray
    labels: np.ndarray
    folds: np.ndarray


def _public_rows(policy: Policy, *, warn: bool = True) -> list[PackRow]:
    """The train and calib rows of the policy's datasets; ``warn``: log each one missing here
    (the compile does; listing the texts to embed beforehand does not say it again)."""
    rows = []
    for ref in policy.datasets:
        if not ref.available or ref.path is None:
            if warn:
                log.warning(
                    "dataset %s is not on this machine (set %s): the head is compiled without it",
                    ref.name,
                    DATASETS_ENV,
                )
            continue
        path = Path(ref.path)
        labels = tuple(sorted((k, tuple(v)) for k, v in ref.labels.items()))
        sha = ref.digest or file_digest(path)  # the policy's version is built from the same
        rows += _trained_rows(ref.name, str(path), sha, labels)
    return rows


@functools.lru_cache(maxsize=4)
def _trained_rows(
    name: str, path: str, sha: str, labels: tuple[tuple[str, tuple[str, ...]], ...]
) -> tuple[PackRow, ...]:
    """One read of a dataset file per compile (listing texts, then fitting), keyed by the
    file's content digest, the one the policy's version carries: changed content is read
    again."""
    read = dataset_rows(name, Path(path), {k: list(v) for k, v in labels})
    return tuple(r for r in read if r.split != "heldout")


def _public(policy: Policy, embed: Embed, n_sig: int) -> _Public | None:
    rows = _public_rows(policy)
    if not rows:
        return None
    emb, sig = _embedded(embed, [r.text for r in rows], n_sig)
    labels = np.array([[c in r.labels for c in policy.codes] for r in rows], dtype=np.float64)
    return _Public(emb, sig, labels, np.array([_fold(r.id) for r in rows]))


def _public_inputs(sub: Bank, public: _Public, rows: np.ndarray) -> np.ndarray:
    f = bank_features(sub, public.vectors[rows], words=False)
    return mlp_inputs(public.vectors[rows], f, public.sig[rows])


def _embedded(embed: Embed, texts: list[str], n_sig: int) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised embeddings, text signals) of ``texts`` from the served tower."""
    vectors = np.asarray(embed(texts), dtype=np.float64)
    dim = vectors.shape[1] - n_sig
    return _normalise(vectors[:, :dim]), vectors[:, dim:]


def _dedupe(rows: list[_Row]) -> list[_Row]:
    """One row per text: labels merged; a policy text stays in every fold's training data."""
    out: dict[str, _Row] = {}
    for r in rows:
        seen = out.get(r.text)
        if seen is None:
            out[r.text] = _Row(r.text, set(r.labels), r.fold, r.owner)
            continue
        seen.labels |= r.labels
        seen.fold = None if r.fold is None else seen.fold
        seen.owner = seen.owner or r.owner
    return list(out.values())


def _prototypes(rows: list[_Row], codes: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per category: its definition, examples and (capped) labelled positives; its hard
    negatives, the safe examples, (capped) unlabelled rows of its pack file and shared benign."""
    pos, neg = [], []
    shared = [i for i, r in enumerate(rows) if not r.labels and r.owner is None]
    for code in codes:
        own = [i for i, r in enumerate(rows) if code in r.labels and r.fold is None]
        labelled = [i for i, r in enumerate(rows) if code in r.labels and r.fold is not None]
        mine = [i for i, r in enumerate(rows) if not r.labels and r.owner == code]
        pos.append(np.array(own + labelled[:MAX_PACK_POS], dtype=np.int64))
        negs = mine[:MAX_PACK_NEG] + shared[:MAX_SHARED_NEG]
        neg.append(np.array(sorted(set(negs)), dtype=np.int64))
    return pos, neg


@dataclass(frozen=True)
class TowerLayout:
    """What the served text tower sends the head: an embedding, then named text signals."""

    width: int
    text_signals: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return self.width - len(self.text_signals)


def tower_layout(config: dict) -> TowerLayout:
    """The layout of a served text tower from its Triton model config (JSON form): the width of
    its EMBEDDING output and the ``stream_guard.text_signals`` parameter (a JSON list)."""
    config = config.get("config", config)
    outputs = {o["name"]: o for o in config.get("output", [])}
    if "EMBEDDING" not in outputs:
        raise PolicyError("the text tower's config has no EMBEDDING output")
    width = int(outputs["EMBEDDING"]["dims"][-1])
    raw = config.get("parameters", {}).get("stream_guard.text_signals", {}).get("string_value")
    names = tuple(json.loads(raw)) if raw else ()
    if width <= len(names):
        raise PolicyError(f"text tower width {width} leaves no room for {len(names)} signals")
    return TowerLayout(width, names)


def _signal_maps(policy: Policy, text_signals: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((len(IMAGE_SIGNALS), len(policy.categories)), np.float32)
    text = np.zeros((len(text_signals), len(policy.categories)), np.float32)
    for c, cat in enumerate(policy.categories):
        for name in cat.image_signals:
            image[IMAGE_SIGNALS.index(name), c] = 1.0
        for name in getattr(cat, "text_signals", []):
            if name not in text_signals:
                raise PolicyError(
                    f"category {cat.code} lists text signal {name!r}, which the served text "
                    f"tower does not send (it sends {list(text_signals)}); export it with "
                    "`stream-guard model export --kind text --signals ...` or drop it from the "
                    "policy"
                )
            text[list(text_signals).index(name), c] = 1.0
    return image, text


def compile_head(
    policy: Policy,
    embed: Embed,
    *,
    extra_texts: Sequence[str] = (),
    extra_labels: np.ndarray | None = None,
    use_pack: bool = True,
    use_datasets: bool = True,
    text_signals: Sequence[str] = (),
) -> CompiledHead:
    """Compile ``policy`` into an ONNX head using ``embed`` (the served text tower).

    ``extra_texts`` / ``extra_labels`` [n, C] (``stream-guard head train``) join the pack's
    labelled rows, as do the policy's datasets (``use_datasets``). ``text_signals`` names the
    columns the tower sends after its embedding.
    """
    codes = policy.codes
    extra = []
    for n, t in enumerate(extra_texts):
        flags = extra_labels[n] if extra_labels is not None else np.zeros(len(codes))
        extra.append((t, {c for c, f in zip(codes, flags, strict=True) if f}))
    pack = []
    if use_pack and policy.pack:
        pack = [r for r in load_pack(Path(policy.pack), codes).rows if r.split != "heldout"]
    background = [_Row(t, set(), None, None) for t in _background()]
    rows = _dedupe(_policy_rows(policy) + _labelled_rows(policy, pack, extra) + background)
    emb, sig = _embedded(embed, [r.text for r in rows], len(text_signals))
    labels = np.array([[c in r.labels for c in codes] for r in rows], dtype=np.float64)
    pos, neg = _prototypes(rows, codes)
    bank = Bank(emb, labels, pos, neg)
    folds = np.array([-1 if r.fold is None else r.fold for r in rows])
    public = _public(policy, embed, len(text_signals)) if use_datasets else None
    n_public = public.labels.sum(axis=0) if public is not None else 0
    trained = (
        labels[folds >= 0].sum(axis=0) + n_public >= MIN_TRAINED_POSITIVES
    ) & policy_thresholds_ok(policy)
    calibration: dict[str, Calibration] = {}
    maps = np.zeros((len(MAP_FIELDS), len(codes)))
    mlp = None
    if trained.any():
        mlp = _trained_mlp(policy, bank, sig, folds, public, trained, calibration, maps)
    _words_anchors(policy, bank, trained, calibration, maps)
    image_map, text_map = _signal_maps(policy, text_signals)
    params = HeadParams(bank, len(text_signals), trained, maps, mlp, image_map, text_map)
    model = build_graph(params, len(IMAGE_SIGNALS))
    model.metadata_props.add(
        key="stream_guard.policy.model",
        value=json.dumps(
            {
                "policy_id": policy.policy_id,
                "policy_version": policy.effective_version,
                "codes": codes,
                "text_signals": list(text_signals),
            }
        ),
    )
    return CompiledHead(
        policy.policy_id,
        policy.effective_version,
        codes,
        model,
        {c: calibration[c] for c in codes},
        list(text_signals),
    )


def policy_thresholds_ok(policy: Policy) -> np.ndarray:
    """Categories whose band can be placed: "always" / "never" thresholds have nothing to place."""
    return np.array(
        [
            policy.thresholds_for(c).allow > 1e-3 and policy.thresholds_for(c).block < 1 - 1e-3
            for c in policy.categories
        ]
    )


def _normalise(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def _trained_mlp(policy, bank: Bank, sig, folds, public, trained, calibration, maps):
    """K-fold cross-fitting: fold models, their out-of-fold logits calibrate each trained
    category, and their average (one wider hidden layer) is what the head serves."""
    models, oof = [], np.zeros(bank.labels.shape)
    oof_public = np.zeros(public.labels.shape) if public is not None else None
    for k in range(FOLDS):
        keep = folds != k
        sub = bank.subset(keep)
        idx = np.arange(keep.sum())
        f = bank_features(sub, sub.vectors, exclude=idx, words=False)
        x, y = mlp_inputs(sub.vectors, f, sig[keep]), sub.labels
        w = np.ones(len(y))
        if public is not None:
            pk = public.folds != k
            x = np.vstack([x, _public_inputs(sub, public, pk)])
            y = np.vstack([y, public.labels[pk]])
            # Public rows together weigh at most DATASET_SHARE of the policy's own rows.
            share = min(1.0, DATASET_SHARE * len(w) / max(int(pk.sum()), 1))
            w = np.concatenate([w, np.full(int(pk.sum()), share)])
        cfg = MlpConfig(**{**vars(MLP), "seed": MLP.seed * FOLDS + k})
        params = fit_mlp(x, y, cfg, w)
        models.append(params)
        out = folds == k
        if out.any():
            fo = bank_features(sub, bank.vectors[out], words=False)
            oof[out] = mlp_logits(mlp_inputs(bank.vectors[out], fo, sig[out]), *params)
        if public is not None:
            oof_public[~pk] = mlp_logits(_public_inputs(sub, public, ~pk), *params)
    calib = folds >= 0
    own_unsafe = bank.labels.any(axis=1)
    for c, cat in enumerate(policy.categories):
        if trained[c]:
            # A category is calibrated on its own violations against safe rows: a row that
            # violates only another category is neither (blocked under a neighbouring code,
            # an upload is still blocked rightly). The policy's own rows place the thresholds
            # (public data's easy negatives would move the escalation band); public rows
            # join only when the policy has too few.
            rows = calib & ~(own_unsafe & (bank.labels[:, c] == 0))
            z, y = oof[rows, c], bank.labels[rows, c].astype(bool)
            if y.sum() < MIN_CALIB_POSITIVES and public is not None:
                other = public.labels.any(axis=1) & (public.labels[:, c] == 0)
                z = np.concatenate([z, oof_public[~other, c]])
                y = np.concatenate([y, public.labels[~other, c].astype(bool)])
            trained[c] = _calibrate_trained(policy, cat, z, y, calibration, maps)
    w1 = np.hstack([m[0] for m in models])
    b1 = np.concatenate([m[1] for m in models])
    w2 = np.vstack([m[2] for m in models]) / len(models)
    b2 = np.mean([m[3] for m in models], axis=0)
    return w1, b1, w2, b2


def _calibrate_trained(policy, cat, z, y, calibration, maps) -> bool:
    """Place one trained category's out-of-fold scores on its thresholds; False when its data
    cannot be calibrated (it is then scored as a words category)."""
    points = operating_points(
        z,
        y,
        block_precision=cat.block_precision or BLOCK_PRECISION,
        neg_share=cat.escalation_share or NEG_ESCALATE_SHARE,
        min_pos=MIN_CALIB_POSITIVES,
    )
    if points is None:
        return False
    t = policy.thresholds_for(cat)
    high = float(np.quantile(z[y], 0.99))
    c = policy.codes.index(cat.code)
    maps[:, c] = score_map(
        *points, t.allow, t.block, low_z=float(np.quantile(z, 0.01)), high_z=high
    )
    calibration[cat.code] = Calibration("trained", *points, int(y.sum()), int((~y).sum()))
    return True


def _words_anchors(policy, bank: Bank, trained, calibration, maps) -> None:
    """Maps of the words categories' margins: allow at the bank's unlabelled rows'
    1 - WORDS_ESCALATE_SHARE / n_words quantile; block at the median of the category's own rows
    (each left out of its prototypes), never nearer than WORDS_SPREAD benign deviations."""
    if trained.all():
        return
    benign = np.nonzero(bank.labels.sum(axis=1) == 0)[0]
    fb = bank_features(bank, bank.vectors[benign], exclude=benign)
    quantile = 1.0 - WORDS_ESCALATE_SHARE / max(int((~trained).sum()), 1)
    for c, cat in enumerate(policy.categories):
        if trained[c]:
            continue
        own = np.nonzero(bank.labels[:, c] > 0)[0]
        fo = bank_features(bank, bank.vectors[own], exclude=own)
        m_own = fo.pos[:, c] - fo.others[:, c]
        m_benign = fb.pos[:, c] - fb.others[:, c] if len(benign) else np.zeros(1)
        m_lo = float(np.quantile(m_benign, quantile))
        spread = float(m_benign.std()) if len(benign) > 1 else 0.05
        m_hi = max(float(np.median(m_own)), m_lo + WORDS_SPREAD * spread)
        t = policy.thresholds_for(cat)
        maps[:, c] = score_map(
            m_lo,
            m_hi,
            t.allow,
            t.block,
            low_z=float(np.quantile(m_benign, 0.01)),
            high_z=float(m_own.max()),
        )
        calibration[cat.code] = Calibration("words", m_lo, m_hi, len(own), len(benign))


def head_texts(policy: Policy, *, use_pack: bool = True) -> list[str]:
    """Every text ``compile_head`` may embed for ``policy`` (to embed them in one go)."""
    texts = [r.text for r in _policy_rows(policy)]
    if use_pack and policy.pack:
        pack = load_pack(Path(policy.pack), policy.codes)
        texts += [r.text for r in pack.rows if r.split != "heldout"]
    if use_pack:
        texts += [r.text for r in _public_rows(policy, warn=False)]
    return list(dict.fromkeys(texts + _background()))
