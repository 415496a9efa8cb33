"""TensorRT engines for the GPU flavour: ONNX -> ``model.plan`` with a batch optimisation profile.

``stream-guard model build-engines REPO`` finds every model whose config.pbtxt says
``platform: "tensorrt_plan"`` (the policy heads of the GPU flavour), and for each version with a
``model.onnx`` builds ``model.plan`` with ONE optimisation profile over the batch axis:
min 1, opt ``min(32, max_batch_size)`` (the worker's default batch), max ``max_batch_size``.
Non-batch dimensions come from the ONNX graph. It uses ``trtexec`` when it is on PATH, else the
``tensorrt`` Python API (imported lazily: the wheels do not install on a CPU-only host).

An engine is specific to the GPU model and TensorRT version that built it, so engines are built
on (a machine like) the serving host and never committed. On a host without an NVIDIA GPU the
build refuses with ``GpuUnavailable`` and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stream_guard.errors import ConfigError

__all__ = [
    "DEFAULT_OPT_BATCH",
    "EngineBuildError",
    "EngineResult",
    "EngineTarget",
    "GpuUnavailable",
    "PENDING",
    "PLAN",
    "Profile",
    "build_engine",
    "build_engines",
    "find_targets",
    "gpu_unavailable_reason",
    "onnx_input_shapes",
    "trtexec_command",
]

PLAN = "model.plan"
PENDING = "ENGINE_PENDING"
DEFAULT_OPT_BATCH = 32


class GpuUnavailable(ConfigError):
    """TensorRT needs an NVIDIA GPU and driver; run build-engines on the GPU host."""


class EngineBuildError(ConfigError):
    """TensorRT could not build an engine from the ONNX file; the message carries its log."""


@dataclass(frozen=True)
class Profile:
    min: int
    opt: int
    max: int

    @classmethod
    def for_batch(cls, max_batch_size: int, opt: int = DEFAULT_OPT_BATCH) -> Profile:
        if max_batch_size < 1:
            raise ConfigError(f"a TensorRT profile needs max_batch_size >= 1, got {max_batch_size}")
        return cls(1, max(1, min(opt, max_batch_size)), max_batch_size)


@dataclass(frozen=True)
class EngineTarget:
    model: str
    version_dir: Path
    max_batch_size: int

    @property
    def onnx(self) -> Path:
        return self.version_dir / "model.onnx"

    @property
    def plan(self) -> Path:
        return self.version_dir / PLAN


@dataclass
class EngineResult:
    model: str
    version: str
    plan: str
    profile: dict[str, int]
    builder: str
    seconds: float
    fp16: bool


def gpu_unavailable_reason() -> str | None:
    """None when an NVIDIA GPU with a driver is visible, else why not (for messages and skips)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as e:
            return f"nvidia-smi failed: {e}"
        if out.returncode == 0 and "GPU" in out.stdout:
            return None
        return f"nvidia-smi lists no GPU ({(out.stderr or out.stdout).strip()[:200]})"
    if Path("/dev/nvidia0").exists():
        return None
    return "no NVIDIA GPU on this host (no nvidia-smi, no /dev/nvidia0); TensorRT needs one"


def _config(model_dir: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (model_dir / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def find_targets(repo: Path, *, force: bool = False) -> list[EngineTarget]:
    """Versions of tensorrt_plan models whose plan is missing or older than their ONNX."""
    targets = []
    for model_dir in sorted(p for p in Path(repo).iterdir() if (p / "config.pbtxt").is_file()):
        cfg = _config(model_dir)
        if cfg.platform != "tensorrt_plan" and cfg.backend != "tensorrt":
            continue
        for version in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            t = EngineTarget(cfg.name or model_dir.name, version, cfg.max_batch_size)
            if not t.onnx.is_file():
                continue
            if force or not t.plan.is_file() or t.plan.stat().st_mtime < t.onnx.stat().st_mtime:
                targets.append(t)
    return targets


def onnx_input_shapes(onnx_path: Path) -> dict[str, list[int]]:
    """Per input, the dims after the batch axis; they must be static (the heads' are)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    shapes = {}
    for inp in graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in dims):
            raise ConfigError(
                f"{onnx_path}: input {inp.name} has a dynamic non-batch axis; give it a fixed size"
            )
        shapes[inp.name] = [d.dim_value for d in dims]
    return shapes


def _shape_arg(shapes: dict[str, list[int]], batch: int) -> str:
    return ",".join(f"{n}:{'x'.join(str(d) for d in [batch, *rest])}" for n, rest in shapes.items())


def trtexec_command(
    trtexec: str,
    onnx_path: Path,
    plan: Path,
    shapes: dict[str, list[int]],
    profile: Profile,
    *,
    fp16: bool = False,
) -> list[str]:
    cmd = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={plan}",
        f"--minShapes={_shape_arg(shapes, profile.min)}",
        f"--optShapes={_shape_arg(shapes, profile.opt)}",
        f"--maxShapes={_shape_arg(shapes, profile.max)}",
        "--skipInference",
    ]
    return cmd + (["--fp16"] if fp16 else [])


def _find_trtexec() -> str | None:
    found = shutil.which("trtexec")
    if found:
        return found
    candidate = Path("/usr/src/tensorrt/bin/trtexec")  # where the NGC images put it
    return str(candidate) if candidate.is_file() else None


def _build_with_api(
    onnx_path: Path, plan: Path, shapes: dict[str, list[int]], profile: Profile, fp16: bool
) -> None:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise GpuUnavailable(
            "neither trtexec nor the tensorrt Python package is available: install TensorRT "
            "(pip install tensorrt on the GPU host, or use the NGC TensorRT/Triton image)"
        ) from e
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = (
        0
        if int(trt.__version__.split(".")[0]) >= 10
        else (1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    )
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, rest in shapes.items():
        opt.set_shape(name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
    config.add_optimization_profile(opt)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT returned no engine (see its log above)")
    plan.write_bytes(bytes(engine))


def build_engine(
    onnx_path: Path, plan: Path, profile: Profile, *, fp16: bool = False
) -> tuple[str, float]:
    """Build one engine; returns (builder used, seconds). Written atomically (temp + rename)."""
    shapes = onnx_input_shapes(onnx_path)
    tmp = plan.with_name(plan.name + ".tmp")
    started = time.monotonic()
    trtexec = _find_trtexec()
    if trtexec:
        cmd = trtexec_command(trtexec, onnx_path, tmp, shapes, profile, fp16=fp16)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise EngineBuildError(f"trtexec failed for {onnx_path}: {out.stdout[-2000:]}")
        builder = "trtexec"
    else:
        _build_with_api(onnx_path, tmp, shapes, profile, fp16)
        builder = "tensorrt-python"
    os.replace(tmp, plan)
    return builder, time.monotonic() - started


def build_engines(
    repo: Path, *, fp16: bool = False, force: bool = False, opt_batch: int = DEFAULT_OPT_BATCH
) -> list[EngineResult]:
    """Build every missing or stale plan in ``repo``; GpuUnavailable on a host without a GPU."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ConfigError(f"{repo} is not a model repository directory")
    reason = gpu_unavailable_reason()
    if reason:
        raise GpuUnavailable(f"cannot build TensorRT engines here: {reason}")
    results = []
    for t in find_targets(repo, force=force):
        profile = Profile.for_batch(t.max_batch_size, opt_batch)
        builder, seconds = build_engine(t.onnx, t.plan, profile, fp16=fp16)
        (t.version_dir / PENDING).unlink(missing_ok=True)
        result = EngineResult(
            t.model,
            t.version_dir.name,
            str(t.plan),
            asdict(profile),
            builder,
            round(seconds, 2),
            fp16,
        )
        (t.version_dir / "engine.json").write_text(json.dumps(asdict(result), indent=2))
        results.append(result)
    return results
