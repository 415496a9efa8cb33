"""Settings errors a person can act on: the variable, the value it had, the format expected.

pydantic reports a bad value by field path (``s3.allowed_buckets``) and a value that is not
JSON by group only (``error parsing value for field "s3"``); an unknown top-level variable is
silently ignored. Here every ``STREAM_GUARD_`` variable of the environment is checked against
the settings model first, and errors are rewritten to name the variable. Pure: the environment
is passed in (``settings.load_settings`` passes ``os.environ``).
"""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from stream_guard.errors import ConfigError

__all__ = [
    "NOT_SETTINGS",
    "PREFIX",
    "SettingsInvalid",
    "Variable",
    "expected_format",
    "load",
    "unknown_variables",
    "variables",
]

PREFIX = "STREAM_GUARD_"
# Variables of the dev tools, not of the settings object: known, never warned about.
NOT_SETTINGS = frozenset({"STREAM_GUARD_STATE_DIR"})


class SettingsInvalid(ConfigError):
    """The environment holds settings that cannot be used; ``lines`` name each variable."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class Variable:
    name: str  # STREAM_GUARD_S3__ALLOWED_BUCKETS
    path: tuple[str, ...]  # ("s3", "allowed_buckets")
    annotation: Any
    metadata: tuple[Any, ...]
    group: bool  # a whole group given as one JSON object

    @property
    def secret(self) -> bool:
        return _contains(self.annotation, SecretStr)

    @property
    def json(self) -> bool:
        """pydantic-settings parses these as JSON (lists, dicts, groups)."""
        return self.group or _is_complex(self.annotation)


def variables(model: type[BaseModel], prefix: str = PREFIX) -> dict[str, Variable]:
    """Every variable the settings model reads: each field, and each group as a whole."""
    out: dict[str, Variable] = {}
    _collect(model, prefix, (), out)
    return out


def _collect(
    model: type[BaseModel], prefix: str, path: tuple[str, ...], out: dict[str, Variable]
) -> None:
    for name, field in model.model_fields.items():
        var = f"{prefix}{name.upper()}"
        sub = _model_type(field.annotation)
        out[var] = Variable(
            var, (*path, name), field.annotation, tuple(field.metadata), sub is not None
        )
        if sub is not None:
            _collect(sub, f"{var}__", (*path, name), out)


def _model_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _non_none(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def _contains(annotation: Any, kind: type) -> bool:
    inner, _ = _non_none(annotation)
    return inner is kind


def _is_complex(annotation: Any) -> bool:
    inner, _ = _non_none(annotation)
    return get_origin(inner) in (list, dict, set, tuple) or _model_type(inner) is not None


_SCALARS = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
    Path: "a file path",
    SecretStr: "text (a secret)",
}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def expected_format(var: Variable) -> str:
    """What a person should put in ``var``, in words, with an example for JSON."""
    if var.group:
        return f"a JSON object of the {var.name}__* settings, e.g. '{{}}'"
    inner, optional = _non_none(var.annotation)
    origin = get_origin(inner)
    if origin is Literal:
        text = "one of " + ", ".join(str(a) for a in get_args(inner))
    elif origin is list:
        text = "a JSON list of strings, e.g. '[\"uploads\"]'"
    elif origin is dict:
        text = 'a JSON object, e.g. \'{"tenant-a": "/policies/a.yaml"}\''
    else:
        text = _SCALARS.get(inner, getattr(inner, "__name__", str(inner)))
    bounds = [
        f"{sym} {getattr(m, key)}"
        for m in var.metadata
        for key, sym in _BOUNDS.items()
        if getattr(m, key, None) is not None
    ]
    if bounds:
        text += " " + " and ".join(bounds)
    return text + (" (or unset)" if optional else "")


def _ours(environ: Mapping[str, str]) -> dict[str, str]:
    # pydantic-settings matches names case-insensitively; so does this check.
    return {k.upper(): v for k, v in environ.items() if k.upper().startswith(PREFIX)}


def _nearest(name: str, known: Mapping[str, Variable]) -> str:
    # Compared without the prefix every name shares, which would make anything look close.
    short = {k[len(PREFIX) :]: k for k in known}
    close = difflib.get_close_matches(name[len(PREFIX) :], list(short), n=1, cutoff=0.7)
    return f"; did you mean {short[close[0]]}?" if close else ""


def _nested_unknown(name: str, known: Mapping[str, Variable]) -> bool:
    """Inside a known group: pydantic refuses it (groups forbid extra fields)."""
    head = name.rsplit("__", 1)[0]
    return "__" in name and head in known and known[head].group


def unknown_variables(environ: Mapping[str, str], model: type[BaseModel]) -> list[str]:
    """Warnings for STREAM_GUARD_ variables the settings would silently ignore."""
    known = variables(model)
    return [
        f"{name} is not a stream-guard setting and is ignored{_nearest(name, known)}"
        for name in sorted(_ours(environ))
        if name not in known and name not in NOT_SETTINGS and not _nested_unknown(name, known)
    ]


def _show(var: Variable | None, value: str) -> str:
    # A whole group in JSON may hold a secret field: its value is not shown either.
    return "'***'" if var is not None and (var.secret or var.group) else repr(value)


def _json_errors(env: Mapping[str, str], known: Mapping[str, Variable]) -> list[str]:
    lines = []
    for name, value in env.items():
        var = known.get(name)
        if var is None or not var.json:
            continue
        try:
            json.loads(value)
        except ValueError:
            lines.append(f"{name}={_show(var, value)} is not JSON: expected {expected_format(var)}")
    return lines


def _variable_for(loc: tuple[Any, ...], known: Mapping[str, Variable]) -> tuple[str, bool]:
    """The variable of an error location (the longest known prefix), and whether it is known."""
    parts = [str(p) for p in loc]
    for end in range(len(parts), 0, -1):
        name = PREFIX + "__".join(parts[:end]).upper()
        if name in known:
            return name, True
    return PREFIX + "__".join(parts).upper(), False


def _explain(error: ValidationError, env: Mapping[str, str], known: dict[str, Variable]) -> list:
    lines = []
    for e in error.errors():
        loc = tuple(e["loc"])
        name, is_known = _variable_for(loc, known)
        if e["type"] == "extra_forbidden" or not is_known:
            name = PREFIX + "__".join(str(p) for p in loc).upper()
            lines.append(f"{name} is not a stream-guard setting{_nearest(name, known)}")
            continue
        var = known[name]
        where = f"{name}={_show(var, env[name])}" if name in env else f"{name} (in a group)"
        why = "" if e["type"] in _SAID_BY_FORMAT else f" ({e['msg']})"
        lines.append(f"{where} is not valid{why}: expected {expected_format(var)}")
    return lines


# Errors the expected format already explains (type, choices, bounds).
_SAID_BY_FORMAT = frozenset(
    {
        "literal_error",
        "int_parsing",
        "int_from_float",
        "int_type",
        "float_parsing",
        "float_type",
        "bool_parsing",
        "bool_type",
        "string_type",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
    }
)


def load(model: type[BaseSettings], environ: Mapping[str, str]) -> tuple[Any, list[str]]:
    """``model()`` from the environment, plus warnings; SettingsInvalid naming each variable."""
    known = variables(model)
    env = _ours(environ)
    lines = _json_errors(env, known)
    if lines:
        raise SettingsInvalid(lines)
    try:
        settings = model()
    except ValidationError as e:
        raise SettingsInvalid(_explain(e, env, known)) from e
    except SettingsError as e:  # a parse failure the JSON check above did not foresee
        raise SettingsInvalid([f"settings could not be read from the environment: {e}"]) from e
    return settings, unknown_variables(environ, model)
