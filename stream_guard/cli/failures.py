"""How the CLI fails: one or two lines a person can act on, exit code 2; tracebacks with --debug.

``run`` invokes the click command without click's own error screens and turns what it raises
into ``error: ...`` plus an optional ``hint: ...`` on stderr. Errors a person causes (a bad
option, a missing file, a setting, a policy, a dependency that is not running) exit with 2;
an error nobody foresaw exits with 1 and says how to get the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import typer

from stream_guard.config_errors import SettingsInvalid
from stream_guard.errors import DependencyUnavailable, StreamGuardError

__all__ = [
    "CliError",
    "DEBUG_FLAG",
    "Failure",
    "INTERNAL",
    "USAGE",
    "debugging",
    "describe",
    "run",
]

USAGE = 2
INTERNAL = 1
DEBUG_FLAG = "--debug"
_debug = False


def debugging() -> bool:
    """Was --debug given? Commands then keep the log chatter of the clients they use."""
    return _debug


class CliError(Exception):
    """A mistake the person can fix: ``message`` says what is wrong, ``hint`` what to do."""

    def __init__(self, message: str, hint: str | None = None, *, code: int = USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


@dataclass(frozen=True)
class Failure:
    lines: list[str]
    hint: str | None = None
    code: int = USAGE


_SETTINGS_HINT = (
    "`stream-guard config` shows the effective settings; README: Configuration reference"
)
_STACK_HINT = "is it running? `stream-guard stack status` checks the local stack"


def _is_usage_error(e: BaseException) -> bool:
    # Recent typer raises its vendored click's exceptions, older typer click's own: same API.
    return hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)


def _click_failure(e: Any) -> Failure:
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "stream-guard"
    return Failure([e.format_message()], f"`{path} --help` lists the options", e.exit_code)


def _third_party(e: Exception) -> Failure | None:
    """Errors of the clients we talk through, at the CLI boundary."""
    module = type(e).__module__
    if module.startswith("aiokafka"):
        return Failure(
            [f"Kafka: {type(e).__name__}: {e}"],
            "check STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS; " + _STACK_HINT,
        )
    if module.startswith("botocore") or module.startswith("boto3"):
        return Failure(
            [f"S3: {e}"], "check STREAM_GUARD_S3__ENDPOINT_URL and credentials; " + _STACK_HINT
        )
    return None


def describe(e: BaseException) -> Failure | None:
    """The lines to show for ``e``; None for an error nobody foresaw."""
    if isinstance(e, CliError):
        return Failure([e.message], e.hint, e.code)
    if isinstance(e, SettingsInvalid):
        return Failure(list(e.lines), _SETTINGS_HINT)
    if _is_usage_error(e):
        return _click_failure(e)
    if isinstance(e, DependencyUnavailable):
        return Failure([str(e)], _STACK_HINT)
    if isinstance(e, StreamGuardError):
        return Failure([str(e)])
    if isinstance(e, OSError) and e.filename is not None:
        return Failure([f"{e.strerror or e}: {e.filename}"])
    if isinstance(e, Exception):
        return _third_party(e)
    return None


def _show(failure: Failure) -> None:
    for line in failure.lines:
        print(f"error: {line}", file=sys.stderr)
    if failure.hint:
        print(f"hint: {failure.hint}", file=sys.stderr)


def _split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``--debug`` is accepted anywhere before a ``--``."""
    args, debug, passthrough = [], False, False
    for a in argv:
        if a == "--":
            passthrough = True
        if a == DEBUG_FLAG and not passthrough:
            debug = True
            continue
        args.append(a)
    return args, debug


def run(command: Any, argv: Sequence[str], prog_name: str = "stream-guard") -> int:
    """Run ``command`` with ``argv``; the exit code."""
    global _debug
    args, debug = _split_debug(argv)
    _debug = debug
    try:
        rv = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except typer.Abort:
        return 130
    except Exception as e:
        if debug:
            raise
        failure = describe(e)
        if failure is None:
            failure = Failure(
                [f"unexpected {type(e).__name__}: {e}"],
                f"run again with {DEBUG_FLAG} for the traceback, and report it",
                INTERNAL,
            )
        _show(failure)
        return failure.code
    return rv if isinstance(rv, int) else 0
