"""The GPU flavour of the model repository matches the CPU flavour, and its engines build on a GPU.

No GPU is needed except for the tests marked ``gpu``: the configs are parsed with Triton's own
protobuf schema and compared with the CPU flavour; the repository writer is run for the GPU
flavour; engine building refuses with a clear reason where there is no NVIDIA GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from stream_guard.build import engines
from stream_guard.build.repository import TEMPLATES, build_repository
from stream_guard.policy.model import load_policy
from stream_guard.settings import DEFAULT_POLICY

CPU, GPU = TEMPLATES / "cpu", TEMPLATES / "gpu"
KIND_GPU = mc.ModelInstanceGroup.KIND_GPU
KIND_CPU = mc.ModelInstanceGroup.KIND_CPU
NO_GPU = engines.gpu_unavailable_reason()


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def configs(flavour_dir: Path) -> dict[str, mc.ModelConfig]:
    return {p.parent.name: parse(p) for p in sorted(flavour_dir.glob("*/config.pbtxt"))}


def tensors(entries) -> list[tuple[str, int, list[int], str]]:
    return [(t.name, t.data_type, list(t.dims), getattr(t, "label_filename", "")) for t in entries]


def batching(cfg: mc.ModelConfig) -> mc.ModelDynamicBatching:
    return cfg.dynamic_batching


@pytest.fixture(scope="module")
def cpu() -> dict[str, mc.ModelConfig]:
    return configs(CPU)


@pytest.fixture(scope="module")
def gpu() -> dict[str, mc.ModelConfig]:
    return configs(GPU)


def test_every_gpu_config_parses_and_names_its_directory(gpu):
    assert gpu, "no GPU-flavour configs found"
    for directory, cfg in gpu.items():
        assert cfg.name == directory


def test_gpu_flavour_serves_every_cpu_model_name(cpu, gpu):
    assert set(cpu) <= set(gpu)


def test_gpu_models_have_the_cpu_tensors_and_batch_limits(cpu, gpu):
    for name, c in cpu.items():
        g = gpu[name]
        assert tensors(g.input) == tensors(c.input), name
        assert tensors(g.output) == tensors(c.output), name
        assert g.max_batch_size == c.max_batch_size, name
        assert g.version_policy == c.version_policy, name


def test_gpu_runtimes_are_the_native_backends(gpu):
    assert gpu["text_encoder"].platform == "ensemble"
    assert gpu["text_encoder_onnx"].platform == "onnxruntime_onnx"
    assert gpu["image_detector"].platform == "onnxruntime_onnx"
    assert gpu["guard_head"].platform == "tensorrt_plan"
    for name in ("text_encoder_onnx", "image_detector", "guard_head"):
        assert [g.kind for g in gpu[name].instance_group] == [KIND_GPU], name
    # String work stays on CPU instances of the GPU host.
    for name in ("text_tokenizer", "ocr"):
        assert gpu[name].backend == "python"
        assert {g.kind for g in gpu[name].instance_group} == {KIND_CPU}, name


def test_guard_head_engine_profile_is_selected(gpu):
    assert list(gpu["guard_head"].instance_group[0].profile) == ["0"]


def test_dynamic_batching_matches_the_cpu_flavour(cpu, gpu):
    for name, c in cpu.items():
        if c.platform == "ensemble":  # an ensemble has no batcher of its own
            continue
        if gpu[name].platform == "ensemble":
            # The GPU text_encoder batches in each of its steps, each with the CPU settings.
            for step in gpu[name].ensemble_scheduling.step:
                assert batching(gpu[step.model_name]) == batching(c), step.model_name
                assert gpu[step.model_name].max_batch_size == c.max_batch_size
            continue
        assert gpu[name].HasField("dynamic_batching"), name
        assert batching(gpu[name]) == batching(c), name


def test_every_queue_policy_rejects_on_timeout(gpu):
    for name, cfg in gpu.items():
        if cfg.platform == "ensemble":
            continue
        q = cfg.dynamic_batching.default_queue_policy
        assert q.timeout_action == mc.ModelQueuePolicy.REJECT, name
        assert q.default_timeout_microseconds > 0 and q.max_queue_size > 0, name


def _step_config(gpu, model_name: str) -> mc.ModelConfig:
    return gpu["guard_head" if model_name == "HEAD_MODEL" else model_name]


@pytest.mark.parametrize("ensemble", ["text_encoder", "guard"])
def test_ensemble_wiring_is_consistent(gpu, ensemble):
    cfg = gpu[ensemble]
    # tensor name -> (dtype, dims) of everything available so far
    available = {t.name: (t.data_type, list(t.dims)) for t in cfg.input}
    consumed = set()
    for step in cfg.ensemble_scheduling.step:
        model = _step_config(gpu, step.model_name)
        inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        assert set(step.input_map) == set(inputs), step.model_name
        for key, tensor in step.input_map.items():
            assert tensor in available, f"{step.model_name} reads {tensor} before it exists"
            dtype, dims = available[tensor]
            assert dtype == inputs[key][0], (step.model_name, key)
            assert len(dims) == len(inputs[key][1]), (step.model_name, key)
            consumed.add(tensor)
        for key, tensor in step.output_map.items():
            assert key in outputs, (step.model_name, key)
            available[tensor] = outputs[key]
        assert model.max_batch_size >= cfg.max_batch_size, step.model_name
    for out in cfg.output:
        assert out.name in available, f"{ensemble} never produces {out.name}"
        assert available[out.name][0] == out.data_type
    assert {t.name for t in cfg.input} <= consumed


# -- the writer --------------------------------------------------------------------------------


def _fake_embed(texts):
    rng = np.random.default_rng(len(texts))
    return rng.normal(size=(len(texts), 384)).astype(np.float32)


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("gpu-repo")
    policy = load_policy(DEFAULT_POLICY)
    heads = build_repository(repo, [policy], flavour="gpu", embed=_fake_embed)
    return repo, policy, heads


def test_build_repository_writes_the_gpu_layout(gpu_repo):
    import onnx

    repo, policy, (head,) = gpu_repo
    assert (repo / "text_encoder" / "1").is_dir()  # the ensemble's (empty) version
    assert (repo / "text_tokenizer" / "1" / "tokenizer.json").is_file()
    assert (repo / "text_tokenizer" / "1" / "model.py").is_file()
    version = repo / head.model_name / str(head.version)
    assert (version / "model.onnx").is_file() and (version / engines.PENDING).is_file()
    assert not (version / "model.py").exists()  # tensorrt_plan, not the Python runner
    cfg = parse(repo / head.model_name / "config.pbtxt")
    assert cfg.name == head.model_name and cfg.platform == "tensorrt_plan"
    assert list(cfg.output[0].dims) == [len(policy.codes)]  # TensorRT checks exact dims
    labels = (repo / head.model_name / "labels.txt").read_text().split()
    assert labels == policy.codes
    # Served ONNX files carry exactly the tensor names their configs declare.
    for model, onnx_file in (
        ("text_encoder_onnx", repo / "text_encoder_onnx" / "1" / "model.onnx"),
        ("image_detector", repo / "image_detector" / "1" / "model.onnx"),
        (head.model_name, version / "model.onnx"),
    ):
        graph = onnx.load(str(onnx_file), load_external_data=False).graph
        model_cfg = parse(repo / model / "config.pbtxt")
        assert {t.name for t in model_cfg.input} == {i.name for i in graph.input}, model
        assert {t.name for t in model_cfg.output} == {o.name for o in graph.output}, model


def test_written_gpu_ensemble_points_at_the_policy_head(gpu_repo):
    repo, policy, (head,) = gpu_repo
    guards = [
        p for p in repo.iterdir() if p.name.startswith("guard_") and p.name != head.model_name
    ]
    assert len(guards) == 1
    steps = parse(guards[0] / "config.pbtxt").ensemble_scheduling.step
    assert steps[-1].model_name == head.model_name


# -- engines -----------------------------------------------------------------------------------


def test_engine_targets_are_the_plan_models_with_an_onnx(gpu_repo):
    repo, _, (head,) = gpu_repo
    targets = engines.find_targets(repo)
    assert [(t.model, t.version_dir.name, t.max_batch_size) for t in targets] == [
        (head.model_name, str(head.version), 128)
    ]
    assert engines.onnx_input_shapes(targets[0].onnx) == {
        "TEXT_EMBEDDING": [384],
        "IMAGE_SIGNALS": [18],
    }


def test_engine_profile_covers_the_configured_batch_range():
    assert engines.Profile.for_batch(128) == engines.Profile(1, 32, 128)
    assert engines.Profile.for_batch(8) == engines.Profile(1, 8, 8)
    cmd = engines.trtexec_command(
        "trtexec",
        Path("m.onnx"),
        Path("m.plan"),
        {"A": [384], "B": [18]},
        engines.Profile(1, 32, 128),
    )
    assert "--minShapes=A:1x384,B:1x18" in cmd
    assert "--optShapes=A:32x384,B:32x18" in cmd
    assert "--maxShapes=A:128x384,B:128x18" in cmd


@pytest.mark.skipif(NO_GPU is None, reason="this host has an NVIDIA GPU")
def test_build_engines_refuses_without_a_gpu_and_says_why(gpu_repo):
    from typer.testing import CliRunner

    from stream_guard.cli.app import app

    with pytest.raises(engines.GpuUnavailable, match="GPU"):
        engines.build_engines(gpu_repo[0])
    result = CliRunner().invoke(app, ["model", "build-engines", str(gpu_repo[0])])
    assert result.exit_code == 2
    assert "GPU" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=f"TensorRT needs an NVIDIA GPU: {NO_GPU}")
def test_build_engines_writes_a_plan_per_head_version(gpu_repo):
    repo, _, (head,) = gpu_repo
    results = engines.build_engines(repo, force=True)
    assert [r.model for r in results] == [head.model_name]
    version = repo / head.model_name / str(head.version)
    assert (version / engines.PLAN).stat().st_size > 0
    assert not (version / engines.PENDING).exists()
