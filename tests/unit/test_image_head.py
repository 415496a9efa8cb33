"""The image head compiled from a policy's image descriptions (image_head.py), on a hand-made
embedding space whose axes are concepts, so every expected score can be reasoned out."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from stream_guard.errors import ConfigError, PolicyError
from stream_guard.policy.image_head import (
    IMAGE_HEAD_OUTPUT,
    TowerSpace,
    compile_image_head,
    image_head_examples,
    image_head_texts,
    lse_margin,
)
from stream_guard.policy.model import parse_policy

AXES = ("red", "blue", "green", "triangle", "circle", "square", "noise1", "noise2", "noise3")
DIM = len(AXES)
SCALE = 20.0


def vec(*concepts: str, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    v = np.zeros(DIM)
    for c in concepts:
        v[AXES.index(c)] += 1.0
    v += np.random.default_rng(seed).normal(0, noise, DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


# What the "text tower" knows: each description is the sum of the concepts it names.
WORDS = {
    "a red triangle on any background": ("red", "triangle"),
    "a blue triangle": ("blue", "triangle"),
    "a green triangle": ("green", "triangle"),
    "a red circle": ("red", "circle"),
    "a blue square": ("blue", "square"),
    "a red square": ("red", "square"),
    "a triangle": ("triangle",),
    "something red": ("red",),
    "a harmless picture": ("noise1",),
    "red triangles, drawn": ("red", "triangle", "noise2"),
}


def embed_texts(texts):
    return np.stack([vec(*WORDS[t]) for t in texts])


POLICY = """
policy_id: shapes
version: "1"
thresholds: {allow: 0.4, block: 0.8}
image_safe_descriptions: ["a harmless picture"]
categories:
  - code: red_triangle
    name: Red triangles
    definition: Images that show a red triangle, whatever the background.
    examples: ["a red triangle"]
    image_descriptions: ["a red triangle on any background"]
    image_negative_descriptions:
      ["a blue triangle", "a green triangle", "a red circle", "a red square"]
  - code: spam
    name: Spam
    definition: Unsolicited advertising text repeated to many users.
    examples: ["buy cheap watches now"]
"""


NEGATIVES = ["a blue triangle", "a green triangle", "a red circle", "a red square"]
NEGATIVES += ["a harmless picture"]


def space(dim: int = DIM) -> TowerSpace:
    return TowerSpace(SCALE, dim, "test-towers", {"image_tower": "t:1"})


def run(head, images: np.ndarray, captions: np.ndarray | None = None) -> np.ndarray:
    sess = ort.InferenceSession(head.to_bytes(), providers=["CPUExecutionProvider"])
    captions = np.zeros_like(images) if captions is None else captions
    (out,) = sess.run(
        [IMAGE_HEAD_OUTPUT],
        {"IMAGE_EMBEDDING": images.astype(np.float32), "CAPTION_EMBEDDING": captions},
    )
    return out


@pytest.fixture(scope="module")
def head():
    return compile_image_head(parse_policy(POLICY), embed_texts, space())


def test_image_score_is_the_models_zero_shot_choice_between_descriptions(head):
    images = np.stack([vec("red", "triangle", noise=0.2, seed=s) for s in range(5)])
    out = run(head, images)
    pos = embed_texts(["a red triangle on any background"])
    neg = embed_texts(
        [
            "a blue triangle",
            "a green triangle",
            "a red circle",
            "a red square",
            "a harmless picture",
        ]
    )
    want = 1 / (1 + np.exp(-lse_margin(images.astype(np.float64), pos, neg, SCALE)))
    np.testing.assert_allclose(out[:, 0], want, atol=1e-5)
    assert (out[:, 0] > 0.8).all()


@pytest.mark.parametrize(
    "concepts", [("blue", "triangle"), ("red", "circle"), ("blue", "square"), ("noise1",)]
)
def test_images_that_do_not_match_the_description_score_low(head, concepts):
    out = run(head, np.stack([vec(*concepts, noise=0.1, seed=s) for s in range(5)]))
    assert (out[:, 0] < 0.2).all(), out[:, 0]


def test_a_category_without_image_descriptions_scores_zero(head):
    out = run(
        head, np.stack([vec("red", "triangle"), vec("noise2")]), embed_texts(["a triangle"] * 2)
    )
    assert (out[:, 1] == 0).all()
    assert head.image_codes == ["red_triangle"]


def test_a_benign_caption_never_hides_a_harmful_image(head):
    image = np.stack([vec("red", "triangle")])
    alone = run(head, image)
    with_caption = run(head, image, embed_texts(["a harmless picture"]))
    assert with_caption[0, 0] >= alone[0, 0] - 1e-6


def test_a_caption_saying_what_a_benign_image_does_not_show_is_caught_together():
    """ShieldVLM's implicit case: a red circle (benign) captioned "a triangle" (benign alone):
    together they describe a red triangle."""
    h = compile_image_head(parse_policy(POLICY), embed_texts, space())
    image = np.stack([vec("red", "circle")])
    caption = embed_texts(["a triangle"])
    assert run(h, image)[0, 0] < 0.2
    assert run(h, vec("noise3")[None], caption)[0, 0] < 0.4  # the caption alone
    assert run(h, image, caption)[0, 0] > 0.8


def test_a_caption_that_names_the_category_is_evidence_in_the_images_space(head):
    out = run(head, vec("noise3")[None], embed_texts(["red triangles, drawn"]))
    assert out[0, 0] > 0.8


def test_the_policy_texts_are_listed_for_one_embedding_call():
    policy = parse_policy(POLICY)
    assert image_head_texts(policy) == [
        "a red triangle on any background",
        "a blue triangle",
        "a green triangle",
        "a red circle",
        "a red square",
        "a harmless picture",
    ]
    assert image_head_examples(policy) == []


def test_image_descriptions_need_benign_alternatives():
    bad = POLICY.replace('image_safe_descriptions: ["a harmless picture"]', "")
    bad = bad.replace("    image_negative_descriptions:\n", "    not_negatives:\n")
    bad = "\n".join(line for line in bad.splitlines() if "not_negatives" not in line)
    bad = "\n".join(line for line in bad.splitlines() if '["a blue triangle"' not in line)
    with pytest.raises(PolicyError, match="nothing to contrast"):
        parse_policy(bad)


def test_example_images_need_descriptions_and_an_image_tower(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    with pytest.raises(PolicyError, match="image_descriptions"):
        parse_policy(
            POLICY.replace(
                '    examples: ["buy cheap',
                '    image_examples: ["a.png"]\n    examples: ["buy cheap',
            ),
            base=tmp_path,
        )
    policy = parse_policy(
        POLICY.replace(
            "    image_negative_descriptions:",
            '    image_examples: ["a.png"]\n    image_negative_examples: ["a.png"]\n'
            "    image_negative_descriptions:",
        ),
        base=tmp_path,
    )
    assert image_head_examples(policy) == [str((tmp_path / "a.png").resolve())]
    with pytest.raises(ConfigError, match="no image tower"):
        compile_image_head(policy, embed_texts, space())


def test_a_missing_example_image_is_a_policy_error_naming_it(tmp_path):
    text = POLICY.replace(
        "    image_negative_descriptions:",
        '    image_examples: ["gone.png"]\n    image_negative_descriptions:',
    )
    with pytest.raises(PolicyError, match="gone.png"):
        parse_policy(text, base=tmp_path)


def test_few_shot_examples_add_evidence_and_refit_the_image_calibration(tmp_path):
    names = [f"{n}.png" for n in range(6)]
    for n in names:
        (tmp_path / n).write_bytes(n.encode())
    text = POLICY.replace(
        "    image_negative_descriptions:",
        f"    image_examples: {names[:3]}\n    image_negative_examples: {names[3:]}\n"
        "    image_negative_descriptions:",
    )
    policy = parse_policy(text, base=tmp_path)
    looks = {
        str((tmp_path / n).resolve()): vec("red", "triangle", noise=0.3, seed=i)
        if i < 3
        else vec("blue", "square", noise=0.3, seed=i)
        for i, n in enumerate(names)
    }
    h = compile_image_head(
        policy, embed_texts, space(), embed_images=lambda uris: np.stack([looks[u] for u in uris])
    )
    cal = h.calibration["red_triangle"]
    assert cal["image"].fitted_on == 6 and cal["examples"].fitted_on == 6
    assert cal["caption"].fitted_on == 0  # one description: nothing to leave out
    out = run(h, np.stack([vec("red", "triangle", noise=0.2, seed=9), vec("blue", "square")]))
    assert out[0, 0] > 0.8 and out[1, 0] < 0.2


def test_towers_of_different_widths_are_refused():
    with pytest.raises(ConfigError, match="not the two towers"):
        compile_image_head(parse_policy(POLICY), embed_texts, space(dim=16))


def test_a_policy_without_image_categories_has_no_image_head():
    data = yaml.safe_load(POLICY)
    data["categories"] = data["categories"][1:]
    with pytest.raises(ConfigError, match="no category with image_descriptions"):
        compile_image_head(parse_policy(yaml.safe_dump(data)), embed_texts, space())
