"""Exported CLIP and SigLIP towers served by the real tritonserver match PyTorch.

Tiny random-initialised checkpoints are saved to disk, exported by the same code as
`stream-guard model export`, written into a CPU-flavour repository (onnx_runner.py on the Python
backend) and served by tritonserver from the nvidia-pytriton wheel. Tolerance: 1e-4 absolute on
the L2-normalised embeddings and on the image-text logits computed from them.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the `export` extra (torch, transformers) is not installed")

from stream_guard.build import export as ex  # noqa: E402
from stream_guard.dev.stack import TritonPorts, free_port, start_triton  # noqa: E402

pytestmark = pytest.mark.integration
TOLERANCE = 1e-4
KINDS = ("clip", "siglip")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-serving")
    repo = root / "repo"
    exported = {}
    for kind in KINDS:
        src = ex.save_tiny_checkpoint(kind, root / kind)
        report = ex.export_dual_encoder(src, root / f"{kind}-onnx")
        names = ex.write_towers(root / f"{kind}-onnx", repo)
        model, _ = ex.load_dual_encoder(str(src))
        exported[kind] = (report, names, model, ex.load_preprocessing(str(src), model, kind))
    ports = TritonPorts(free_port(), free_port(), free_port())
    models = [name for _, names, _, _ in exported.values() for name in names.values()]
    proc = start_triton(root / "state", repo, ports, models)
    try:
        yield exported, f"127.0.0.1:{ports.grpc}"
    finally:
        proc.stop()


def _infer(url: str, model: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for name, array in arrays.items():
        dtype = "UINT8" if array.dtype == np.uint8 else "INT64"
        inp = grpcclient.InferInput(name, list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
    client.close()
    return result.as_numpy("EMBEDDING")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("batch", "seq"), [(1, 4), (4, 11)])
def test_triton_served_towers_match_pytorch(served, kind, batch, seq):
    exported, url = served
    report, names, model, prep = exported[kind]
    images, ids, mask = ex.random_inputs(report, batch=batch, seq=seq, seed=batch + seq)
    ref = ex.torch_reference(model, prep, images, ids, mask)
    image_emb = _infer(url, names["image"], {"IMAGE": images})
    text_emb = _infer(url, names["text"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    errors = {
        "image": float(np.abs(image_emb - ref["image"]).max()),
        "text": float(np.abs(text_emb - ref["text"]).max()),
        "scores": float(np.abs(ex.scores(report, image_emb, text_emb) - ref["scores"]).max()),
    }
    print(f"{kind} batch={batch} seq={seq} max abs error via Triton: {errors}")
    assert max(errors.values()) < TOLERANCE, errors


# -- a Hugging Face text encoder + a classifier as the guard's text tower ------------------------

TEXT_POLICY = """
policy_id: tiny_text
version: "1"
safe_examples: ["a walk in the park", "hello world", "fresh bread from the bakery"]
categories:
  - code: T
    name: Toxicity
    definition: insults and toxic language aimed at a person
    examples: ["you are a worthless idiot", "nobody wants you here, loser"]
    text_signals: ["toxic:insult"]
  - code: V
    name: Violence
    definition: threats of violence against a person
    examples: ["I will find you after school"]
"""
TEXTS = ["hello world", "I will find you after school and you will regret it", "a", ""]


@pytest.fixture(scope="module")
def text_tower(tmp_path_factory):
    """A tiny RoBERTa encoder + BERT classifier exported, written as the repository's
    text_encoder, and served by tritonserver with a head compiled on it."""
    from stream_guard.build import text_export as tx
    from stream_guard.build.repository import write_head
    from stream_guard.build.text_encoder import served_tower
    from stream_guard.policy.compiler import compile_head
    from stream_guard.policy.model import parse_policy

    root = tmp_path_factory.mktemp("text-tower")
    enc = tx.save_tiny_text_checkpoint("roberta", root / "enc")
    cls = tx.save_tiny_text_checkpoint("bert", root / "cls", classifier_labels=["toxic", "insult"])
    tx.export_text_tower(enc, root / "out", signals=[f"toxic={cls}"], prefix="query: ")
    repo = root / "repo"
    tx.write_text_tower(root / "out", repo)
    policy = parse_policy(TEXT_POLICY)
    embed, signals = served_tower(repo)
    head = write_head(repo, compile_head(policy, embed, text_signals=signals))
    ports = TritonPorts(free_port(), free_port(), free_port())
    proc = start_triton(root / "state", repo, ports, ["text_encoder", head.model_name])
    try:
        yield policy, embed, head, f"127.0.0.1:{ports.grpc}"
    finally:
        proc.stop()


async def test_triton_serves_the_exported_text_tower_with_its_signals(text_tower):
    from stream_guard.settings import TritonSettings
    from stream_guard.triton import GuardModels

    _, embed, _, url = text_tower
    models = GuardModels(TritonSettings(url=url))
    try:
        served = await models.embed_texts(TEXTS)
    finally:
        await models.close()
    want = embed(TEXTS)
    assert served.shape == (len(TEXTS), 34)
    error = float(np.abs(served - want).max())
    print(f"exported text tower via Triton: max abs error {error:.2e}")
    assert error < TOLERANCE


async def test_a_worker_compiles_its_head_on_the_served_tower_and_its_signals(text_tower):
    from stream_guard.policy.heads import compile_with_triton, text_tower_layout
    from stream_guard.settings import TritonSettings
    from stream_guard.triton import GuardModels

    policy, embed, head, url = text_tower
    models = GuardModels(TritonSettings(url=url))
    try:
        layout = await text_tower_layout(models)
        compiled = await compile_with_triton(policy, models)
        vectors = await models.embed_texts(["you are a worthless idiot", "hello world"])
        scores = await models.score(head.model_name, head.version, vectors, np.zeros((2, 18)))
    finally:
        await models.close()
    assert (layout.width, layout.text_signals) == (34, ("toxic:toxic", "toxic:insult"))
    assert compiled.text_signals == ["toxic:toxic", "toxic:insult"]
    width = compiled.onnx_model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    assert width == 34
    # The served head: T lists toxic:insult, so its score is at least that signal; V does not.
    insult = vectors[:, 32 + 1]
    t, v = policy.codes.index("T"), policy.codes.index("V")
    assert (scores[:, t] >= insult - 1e-6).all()
    local = embed(["you are a worthless idiot", "hello world"])
    np.testing.assert_allclose(vectors, local, atol=TOLERANCE)
    assert scores.shape == (2, 2) and np.isfinite(scores[:, v]).all()
