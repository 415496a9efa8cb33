# ruff: noqa: E501  (report lines)
"""Guard quality of the default policy before and after its labelled pack (docs/quality.md).

    python -m benchmarks.quality_packs [--davidson N] [--words]

Compiles the shipped Llama Guard 4 policy twice with the embedded MiniLM text tower (the same
ONNX model Triton serves, run here by onnxruntime): from the policy alone ("before") and with
its pack ("after": train split fitted, calib split calibrated). Both are scored on the pack's
held-out split, which no head sees, and on held-out tweets from ../shared/datasets/davidson
(hate vs neither, S10). Texts are scored whole-text as the worker does (windows + normalised
forms, maximum per category). Prints markdown tables and the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from stream_guard.build.text_encoder import TextEmbedder, default_minilm_dir
from stream_guard.events import UploadText
from stream_guard.policy.compiler import compile_head, head_texts
from stream_guard.policy.model import IMAGE_SIGNALS, load_policy
from stream_guard.policy.packs import load_pack
from stream_guard.quality.compare import run_head
from stream_guard.quality.metrics import average_precision, roc_auc
from stream_guard.settings import DEFAULT_POLICY
from stream_guard.text import segments

DAVIDSON = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "davidson" / "labeled_data.csv"
)


def whole_text_scores(head: bytes, embed, texts: list[str]) -> np.ndarray:
    segs = [segments(UploadText(caption=t[:20_000])).texts or [t] for t in texts]
    flat = [s for ss in segs for s in ss]
    scores = run_head(head, embed(flat), len(IMAGE_SIGNALS))
    out, start = [], 0
    for ss in segs:
        out.append(scores[start : start + len(ss)].max(axis=0))
        start += len(ss)
    return np.stack(out)


def report(name: str, policy, scores: np.ndarray, labels: np.ndarray) -> list[str]:
    codes = policy.codes
    lines = [
        f"\n### {name}\n",
        "| category | n+ | AUPRC | block precision | block recall | escalated (neg) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, cat in enumerate(policy.categories):
        y = labels[:, c]
        if y.sum() == 0:
            continue
        t = policy.thresholds_for(cat)
        blocked = scores[:, c] >= t.block
        esc = (scores[:, c] >= t.allow) & ~blocked
        prec = (blocked & y).sum() / max(blocked.sum(), 1)
        rec = (blocked & y).sum() / y.sum()
        lines.append(
            f"| {cat.code} | {int(y.sum())} | {average_precision(y, scores[:, c]):.3f} | {prec:.2f} | {rec:.2f} | "
            f"{esc[~y].mean():.1%} |"
        )
    any_y = labels.any(axis=1)
    top = scores.max(axis=1)
    decisions = [policy.decide(dict(zip(codes, s.tolist(), strict=True)))[0] for s in scores]
    escalated = np.array([d == "escalate" for d in decisions])
    flagged = np.array([d != "allow" for d in decisions])
    lines.append(
        f"\nany-unsafe AUPRC {average_precision(any_y, top):.3f}, AUROC {roc_auc(any_y, top):.3f}; "
        f"at shipped thresholds: escalated {escalated.mean():.1%} (safe rows {escalated[~any_y].mean():.1%}), "
        f"safe rows flagged {flagged[~any_y].mean():.1%}, unsafe rows flagged {flagged[any_y].mean():.1%}"
    )
    return lines


def words_only(policy, embed, texts, labels, packed: np.ndarray) -> list[str]:
    """Each category in turn written in words only (definition, 4 examples, 4 hard negatives,
    none of its pack rows) beside the rest of the packed policy, on the held-out split."""
    lines = [
        "\n### Each category written in words only, beside the packed policy\n",
        "| category | AUROC words-only | AUROC trained | caught at shipped thresholds "
        "(words-only / trained) | other rows it sends to escalate or block (words-only) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows = []
    for c, cat in enumerate(policy.categories):
        with tempfile.TemporaryDirectory() as tmp:
            for f in Path(policy.pack).glob("*.jsonl"):
                keep = [
                    line
                    for line in f.read_text(encoding="utf-8").splitlines()
                    if line.strip()
                    and cat.code not in json.loads(line)["labels"]
                    and not json.loads(line)["id"].startswith(f"{cat.code}-")
                ]
                (Path(tmp) / f.name).write_text("\n".join(keep) + "\n", encoding="utf-8")
            short = cat.model_copy(
                update={
                    "examples": cat.examples[:4],
                    "negative_examples": cat.negative_examples[:4],
                }
            )
            cats = [short if k.code == cat.code else k for k in policy.categories]
            variant = policy.model_copy(update={"categories": cats, "pack": tmp})
            head = compile_head(variant, embed)
        assert head.calibration[cat.code].method == "words"
        s = whole_text_scores(head.to_bytes(), embed, texts)[:, c]
        y = labels[:, c]
        allow = policy.thresholds_for(cat).allow
        row = (roc_auc(y, s), roc_auc(y, packed[:, c]), np.mean(s[y] >= allow))
        row += (np.mean(packed[y, c] >= allow), np.mean(s[~y] >= allow))
        rows.append(row)
        lines.append(
            f"| {cat.code} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.2f} / {row[3]:.2f} | {row[4]:.1%} |"
        )
    m = np.mean(rows, axis=0)
    lines.append(f"| mean | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.2f} / {m[3]:.2f} | {m[4]:.1%} |")
    return lines


def _davidson_train(held_n: int, n: int) -> list[dict[str, str]]:
    """The last ``n`` hate/neither tweets of the shuffled order (never in the first sample) plus
    as many offensive-but-not-hate tweets: profanity alone is not S10."""
    with DAVIDSON.open(newline="") as f:
        rows = list(csv.DictReader(f))
    labelled = [r for r in rows if r["class"] in ("0", "2")]
    random.Random(20261201).shuffle(labelled)
    offensive = [r for r in rows if r["class"] == "1"]
    random.Random(7).shuffle(offensive)
    return labelled[max(held_n, len(labelled) - n) :] + offensive[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--davidson", type=int, default=1500, help="held-out tweets (0: skip)")
    ap.add_argument(
        "--words", action="store_true", help="also each category written in words only (~2 min)"
    )
    ap.add_argument(
        "--davidson-train",
        type=int,
        default=0,
        help="also a head given N Davidson tweets as labelled data, as `stream-guard head train` "
        "would (hate -> S10; neither and as many offensive tweets -> safe); taken from the "
        "second sample, which is then evaluated without them",
    )
    args = ap.parse_args()
    started = time.time()
    policy = load_policy(DEFAULT_POLICY)
    pack = load_pack(Path(policy.pack), policy.codes)
    embedder = TextEmbedder.from_model_dir(default_minilm_dir())
    cache: dict[str, np.ndarray] = {}

    def embed(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            for t, v in zip(missing, embedder.embed(missing), strict=True):
                cache[t] = v
        return np.stack([cache[t] for t in texts])

    embed([*head_texts(policy)])  # embedding is the text tower's cost, not the compiler's
    heads, compile_s = {}, {}
    for name, use_pack in (("before (policy only)", False), ("after (policy + pack)", True)):
        t0 = time.time()
        heads[name] = compile_head(policy, embed, use_pack=use_pack).to_bytes()
        compile_s[name] = time.time() - t0
    tweets_train: list[dict[str, str]] = []
    if args.davidson_train and DAVIDSON.exists():
        tweets_train = _davidson_train(args.davidson, args.davidson_train)
        name = f"pack + {len(tweets_train)} Davidson tweets (head train)"
        t0 = time.time()
        s10 = policy.codes.index("S10")
        labels_train = np.zeros((len(tweets_train), len(policy.codes)), bool)
        labels_train[:, s10] = [r["class"] == "0" for r in tweets_train]
        heads[name] = compile_head(
            policy,
            embed,
            extra_texts=[r["tweet"] for r in tweets_train],
            extra_labels=labels_train,
        ).to_bytes()
        compile_s[name] = time.time() - t0
    held = pack.split("heldout")
    texts = [r.text for r in held]
    labels = np.array([[c in r.labels for c in policy.codes] for r in held])
    out = [
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
        f"Pack held-out split: {len(held)} rows ({int(labels.any(axis=1).sum())} unsafe)",
    ]
    tweets = []
    if args.davidson and DAVIDSON.exists():
        with DAVIDSON.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["class"] in ("0", "2")]
        random.Random(20261201).shuffle(rows)
        tweets = rows[: args.davidson]
        # A second, disjoint sample: how much S10 AUROC moves between samples of the same set.
        second = rows[args.davidson : 3 * args.davidson]
        trained = {r["tweet"] for r in tweets_train}
        second = [r for r in second if r["tweet"] not in trained]
    for name, head in heads.items():
        out.append(f"\n{name}: compiled in {compile_s[name]:.1f} s, head {len(head) / 1e6:.1f} MB")
        out += report(
            f"{name}: pack held-out", policy, whole_text_scores(head, embed, texts), labels
        )
        if tweets:
            s = whole_text_scores(head, embed, [r["tweet"] for r in tweets])[
                :, policy.codes.index("S10")
            ]
            y = np.array([r["class"] == "0" for r in tweets])
            s2 = whole_text_scores(head, embed, [r["tweet"] for r in second])[
                :, policy.codes.index("S10")
            ]
            y2 = np.array([r["class"] == "0" for r in second])
            out.append(
                f"\nDavidson tweets ({len(tweets)}, hate {int(y.sum())}): S10 AUROC {roc_auc(y, s):.3f}, "
                f"AUPRC {average_precision(y, s):.3f}, recall at block {np.mean(s[y] >= 0.8):.2f}, "
                f"neither flagged {np.mean(s[~y] >= 0.35):.1%}; second sample ({len(second)}): "
                f"S10 AUROC {roc_auc(y2, s2):.3f}"
            )
    if args.words:
        packed = whole_text_scores(heads["after (policy + pack)"], embed, texts)
        out += words_only(policy, embed, texts, labels, packed)
    out.append(f"\n({time.time() - started:.0f} s)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
