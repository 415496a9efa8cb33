"""Find, compile, write and hot-load the image head of each policy (see ``image_head.py``).

Beside the text head (``heads.py``): when ``triton.image_tower`` names an exported CLIP / SigLIP
image tower and the policy has categories with ``image_descriptions``, the worker makes sure
Triton serves ``<image_head_model>_<policy_id>`` compiled from the exact policy for the exact
towers (their fingerprint is in each version's ``policy.json``): a new policy version or a new
tower export compiles a new version. Descriptions are embedded by the served text tower and
example images by the served image tower, so the prototypes live in the uploads' space. In
the GPU flavour the new version's TensorRT plan is built before Triton loads it; a host without
a GPU refuses and names the command to run on the GPU host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stream_guard.build.repository import head_versions, read_head_metadata
from stream_guard.errors import ConfigError, DependencyUnavailable, PermanentError
from stream_guard.policy.image_head import (
    CompiledImageHead,
    TowerSpace,
    compile_image_head,
    image_head_examples,
    image_head_texts,
)
from stream_guard.policy.model import Policy, head_model_name
from stream_guard.policy.registry import ImageHead
from stream_guard.triton import GuardModels, ImageGuard

if TYPE_CHECKING:
    from stream_guard.media.storage import ObjectStore

__all__ = [
    "IMAGE_HEADS_PARAMETER",
    "compile_image_with_triton",
    "ensure_image_head",
    "repository_flavour",
    "write_image_head",
]

log = logging.getLogger(__name__)

IMAGE_HEADS_PARAMETER = "stream_guard.image_heads"


def _space(guard: ImageGuard) -> TowerSpace:
    return TowerSpace(
        guard.logit_scale,
        guard.embed_dim,
        guard.fingerprint,
        {"image_tower": guard.image.model_version, "image_text_tower": guard.text.model_version},
    )


async def _example_embeddings(
    uris: Sequence[str], models: GuardModels, guard: ImageGuard, store: ObjectStore | None
) -> dict[str, np.ndarray]:
    """Example images fetched (file or S3), decoded and sized like uploads, then embedded."""
    from stream_guard.events import ImageRef
    from stream_guard.media.decode import decode_image, preprocess_for_tower

    loop = asyncio.get_running_loop()
    tower = guard.tower_input()
    prepared = []
    for uri in uris:
        if uri.startswith("s3://"):
            if store is None:
                raise ConfigError(f"example image {uri} is on S3, but no object store was given")
            data = (await store.fetch(ImageRef(uri=uri))).data
        else:
            data = await loop.run_in_executor(None, Path(uri).read_bytes)
        try:
            image = await loop.run_in_executor(
                None, lambda d=data: decode_image(d, content_type=None).rgb
            )
        except PermanentError as e:
            raise ConfigError(f"example image {uri} cannot be used: {e}") from e
        prepared.append(preprocess_for_tower(image, tower))
    vectors = await models.embed_images(np.stack(prepared))
    return dict(zip(uris, vectors, strict=True))


async def compile_image_with_triton(
    policy: Policy, models: GuardModels, guard: ImageGuard, store: ObjectStore | None = None
) -> CompiledImageHead:
    """The policy's image head, its texts and example images embedded by the served towers."""
    texts = image_head_texts(policy)
    table = dict(zip(texts, await models.embed_image_texts(texts), strict=True))
    uris = image_head_examples(policy)
    images = await _example_embeddings(uris, models, guard, store) if uris else {}

    def embed_texts(batch: Sequence[str]) -> np.ndarray:
        return np.stack([table[t] for t in batch])

    def embed_images(batch: Sequence[str]) -> np.ndarray:
        return np.stack([images[u] for u in batch])

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None,
        lambda: compile_image_head(policy, embed_texts, _space(guard), embed_images=embed_images),
    )


def repository_flavour(repo: Path) -> str:
    """gpu when the repository serves TensorRT heads (its guard_head_* configs say so)."""
    for config in sorted(repo.glob("guard_head*/config.pbtxt")):
        if "tensorrt_plan" in config.read_text():
            return "gpu"
    return "cpu"


def write_image_head(repo: Path, head: CompiledImageHead, *, prefix: str, flavour: str) -> int:
    """Write ``head`` as the next version of its policy's image head (atomic per version)."""
    from stream_guard.build.repository import TEMPLATES

    name = head_model_name(prefix, head.policy_id)
    dest = repo / name
    dest.mkdir(parents=True, exist_ok=True)
    template = (TEMPLATES / flavour / "guard_image_head" / "config.pbtxt").read_text()
    config = template.replace('name: "guard_image_head"', f'name: "{name}"')
    dim = head.space.embed_dim
    config = config.replace("TYPE_FP32, dims: [ -1 ] },", f"TYPE_FP32, dims: [ {dim} ] }},")
    config = config.replace("TYPE_FP32, dims: [ -1 ] }\n", f"TYPE_FP32, dims: [ {dim} ] }}\n")
    if flavour == "gpu":  # TensorRT checks the config's dims against the engine's
        config = config.replace("dims: [ -1 ], label", f"dims: [ {len(head.codes)} ], label")
    (dest / "labels.txt").write_text("\n".join(head.codes) + "\n")
    version = (head_versions(repo, name) or [0])[-1] + 1
    staging = dest / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if flavour == "cpu":
        shutil.copy(TEMPLATES / "cpu" / "onnx_runner.py", staging / "model.py")
    (staging / "model.onnx").write_bytes(head.to_bytes())
    if flavour == "gpu":
        (staging / "ENGINE_PENDING").write_text(
            "model.plan is built from model.onnx on a GPU host: stream-guard model build-engines\n"
        )
    (staging / "policy.json").write_text(json.dumps(head.metadata(), indent=2))
    staging.rename(dest / str(version))  # Triton never sees a half-written version
    (dest / "config.pbtxt").write_text(config + _image_heads_parameter(repo, name))
    return version


def _image_heads_parameter(repo: Path, name: str) -> str:
    heads = {}
    for v in head_versions(repo, name):
        try:
            meta = read_head_metadata(repo, name, v)
        except (OSError, ValueError):
            continue
        towers = meta.get("towers") or {}
        heads[str(v)] = {
            "policy_version": meta.get("policy_version"),
            "codes": meta.get("codes"),
            "towers": towers.get("fingerprint") if isinstance(towers, dict) else None,
        }
    value = json.dumps(heads, separators=(",", ":")).replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'\nparameters: {{ key: "{IMAGE_HEADS_PARAMETER}" value: {{ string_value: "{value}" }} }}\n'
    )


def _matches(meta: dict, policy: Policy, guard: ImageGuard) -> bool:
    towers = meta.get("towers")
    fingerprint = towers.get("fingerprint") if isinstance(towers, dict) else towers
    return (
        meta.get("policy_version") == policy.effective_version
        and meta.get("codes") == policy.codes
        and fingerprint == guard.fingerprint
    )


def _find_image_version(repo: Path, name: str, policy: Policy, guard: ImageGuard) -> int | None:
    for version in reversed(head_versions(repo, name)[-2:]):
        try:
            meta = read_head_metadata(repo, name, version)
        except (OSError, ValueError):
            continue
        if _matches(meta, policy, guard):
            return version
    return None


async def _served_image_head(
    policy: Policy, models: GuardModels, name: str, guard: ImageGuard
) -> ImageHead:
    try:
        config = await models.client.get_model_config(name, as_json=True)
    except Exception as e:
        raise DependencyUnavailable("triton", f"image head {name} is not served: {e}") from e
    raw = config.get("config", config).get("parameters", {}).get(IMAGE_HEADS_PARAMETER, {})
    try:
        heads = json.loads(raw.get("string_value", "{}"))
    except ValueError:
        heads = {}
    matching = [int(v) for v, meta in heads.items() if _matches(meta, policy, guard)]
    if not matching:
        raise ConfigError(
            f"Triton serves no version of {name} compiled from policy {policy.policy_id} "
            f"{policy.effective_version} with towers {guard.fingerprint}: let a worker with "
            "triton.model_repository compile it"
        )
    return ImageHead(name, max(matching), guard)


async def _probe_image(models: GuardModels, head: ImageHead, policy: Policy) -> None:
    zeros = np.zeros((1, head.guard.embed_dim), np.float32)
    try:
        out = await models.image_scores(head.model_name, head.version, zeros, zeros)
    except DependencyUnavailable as e:
        if not await models.ready():
            raise
        raise ConfigError(f"Triton does not serve {head.model_version} ({e})") from e
    if out.shape[1] != len(policy.codes):
        raise ConfigError(
            f"{head.model_version} has {out.shape[1]} outputs but policy {policy.policy_id} "
            f"has {len(policy.codes)} categories"
        )


async def _build_plan(repo: Path, name: str) -> None:
    """GPU flavour: the new version's TensorRT plan, built before Triton is asked to load it."""
    from stream_guard.build.engines import GpuUnavailable, build_engines

    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, lambda: build_engines(repo))
    except GpuUnavailable as e:
        raise ConfigError(
            f"{name} needs a TensorRT plan and this host cannot build one ({e}): run "
            f"`stream-guard model build-engines {repo}` on the GPU host; the worker loads the "
            "version on its next reload"
        ) from e


async def ensure_image_head(
    policy: Policy, models: GuardModels, *, repo: Path | None, store: ObjectStore | None = None
) -> ImageHead | None:
    """The image head serving ``policy`` (found, else compiled, written and loaded), or None
    when no image guard is configured or the policy has no category with image descriptions."""
    guard = await models.image_guard()
    if guard is None or not policy.image_codes:
        return None
    name = head_model_name(models.settings.image_head_model, policy.policy_id)
    if repo is None:
        head = await _served_image_head(policy, models, name, guard)
    else:
        version = _find_image_version(repo, name, policy, guard)
        if version is None:
            compiled = await compile_image_with_triton(policy, models, guard, store)
            flavour = repository_flavour(repo)
            loop = asyncio.get_running_loop()
            version = await loop.run_in_executor(
                None,
                lambda: write_image_head(
                    repo, compiled, prefix=models.settings.image_head_model, flavour=flavour
                ),
            )
            if flavour == "gpu":
                await _build_plan(repo, name)
            log.info(
                "compiled policy %s image categories into %s:%d", policy.policy_id, name, version
            )
        await models.load_model(name)
        head = ImageHead(name, version, guard)
    await _probe_image(models, head, policy)
    return head
