"""The policy compiler: graph arithmetic against its numpy reference, training, calibration,
words-only categories on the real MiniLM text tower and the shipped pack, text signals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from stream_guard.errors import PolicyError
from stream_guard.policy import compiler
from stream_guard.policy.compiler import compile_head, head_texts, tower_layout
from stream_guard.policy.head_graph import (
    Bank,
    HeadParams,
    apply_maps,
    bank_features,
    build_graph,
    head_scores,
)
from stream_guard.policy.model import IMAGE_SIGNALS, load_policy, parse_policy
from stream_guard.policy.training import (
    HIGH_SCORE,
    LOW_SCORE,
    MlpConfig,
    fit_mlp,
    operating_points,
    score_map,
)
from stream_guard.settings import DEFAULT_POLICY

N_IMAGE = len(IMAGE_SIGNALS)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _toy_params(rng, *, n=70, d=16, n_cat=3, n_sig=2, hidden=8, trained=(True, False, True)):
    vectors = _unit(rng, n, d)
    labels = (rng.random((n, n_cat)) < 0.3).astype(np.float64)
    pos = [np.nonzero(labels[:, c])[0][: 4 + 3 * c] for c in range(n_cat)]
    neg = [np.nonzero(labels[:, 0] == 0)[0][:5], np.array([], np.int64), np.arange(7)]
    width = d + 4 * n_cat + n_sig
    mlp = (
        rng.normal(size=(width, hidden)),
        rng.normal(size=hidden),
        rng.normal(size=(hidden, n_cat)),
        rng.normal(size=n_cat),
    )
    image_map = np.zeros((N_IMAGE, n_cat), np.float32)
    image_map[3, 1] = 1.0
    text_map = np.zeros((n_sig, n_cat), np.float32)
    text_map[1, 2] = 1.0
    return HeadParams(
        Bank(vectors, labels, pos, neg),
        n_sig,
        np.array(trained),
        np.stack(
            [score_map(z, z + 1.0, 0.35, 0.8, low_z=z - 3, high_z=z + 4) for z in (-1.0, 0.0, 0.5)],
            axis=1,
        ),
        mlp,
        image_map,
        text_map,
    )


def _run(model, text: np.ndarray, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"TEXT_EMBEDDING": text.astype(np.float32), "IMAGE_SIGNALS": image.astype(np.float32)}
    return session.run(["SCORES"], feeds)[0]


# -- the graph computes what numpy computes ------------------------------------------------------


@pytest.mark.parametrize(
    "trained",
    [(True, False, True), (False, False, False), (True, True, True)],
    ids=["mixed", "words-only", "trained-only"],
)
def test_onnx_head_matches_its_numpy_reference(trained):
    rng = np.random.default_rng(7)
    p = _toy_params(rng, trained=trained)
    if not any(trained):
        p.mlp = None
    batch = 9
    text = np.hstack([_unit(rng, batch, p.dim), rng.random((batch, p.n_text_signals))])
    text[0, : p.dim] = 0.0  # an upload without text
    image = rng.random((batch, N_IMAGE)) * 0.5
    got = _run(build_graph(p, N_IMAGE), text, image)
    want = head_scores(p, text, image)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # no text: only the signals the categories list count
    assert got[0, 0] == 0.0 and got[0, 1] == pytest.approx(image[0, 3], abs=1e-6)
    assert got[0, 2] == pytest.approx(text[0, p.dim + 1], abs=1e-6)


def test_a_row_left_out_of_the_bank_does_not_vote_for_itself():
    vectors = np.eye(3, dtype=np.float32)
    labels = np.array([[1.0], [0.0], [0.0]])
    bank = Bank(vectors, labels, [np.array([0])], [np.array([1, 2])])
    seen = bank_features(bank, vectors[:1])
    unseen = bank_features(bank, vectors[:1], exclude=np.array([0]))
    assert seen.near[0, 0] > 0.99 and unseen.near[0, 0] < 1e-6
    assert seen.pos[0, 0] == pytest.approx(1.0) and unseen.pos[0, 0] == 0.0  # no real prototype


def test_bank_subset_keeps_prototypes_pointing_at_the_same_rows():
    rng = np.random.default_rng(0)
    bank = Bank(_unit(rng, 6, 4), np.zeros((6, 1)), [np.array([1, 3, 5])], [np.array([0, 2])])
    keep = np.array([True, False, True, True, False, True])
    sub = bank.subset(keep)
    np.testing.assert_array_equal(sub.vectors[sub.pos[0]], bank.vectors[[3, 5]])
    np.testing.assert_array_equal(sub.vectors[sub.neg[0]], bank.vectors[[0, 2]])


# -- training and calibration ---------------------------------------------------------------------


def test_mlp_learns_a_label_no_linear_model_can():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(600, 2))
    y = ((x[:, 0] * x[:, 1]) > 0).astype(np.float64)[:, None]  # XOR of the signs
    w1, b1, w2, b2 = fit_mlp(x, y, MlpConfig(hidden=16, epochs=200, weight_decay=0.0))
    z = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    assert ((z[:, 0] > 0) == (y[:, 0] > 0)).mean() > 0.9


@pytest.mark.parametrize(
    ("n_pos", "neg_share", "expected"),
    [
        # scores 0..39, the top n_pos positive: block at the lowest score whose precision from
        # the top is still >= 0.9 (29: 10 of 11), allow half a logit below it or at the
        # negatives' quantile, whichever is lower
        (10, 0.0, (28.5, 29.0)),
        (10, 0.2, (23.0, 29.0)),
        (20, 0.0, (17.5, 18.0)),
        (7, 0.0, None),  # too few positives to calibrate
    ],
)
def test_operating_points(n_pos, neg_share, expected):
    z = np.arange(40.0)
    got = operating_points(z, z >= 40 - n_pos, block_precision=0.9, neg_share=neg_share, min_pos=8)
    assert got == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (2.0, 0.35),  # the raw score calibration put on allow
        (4.0, 0.8),  # ... and on block
        (3.0, None),  # between: inside the escalation band
        (-8.0, LOW_SCORE),  # the category's low percentile: not 0
        (12.0, HIGH_SCORE),  # its high percentile: not 1
    ],
)
def test_score_map_puts_calibrated_points_on_the_thresholds_and_keeps_tails_rankable(raw, expected):
    maps = score_map(2.0, 4.0, 0.35, 0.8, low_z=-8.0, high_z=12.0)[:, None]
    p = float(1 / (1 + np.exp(-apply_maps(maps, np.array([[raw]]))[0, 0])))
    if expected is None:
        assert 0.35 < p < 0.8
    else:
        assert p == pytest.approx(expected, abs=1e-6)
    # monotone everywhere, and far tails still distinguishable at 4 decimals
    z = np.linspace(-40, 40, 801)[:, None]
    probs = 1 / (1 + np.exp(-apply_maps(maps, z)[:, 0]))
    assert (np.diff(probs) > 0).all()
    assert round(float(probs[100]), 4) < round(float(probs[300]), 4) < 0.35  # -30 vs -10


# -- text signals and the tower's layout ----------------------------------------------------------


def test_tower_layout_reads_width_and_signal_names_from_the_triton_config():
    cfg = {
        "config": {
            "output": [{"name": "EMBEDDING", "dims": ["770"]}],
            "parameters": {
                "stream_guard.text_signals": {"string_value": '["tox:toxic", "tox:insult"]'}
            },
        }
    }
    layout = tower_layout(cfg)
    assert layout.width == 770 and layout.dim == 768
    assert layout.text_signals == ("tox:toxic", "tox:insult")
    assert tower_layout({"output": [{"name": "EMBEDDING", "dims": [384]}]}).text_signals == ()
    with pytest.raises(PolicyError, match="no EMBEDDING"):
        tower_layout({"output": []})


TOY_POLICY = """\
policy_id: toy
version: "1"
thresholds: {allow: 0.35, block: 0.8}
safe_examples: ["a quiet walk in the park", "fresh bread from the bakery"]
categories:
  - code: A
    name: Alpha
    definition: texts about alpha things
    examples: ["alpha one", "alpha two"]
    text_signals: [tox:toxic]
  - code: B
    name: Beta
    definition: texts about beta things
    examples: ["beta one"]
"""


def _hash_embed(width: int, signals: int = 0):
    """A deterministic stand-in tower for pure compiler mechanics (quality is tested below on
    the real MiniLM tower): a unit vector per text, then ``signals`` columns."""

    def embed(texts):
        out = []
        for t in texts:
            rng = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            v = rng.normal(size=width)
            v /= np.linalg.norm(v)
            out.append(np.concatenate([v, np.full(signals, 0.9 if "alpha" in t else 0.1)]))
        return np.array(out, np.float32)

    return embed


def test_a_listed_text_signal_scores_its_category_like_an_image_signal():
    policy = parse_policy(TOY_POLICY)
    head = compile_head(policy, _hash_embed(32, 1), text_signals=["tox:toxic"])
    assert head.text_signals == ["tox:toxic"]
    text = np.zeros((2, 33), np.float32)
    text[:, 0], text[0, 32] = 1.0, 0.97
    scores = _run(head.onnx_model, text, np.zeros((2, N_IMAGE)))
    assert scores[0, 0] >= 0.97 > scores[1, 0]
    assert scores[0, 1] == scores[1, 1]  # B does not list it


def test_a_text_signal_the_tower_does_not_send_is_refused_with_the_names_it_sends():
    policy = parse_policy(TOY_POLICY)
    with pytest.raises(PolicyError, match=r"tox:toxic.*\['other'\]"):
        compile_head(policy, _hash_embed(32, 1), text_signals=["other"])


def test_the_head_takes_the_width_of_the_tower_it_is_compiled_on():
    policy = parse_policy(TOY_POLICY.replace("    text_signals: [tox:toxic]\n", ""))
    head = compile_head(policy, _hash_embed(48))
    dims = head.onnx_model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 48


def test_head_texts_lists_every_text_the_compiler_embeds():
    policy = load_policy(DEFAULT_POLICY)
    table = set(head_texts(policy))
    seen: list[str] = []
    real = _hash_embed(16)

    def embed(texts):
        seen.extend(texts)
        return real(texts)

    compiler_mlp = compiler.MLP
    compiler.MLP = MlpConfig(hidden=4, epochs=1)  # mechanics only: keep the fit cheap
    try:
        compile_head(policy, embed)
    finally:
        compiler.MLP = compiler_mlp
    assert set(seen) <= table


def test_the_held_out_split_never_reaches_the_head():
    policy = load_policy(DEFAULT_POLICY)
    from stream_guard.policy.packs import load_pack

    held = {r.text for r in load_pack(Path(policy.pack), policy.codes).split("heldout")}
    assert held and not held & set(head_texts(policy))


# -- a category written in words, on the real text tower ------------------------------------------

GAMBLING = """
  - code: G1
    name: Gambling Promotion
    definition: >-
      Content that advertises, promotes or encourages gambling: online casinos, slots, poker,
      betting or sports wagering, including sign-up bonuses, odds tips and invitations to bet.
    examples:
      - "Sign up today at LuckyStar Casino and get 200 free spins on your first deposit"
      - "Bet on tonight's match with our app, use code WIN50 for a risk-free first wager"
      - "Our VIP betting tips hit 9 of 10 last week, join the channel and start winning real money"
      - "Best online slots of the year, deposit now and double your bankroll"
"""
# Written for this test, never shown to the compiler.
GAMBLING_TEXTS = [
    "Claim your welcome bonus: deposit $20 and play roulette with $100 tonight",
    "Hot tip: put your money on the underdog at 5 to 1, link to the bookmaker in bio",
    "Download the poker app and get free chips, real cash prizes every hour",
    "Spin the wheel at our online casino, new players get 50 free spins",
    "Place your bets now, odds boosted for the derby, first bet refunded if you lose",
]
BENIGN_TEXTS = [
    "Had a lovely picnic in the park with the kids today",
    "New recipe: lemon garlic roast chicken",
    "The match ended 2-1 after extra time",
    "Our book club is reading a mystery novel this month",
    "Traffic on the bridge is slow this morning",
    "Grandma's garden is full of tomatoes this year",
]
THREAT = "I'm going to hurt you when I find you"


@pytest.fixture(scope="module")
def minilm():
    from stream_guard.build.text_encoder import TextEmbedder, default_minilm_dir

    embedder = TextEmbedder.from_model_dir(default_minilm_dir())
    cache: dict[str, np.ndarray] = {}

    def embed(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, embedder.embed(missing), strict=True))
        return np.stack([cache[t] for t in texts])

    return embed


def _with_gambling(use_pack: bool):
    text = Path(DEFAULT_POLICY).read_text(encoding="utf-8").rstrip() + "\n" + GAMBLING
    policy = parse_policy(text, base=Path(DEFAULT_POLICY).parent)
    return policy if use_pack else policy.model_copy(update={"pack": None})


@pytest.mark.parametrize("use_pack", [True, False], ids=["beside-a-trained-policy", "no-pack"])
def test_a_category_written_in_words_catches_what_it_names_and_leaves_the_rest(minilm, use_pack):
    policy = _with_gambling(use_pack)
    head = compile_head(policy, minilm)
    assert head.calibration["G1"].method == "words"
    texts = GAMBLING_TEXTS + BENIGN_TEXTS + [THREAT]
    scores = _run(head.onnx_model, minilm(texts), np.zeros((len(texts), N_IMAGE)))
    allow = policy.thresholds.allow
    g1 = scores[:, policy.codes.index("G1")]
    n = len(GAMBLING_TEXTS)
    assert (g1[:n] >= allow).sum() >= n - 1, g1[:n]  # caught: escalated or blocked
    assert (g1[n:] < allow).all(), g1[n:]  # benign text and another category's text
    assert scores[-1].max() >= allow  # the threat is still caught by its own category


def test_benign_text_scores_below_allow_for_a_policy_without_labelled_data(minilm):
    policy = load_policy(DEFAULT_POLICY).model_copy(update={"pack": None, "datasets": []})
    head = compile_head(policy, minilm)
    assert {c.method for c in head.calibration.values()} == {"words"}
    scores = _run(head.onnx_model, minilm(BENIGN_TEXTS), np.zeros((len(BENIGN_TEXTS), N_IMAGE)))
    assert (scores.max(axis=1) < policy.thresholds.allow).all(), scores.max(axis=1)
    threat = _run(head.onnx_model, minilm([THREAT]), np.zeros((1, N_IMAGE)))
    assert threat[0, policy.codes.index("S1")] >= policy.thresholds.allow


@pytest.fixture(scope="module")
def shipped_calibration(minilm):
    return compile_head(load_policy(DEFAULT_POLICY), minilm).calibration


def test_the_pack_trains_and_calibrates_every_default_category(shipped_calibration):
    assert {c.method for c in shipped_calibration.values()} == {"trained"}
    assert all(c.n_pos >= compiler.MIN_TRAINED_POSITIVES for c in shipped_calibration.values())


def _with_s1(field: str, value: float, minilm):
    policy = load_policy(DEFAULT_POLICY)
    cats = [c.model_copy(update={field: value}) if c.code == "S1" else c for c in policy.categories]
    return compile_head(policy.model_copy(update={"categories": cats}), minilm).calibration


def test_a_larger_escalation_share_lowers_only_that_categorys_allow_point(
    minilm, shipped_calibration
):
    base, wider = shipped_calibration, _with_s1("escalation_share", 0.02, minilm)
    assert wider["S1"].z_allow < base["S1"].z_allow, "more of S1's negatives may escalate"
    assert wider["S1"].z_block == pytest.approx(base["S1"].z_block)
    assert wider["S7"].z_allow == pytest.approx(base["S7"].z_allow)


def test_a_lower_block_precision_lowers_only_that_categorys_block_point(
    minilm, shipped_calibration
):
    base, lower = shipped_calibration, _with_s1("block_precision", 0.6, minilm)
    assert lower["S1"].z_block < base["S1"].z_block, "S1 blocks at a lower score"
    assert lower["S7"].z_block == pytest.approx(base["S7"].z_block)
