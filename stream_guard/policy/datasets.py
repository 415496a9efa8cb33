"""Public labelled datasets a policy trains on, read where they lie (never copied in).

A policy may name datasets beside its pack::

    datasets:
      - name: davidson            # a reader this module knows
        labels:                   # dataset class -> the policy's codes ([] = safe)
          hate_speech: [S10]
          neither: []

Classes the mapping leaves out are not used (Davidson's "offensive language" is profanity and
insults, which no Llama Guard category covers: labelled safe it would teach the head that abuse
is fine, labelled hate it would make S10 fire on swearing). Each row's split is fixed by a
hash of its text, like a pack row's by its id, so the held-out 20 % is never trained on.

Where the files are: ``path`` (relative to the policy file), else ``$STREAM_GUARD_DATASETS``
(a folder of ``<name>/...``; when set, the only place looked at), else
``../shared/datasets`` beside a source checkout. A dataset
that is not there is left out and said so: the head is compiled without it and its
effective version differs from one compiled with it (the file's digest is in the version).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stream_guard.errors import PolicyError
from stream_guard.policy.packs import PackRow, split_of

__all__ = [
    "DATASETS_ENV",
    "READERS",
    "dataset_file",
    "dataset_rows",
    "file_digest",
]

DATASETS_ENV = "STREAM_GUARD_DATASETS"
_SOURCE_CHECKOUT_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"
_MAX_BYTES = 256 * 1024 * 1024  # a labelled CSV, not a dump: refuse anything larger


def _davidson(path: Path) -> Iterator[tuple[str, str]]:
    """(class, tweet) of Davidson et al. 2017 ``labeled_data.csv`` (class 0/1/2)."""
    names = {"0": "hate_speech", "1": "offensive_language", "2": "neither"}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            cls, text = names.get(row.get("class", "")), row.get("tweet") or ""
            if cls and text.strip():
                yield cls, text


@dataclass(frozen=True)
class Reader:
    default_file: str  # under the datasets folder
    classes: tuple[str, ...]
    read: Callable[[Path], Iterator[tuple[str, str]]]


READERS: dict[str, Reader] = {
    "davidson": Reader(
        "davidson/labeled_data.csv", ("hate_speech", "offensive_language", "neither"), _davidson
    ),
}


def dataset_file(name: str, path: str | None, base: Path | None) -> Path | None:
    """The dataset's file, or None when it is not on this machine."""
    if path is not None:
        p = Path(path)
        p = p if p.is_absolute() or base is None else base / p
        return p if p.is_file() else None
    default = READERS[name].default_file
    # The variable, when set, is the only place looked at: an operator who points it
    # somewhere means there (and an empty folder means "compile without").
    root = Path(os.environ.get(DATASETS_ENV) or _SOURCE_CHECKOUT_DATASETS)
    return root / default if (root / default).is_file() else None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_rows(name: str, path: Path, labels: dict[str, list[str]]) -> list[PackRow]:
    """The mapped rows of one dataset file, each with its fixed split; unmapped classes and
    repeated texts are skipped."""
    if path.stat().st_size > _MAX_BYTES:
        raise PolicyError(f"dataset {name}: {path} is larger than {_MAX_BYTES} bytes")
    rows: dict[str, PackRow] = {}
    try:
        for cls, text in READERS[name].read(path):
            if cls not in labels:
                continue
            row_id = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
            rows.setdefault(
                row_id, PackRow(row_id, text, frozenset(labels[cls]), cls, split_of(row_id))
            )
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PolicyError(f"dataset {name}: cannot read {path}: {e}") from e
    return list(rows.values())
