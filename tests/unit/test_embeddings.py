"""The repository's embedding cache: hits, misses, and invalidation by the tower it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream_guard.policy.embeddings import EmbeddingCache, tower_digest


def _tower(repo: Path, content: bytes, extra: bytes = b"") -> None:
    v = repo / "text_encoder" / "1"
    v.mkdir(parents=True, exist_ok=True)
    (v / "model.onnx").write_bytes(content)
    (v / "signals.json").write_bytes(extra)
    (repo / "text_encoder" / "config.pbtxt").write_text('name: "text_encoder"')


def test_cached_vectors_come_back_and_only_new_texts_are_missing(tmp_path: Path):
    _tower(tmp_path, b"graph-1")
    cache = EmbeddingCache.for_repository(tmp_path, "text_encoder")
    assert cache is not None and cache.missing(["a", "b"]) == ["a", "b"]
    cache.add(["a", "b"], np.array([[1, 0], [0, 1]], np.float32))
    cache.save()
    again = EmbeddingCache.for_repository(tmp_path, "text_encoder")
    assert again.missing(["a", "b", "c"]) == ["c"]
    assert np.array_equal(again.get(["b", "a"]), [[0, 1], [1, 0]])


def test_another_tower_or_other_text_signals_discard_the_cache(tmp_path: Path):
    _tower(tmp_path, b"graph-1")
    first = tower_digest(tmp_path, "text_encoder")
    cache = EmbeddingCache.for_repository(tmp_path, "text_encoder")
    cache.add(["a"], np.ones((1, 2), np.float32))
    cache.save()
    _tower(tmp_path, b"graph-1", extra=b'{"toxicity": ["toxic"]}')
    assert tower_digest(tmp_path, "text_encoder") != first
    assert EmbeddingCache.for_repository(tmp_path, "text_encoder").missing(["a"]) == ["a"]


def test_no_tower_means_no_cache(tmp_path: Path):
    assert EmbeddingCache.for_repository(tmp_path, "text_encoder") is None
    assert EmbeddingCache.for_repository(None, "text_encoder") is None
