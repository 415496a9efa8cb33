"""``--help`` without a type tag (``<bool>``, ``<str>``, ``<Path>``) on every option line.

typer renders each parameter's Python type beside it; the help text and the default already
say what a value is, so the tags are only noise. Recent typer has no switch for this: the
tag comes from ``display_type_rich`` of its parameter classes, replaced here once, for this
process (the ``stream-guard`` CLI), before any help is drawn.
"""

from __future__ import annotations

from typing import Any

from typer import core

__all__ = [
    "plain_help",
]


def _no_type(self: Any, ctx: Any) -> None:
    return None


def plain_help() -> None:
    """Draw options and arguments without their type tag (idempotent)."""
    for name in ("TyperOption", "TyperArgument"):
        cls = getattr(core, name, None)
        if cls is not None and hasattr(cls, "display_type_rich"):
            cls.display_type_rich = _no_type
