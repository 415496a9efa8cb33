"""The policy texts the console shows beside an item, kept in step with the configured files.

An item names the policy version it was judged under; the console shows that version's text when
it has read it (it remembers the versions it has seen since it started), else the current one
and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stream_guard.policy.live import load_configured
from stream_guard.policy.model import Policy
from stream_guard.settings import Settings

__all__ = ["PolicyBook"]

log = logging.getLogger(__name__)


class PolicyBook:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._versions: dict[tuple[str, str], Policy] = {}
        self._latest: dict[str, Policy] = {}
        self._mtimes: dict[Path, int | None] = {}

    def _paths(self) -> set[Path]:
        return {self.settings.policy.path, *self.settings.policy.tenants.values()}

    def refresh(self) -> None:
        """Re-read the policy files when one changed; a bad edit keeps what was read before."""
        mtimes = {p: _mtime(p) for p in self._paths()}
        if mtimes == self._mtimes:
            return
        self._mtimes = mtimes
        try:
            policies = load_configured(self.settings)
        except Exception as e:
            log.error("policy files not re-read, the console keeps the texts it has: %s", e)
            return
        for p in policies.values():
            self._versions[(p.policy_id, p.effective_version)] = p
            self._latest[p.policy_id] = p

    def get(self, policy_id: str, version: str) -> Policy | None:
        return self._versions.get((policy_id, version)) or self._latest.get(policy_id)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
