"""Guard quality side by side: the compiled head against the baselines it must beat.

Issue 3 asks the policy compiler to beat two kinds of baseline on labelled sets:

- ``nearest-prototype``: the naive head. Each category is its definition plus its first four
  examples, embedded by the text tower (all-MiniLM-L6-v2); an upload's category score is its
  highest cosine with them; it is flagged under the argmax category when that cosine reaches a
  threshold chosen on the policy's own texts (leave-one-out, best binary F1).
- ``tfidf-logreg``: a plain lexical abuse classifier. TF-IDF of word 1-2 grams and one
  class-balanced logistic regression per category, trained on the policy's texts (definition
  and examples positive; hard negatives, safe examples and other categories negative); flagged
  at probability >= 0.5. Needs scikit-learn (the ``dev`` extra), never the serving path.
- ``compiled``: ``compile_head(policy)``, the head production serves, decided by the policy's
  thresholds exactly as the worker does (``Policy.decide``; an escalation counts as flagged,
  because fast mode did not let it through).
- ``compiled+train``: the same with ``stream-guard head train`` data (a disjoint labelled split);
  ``tfidf-logreg+train`` is the lexical baseline given the same extra data, for a fair match.

Each system is scored at its own operating point (binary F1, accuracy, FPR, TPR) and without
one: AUPRC per category, binary AUPRC (a row's highest category score against unsafe / safe),
and the TPR at a matched FPR of at most 10 %, so a system that flags everything cannot look good.

Everything runs in-process on text: the same ONNX text tower and head Triton serves, run by
onnxruntime (``stream-guard eval`` gives the same numbers through Triton). Images are ignored
here: the baselines are text models, and the labelled sets are text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_guard.policy.model import Policy
from stream_guard.quality.manifest import ManifestRow, label_matrix
from stream_guard.quality.metrics import average_precision, evaluate, policy_decisions

__all__ = [
    "Difference",
    "Embed",
    "LOW_FPR",
    "LabelledTexts",
    "METRICS",
    "NAIVE_EXAMPLES",
    "NearestPrototype",
    "SYSTEMS",
    "SystemResult",
    "TfidfLogReg",
    "argmax_flags",
    "best_f1_threshold",
    "compare",
    "differences",
    "format_differences",
    "format_markdown",
    "mean_auprc",
    "normalise",
    "paired_bootstrap",
    "policy_corpus",
    "run_head",
    "summarise",
    "tpr_at_fpr",
]

Embed = Callable[[Sequence[str]], np.ndarray]
NAIVE_EXAMPLES = 4
SYSTEMS = ("nearest-prototype", "tfidf-logreg", "tfidf-logreg+train", "compiled", "compiled+train")
LOW_FPR = 0.1  # the matched operating point of ``tpr_at_low_fpr``


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with their [n, C] truth in a policy's code order."""

    texts: list[str]
    labels: npt.NDArray[np.bool_]

    @classmethod
    def from_rows(cls, rows: Sequence[ManifestRow], codes: Sequence[str]) -> LabelledTexts:
        with_text = [r for r in rows if r.text]
        return cls([r.text for r in with_text], label_matrix(with_text, codes))

    def __len__(self) -> int:
        return len(self.texts)


def policy_corpus(policy: Policy) -> LabelledTexts:
    """The policy's own texts as labelled data, as the compiler sees them: a definition and its
    examples are positives of their category; hard negatives and safe examples are safe."""
    codes = policy.codes
    rows: dict[str, set[str]] = {t: set() for t in policy.safe_examples}
    for cat in policy.categories:
        for t in (cat.definition, *cat.examples):
            rows.setdefault(t, set()).add(cat.code)
        for t in cat.negative_examples:
            rows.setdefault(t, set())
    texts = list(rows)
    labels = np.array([[c in rows[t] for c in codes] for t in texts], dtype=bool)
    return LabelledTexts(texts, labels.reshape(len(texts), len(codes)))


def normalise(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def best_f1_threshold(unsafe: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """The threshold on ``score`` with the best binary F1 (ties: the highest threshold)."""
    y = np.asarray(unsafe, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if not y.any():
        return float(s.max()) + 1e-6
    best_t, best_f1 = float(s.max()), -1.0
    for t in np.unique(s)[::-1]:
        flagged = s >= t
        tp = int(np.sum(flagged & y))
        f1 = 2 * tp / (int(flagged.sum()) + int(y.sum()))
        if f1 > best_f1 + 1e-12:
            best_t, best_f1 = float(t), f1
    return best_t


def tpr_at_fpr(unsafe: npt.ArrayLike, score: npt.ArrayLike, max_fpr: float) -> float | None:
    """The highest TPR of ``score >= t`` over thresholds whose FPR is at most ``max_fpr``.
    ``None`` without both classes."""
    y = np.asarray(unsafe, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    ss, yy = s[order], y[order]
    # one point per distinct threshold: the last row of each run of equal scores
    last = np.r_[np.flatnonzero(np.diff(ss)), ss.size - 1]
    tps = np.cumsum(yy)[last]
    fps = (last + 1) - tps
    ok = fps / n_neg <= max_fpr + 1e-12
    return float(tps[ok].max()) / n_pos if ok.any() else 0.0


def argmax_flags(scores: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """One flag per row at most: the top category, when its score reaches ``threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    flags = np.zeros(s.shape, dtype=bool)
    top = np.argmax(s, axis=1)
    rows = np.arange(s.shape[0])
    flags[rows, top] = s[rows, top] >= threshold
    return flags


@dataclass
class NearestPrototype:
    """The naive head: argmax cosine to a definition and four examples, thresholded."""

    prototypes: np.ndarray  # [C, K, D], padded rows are zero
    mask: np.ndarray  # [C, K] bool
    threshold: float = 0.5

    @classmethod
    def fit(
        cls, policy: Policy, embed: Embed, *, n_examples: int = NAIVE_EXAMPLES
    ) -> NearestPrototype:
        per_cat = [[c.definition, *c.examples[:n_examples]] for c in policy.categories]
        k = max(len(p) for p in per_cat)
        flat = [t for p in per_cat for t in p]
        vectors = normalise(embed(flat))
        protos = np.zeros((len(per_cat), k, vectors.shape[1]), np.float32)
        mask = np.zeros((len(per_cat), k), bool)
        i = 0
        for c, texts in enumerate(per_cat):
            protos[c, : len(texts)] = vectors[i : i + len(texts)]
            mask[c, : len(texts)] = True
            i += len(texts)
        head = cls(protos, mask)
        # The operating threshold: best binary F1 on the policy's texts, leave-one-out (a
        # prototype never scores itself, or every example would sit at cosine 1).
        corpus = policy_corpus(policy)
        vec = normalise(embed(corpus.texts))
        sims = head.similarities(vec)
        sims[sims > 1.0 - 1e-5] = -1.0
        head.threshold = best_f1_threshold(corpus.labels.any(axis=1), sims.max(axis=2).max(axis=1))
        return head

    def similarities(self, vectors: np.ndarray) -> np.ndarray:
        sims = np.einsum("nd,ckd->nck", normalise(vectors), self.prototypes)
        return np.where(self.mask[None], sims, -1.0)

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        return self.similarities(vectors).max(axis=2).astype(np.float64)

    def flags(self, scores: np.ndarray) -> npt.NDArray[np.bool_]:
        return argmax_flags(scores, self.threshold)


@dataclass
class TfidfLogReg:
    """Plain lexical baseline: TF-IDF word 1-2 grams, one balanced logistic regression per code."""

    vectorizer: Any
    models: list[Any | None] = field(default_factory=list)
    threshold: float = 0.5

    @classmethod
    def fit(cls, data: LabelledTexts) -> TfidfLogReg:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
            from sklearn.linear_model import LogisticRegression
        except ImportError as e:  # the baseline is a dev tool
            raise RuntimeError(
                "the TF-IDF baseline needs scikit-learn: pip install -e '.[dev]'"
            ) from e
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
        x = vectorizer.fit_transform(data.texts)
        models: list[Any | None] = []
        for j in range(data.labels.shape[1]):
            y = data.labels[:, j]
            if y.all() or not y.any():
                models.append(None)
                continue
            models.append(LogisticRegression(class_weight="balanced", max_iter=2000).fit(x, y))
        return cls(vectorizer, models)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        x = self.vectorizer.transform(list(texts))
        out = np.zeros((len(texts), len(self.models)))
        for j, m in enumerate(self.models):
            if m is not None:
                out[:, j] = m.predict_proba(x)[:, 1]
        return out

    def flags(self, scores: np.ndarray) -> npt.NDArray[np.bool_]:
        return np.asarray(scores) >= self.threshold


def run_head(onnx_bytes: bytes, vectors: np.ndarray, n_signals: int) -> np.ndarray:
    """Scores of a compiled head on text embeddings (no image signals), via onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = {
        "TEXT_EMBEDDING": np.ascontiguousarray(vectors, dtype=np.float32),
        "IMAGE_SIGNALS": np.zeros((len(vectors), n_signals), np.float32),
    }
    return np.asarray(session.run(["SCORES"], feeds)[0], dtype=np.float64)


@dataclass(frozen=True)
class SystemResult:
    """One system on one labelled set."""

    system: str
    dataset: str
    n: int
    binary_f1: float | None
    binary_accuracy: float
    binary_fpr: float | None
    binary_tpr: float | None
    binary_auprc: float | None  # unsafe vs safe, scored by the row's highest category score
    tpr_at_low_fpr: float | None  # binary TPR at the best threshold with FPR <= LOW_FPR
    mean_auprc: float | None
    macro_f1: float | None
    auprc: Mapping[str, float | None]
    # the inputs, kept for paired bootstrap intervals (not part of the JSON)
    labels: npt.NDArray[np.bool_] | None = field(default=None, repr=False, compare=False)
    scores: npt.NDArray[np.float64] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "dataset": self.dataset,
            "n": self.n,
            "binary_f1": self.binary_f1,
            "binary_accuracy": self.binary_accuracy,
            "binary_fpr": self.binary_fpr,
            "binary_tpr": self.binary_tpr,
            "binary_auprc": self.binary_auprc,
            "tpr_at_low_fpr": self.tpr_at_low_fpr,
            "mean_auprc": self.mean_auprc,
            "macro_f1": self.macro_f1,
            "auprc": dict(self.auprc),
        }


def summarise(
    system: str,
    dataset: str,
    codes: Sequence[str],
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    decisions: npt.ArrayLike,
) -> SystemResult:
    """The comparison's numbers for one system: ``decisions`` are flags or policy decisions."""
    report = evaluate(codes, labels, scores, decisions, escalate_as="unsafe")
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    b = report.binary
    return SystemResult(
        system=system,
        dataset=dataset,
        n=report.n,
        binary_f1=b.f1,
        binary_accuracy=b.accuracy,
        binary_fpr=b.fpr,
        binary_tpr=b.tpr,
        binary_auprc=average_precision(y.any(axis=1), s.max(axis=1)),
        tpr_at_low_fpr=tpr_at_fpr(y.any(axis=1), s.max(axis=1), LOW_FPR),
        mean_auprc=report.mean_auprc,
        macro_f1=report.macro_f1,
        auprc={c.code: c.auprc for c in report.categories},
        labels=y,
        scores=s,
    )


def mean_auprc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Mean AUPRC over the categories that have positives."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    aps = [average_precision(y[:, j], s[:, j]) for j in range(y.shape[1]) if y[:, j].any()]
    return float(np.mean(aps)) if aps else None


METRICS: dict[str, Callable[[npt.NDArray[np.bool_], npt.NDArray[np.float64]], float | None]] = {
    "mean_auprc": mean_auprc,
    "binary_auprc": lambda y, s: average_precision(y.any(axis=1), s.max(axis=1)),
    "tpr_at_low_fpr": lambda y, s: tpr_at_fpr(y.any(axis=1), s.max(axis=1), LOW_FPR),
}


@dataclass(frozen=True)
class Difference:
    """``metric(a) - metric(b)`` on one set, with a paired bootstrap 95 % interval."""

    dataset: str
    a: str
    b: str
    metric: str
    value: float
    low: float
    high: float


def paired_bootstrap(
    a: SystemResult, b: SystemResult, metric: str, *, rounds: int = 1000, seed: int = 0
) -> Difference:
    """Resample the set's rows (the same rows for both systems) ``rounds`` times; the interval
    is the 2.5-97.5 percentile of the difference. Resamples where the metric is undefined (no
    positive of any category) are dropped."""
    if a.labels is None or a.scores is None or b.scores is None:
        raise ValueError("paired_bootstrap needs results made by summarise()")
    if a.dataset != b.dataset or a.labels.shape != b.scores.shape:
        raise ValueError("paired_bootstrap compares two systems on the same set")
    fn = METRICS[metric]
    y, sa, sb = a.labels, a.scores, b.scores
    value = _diff(fn, y, sa, sb)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, len(y), len(y))
        d = _diff(fn, y[idx], sa[idx], sb[idx])
        if d is not None:
            diffs.append(d)
    if value is None or not diffs:
        raise ValueError(f"{metric} is undefined on {a.dataset}")
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Difference(a.dataset, a.system, b.system, metric, value, float(low), float(high))


def _diff(fn: Any, y: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> float | None:
    ma, mb = fn(y, sa), fn(y, sb)
    return None if ma is None or mb is None else float(ma - mb)


def differences(
    results: Sequence[SystemResult],
    *,
    systems: Sequence[str] = ("compiled", "compiled+train"),
    metrics: Sequence[str] = tuple(METRICS),
    rounds: int = 1000,
) -> list[Difference]:
    """Each of ``systems`` minus each baseline, per set and metric, with bootstrap intervals."""
    out = []
    for r in results:
        if r.system not in systems:
            continue
        for other in results:
            if other.dataset != r.dataset or other.system in systems:
                continue
            for metric in metrics:
                out.append(paired_bootstrap(r, other, metric, rounds=rounds))
    return out


def format_differences(diffs: Sequence[Difference]) -> str:
    lines = [
        "| set | system | minus baseline | metric | difference | 95 % interval |",
        "| --- | --- | --- | --- | ---: | --- |",
    ]
    for d in diffs:
        lines.append(
            f"| {d.dataset} | {d.a} | {d.b} | {d.metric} | {d.value:+.3f} | "
            f"[{d.low:+.3f}, {d.high:+.3f}] |"
        )
    return "\n".join(lines)


def compare(
    policy: Policy,
    embed: Embed,
    datasets: Mapping[str, LabelledTexts],
    train: LabelledTexts | None,
    *,
    n_signals: int,
) -> list[SystemResult]:
    """Every system of ``SYSTEMS`` on every dataset (``compiled+train`` only with ``train``)."""
    from stream_guard.policy.compiler import compile_head

    codes = policy.codes
    naive = NearestPrototype.fit(policy, embed)
    corpus = policy_corpus(policy)
    tfidf = TfidfLogReg.fit(corpus)
    tfidf_train = (
        TfidfLogReg.fit(
            LabelledTexts(corpus.texts + train.texts, np.vstack([corpus.labels, train.labels]))
        )
        if train is not None
        else None
    )
    compiled = compile_head(policy, embed).to_bytes()
    trained = (
        compile_head(policy, embed, extra_texts=train.texts, extra_labels=train.labels).to_bytes()
        if train is not None
        else None
    )
    results = []
    for name, data in datasets.items():
        vectors = normalise(embed(data.texts))
        s = naive.scores(vectors)
        results.append(summarise("nearest-prototype", name, codes, data.labels, s, naive.flags(s)))
        for system, lexical in (("tfidf-logreg", tfidf), ("tfidf-logreg+train", tfidf_train)):
            if lexical is None:
                continue
            s = lexical.scores(data.texts)
            results.append(summarise(system, name, codes, data.labels, s, lexical.flags(s)))
        for system, head in (("compiled", compiled), ("compiled+train", trained)):
            if head is None:
                continue
            s = run_head(head, vectors, n_signals)
            results.append(
                summarise(system, name, codes, data.labels, s, policy_decisions(policy, codes, s))
            )
    return results


def format_markdown(results: Sequence[SystemResult], codes: Sequence[str]) -> str:
    """Two markdown tables: binary metrics, then per-category AUPRC."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "| set | system | n | binary F1 | accuracy | FPR | TPR | binary AUPRC "
        f"| TPR@FPR<={LOW_FPR:g} | mean AUPRC | macro F1 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.dataset} | {r.system} | {r.n} | {f(r.binary_f1)} | {f(r.binary_accuracy)} | "
            f"{f(r.binary_fpr)} | {f(r.binary_tpr)} | {f(r.binary_auprc)} | "
            f"{f(r.tpr_at_low_fpr)} | {f(r.mean_auprc)} | {f(r.macro_f1)} |"
        )
    lines += [
        "",
        "| set | system | " + " | ".join(codes) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in codes) + " |",
    ]
    for r in results:
        lines.append(
            f"| {r.dataset} | {r.system} | " + " | ".join(f(r.auprc.get(c)) for c in codes) + " |"
        )
    return "\n".join(lines)
