# ruff: noqa: E501  (report lines)
"""Guard quality of the default policy before and after its labelled pack (docs/quality.md).

    python -m benchmarks.quality_packs [--slices] [--words]

Compiles the shipped Llama Guard 4 policy three times with the embedded MiniLM text tower (the
same ONNX model Triton serves, run here by onnxruntime): from the policy's texts alone, with
its pack, and with its pack and its public datasets (what ships). Each is scored on data no
head sees: the pack's held-out split, the held-out split of the Davidson tweets
(../shared/datasets/davidson, hate vs neither, S10), and the suites in benchmarks/suites
(functional hate tests, look-alike questions, a general mix with long posts). Texts are scored
whole-text as the worker does (windows, sentence chunks, normalised forms; the maximum per
category). Prints markdown tables and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from stream_guard.build.text_encoder import TextEmbedder, default_minilm_dir
from stream_guard.events import UploadText
from stream_guard.policy.compiler import compile_head, head_texts
from stream_guard.policy.datasets import dataset_rows
from stream_guard.policy.model import IMAGE_SIGNALS, load_policy
from stream_guard.policy.packs import load_pack
from stream_guard.quality.compare import run_head
from stream_guard.quality.metrics import average_precision, roc_auc
from stream_guard.settings import DEFAULT_POLICY
from stream_guard.text import segments

SUITES = Path(__file__).resolve().parent / "suites"


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
        "| category | n+ | AUPRC | block precision: same category / any unsafe | block recall | escalated (neg) |",
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
        # What calibration targets: a block under this code lands on an unsafe upload.
        prec_any = (blocked & labels.any(axis=1)).sum() / max(blocked.sum(), 1)
        rec = (blocked & y).sum() / y.sum()
        lines.append(
            f"| {cat.code} | {int(y.sum())} | {average_precision(y, scores[:, c]):.3f} | {prec:.2f} / {prec_any:.2f} | {rec:.2f} | "
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
            variant = policy.model_copy(update={"categories": cats, "pack": tmp, "datasets": []})
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


def suite_report(
    name: str, policy, scores: np.ndarray, rows: list[dict], slices: bool
) -> list[str]:
    """One held-out suite (benchmarks/suites): ranking, and the shipped decisions."""
    y = np.array([bool(r["labels"]) for r in rows])
    top = scores.max(axis=1)
    decisions = [policy.decide(dict(zip(policy.codes, s.tolist(), strict=True)))[0] for s in scores]
    flagged = np.array([d != "allow" for d in decisions])
    escalated = np.array([d == "escalate" for d in decisions])
    tp = (flagged & y).sum()
    p, r = tp / max(flagged.sum(), 1), tp / max(y.sum(), 1)
    lines = [
        f"| {name} | {len(rows)} ({int(y.sum())}) | {average_precision(y, top):.3f} | {roc_auc(y, top):.3f} "
        f"| {(flagged == y).mean():.3f} | {p:.2f} / {r:.2f} / {2 * p * r / max(p + r, 1e-9):.3f} "
        f"| {escalated.mean():.1%} | {flagged[~y].mean():.1%} |"
    ]
    if slices:
        names = np.array([row.get("slice", "") for row in rows])
        for v in sorted(set(names)):
            m = names == v
            lines.append(
                f"|   {v} | {int(m.sum())} | | | {(flagged[m] == y[m]).mean():.2f} | | {escalated[m].mean():.0%} | |"
            )
    return lines


SUITE_HEADER = [
    "| suite | rows (unsafe) | any-unsafe AUPRC | AUROC | accuracy at shipped thresholds | "
    "P / R / F1 (escalate counts as flagged) | escalated | safe rows flagged |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def _tweets(policy) -> list:
    """The held-out split of the policy's Davidson dataset, hate vs neither (no head sees it)."""
    ref = next((d for d in policy.datasets if d.name == "davidson"), None)
    if ref is None or not ref.available:
        return []
    return [r for r in dataset_rows(ref.name, Path(ref.path), ref.labels) if r.split == "heldout"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--words", action="store_true", help="also each category written in words only (~3 min)"
    )
    ap.add_argument("--slices", action="store_true", help="suite results per slice")
    args = ap.parse_args()
    started = time.time()
    policy = load_policy(DEFAULT_POLICY)
    pack = load_pack(Path(policy.pack), policy.codes)
    embedder = TextEmbedder.from_model_dir(default_minilm_dir())
    cache: dict[str, np.ndarray] = {}

    def embed(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            cache.update(zip(chunk, embedder.embed(chunk), strict=True))
        return np.stack([cache[t] for t in texts])

    embed([*head_texts(policy)])  # embedding is the text tower's cost, not the compiler's
    variants = {
        "policy only": {"use_pack": False, "use_datasets": False},
        "policy + pack": {"use_datasets": False},
        "policy + pack + datasets (shipped)": {},
    }
    heads, compile_s = {}, {}
    for name, kw in variants.items():
        t0 = time.time()
        heads[name] = compile_head(policy, embed, **kw).to_bytes()
        compile_s[name] = time.time() - t0
    held = pack.split("heldout")
    texts = [r.text for r in held]
    labels = np.array([[c in r.labels for c in policy.codes] for r in held])
    tweets = _tweets(policy)
    suites = {
        f.stem: [
            json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        for f in sorted(SUITES.glob("*.jsonl"))
    }
    out = [
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"Policy {policy.policy_id} {policy.effective_version}; pack held-out split: {len(held)} rows "
        f"({int(labels.any(axis=1).sum())} unsafe); Davidson held-out split: {len(tweets)} tweets "
        f"({sum(bool(r.labels) for r in tweets)} hate)",
    ]
    s10 = policy.codes.index("S10")
    for name, head in heads.items():
        out.append(
            f"\n## {name}: compiled in {compile_s[name]:.1f} s, head {len(head) / 1e6:.1f} MB"
        )
        out += report(
            f"{name}: pack held-out", policy, whole_text_scores(head, embed, texts), labels
        )
        if tweets:
            s = whole_text_scores(head, embed, [r.text for r in tweets])[:, s10]
            y = np.array([bool(r.labels) for r in tweets])
            allow = policy.thresholds_for(policy.categories[s10]).allow
            out.append(
                f"\nDavidson held-out tweets: S10 AUROC {roc_auc(y, s):.3f}, AUPRC {average_precision(y, s):.3f}, "
                f"hate flagged {np.mean(s[y] >= allow):.1%}, neither flagged {np.mean(s[~y] >= allow):.1%}"
            )
        out += ["\nHeld-out suites (benchmarks/suites):\n", *SUITE_HEADER]
        for suite, rows in suites.items():
            scores = whole_text_scores(head, embed, [r["text"] for r in rows])
            out += suite_report(suite, policy, scores, rows, args.slices)
    if args.words:
        packed = whole_text_scores(heads["policy + pack + datasets (shipped)"], embed, texts)
        out += words_only(policy, embed, texts, labels, packed)
    out.append(f"\n({time.time() - started:.0f} s)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
