"""The labelled manifest that reviewer decisions accumulate into: a local folder or an S3 prefix.

One JSON object per upload at ``<root>/rows/<upload_id>.json``, so the store is de-duplicated per
upload by construction and safe for redelivery: the first decision for an upload is its label; a
redelivered copy of that decision is a duplicate (nothing written), a different later decision is
a conflict (nothing written, the caller reports it). ``export`` gathers the rows into one JSONL
manifest, the file ``head train``, ``calibrate`` and ``eval`` read.

The calls are synchronous (boto3, file system): the worker runs them in a thread.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from stream_guard.errors import ConfigError, DependencyUnavailable
from stream_guard.settings import S3Settings

__all__ = [
    "LabelStore",
    "LocalLabels",
    "Outcome",
    "S3Labels",
    "export_manifest",
    "open_label_store",
    "record_row",
]

Outcome = Literal["added", "duplicate", "conflict"]
ROWS = "rows"


class LabelStore(Protocol):
    where: str

    def get(self, upload_id: str) -> dict[str, Any] | None: ...

    def put(self, upload_id: str, row: dict[str, Any]) -> None: ...

    def rows(self) -> Iterator[dict[str, Any]]: ...


class LocalLabels:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def _path(self, upload_id: str) -> Path:
        return self.root / ROWS / f"{upload_id}.json"

    def get(self, upload_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(upload_id).read_text())
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DependencyUnavailable("labels", f"reading {self._path(upload_id)}: {e}") from e

    def put(self, upload_id: str, row: dict[str, Any]) -> None:
        path = self._path(upload_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".row-")
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(row, sort_keys=True))
            os.replace(tmp, path)  # readers never see half a row
        except OSError as e:
            raise DependencyUnavailable("labels", f"writing {path}: {e}") from e

    def rows(self) -> Iterator[dict[str, Any]]:
        folder = self.root / ROWS
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.json")):
            yield json.loads(path.read_text())


class S3Labels:
    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.where = f"s3://{bucket}/{self.prefix}"

    def _key(self, upload_id: str) -> str:
        return "/".join(p for p in (self.prefix, ROWS, f"{upload_id}.json") if p)

    def get(self, upload_id: str) -> dict[str, Any] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(upload_id))
            return json.loads(obj["Body"].read())
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise DependencyUnavailable("labels", f"reading {self.where}: {e}") from e
        except BotoCoreError as e:
            raise DependencyUnavailable("labels", f"reading {self.where}: {e}") from e

    def put(self, upload_id: str, row: dict[str, Any]) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(upload_id),
                Body=json.dumps(row, sort_keys=True).encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as e:
            raise DependencyUnavailable("labels", f"writing {self.where}: {e}") from e

    def rows(self) -> Iterator[dict[str, Any]]:
        start = "/".join(p for p in (self.prefix, ROWS) if p) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(".json"):
                        body = self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"]
                        yield json.loads(body.read())
        except (ClientError, BotoCoreError) as e:
            raise DependencyUnavailable("labels", f"listing {self.where}: {e}") from e


def open_label_store(spec: str, s3: S3Settings) -> LabelStore:
    """``s3://bucket/prefix`` or a local folder (created on the first row)."""
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[5:].partition("/")
        if not bucket:
            raise ConfigError(f"review.manifest {spec!r}: expected s3://bucket/prefix")
        from stream_guard.media.storage import s3_client

        client = s3_client(s3)
        return S3Labels(client, bucket, prefix)
    if "://" in spec:
        raise ConfigError(f"review.manifest {spec!r}: use a local folder or s3://bucket/prefix")
    return LocalLabels(Path(spec).expanduser())


def record_row(store: LabelStore, row: dict[str, Any]) -> Outcome:
    """Add ``row`` unless its upload already has one: first decision wins."""
    existing = store.get(row["id"])
    if existing is None:
        store.put(row["id"], row)
        return "added"
    return "duplicate" if existing.get("decision_id") == row["decision_id"] else "conflict"


def export_manifest(store: LabelStore, out: Path) -> int:
    """Write every row as one JSONL manifest (oldest decision first); returns the row count."""
    rows = sorted(store.rows(), key=lambda r: (str(r.get("decided_at", "")), str(r["id"])))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(out)
    return len(rows)
