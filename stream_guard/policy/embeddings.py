"""A disk cache of text-tower embeddings, kept in the model repository beside the heads.

Compiling a head embeds every text of its policy and pack (about 4,600 for the default policy:
a minute of the text tower on 2 CPU cores). The texts hardly change between compiles, so their
embeddings are kept in ``<repository>/.embeddings/<text model>.npz``, keyed by each text's
sha256 and valid only for the exact tower file they came from (its sha256 is stored with them;
another tower discards the cache). A compile then embeds only new texts: a hot reload that adds
a category costs seconds, not a minute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["EmbeddingCache", "tower_digest"]

log = logging.getLogger(__name__)

CACHE_DIR = ".embeddings"


def tower_digest(repo: Path, text_model: str) -> str | None:
    """sha256 over the text tower's newest version (every file in it: the ONNX graph, its
    tokenizer, text-signal models and their labels) and the model's config (a text prefix, the
    width), or None when there is no such tower (no caching)."""
    model_dir = repo / text_model
    versions = sorted((int(p.name) for p in model_dir.glob("*") if p.name.isdigit()), reverse=True)
    for v in versions:
        files = sorted(f for f in (model_dir / str(v)).rglob("*") if f.is_file())
        if not any(f.suffix == ".onnx" for f in files):
            continue
        h = hashlib.sha256()
        for f in [model_dir / "config.pbtxt", *files]:
            if not f.is_file() or "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(model_dir)).encode())
            with f.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    return None


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingCache:
    def __init__(self, repo: Path, text_model: str, tower: str) -> None:
        self.path = repo / CACHE_DIR / f"{text_model}.npz"
        self.tower = tower
        self._vectors: dict[str, np.ndarray] = {}
        self._load()

    @classmethod
    def for_repository(cls, repo: Path | None, text_model: str) -> EmbeddingCache | None:
        if repo is None:
            return None
        tower = tower_digest(repo, text_model)
        return cls(repo, text_model, tower) if tower else None

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["tower"]) != self.tower:
                    return
                self._vectors = dict(zip(data["keys"].tolist(), data["vectors"], strict=True))
        except (OSError, KeyError, ValueError) as e:
            if self.path.exists():
                log.warning("embedding cache %s unreadable, starting empty: %s", self.path, e)

    def missing(self, texts: Sequence[str]) -> list[str]:
        return [t for t in dict.fromkeys(texts) if _key(t) not in self._vectors]

    def get(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._vectors[_key(t)] for t in texts])

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        for t, v in zip(texts, vectors, strict=True):
            self._vectors[_key(t)] = np.asarray(v, np.float32)

    def save(self) -> None:
        """Atomic: a concurrent reader sees the old file or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._vectors)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    tower=np.array(self.tower),
                    keys=np.array(keys),
                    vectors=np.stack([self._vectors[k] for k in keys])
                    if keys
                    else np.zeros((0, 0), np.float32),
                )
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
