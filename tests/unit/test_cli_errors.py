"""The real `stream-guard` CLI fails in one or two lines with exit code 2 (no stack needed).

Each test runs the installed console script as a subprocess, the way a person does, with no
STREAM_GUARD_ variables of the caller and Kafka pointed at a closed port, so nothing here can
reach anybody's broker.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream_guard.dev.demo import landscape

CLI = shutil.which("stream-guard", path=str(Path(sys.executable).parent)) or "stream-guard"
TYPE_TAG = re.compile(r"<(bool|str|int|float|Path|list\[[^\]]*\]|[A-Za-z_]+ range)>")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_GUARD_")}
    base["STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS"] = f"127.0.0.1:{closed_port()}"
    base["COLUMNS"] = "120"
    return subprocess.run(
        [CLI, *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_short_error(result, starts: str) -> list[str]:
    err = lines(result.stderr)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert 1 <= len(err) <= 2, err
    assert err[0].startswith(f"error: {starts}"), err
    assert all(line.startswith(("error: ", "hint: ")) for line in err), err
    return err


def test_submit_with_nothing_to_submit_says_what_to_give():
    result = run("submit")
    err = assert_short_error(result, "nothing to submit")
    assert err[1].startswith("hint: e.g. stream-guard submit photo.jpg")
    assert result.stdout == ""


def test_submit_refuses_a_text_file_before_talking_to_anything(tmp_path):
    (tmp_path / "secret.txt").write_text("my secret notes\n")
    result = run("submit", "secret.txt", cwd=tmp_path)
    assert_short_error(result, "secret.txt is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)")


def test_submit_refuses_a_truncated_jpeg_with_the_decoders_reason(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(landscape(1)[:1500])
    result = run("submit", "cut.jpg", cwd=tmp_path)
    err = assert_short_error(result, "cut.jpg: ")
    assert "image.undecodable" in err[0]


@pytest.mark.parametrize(("option", "value"), [("--upload-id", "bad id/../x"), ("--tenant", "a b")])
def test_submit_refuses_an_invalid_id_naming_the_option(tmp_path, option, value):
    (tmp_path / "photo.jpg").write_bytes(landscape(0))
    result = run("submit", "photo.jpg", option, value, cwd=tmp_path)
    err = assert_short_error(result, f"{option} {value!r} is not a valid id")
    assert "letters, digits" in err[1]


def test_submit_names_the_broker_it_cannot_reach():
    port = closed_port()
    result = run(
        "submit",
        "--text",
        "hello",
        env={"STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"},
    )
    err = assert_short_error(result, f"cannot reach Kafka at 127.0.0.1:{port}")
    assert "STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS" in err[1]


def test_an_option_of_the_wrong_type_is_a_usage_error_with_the_help_to_read():
    result = run("tail", "--count", "many")
    err = assert_short_error(result, "Invalid value for '--count'")
    assert err[1] == "hint: `stream-guard tail --help` lists the options"


def test_an_unknown_command_is_a_usage_error():
    result = run("tial")
    assert_short_error(result, "No such command 'tial'")


def test_a_setting_that_is_not_json_names_the_variable_value_and_format():
    result = run("config", env={"STREAM_GUARD_S3__ALLOWED_BUCKETS": "uploads"})
    err = assert_short_error(
        result,
        "STREAM_GUARD_S3__ALLOWED_BUCKETS='uploads' is not JSON: expected a JSON list of "
        "strings, e.g. '[\"uploads\"]'",
    )
    assert err[1].startswith("hint: `stream-guard config`")


def test_a_misspelled_group_variable_is_an_error_with_the_nearest_name():
    result = run("config", env={"STREAM_GUARD_KAFKA__BOOTSTRAP": "b1:9092"})
    assert_short_error(
        result,
        "STREAM_GUARD_KAFKA__BOOTSTRAP is not a stream-guard setting; did you mean "
        "STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS?",
    )


def test_an_unknown_variable_is_warned_about_at_startup_and_the_command_runs():
    result = run("config", env={"STREAM_GUARD_SHUTDOWN_GRACE": "5"})
    assert result.returncode == 0, result.stderr
    assert lines(result.stderr) == [
        "warning: STREAM_GUARD_SHUTDOWN_GRACE is not a stream-guard setting and is ignored; "
        "did you mean STREAM_GUARD_SHUTDOWN_GRACE_S?"
    ]
    assert '"shutdown_grace_s": 25.0' in result.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere_on_the_line_keeps_the_traceback(where):
    args = ["--debug", "submit"] if where == "before" else ["submit", "--debug"]
    result = run(*args)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "CliError: nothing to submit" in result.stderr


def test_stack_commands_without_a_stack_say_so(tmp_path):
    state = str(tmp_path / "none")
    env_result = run("stack", "env", "--state-dir", state)
    err = assert_short_error(env_result, f"no local stack recorded in {state}")
    assert "stack up --detach" in err[1]
    status = run("stack", "status", "--state-dir", state)
    assert status.returncode == 3, status.stderr
    down = run("stack", "down", "--state-dir", state)
    assert down.returncode == 0
    assert "nothing to stop" in down.stderr


def test_a_damaged_state_file_is_named_not_a_traceback(tmp_path):
    (tmp_path / "stack.json").write_text("{half")
    result = run("stack", "status", "--state-dir", str(tmp_path))
    assert_short_error(result, f"{tmp_path / 'stack.json'} is not a stack state file")


def test_help_has_no_type_tags_on_any_command():
    from typer.main import get_command
    from typer.testing import CliRunner

    from stream_guard.cli.app import app

    def paths(command, prefix: list[str]):
        yield prefix
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from paths(sub, [*prefix, name])

    runner = CliRunner()
    checked = 0
    for path in paths(get_command(app), []):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        tags = TYPE_TAG.findall(result.output)
        assert not tags, (path, tags)
        checked += 1
    assert checked > 20
    real = run("stack", "up", "--help")
    assert real.returncode == 0
    assert "--env-file" in real.stdout and "--detach" in real.stdout
    assert not TYPE_TAG.findall(real.stdout), real.stdout
