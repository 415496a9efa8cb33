"""The policies a worker serves, kept in step with their files.

At start every configured policy file is loaded and its head made ready on Triton (retrying
while Triton is down), with its image head when an image guard is configured; afterwards
``reload`` checks each file's modification time, and only a changed file is parsed and, if its
content changed, compiled into new head versions. Parsing and compiling run off the event
loop. Two different files that declare the same ``policy_id`` are refused at load: heads are
named by policy id, so one tenant would be scored under the other's policy and the two would
flip on every reload.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from stream_guard import observability as obs
from stream_guard.errors import ConfigError, TransientError
from stream_guard.media.storage import ObjectStore
from stream_guard.policy.heads import ensure_head
from stream_guard.policy.image_head import image_head_examples
from stream_guard.policy.image_heads import ensure_image_head
from stream_guard.policy.model import Policy, load_policy
from stream_guard.policy.registry import ActiveHead, PolicyRegistry
from stream_guard.retry import backoff_delays
from stream_guard.settings import Settings
from stream_guard.triton import GuardModels

__all__ = ["LivePolicies", "check_distinct_ids", "load_configured"]

log = logging.getLogger(__name__)


def load_configured(settings: Settings) -> dict[str, Policy]:
    """Tenant -> policy ('' is the default), refusing two files with one policy id."""
    policies = {"": load_policy(settings.policy.path)}
    for tenant, path in settings.policy.tenants.items():
        policies[tenant] = load_policy(path)
    check_distinct_ids(
        {settings.policy.path: policies[""]}
        | {path: policies[t] for t, path in settings.policy.tenants.items()}
    )
    return policies


def check_distinct_ids(by_path: dict[Path, Policy]) -> None:
    seen: dict[str, Path] = {}
    for path, policy in by_path.items():
        other = seen.setdefault(policy.policy_id, path)
        if Path(other).resolve() != Path(path).resolve():
            raise ConfigError(
                f"policy files {other} and {path} both declare policy_id {policy.policy_id!r}: "
                "give each policy file its own policy_id (heads are named by it)"
            )


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class LivePolicies:
    def __init__(self, settings: Settings, models: GuardModels) -> None:
        self.settings = settings
        self.models = models
        self.registry: PolicyRegistry | None = None
        self._digests: dict[str, str] = {}
        self._mtimes: dict[Path, float | None] = {}

    def _paths(self) -> set[Path]:
        return {self.settings.policy.path, *self.settings.policy.tenants.values()}

    async def _ensure(self, policy: Policy) -> ActiveHead:
        t = self.settings.triton
        if any(u.startswith("s3://") for u in image_head_examples(policy)):
            # Example images on S3 need the worker's object store: compile the image head with
            # it first; ensure_head then finds that version.
            store = ObjectStore(self.settings.s3)
            try:
                await ensure_image_head(policy, self.models, repo=t.model_repository, store=store)
            finally:
                store.close()
        return await ensure_head(policy, self.models, prefix=t.head_model, repo=t.model_repository)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._mtimes = {p: _mtime(p) for p in self._paths()}
        policies = await loop.run_in_executor(None, load_configured, self.settings)
        heads: dict[str, ActiveHead] = {}
        for delay in backoff_delays(self.settings.retry, forever=True):
            try:
                by_id: dict[str, ActiveHead] = {}
                for tenant, policy in policies.items():
                    if policy.policy_id not in by_id:
                        by_id[policy.policy_id] = await self._ensure(policy)
                    heads[tenant] = by_id[policy.policy_id]
                break
            except TransientError as e:
                log.warning("waiting for Triton to serve the policy heads: %s", e)
                obs.RETRIES.labels("triton").inc()
                await asyncio.sleep(delay)
        default = heads.pop("")
        self.registry = PolicyRegistry(default, heads)
        for head in self.registry.heads():
            self._adopt(head)

    def _adopt(self, head: ActiveHead) -> None:
        policy = head.policy
        self._digests[policy.policy_id] = policy.digest
        obs.POLICY_VERSION.labels(
            policy.policy_id, policy.effective_version, head.model_version
        ).set(1)

    async def reload(self) -> None:
        if self.registry is None:
            return
        loop = asyncio.get_running_loop()
        for path in self._paths():
            mtime = _mtime(path)
            if mtime == self._mtimes.get(path):
                continue
            self._mtimes[path] = mtime
            try:
                policy = await loop.run_in_executor(None, load_policy, path)
                others = {p: h.policy for p, h in self._served_by_path().items() if p != path}
                check_distinct_ids({**others, path: policy})
            except Exception as e:
                log.error("policy %s not reloaded, keeping the running version: %s", path, e)
                continue
            if self._digests.get(policy.policy_id) == policy.digest:
                continue
            await self._switch(policy)

    def _served_by_path(self) -> dict[Path, ActiveHead]:
        assert self.registry is not None
        s = self.settings.policy
        out = {s.path: self.registry.for_tenant("")}
        for tenant, path in s.tenants.items():
            out[path] = self.registry.for_tenant(tenant)
        return out

    async def _switch(self, policy: Policy) -> None:
        assert self.registry is not None
        try:
            head = await self._ensure(policy)
        except Exception as e:
            log.error(
                "policy %s %s failed to compile or load: %s",
                policy.policy_id,
                policy.effective_version,
                e,
            )
            self._mtimes.clear()  # try again on the next tick
            return
        self.registry.replace(policy.policy_id, head)
        self._adopt(head)
        log.info(
            "policy %s now %s on %s", policy.policy_id, policy.effective_version, head.model_version
        )
