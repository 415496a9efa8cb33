"""Which compiled head serves which tenant, swapped atomically on a policy reload.

A tenant's policy comes only from configuration (``policy.tenants``), never from the event, so
one tenant's upload can never be judged by another tenant's policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stream_guard.policy.model import Policy

if TYPE_CHECKING:
    from stream_guard.triton import ImageGuard

__all__ = [
    "ActiveHead",
    "ImageHead",
    "PolicyRegistry",
]


@dataclass(frozen=True)
class ImageHead:
    """The policy's image head and the dual-encoder towers it was compiled against."""

    model_name: str
    version: int
    guard: ImageGuard

    @property
    def model_version(self) -> str:
        return f"{self.model_name}:{self.version}"

    def models(self) -> list[tuple[str, str, str]]:
        """(role, model name, version) of each model an image's evidence passed through."""
        g = self.guard
        return [
            ("image_tower", g.image.name, g.image.version),
            ("image_text_tower", g.text.name, g.text.version),
            ("image_head", self.model_name, str(self.version)),
        ]


@dataclass(frozen=True)
class ActiveHead:
    policy: Policy
    model_name: str
    version: int
    image: ImageHead | None = None  # set when an image guard is served and the policy has
    # categories with image_descriptions

    @property
    def model_version(self) -> str:
        return f"{self.model_name}:{self.version}"


class PolicyRegistry:
    def __init__(self, default: ActiveHead, tenants: dict[str, ActiveHead] | None = None) -> None:
        self._default = default
        self._tenants = dict(tenants or {})

    def for_tenant(self, tenant_id: str) -> ActiveHead:
        return self._tenants.get(tenant_id, self._default)

    def replace(self, policy_id: str, head: ActiveHead) -> None:
        """Point every tenant served by ``policy_id`` at ``head`` (a newer version)."""
        if self._default.policy.policy_id == policy_id:
            self._default = head
        for tenant, current in self._tenants.items():
            if current.policy.policy_id == policy_id:
                self._tenants[tenant] = head

    def heads(self) -> list[ActiveHead]:
        seen: dict[str, ActiveHead] = {}
        for head in [self._default, *self._tenants.values()]:
            seen.setdefault(head.policy.policy_id, head)
        return list(seen.values())
