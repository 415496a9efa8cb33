"""Labelled manifests: the uploads that ``eval`` and ``calibrate`` score, with their true labels.

A manifest is JSONL (one object a line) or CSV (a header row). Each row is one upload:

- ``id`` (optional): the upload id; defaults to ``line-<N>``. Must be unique and match the
  upload-id pattern of the event contracts, because the scoring path publishes it as one.
- ``images``: local paths (relative ones resolve against the manifest's folder) or
  ``s3://bucket/key`` URIs. JSONL: a list (a single string is accepted); CSV: ``;``-separated.
- text: ``text`` (an alias of ``caption``), ``caption``, ``title``, ``prompt``, ``response``.
- ``labels``: the violated category codes; empty means safe (``safe`` alone is accepted too).
  JSONL: a list (or a ``;``-separated string); CSV: ``;``-separated. The key or column is
  required: an unlabelled row silently read as safe would skew every metric.

Rows need at least one image or some text. Unknown fields are ignored. A bad row raises
:class:`ManifestError` naming the file and line, so the operator can fix it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from stream_guard.errors import StreamGuardError
from stream_guard.events import ID_PATTERN

__all__ = [
    "ManifestError",
    "ManifestFormat",
    "ManifestRow",
    "SAFE_LABEL",
    "TEXT_FIELDS",
    "label_matrix",
    "parse_manifest",
    "read_manifest",
]

TEXT_FIELDS = ("caption", "title", "prompt", "response")
SAFE_LABEL = "safe"
_ID_RE = re.compile(ID_PATTERN)
_S3_RE = re.compile(r"^s3://[^/]+/.+[^/]$")

ManifestFormat = Literal["jsonl", "csv"]


class ManifestError(StreamGuardError):
    """A labelled manifest cannot be read; the message names the file and line to fix."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")
        self.source = source
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class ManifestRow:
    """One labelled upload. ``labels`` is empty for a safe upload."""

    id: str
    images: tuple[str, ...]
    labels: tuple[str, ...]
    caption: str | None = None
    title: str | None = None
    prompt: str | None = None
    response: str | None = None
    line: int = 0
    slice: str | None = None  # optional group name: `eval` reports each slice on its own

    @property
    def text(self) -> str:
        """All text in the same order as ``UploadText.joined`` (what the text tower sees)."""
        parts = [self.title, self.caption, self.prompt, self.response]
        return "\n".join(p for p in parts if p)

    @property
    def text_fields(self) -> dict[str, str]:
        """The non-empty text fields, ready for ``UploadText.model_validate``."""
        return {f: v for f in TEXT_FIELDS if (v := getattr(self, f))}

    @property
    def is_safe(self) -> bool:
        return not self.labels


def read_manifest(
    path: str | Path,
    *,
    format: ManifestFormat | None = None,
    codes: Sequence[str] | None = None,
    check_files: bool = False,
) -> list[ManifestRow]:
    """Read a labelled manifest (JSONL or CSV, chosen by suffix, else by the first character).

    ``codes``: when given, a label outside them is an error (a typo would otherwise count as a
    category the model never predicts). ``check_files``: also require local images to exist.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(str(path), None, f"cannot read manifest: {e}") from e
    return parse_manifest(
        text,
        format=format or _guess_format(path, text),
        source=str(path),
        base_dir=path.parent,
        codes=codes,
        check_files=check_files,
    )


def parse_manifest(
    text: str,
    *,
    format: ManifestFormat,
    source: str = "<manifest>",
    base_dir: str | Path | None = None,
    codes: Sequence[str] | None = None,
    check_files: bool = False,
) -> list[ManifestRow]:
    """Parse manifest text; ``read_manifest`` without the file read."""
    if format == "jsonl":
        records = _jsonl_records(text, source)
    elif format == "csv":
        records = _csv_records(text, source)
    else:
        raise ManifestError(source, None, f"unknown manifest format {format!r}: use jsonl or csv")
    known = set(codes) if codes is not None else None
    base = Path(base_dir) if base_dir is not None else None
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for line, record in records:
        row = _row(record, line, source, base, known, check_files)
        if row.id in seen:
            raise ManifestError(
                source, line, f"duplicate id {row.id!r} (first on line {seen[row.id]})"
            )
        seen[row.id] = line
        rows.append(row)
    if not rows:
        raise ManifestError(source, None, "manifest has no rows")
    return rows


def label_matrix(rows: Sequence[ManifestRow], codes: Sequence[str]) -> npt.NDArray[np.bool_]:
    """[n, C] boolean truth matrix in ``codes`` order; an unknown label raises ManifestError."""
    index = {c: j for j, c in enumerate(codes)}
    out = np.zeros((len(rows), len(codes)), dtype=bool)
    for i, row in enumerate(rows):
        for label in row.labels:
            if label not in index:
                raise ManifestError(
                    "manifest",
                    row.line or None,
                    f"row {row.id}: label {label!r} is not one of the categories {list(codes)}",
                )
            out[i, index[label]] = True
    return out


def _guess_format(path: Path, text: str) -> ManifestFormat:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def _jsonl_records(text: str, source: str) -> Iterable[tuple[int, Mapping[str, Any]]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(source, line, f"not valid JSON: {e.msg}") from e
        if not isinstance(record, dict):
            raise ManifestError(source, line, "each JSONL line must be a JSON object")
        yield line, record


def _csv_records(text: str, source: str) -> Iterable[tuple[int, Mapping[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise ManifestError(source, 1, f"bad CSV header: {e}") from e
    header = [h.strip() for h in header]
    if "labels" not in header:
        raise ManifestError(source, 1, f"CSV header has no 'labels' column (got {header})")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ManifestError(source, 1, f"CSV header repeats columns {dupes}")
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ManifestError(source, start, f"bad CSV row: {e}") from e
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise ManifestError(
                source, line, f"expected {len(header)} columns ({header}), got {len(cells)}"
            )
        # CSV has no null: an empty cell means "not given", except labels, where it means safe.
        record = {h: c for h, c in zip(header, cells, strict=True) if c.strip()}
        record.setdefault("labels", "")
        yield line, record


def _row(
    record: Mapping[str, Any],
    line: int,
    source: str,
    base: Path | None,
    known: set[str] | None,
    check_files: bool,
) -> ManifestRow:
    def fail(reason: str) -> ManifestError:
        return ManifestError(source, line, reason)

    row_id = _row_id(record, line, fail)
    text = _row_text(record, fail)
    images = tuple(_image(u, base, fail, check_files) for u in _as_list(record, "images", fail))
    labels = _row_labels(record, known, fail)
    if not images and not text:
        raise fail("a row needs at least one image or some text")
    slice_ = record.get("slice")
    if slice_ is not None and not isinstance(slice_, str):
        raise fail(f"slice must be a string, got {type(slice_).__name__}")
    return ManifestRow(
        id=row_id, images=images, labels=tuple(labels), line=line, slice=slice_ or None, **text
    )


def _row_id(record: Mapping[str, Any], line: int, fail: Any) -> str:
    raw_id = record.get("id")
    if raw_id is None or raw_id == "":
        row_id = f"line-{line}"
    elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool):
        row_id = str(raw_id).strip()
    else:
        raise fail(f"id must be a string, got {type(raw_id).__name__}")
    if not _ID_RE.match(row_id):
        raise fail(f"id {row_id!r} is not a valid upload id (letters, digits, . _ : -; <= 128)")
    return row_id


def _row_text(record: Mapping[str, Any], fail: Any) -> dict[str, str]:
    text: dict[str, str] = {}
    for field in ("text", *TEXT_FIELDS):
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise fail(f"{field} must be a string, got {type(value).__name__}")
        if value.strip():
            text[field] = value
    if "text" in text:
        if "caption" in text:
            raise fail("give either text or caption, not both (text is an alias of caption)")
        text["caption"] = text.pop("text")
    return text


def _row_labels(record: Mapping[str, Any], known: set[str] | None, fail: Any) -> list[str]:
    if "labels" not in record:
        raise fail("missing labels (use [] or an empty cell for a safe upload)")
    labels = [label.strip() for label in _as_list(record, "labels", fail)]
    if any(not label for label in labels):
        raise fail("labels must not be blank")
    if [label.lower() for label in labels] == [SAFE_LABEL]:
        return []
    if SAFE_LABEL in (label.lower() for label in labels):
        raise fail(f"'safe' cannot be combined with other labels: {labels}")
    if len(set(labels)) != len(labels):
        raise fail(f"repeated labels {labels}")
    if known is not None:
        unknown = sorted(set(labels) - known)
        if unknown:
            raise fail(f"unknown labels {unknown}; policy categories: {sorted(known)}")
    return labels


def _as_list(record: Mapping[str, Any], field: str, fail: Any) -> list[str]:
    value = record.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(";") if p.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise fail(f"{field} must be a list of strings (or a ';'-separated string)")


def _image(uri: str, base: Path | None, fail: Any, check_files: bool) -> str:
    uri = uri.strip()
    if not uri:
        raise fail("image path must not be blank")
    if uri.startswith("s3://"):
        if not _S3_RE.match(uri):
            raise fail(f"image {uri!r} must look like s3://bucket/key")
        return uri
    if "://" in uri:
        raise fail(f"image {uri!r}: only local paths and s3:// URIs are supported")
    path = Path(uri).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if check_files and not path.is_file():
        raise fail(f"image {uri!r} not found at {path}")
    return str(path)
