"""What every command shares: the settings, with their warnings shown once on stderr.

Read anew on every call (not cached): tests run several commands in one process, each with its
own environment.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stream_guard.settings import Settings

__all__ = [
    "load",
    "log_warnings",
    "settings",
]


def load() -> tuple[Settings, tuple[str, ...]]:
    """Settings and warnings; raises SettingsInvalid (shown as one line per bad variable)."""
    from stream_guard.settings import load_settings

    value, warnings = load_settings()
    return value, tuple(warnings)


def settings() -> Settings:
    """The settings, with each warning printed to stderr the first time."""
    value, warnings = load()
    _print_once(warnings)
    return value


@functools.cache
def _print_once(warnings: tuple[str, ...]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def log_warnings(logger: logging.Logger) -> Settings:
    """For the workers: the settings, warnings as log records (JSON logs keep them)."""
    value, warnings = load()
    for w in warnings:
        logger.warning(w)
    return value
