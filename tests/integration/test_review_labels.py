"""The labelled manifest on an S3 prefix (the real S3 server of the local stack)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from stream_guard.quality.manifest import read_manifest
from stream_guard.review.decisions import manifest_row
from stream_guard.review.labels import export_manifest, open_label_store, record_row
from stream_guard.settings import S3Settings
from tests.unit.test_review import decision

pytestmark = pytest.mark.integration


def test_rows_on_an_s3_prefix_are_one_per_upload_and_export_as_a_manifest(
    stack, s3, tmp_path: Path
):
    prefix = f"labels/{uuid.uuid4().hex[:8]}"
    settings = S3Settings(
        endpoint_url=stack.s3_endpoint,
        access_key_id="stream-guard-local",
        secret_access_key="stream-guard-local-secret",
    )
    store = open_label_store(f"s3://uploads/{prefix}", settings)
    first = manifest_row(decision("u1"))
    assert record_row(store, first) == "added"
    assert record_row(store, first) == "duplicate"
    late = manifest_row(decision("u1", decision_id="d-late", decision="allow", categories=[]))
    assert record_row(store, late) == "conflict"
    assert record_row(store, manifest_row(decision("u2", decision="allow", categories=[]))) == (
        "added"
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="uploads", Prefix=prefix)["Contents"]]
    assert sorted(keys) == [f"{prefix}/rows/u1.json", f"{prefix}/rows/u2.json"]
    out = tmp_path / "labelled.jsonl"
    assert export_manifest(store, out) == 2
    rows = read_manifest(out, codes=["S1", "S10"])
    assert [(r.id, r.labels) for r in rows] == [("u1", ("S1",)), ("u2", ())]


def test_a_label_store_that_is_down_is_a_transient_error(tmp_path: Path):
    from stream_guard.dev.stack import free_port
    from stream_guard.errors import DependencyUnavailable

    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="x",
        secret_access_key="y",
        timeout_s=1.0,
    )
    store = open_label_store("s3://uploads/labels", settings)
    with pytest.raises(DependencyUnavailable):
        record_row(store, manifest_row(decision("u1")))
