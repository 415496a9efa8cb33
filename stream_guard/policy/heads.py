"""Resolve, compile and hot-load the classification head that serves each policy.

At start and on every policy change the worker makes sure Triton serves a head compiled from
the exact policy text: it looks for a version whose ``policy.json`` names the policy's effective
version, otherwise compiles one (embedding the policy through Triton's own text tower, so the
prototypes live in the same space as the uploads), writes it as a new version and asks Triton
(EXPLICIT model control) to load it. In-flight batches finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stream_guard.build.repository import (
    HEADS_PARAMETER,
    head_versions,
    read_head_metadata,
    write_head,
)
from stream_guard.errors import ConfigError, DependencyUnavailable
from stream_guard.policy.compiler import (
    COMPILER_VERSION,
    TowerLayout,
    compile_head,
    head_texts,
    tower_layout,
)
from stream_guard.policy.embeddings import EmbeddingCache
from stream_guard.policy.model import Policy, head_model_name
from stream_guard.policy.registry import ActiveHead
from stream_guard.triton import N_SIGNALS, GuardModels

__all__ = [
    "compile_with_triton",
    "text_tower_layout",
    "ensure_head",
    "resolve_head",
]

log = logging.getLogger(__name__)


async def compile_with_triton(policy: Policy, models: GuardModels, repo: Path | None = None):
    """Compile ``policy`` with embeddings from the served text tower (only texts the
    repository's embedding cache lacks are sent to Triton)."""
    texts = head_texts(policy)
    cache = EmbeddingCache.for_repository(repo, models.settings.text_model)
    missing = cache.missing(texts) if cache else texts
    vectors = await models.embed_texts(missing)
    if cache is not None:
        cache.add(missing, vectors)
        await asyncio.get_running_loop().run_in_executor(None, cache.save)
        table = dict(zip(texts, cache.get(texts), strict=True))
    else:
        table = dict(zip(texts, vectors, strict=True))

    def embed(batch: Sequence[str]) -> np.ndarray:
        return np.stack([table[t] for t in batch])

    # The head compiles on whatever tower is served: its width and text signals, from Triton.
    layout = await text_tower_layout(models)
    compile_fn = functools.partial(compile_head, text_signals=layout.text_signals)

    loop = asyncio.get_running_loop()  # fitting the head is CPU work: off the event loop
    return await loop.run_in_executor(None, compile_fn, policy, embed)


def _find_version(repo: Path, model: str, policy: Policy) -> int | None:
    # Only the two newest versions are loaded (version_policy latest 2).
    for version in reversed(head_versions(repo, model)[-2:]):
        try:
            meta = read_head_metadata(repo, model, version)
        except (OSError, ValueError):
            continue
        if (
            meta.get("policy_version") == policy.effective_version
            and meta.get("compiler") == COMPILER_VERSION
        ):
            return version
    return None


async def text_tower_layout(models: GuardModels) -> TowerLayout:
    """Width and text signals of the served text tower, from its Triton config."""
    name = models.settings.text_model
    try:
        config = await models.client.get_model_config(name, as_json=True)
    except Exception as e:
        raise DependencyUnavailable("triton", f"text tower {name} is not served: {e}") from e
    return tower_layout(config)


async def _probe(models: GuardModels, head: ActiveHead) -> None:
    """A zero probe: fails for a version Triton does not serve or a head of another width."""
    width = (await text_tower_layout(models)).width
    models.embed_width = width  # rows without text send zeros of the served width
    try:
        out = await models.score(
            head.model_name,
            head.version,
            np.zeros((1, width), np.float32),
            np.zeros((1, N_SIGNALS), np.float32),
        )
    except DependencyUnavailable as e:
        if not await models.ready():
            raise
        # Triton is up and answered: the version is the problem, not the server.
        raise ConfigError(
            f"Triton does not serve {head.model_version} ({e}); the head's version policy "
            "serves only its newest versions"
        ) from e
    if out.shape[1] != len(head.policy.codes):
        raise ConfigError(
            f"{head.model_version} has {out.shape[1]} outputs but policy {head.policy.policy_id} "
            f"has {len(head.policy.codes)} categories: recompile with `stream-guard policy compile`"
        )


async def _served_head(policy: Policy, models: GuardModels, name: str) -> ActiveHead:
    """Read-only deployment: the newest served version compiled from this exact policy, by the
    ``stream_guard.heads`` parameter of the head's Triton config (written with every version).
    Scores are read by position, so a head of another policy version (a reordered or renamed
    category with the same count) is refused, never served."""
    try:
        config = await models.client.get_model_config(name, as_json=True)
    except Exception as e:
        raise DependencyUnavailable("triton", f"head {name} is not served: {e}") from e
    raw = config.get("config", config).get("parameters", {}).get(HEADS_PARAMETER, {})
    try:
        heads = json.loads(raw.get("string_value", "{}"))
    except ValueError:
        heads = {}
    matching = [
        int(v)
        for v, meta in heads.items()
        if meta.get("policy_version") == policy.effective_version
        and meta.get("codes") == policy.codes
    ]
    if not matching:
        raise ConfigError(
            f"Triton serves no version of {name} compiled from policy {policy.policy_id} "
            f"{policy.effective_version} (served: "
            f"{ {v: m.get('policy_version') for v, m in heads.items()} }); compile it with "
            "`stream-guard policy compile` and load it, or give the worker the repository"
        )
    return ActiveHead(policy, name, max(matching))


async def _with_image_head(head: ActiveHead, models: GuardModels, repo: Path | None) -> ActiveHead:
    """The head with the policy's image head beside it, when an image guard is served."""
    from stream_guard.policy.image_heads import ensure_image_head

    image = await ensure_image_head(head.policy, models, repo=repo)
    return head if image is None else dataclasses.replace(head, image=image)


async def resolve_head(
    policy: Policy,
    models: GuardModels,
    *,
    prefix: str,
    repo: Path | None,
    version: int | None = None,
) -> ActiveHead:
    """The head to score ``policy`` with: a pinned ``version`` (checked against the policy's
    categories and probed), else the one ``ensure_head`` finds or compiles."""
    if version is None:
        return await ensure_head(policy, models, prefix=prefix, repo=repo)
    name = head_model_name(prefix, policy.policy_id)
    if repo is not None:
        try:
            meta = read_head_metadata(repo, name, version)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{name} version {version} is not in {repo}: {e}") from e
        if meta.get("codes") != policy.codes:
            raise ConfigError(
                f"{name} version {version} was compiled for categories {meta.get('codes')}, "
                f"not this policy's {policy.codes}"
            )
    await models.load_model(name)
    head = ActiveHead(policy, name, version)
    await _probe(models, head)
    return await _with_image_head(head, models, repo)


async def ensure_head(
    policy: Policy, models: GuardModels, *, prefix: str, repo: Path | None
) -> ActiveHead:
    name = head_model_name(prefix, policy.policy_id)
    if repo is None:
        head = await _served_head(policy, models, name)
        await _probe(models, head)
        return await _with_image_head(head, models, repo)
    version = _find_version(repo, name, policy)
    if version is None:
        compiled = await compile_with_triton(policy, models, repo)
        loop = asyncio.get_running_loop()
        version = (await loop.run_in_executor(None, write_head, repo, compiled)).version
        log.info(
            "compiled policy %s %s into %s:%d",
            policy.policy_id,
            policy.effective_version,
            name,
            version,
        )
    await models.load_model(name)
    head = ActiveHead(policy, name, version)
    await _probe(models, head)
    return await _with_image_head(head, models, repo)
