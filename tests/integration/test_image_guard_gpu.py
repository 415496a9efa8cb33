"""The image guard's GPU flavour: exported towers on onnxruntime_onnx, the image head as a
TensorRT plan, served by a full Triton (the NGC image's tritonserver, with the onnxruntime and
tensorrt backends). Needs an NVIDIA GPU; skipped elsewhere with the reason.

Run on the GPU host (docs/models.md, "GPU status"):

    STREAM_GUARD_GPU_TRITONSERVER=/opt/tritonserver/bin/tritonserver \\
        .venv/bin/pytest -m gpu tests/integration/test_image_guard_gpu.py -s -p no:cacheprovider

It prints (and writes to $STREAM_GUARD_GPU_REPORT when set) the engine build seconds and the
latency of the image tower, the text tower and the image head at batch 1, 8 and 32.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from stream_guard.build import engines

NO_GPU = engines.gpu_unavailable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(NO_GPU is not None, reason=f"needs an NVIDIA GPU: {NO_GPU}"),
]
BATCHES = (1, 8, 32)


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory):
    pytest.importorskip("torch", reason="the `export` extra is not installed")
    import yaml

    from stream_guard.build.export import export_dual_encoder, write_towers
    from stream_guard.policy.image_head import TowerSpace, compile_image_head
    from stream_guard.policy.image_heads import write_image_head
    from stream_guard.policy.model import parse_policy
    from tests.integration.test_image_guard import checkpoint, policy_yaml

    root = tmp_path_factory.mktemp("gpu-image-guard")
    repo = root / "repo"
    report = export_dual_encoder(checkpoint("clip", True), root / "onnx")
    names = write_towers(root / "onnx", repo, prefix="tiny_clip", flavour="gpu")
    policy = parse_policy(yaml.safe_dump(policy_yaml("shapes_gpu")))
    embed = _onnx_text_embedder(root / "onnx")
    space = TowerSpace(report.logit_scale, report.embed_dim, "gpu-test", {})
    head = compile_image_head(policy, embed, space)
    version = write_image_head(repo, head, prefix="guard_image_head", flavour="gpu")
    started = time.perf_counter()
    results = engines.build_engines(repo)
    seconds = time.perf_counter() - started
    return repo, names, f"guard_image_head_{policy.policy_id}", version, results, seconds, report


def _onnx_text_embedder(onnx_dir: Path):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    sess = ort.InferenceSession(str(onnx_dir / "text_encoder.onnx"))

    def embed(texts):
        enc = tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        return sess.run(["EMBEDDING"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})[0]

    return embed


def test_the_image_head_builds_as_a_tensorrt_plan(gpu_repo):
    repo, _, head, version, results, seconds, _ = gpu_repo
    assert head in [r.model for r in results]
    assert (repo / head / str(version) / engines.PLAN).stat().st_size > 0
    print(f"engine build seconds (all plans in the repository): {seconds:.1f}")


@pytest.mark.skipif(
    not os.environ.get("STREAM_GUARD_GPU_TRITONSERVER"),
    reason="set STREAM_GUARD_GPU_TRITONSERVER to a tritonserver with the onnxruntime and "
    "tensorrt backends (the NGC image's /opt/tritonserver/bin/tritonserver)",
)
def test_served_gpu_flavour_latency_at_batch_1_8_32(gpu_repo, tmp_path):
    import tritonclient.grpc as grpcclient

    from stream_guard.dev.stack import free_port

    repo, names, head, version, _, seconds, report = gpu_repo
    grpc, http = free_port(), free_port()
    server = subprocess.Popen(
        [
            os.environ["STREAM_GUARD_GPU_TRITONSERVER"],
            f"--model-repository={repo}",
            f"--grpc-port={grpc}",
            f"--http-port={http}",
            "--metrics-port=0",
            "--allow-metrics=false",
        ],
        stdout=open(tmp_path / "triton.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            time.sleep(1)
        numbers = {"engine_build_s": round(seconds, 2), "gpu": _gpu_name()}
        s, e = report.image_size, report.embed_dim
        for batch in BATCHES:
            rng = np.random.default_rng(batch)
            numbers[f"image_tower_b{batch}_ms"] = _latency(
                client, names["image"], {"IMAGE": rng.integers(0, 256, (batch, s, s, 3), np.uint8)}
            )
            texts = np.array([[b"a red triangle on any background"]] * batch, dtype=np.object_)
            numbers[f"text_tower_b{batch}_ms"] = _latency(
                client, names["text_embedder"], {"TEXT": texts}
            )
            emb = rng.normal(size=(batch, e)).astype(np.float32)
            numbers[f"image_head_b{batch}_ms"] = _latency(
                client, head, {"IMAGE_EMBEDDING": emb, "CAPTION_EMBEDDING": emb}
            )
        print(json.dumps(numbers, indent=2))
        if os.environ.get("STREAM_GUARD_GPU_REPORT"):
            Path(os.environ["STREAM_GUARD_GPU_REPORT"]).write_text(json.dumps(numbers, indent=2))
        assert all(v > 0 for k, v in numbers.items() if k.endswith("_ms"))
    finally:
        server.terminate()
        server.wait(30)


def _latency(client, model: str, arrays: dict[str, np.ndarray], runs: int = 50) -> float:
    import tritonclient.grpc as grpcclient

    kinds = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32", np.dtype(object): "BYTES"}
    inputs = []
    for name, array in arrays.items():
        inp = grpcclient.InferInput(name, list(array.shape), kinds[array.dtype])
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    client.infer(model, inputs)  # warm-up
    started = time.perf_counter()
    for _ in range(runs):
        client.infer(model, inputs)
    return round((time.perf_counter() - started) / runs * 1000, 3)


def _gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip()
    except OSError:
        return "unknown"
