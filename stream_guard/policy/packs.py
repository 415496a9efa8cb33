"""Labelled policy packs: written examples beside a policy, split once and for all.

A policy names its pack with ``pack: builtin:<name>`` (shipped under ``policy/builtin/packs/``)
or a directory path (relative to the policy file). A pack is JSON-lines files of
``{"id", "text", "labels", "style"}`` rows (``labels: []`` is safe). Every row belongs to one
split, fixed by a hash of its id, so no head ever trains on the held-out rows:

- ``train`` (60 %) and ``calib`` (20 %): the compiler fits the head on these by K-fold
  cross-fitting, and its out-of-fold scores set the thresholds' targets (the calib split was
  the model-selection set while the compiler was designed);
- ``heldout`` (20 %): only ``eval`` and ``docs/quality.md`` read these.

Labels that are not codes of the policy are dropped (a row labelled only with unknown codes
is skipped, never counted as safe).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from stream_guard.errors import PolicyError

__all__ = ["BUILTIN_PACKS", "SPLITS", "Pack", "PackRow", "load_pack", "pack_dir", "pack_digest"]

BUILTIN_PACKS = Path(__file__).resolve().parent / "builtin" / "packs"
SPLITS = ("train", "calib", "heldout")


@dataclass(frozen=True)
class PackRow:
    id: str
    text: str
    labels: frozenset[str]
    style: str
    split: str


def split_of(row_id: str) -> str:
    bucket = int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 6 else ("calib" if bucket < 8 else "heldout")


def pack_dir(pack: str, base: Path | None = None) -> Path:
    if pack.startswith("builtin:"):
        return BUILTIN_PACKS / pack.removeprefix("builtin:")
    path = Path(pack)
    return path if path.is_absolute() or base is None else base / path


def pack_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.jsonl")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Pack:
    rows: tuple[PackRow, ...]

    def split(self, name: str) -> list[PackRow]:
        return [r for r in self.rows if r.split == name]


def load_pack(directory: Path, codes: list[str]) -> Pack:
    if not directory.is_dir():
        raise PolicyError(f"policy pack {directory} is not a directory")
    known = set(codes)
    rows: dict[str, PackRow] = {}
    for f in sorted(directory.glob("*.jsonl")):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                labels = set(d["labels"])
                text, row_id = str(d["text"]), str(d["id"])
            except (ValueError, KeyError, TypeError) as e:
                raise PolicyError(f"{f}:{n}: not a pack row ({e})") from e
            if labels and not labels & known:
                continue
            rows.setdefault(
                row_id,
                PackRow(
                    row_id, text, frozenset(labels & known), d.get("style", ""), split_of(row_id)
                ),
            )
    return Pack(tuple(rows.values()))
