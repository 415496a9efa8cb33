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
