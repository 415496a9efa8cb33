"""Images judged against the policy's words by an exported dual encoder, end to end.

No CLIP or SigLIP weights can be downloaded here, so a tiny CLIP and a tiny SigLIP are trained
in the test (``tests/tiny_dual_encoder.py``: drawn shapes with captions, about a minute on this
CPU) and saved as Hugging Face checkpoints. Then the product path, as a user runs it:
``stream-guard model export CKPT --repository REPO`` -> a policy whose image category exists
only in words ("a red triangle on any background") -> a real `stream-guard serve` worker, the
real broker, S3 and tritonserver. Matching images are flagged, other shapes and colours are
allowed, a caption-only category is unaffected, the verdicts name the towers, and an edit of
the description is followed by the running worker. A random-initialised model of the same
shape goes through the same test and must fail it, so the test cannot pass by accident.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch", reason="the `export` extra (torch, transformers) is not installed")

from tests.conftest import ROOT, STATE, publish, read, upload  # noqa: E402
from tests.tiny_dual_encoder import draw, train_tiny  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# Steps, not seconds, so training is deterministic (about a minute each on a 2-core CPU).
TRAIN_STEPS = {"clip": 1800, "siglip": 3000}
MATCHING = [("red", "triangle", bg) for bg in ("plain", "striped", "dotted", "noisy")] * 2
OTHERS = [
    ("blue", "triangle", "plain"),
    ("green", "triangle", "striped"),
    ("purple", "triangle", "dotted"),
    ("red", "circle", "plain"),
    ("red", "square", "noisy"),
    ("red", "cross", "striped"),
    ("yellow", "circle", "dotted"),
    ("blue", "square", "plain"),
    ("green", "cross", "noisy"),
    ("purple", "circle", "striped"),
]
GAMBLING_TEXT = "Try our new online casino tonight, bet big and win a huge jackpot"


def policy_yaml(policy_id: str, colour: str = "red", shape: str = "triangle") -> dict:
    """A policy with one image category written only in words and one caption-only category."""
    near_misses = [f"a {c} {shape}" for c in ("red", "blue", "green", "yellow", "purple")]
    near_misses += [f"a {colour} {s}" for s in ("circle", "square", "triangle", "cross")]
    target = f"a {colour} {shape}"
    return {
        "policy_id": policy_id,
        "version": "1.0.0",
        "thresholds": {"allow": 0.4, "block": 0.8},
        "safe_examples": ["my weekend drawing", "look at this picture", "hello everyone"],
        "image_safe_descriptions": [],
        "categories": [
            {
                "code": "shape",
                "name": f"{colour.title()} {shape}s",
                "definition": f"Images that show a {colour} {shape}, whatever the background.",
                "examples": [f"here is a {colour} {shape}"],
                "image_descriptions": [f"a {colour} {shape} on any background"],
                "image_negative_descriptions": [d for d in near_misses if d != target],
            },
            {
                "code": "gambling",
                "name": "Gambling",
                "definition": "Content that promotes betting, casinos, online gambling or "
                "wagering money on games of chance.",
                "examples": [
                    "Place your bets now at our online casino and double your money",
                    "Join my poker site, first deposit bonus 200 percent",
                    "Spin the slot machines and win the jackpot today",
                ],
            },
        ],
    }


def png(colour: str, shape: str, background: str, seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(draw(colour, shape, background, seed=seed, side=96)).save(buf, "PNG")
    return buf.getvalue()


def _trainer_digest(kind: str) -> str:
    source = (ROOT / "tests" / "tiny_dual_encoder.py").read_bytes()
    return hashlib.sha256(source + str(TRAIN_STEPS[kind]).encode()).hexdigest()[:12]


def checkpoint(kind: str, trained: bool) -> Path:
    """Train (deterministic: fixed seed and step count), cached by the trainer's own source so
    a rerun on the same tree reuses it; a fresh checkout trains in the test."""
    name = f"{kind}-{'trained' if trained else 'random'}-{_trainer_digest(kind)}"
    out = STATE / "tiny-models" / name
    if (out / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    report = train_tiny(kind, out, steps=TRAIN_STEPS[kind], train=trained, max_seconds=600)
    print(f"tiny {kind} trained={trained}: {report}")
    if trained:
        assert report.zero_shot_accuracy > 0.7, report  # the model really learnt the world
    return out


@dataclass
class Deployed:
    kind: str
    towers: dict[str, str]
    checkpoint: Path


def export(stack, kind: str, trained: bool, tmp: Path) -> Deployed:
    """`stream-guard model export` into the stack's repository, as an operator runs it."""
    src = checkpoint(kind, trained)
    prefix = f"tiny_{kind}_{'t' if trained else 'r'}_{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_guard.cli.app",
            "model",
            "export",
            str(src),
            "--out",
            str(tmp / f"{prefix}-onnx"),
            "--repository",
            str(stack.model_repository),
            "--prefix",
            prefix,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    models = json.loads(done.stdout)["models"]
    assert set(models) == {"image", "text", "text_tokenizer", "text_embedder"}
    return Deployed(kind, models, src)


def worker_for(deployed: Deployed, worker_env, start_worker, policy: Path):
    env = {
        **worker_env,
        "STREAM_GUARD_POLICY__PATH": str(policy),
        "STREAM_GUARD_POLICY__RELOAD_INTERVAL_S": "0.5",
        "STREAM_GUARD_TRITON__IMAGE_TOWER": deployed.towers["image"],
    }
    return start_worker(env)


def judge(stack, topics, s3, cases: dict[str, tuple[tuple, str | None]], already: int = 0):
    """Publish one upload per case (an image, optionally a caption); verdicts by upload id."""
    records = []
    for n, (uid, (look, caption)) in enumerate(cases.items()):
        key = f"{uid}.png"
        s3.put_object(Bucket=stack.bucket, Key=key, Body=png(*look, seed=1000 + n))
        event = upload(uid, caption, [f"s3://{stack.bucket}/{key}"])
        records.append((uid.encode(), event))
    publish(stack.bootstrap, topics.uploads, records)
    got = read(stack.bootstrap, topics.verdicts, already + len(cases), timeout=120)
    verdicts = {}
    for r in got:
        v = json.loads(r.value)
        if v["upload_id"] in cases:
            verdicts[v["upload_id"]] = v
    assert set(verdicts) == set(cases), sorted(set(cases) - set(verdicts))
    return verdicts


def scores(verdict: dict) -> dict[str, dict]:
    return {c["code"]: c for c in verdict["categories"]}


@dataclass
class Outcome:
    flagged_matching: int
    allowed_others: int
    n_matching: int
    n_others: int

    @property
    def passed(self) -> bool:
        return self.flagged_matching == self.n_matching and self.allowed_others == self.n_others


def shapes_outcome(verdicts: dict, matching: list[str], others: list[str]) -> Outcome:
    flagged = sum(scores(verdicts[u])["shape"]["decision"] != "allow" for u in matching)
    allowed = sum(verdicts[u]["decision"] == "allow" for u in others)
    return Outcome(flagged, allowed, len(matching), len(others))


def cases_for(tag: str, matching=MATCHING, others=OTHERS):
    m = {f"{tag}-match-{n}": (look, None) for n, look in enumerate(matching)}
    o = {f"{tag}-other-{n}": (look, None) for n, look in enumerate(others)}
    return m, o


def write_policy(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def first_phase(stack, topics, s3, deployed, worker_env, start_worker, tmp_path):
    policy_id = f"shapes_{uuid.uuid4().hex[:6]}"
    path = write_policy(tmp_path / "policy.yaml", policy_yaml(policy_id))
    worker_for(deployed, worker_env, start_worker, path)
    matching, others = cases_for(deployed.kind)
    verdicts = judge(stack, topics, s3, {**matching, **others})
    outcome = shapes_outcome(verdicts, list(matching), list(others))
    print(f"{deployed.kind} {deployed.checkpoint.name}: {outcome}")
    for uid, v in verdicts.items():
        print(uid, v["decision"], {c: s["score"] for c, s in scores(v).items()})
    return path, verdicts, outcome


def test_trained_clip_flags_images_described_in_words_and_follows_an_edit(
    stack, topics, worker_env, start_worker, s3, tmp_path
):
    deployed = export(stack, "clip", True, tmp_path)
    path, verdicts, outcome = first_phase(
        stack, topics, s3, deployed, worker_env, start_worker, tmp_path
    )
    assert outcome.passed, outcome

    # The verdicts name the towers and the image head next to the text head.
    named = verdicts["clip-match-0"]["image_models"]
    assert [m["role"] for m in named] == ["image_tower", "image_text_tower", "image_head"]
    assert named[0]["name"] == deployed.towers["image"]
    assert named[1]["name"] == deployed.towers["text_embedder"]
    assert named[2]["name"].startswith("guard_image_head_shapes_")
    first_head = int(named[2]["version"])

    # The caption-only category is untouched by images: no text, no score.
    assert all(scores(v)["gambling"]["score"] == 0.0 for v in verdicts.values())

    sent = len(verdicts)
    mixed = {
        "clip-gamble-circle": (("red", "circle", "plain"), GAMBLING_TEXT),
        "clip-gamble-triangle": (("red", "triangle", "plain"), GAMBLING_TEXT),
        "clip-benign-caption": (("red", "triangle", "striped"), "my weekend drawing"),
        # ShieldVLM's implicit case: a red circle and the caption "a triangle" are each benign
        # under "a red triangle", together they are one.
        "clip-joint": (("red", "circle", "plain"), "a triangle"),
        "clip-joint-caption-alone": (("blue", "circle", "plain"), "a triangle"),
        "clip-joint-image-alone": (("red", "circle", "plain"), "hello everyone"),
    }
    got = judge(stack, topics, s3, mixed, already=sent)
    sent += len(mixed)
    for uid, v in got.items():
        print(uid, v["decision"], {c: s["score"] for c, s in scores(v).items()})
    joint = scores(got["clip-joint"])["shape"]
    assert joint["decision"] == "block", joint
    assert scores(got["clip-joint-image-alone"])["shape"]["decision"] == "allow"
    # The caption alone reads as a triangle to the text head too (it escalates); the red image
    # makes it a red triangle: the joint evidence is the image head's, above the text's.
    assert joint["score"] > scores(got["clip-joint-caption-alone"])["shape"]["score"]
    circle, triangle = got["clip-gamble-circle"], got["clip-gamble-triangle"]
    assert scores(circle)["gambling"]["decision"] != "allow"
    assert scores(circle)["shape"]["decision"] == "allow"
    assert scores(triangle)["gambling"]["decision"] != "allow"
    assert scores(triangle)["shape"]["decision"] != "allow"
    assert scores(got["clip-benign-caption"])["shape"]["decision"] != "allow"

    # Edit the description: blue circles now, red triangles no longer. The running worker
    # recompiles the image head and follows.
    write_policy(path, policy_yaml(yaml.safe_load(path.read_text())["policy_id"], "blue", "circle"))
    deadline = time.monotonic() + 120
    followed = None
    n = 0
    while time.monotonic() < deadline and followed is None:
        probe = {f"clip-probe-{n}": (("blue", "circle", "plain"), None)}
        v = judge(stack, topics, s3, probe, already=sent)[f"clip-probe-{n}"]
        sent += 1
        n += 1
        if scores(v)["shape"]["decision"] != "allow":
            followed = v
        else:
            time.sleep(0.5)
    assert followed is not None, "the worker never followed the edited description"
    assert int(followed["image_models"][2]["version"]) > first_head
    matching, others = cases_for(
        "clip-after",
        matching=[("blue", "circle", bg) for bg in ("plain", "striped", "dotted", "noisy")],
        others=[("red", "triangle", "plain"), ("red", "triangle", "noisy"), *OTHERS[4:8]],
    )
    after = judge(stack, topics, s3, {**matching, **others}, already=sent)
    outcome = shapes_outcome(after, list(matching), list(others))
    assert outcome.passed, outcome


def test_trained_siglip_flags_images_described_in_words(
    stack, topics, worker_env, start_worker, s3, tmp_path
):
    deployed = export(stack, "siglip", True, tmp_path)
    _, verdicts, outcome = first_phase(
        stack, topics, s3, deployed, worker_env, start_worker, tmp_path
    )
    assert outcome.passed, outcome
    assert all(scores(v)["gambling"]["score"] == 0.0 for v in verdicts.values())
    assert verdicts["siglip-match-0"]["image_models"][0]["name"] == deployed.towers["image"]


def test_a_random_initialised_model_fails_the_same_test(
    stack, topics, worker_env, start_worker, s3, tmp_path
):
    deployed = export(stack, "clip", False, tmp_path)
    _, _, outcome = first_phase(stack, topics, s3, deployed, worker_env, start_worker, tmp_path)
    assert not outcome.passed, outcome


def test_eval_reports_image_rows_by_slice_like_text_rows(stack, tmp_path):
    """`stream-guard eval` on a labelled manifest of image-only, caption-only and joint rows:
    the same path as the worker (decode, image tower, image head), metrics per slice."""
    deployed = export(stack, "clip", True, tmp_path)
    policy = write_policy(tmp_path / "policy.yaml", policy_yaml(f"evalimg_{uuid.uuid4().hex[:6]}"))
    rows = []
    for n, look in enumerate(MATCHING[:4] + OTHERS[:6]):
        (tmp_path / f"img{n}.png").write_bytes(png(*look, seed=2000 + n))
        labels = ["shape"] if look[:2] == ("red", "triangle") else []
        rows.append({"id": f"i{n}", "images": [f"img{n}.png"], "labels": labels})
    for n, (text, labels) in enumerate(
        [(GAMBLING_TEXT, ["gambling"]), ("hello everyone", []), ("look at this picture", [])]
    ):
        rows.append({"id": f"c{n}", "caption": text, "labels": labels})
    joint = [
        (("red", "triangle", "dotted"), "my weekend drawing", ["shape"]),
        (("blue", "circle", "plain"), GAMBLING_TEXT, ["gambling"]),
        (("green", "square", "striped"), "hello everyone", []),
    ]
    for n, (look, text, labels) in enumerate(joint):
        (tmp_path / f"joint{n}.png").write_bytes(png(*look, seed=3000 + n))
        rows.append({"id": f"j{n}", "images": [f"joint{n}.png"], "caption": text, "labels": labels})
    for r in rows:
        r["slice"] = (
            "joint"
            if r["id"][0] == "j"
            else "image-only"
            if r["id"][0] == "i"
            else ("caption-only")
        )
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {
        **os.environ,
        **stack.env(),
        "STREAM_GUARD_TRITON__IMAGE_TOWER": deployed.towers["image"],
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_guard.cli.app",
            "eval",
            str(manifest),
            "--policy",
            str(policy),
            "--out",
            str(tmp_path / "report"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    slices = report["slices"]
    assert set(slices) == {"image-only", "caption-only", "joint"}
    assert [slices[k]["n"] for k in ("image-only", "caption-only", "joint")] == [10, 3, 3]
    assert slices["image-only"]["accuracy"] == 1.0, slices["image-only"]
    assert slices["joint"]["accuracy"] == 1.0, slices["joint"]
