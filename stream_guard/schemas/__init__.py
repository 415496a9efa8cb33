"""Committed JSON Schemas of the event contracts (regenerate: `python -m stream_guard.schemas`)."""

from __future__ import annotations

from pathlib import Path

from stream_guard.events import json_schemas

__all__ = [
    "SCHEMA_DIR",
    "write_all",
]

SCHEMA_DIR = Path(__file__).resolve().parent


def write_all() -> list[Path]:
    paths = []
    for name, text in json_schemas().items():
        path = SCHEMA_DIR / f"{name}.schema.json"
        path.write_text(text)
        paths.append(path)
    return paths
