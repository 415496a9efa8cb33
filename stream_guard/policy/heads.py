"""Resolve, compile and hot-load the classification head that serves each policy.

At start and on every policy change the worker makes sure Triton serves a head compiled from
the exact policy text: it looks for a version whose ``policy.json`` names the policy's effective
version, otherwise compiles one (embedding the policy through Triton's own text tower, so the
prototypes live in the same space as the uploads), writes it as a new version and asks Triton
(EXPLICIT model control) to load it. In-flight batches finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stream_guard.build.repository import head_versions, read_head_metadata, write_head
from stream_guard.errors import ConfigError, DependencyUnavailable
from stream_guard.policy.compiler import compile_head, head_texts
from stream_guard.policy.model import Policy, head_model_name
from stream_guard.policy.registry import ActiveHead
from stream_guard.triton import EMBED_DIM, N_SIGNALS, GuardModels

__all__ = [
    "compile_with_triton",
    "ensure_head",
    "resolve_head",
]

log = logging.getLogger(__name__)


async def compile_with_triton(policy: Policy, models: GuardModels):
    texts = head_texts(policy)
    vectors = await models.embed_texts(texts)
    table = dict(zip(texts, vectors, strict=True))

    def embed(batch: Sequence[str]) -> np.ndarray:
        return np.stack([table[t] for t in batch])

    loop = asyncio.get_running_loop()  # fitting the head is CPU work: off the event loop
    return await loop.run_in_executor(None, compile_head, policy, embed)


def _find_version(repo: Path, model: str, policy: Policy) -> int | None:
    # Only the two newest versions are loaded (version_policy latest 2).
    for version in reversed(head_versions(repo, model)[-2:]):
        try:
            meta = read_head_metadata(repo, model, version)
        except (OSError, ValueError):
            continue
        if meta.get("policy_version") == policy.effective_version:
            return version
    return None


async def _probe(models: GuardModels, head: ActiveHead) -> None:
    """A zero probe: fails for a version Triton does not serve or a head of another width."""
    try:
        out = await models.score(
            head.model_name,
            head.version,
            np.zeros((1, EMBED_DIM), np.float32),
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
    return head


async def ensure_head(
    policy: Policy, models: GuardModels, *, prefix: str, repo: Path | None
) -> ActiveHead:
    name = head_model_name(prefix, policy.policy_id)
    if repo is None:
        # Read-only deployment: trust the newest version Triton serves, after a shape probe.
        try:
            meta = await models.client.get_model_metadata(name)
        except Exception as e:
            raise DependencyUnavailable("triton", f"head {name} is not served: {e}") from e
        version = max(int(v) for v in meta.versions)
        head = ActiveHead(policy, name, version)
        await _probe(models, head)
        return head
    version = _find_version(repo, name, policy)
    if version is None:
        compiled = await compile_with_triton(policy, models)
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
    return head
