"""Labelled manifests: JSONL and CSV rows, and bad rows reported with their line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_guard.errors import StreamGuardError
from stream_guard.quality.manifest import (
    ManifestError,
    ManifestRow,
    label_matrix,
    parse_manifest,
    read_manifest,
)


def _jsonl(*rows) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_jsonl_rows_are_read_with_paths_text_and_labels(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        _jsonl(
            {"id": "u1", "images": ["img/a.png", "s3://bucket/k/b.jpg"], "labels": ["hate"]},
            "",
            {"text": "a caption", "labels": []},
            {"prompt": "p", "response": "r", "labels": "hate;sexual", "extra": 1},
            {"images": "/abs/c.png", "title": "t", "labels": ["safe"]},
        )
    )
    rows = read_manifest(path)
    assert rows[0] == ManifestRow(
        id="u1",
        images=(str(tmp_path / "img/a.png"), "s3://bucket/k/b.jpg"),
        labels=("hate",),
        line=1,
    )
    assert rows[1].id == "line-3" and rows[1].caption == "a caption" and rows[1].is_safe
    assert rows[1].text_fields == {"caption": "a caption"}
    assert rows[2].labels == ("hate", "sexual")
    assert rows[2].text == "p\nr" and rows[2].text_fields == {"prompt": "p", "response": "r"}
    assert rows[3].images == ("/abs/c.png",) and rows[3].labels == ()


def test_csv_rows_split_lists_on_semicolons_and_read_empty_labels_as_safe(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "id,images,text,labels,notes\n"
        "a1,x.png;s3://b/y.png,hello,hate;violence,\n"
        'a2,,"two\nlines",,ignored\n'
        "\n"
        "a3,z.png,,sexual,\n",
        encoding="utf-8",
    )
    rows = read_manifest(path, codes=["hate", "sexual", "violence"])
    assert [r.id for r in rows] == ["a1", "a2", "a3"]
    assert rows[0].images == (str(tmp_path / "x.png"), "s3://b/y.png")
    assert rows[0].labels == ("hate", "violence") and rows[0].caption == "hello"
    assert rows[1].caption == "two\nlines" and rows[1].labels == () and rows[1].images == ()
    assert [r.line for r in rows] == [2, 3, 6]


def test_format_is_guessed_from_the_content_when_the_suffix_says_nothing(tmp_path):
    path = tmp_path / "manifest.txt"
    path.write_text(_jsonl({"text": "x", "labels": []}))
    assert read_manifest(path)[0].caption == "x"
    path.write_text("text,labels\nx,\n")
    assert read_manifest(path)[0].caption == "x"


def test_label_matrix_follows_code_order():
    rows = parse_manifest(
        _jsonl({"text": "a", "labels": ["b"]}, {"text": "b", "labels": []}), format="jsonl"
    )
    assert label_matrix(rows, ["a", "b"]).tolist() == [[False, True], [False, False]]
    with pytest.raises(ManifestError, match="'b' is not one of"):
        label_matrix(rows, ["a"])
    assert label_matrix(rows, ["a", "b"]).dtype == np.bool_


@pytest.mark.parametrize(
    "text, line, message",
    [
        ('{"text": "ok", "labels": []}\n{"text": ', 2, "not valid JSON"),
        ("[1, 2]\n", 1, "must be a JSON object"),
        ('{"text": "x"}\n', 1, "missing labels"),
        ('{"text": "x", "labels": [1]}\n', 1, "labels must be a list of strings"),
        ('{"text": "x", "labels": [""]}\n', 1, "labels must not be blank"),
        ('{"text": "x", "labels": ["a", "a"]}\n', 1, "repeated labels"),
        ('{"text": "x", "labels": ["safe", "a"]}\n', 1, "'safe' cannot be combined"),
        ('{"text": "x", "labels": ["nope"]}\n', 1, "unknown labels \\['nope'\\]"),
        ('{"id": "bad id", "text": "x", "labels": []}\n', 1, "not a valid upload id"),
        ('{"id": true, "text": "x", "labels": []}\n', 1, "id must be a string"),
        ('{"labels": []}\n', 1, "at least one image or some text"),
        ('{"text": "  ", "images": [], "labels": []}\n', 1, "at least one image or some text"),
        ('{"text": 3, "labels": []}\n', 1, "text must be a string"),
        ('{"text": "a", "caption": "b", "labels": []}\n', 1, "either text or caption"),
        ('{"images": ["http://x/y.png"], "labels": []}\n', 1, "only local paths and s3://"),
        ('{"images": ["s3://bucket-only"], "labels": []}\n', 1, "s3://bucket/key"),
        ('{"images": ["s3://bucket/dir/"], "labels": []}\n', 1, "s3://bucket/key"),
        (
            '{"id": "d", "text": "x", "labels": []}\n\n{"id": "d", "text": "y", "labels": []}\n',
            3,
            "duplicate id 'd' \\(first on line 1\\)",
        ),
    ],
)
def test_bad_jsonl_rows_name_their_line(text, line, message):
    with pytest.raises(ManifestError, match=message) as err:
        parse_manifest(text, format="jsonl", source="m.jsonl", codes=["a"])
    assert err.value.line == line
    assert str(err.value).startswith(f"m.jsonl:{line}: ")
    assert isinstance(err.value, StreamGuardError)


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("id,text\nu1,x\n", 1, "no 'labels' column"),
        ("text,labels,text\nx,,y\n", 1, "repeats columns \\['text'\\]"),
        ("text,labels\nx,\ny,,extra\n", 3, "expected 2 columns"),
        ("text,labels\n\nx,c\n", 3, "unknown labels \\['c'\\]"),
        ('text,labels\nx,\n"unterminated,\n', 3, "expected 2 columns|bad CSV"),
    ],
)
def test_bad_csv_rows_name_their_line(text, line, message):
    with pytest.raises(ManifestError, match=message) as err:
        parse_manifest(text, format="csv", source="m.csv", codes=["b"])
    assert err.value.line == line


def test_missing_files_are_reported_only_when_asked(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(_jsonl({"images": ["missing.png"], "labels": []}))
    assert read_manifest(path)[0].images == (str(tmp_path / "missing.png"),)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(path, check_files=True)
    (tmp_path / "missing.png").write_bytes(b"x")
    assert read_manifest(path, check_files=True)


@pytest.mark.parametrize(
    "content, message",
    [("", "no rows"), ("\n\n", "no rows"), ("text,labels\n", "no rows")],
)
def test_empty_manifests_are_an_error(tmp_path, content, message):
    path = tmp_path / ("m.csv" if "," in content else "m.jsonl")
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_unreadable_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "absent.jsonl")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        parse_manifest("x", format="xml")  # type: ignore[arg-type]
