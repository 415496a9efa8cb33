"""`stream-guard tail` and `submit` through the real CLI against the session's local stack."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stream_guard.dev.demo import landscape
from tests.conftest import publish, read

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "stream-guard")


@pytest.fixture
def cli_env(stack, topics) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_GUARD_")}
    return {**base, **stack.env(), **topics.env()}


def sg(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def topic_names(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    async def run() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(run())


def keys(s3, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


@pytest.fixture
def verdicts(stack, topics) -> list[bytes]:
    values = [json.dumps({"upload_id": f"u{n}", "n": n}).encode() for n in range(3)]
    publish(stack.bootstrap, topics.verdicts, [(f"u{n}".encode(), v) for n, v in enumerate(values)])
    return values


def test_tail_reads_a_role_or_a_topic_name_from_the_beginning(cli_env, topics, verdicts):
    by_role = sg(cli_env, "tail", "--topic", "verdicts", "--idle", "2")
    assert by_role.returncode == 0, by_role.stderr
    assert sorted(by_role.stdout.splitlines()) == sorted(v.decode() for v in verdicts)
    by_name = sg(cli_env, "tail", "--topic", topics.verdicts, "--idle", "2")
    assert sorted(by_name.stdout.splitlines()) == sorted(by_role.stdout.splitlines())
    two = sg(cli_env, "tail", "--count", "2")  # verdicts is the default role
    assert len(two.stdout.splitlines()) == 2
    one = sg(cli_env, "tail", "--upload-id", "u1", "--idle", "2")
    assert [json.loads(line)["n"] for line in one.stdout.splitlines()] == [1]


def test_tail_of_an_empty_topic_says_so_instead_of_printing_nothing(cli_env):
    result = sg(cli_env, "tail", "--topic", "dlq", "--idle", "1")
    assert result.returncode == 0
    assert result.stdout == ""
    assert "no records (waited 1s idle; --follow waits for new ones)" in result.stderr


@pytest.mark.parametrize("topic", ["verdict", f"nosuch-{uuid.uuid4().hex[:6]}"])
def test_tail_refuses_a_topic_that_does_not_exist_and_creates_none(stack, cli_env, topic):
    result = sg(cli_env, "tail", "--topic", topic)
    assert result.returncode == 2
    err = result.stderr.splitlines()
    assert len(err) == 2, err
    assert err[0] == (
        f"error: topic {topic!r} does not exist on {stack.bootstrap}; tail never creates topics"
    )
    assert "roles: uploads, verdicts, escalations, review, dlq" in err[1]
    if topic == "verdict":
        assert err[1].startswith("hint: did you mean 'verdicts'?")
    assert topic not in topic_names(stack.bootstrap)


def test_tail_follow_prints_new_records_until_interrupted(stack, cli_env, topics):
    proc = subprocess.Popen(
        [CLI, "tail", "--topic", "escalations", "--follow"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(8)  # longer than any idle timeout: --follow keeps waiting
        assert proc.poll() is None
        publish(stack.bootstrap, topics.escalations, [(b"late", b'{"upload_id": "late"}')])
        line = proc.stdout.readline()
        assert json.loads(line) == {"upload_id": "late"}
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in err


def test_submit_uploads_the_image_and_publishes_one_event(stack, cli_env, topics, s3, tmp_path):
    (tmp_path / "photo one.jpg").write_bytes(landscape(0))
    uid = f"sub-{uuid.uuid4().hex[:8]}"
    result = sg(
        cli_env, "submit", "photo one.jpg", "--text", "our hike", "--upload-id", uid, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == uid
    (record,) = read(stack.bootstrap, topics.uploads, 1, timeout=30, settle=1.0)
    assert record.key == uid.encode()
    event = json.loads(record.value)
    (image,) = event["images"]
    assert image == {
        "uri": f"s3://{stack.bucket}/uploads/{uid}/0-photo_one.jpg",
        "content_type": "image/jpeg",
    }
    assert event["text"]["caption"] == "our hike"
    head = s3.head_object(Bucket=stack.bucket, Key=f"uploads/{uid}/0-photo_one.jpg")
    assert head["ContentType"] == "image/jpeg"


def test_a_refused_submit_leaves_no_object_no_event_and_no_topic(
    stack, cli_env, topics, s3, tmp_path
):
    (tmp_path / "photo.jpg").write_bytes(landscape(0))
    (tmp_path / "secret.txt").write_text("not an image\n")
    uid = f"sub-{uuid.uuid4().hex[:8]}"
    missing = f"missing-{uuid.uuid4().hex[:6]}"
    cases = [
        (["photo.jpg", "secret.txt", "--upload-id", uid], {}, "secret.txt is not an image"),
        (["photo.jpg", "--upload-id", "bad id/../x"], {}, "--upload-id 'bad id/../x'"),
        (
            ["photo.jpg", "--upload-id", uid],
            {"STREAM_GUARD_KAFKA__TOPICS__UPLOADS": missing},
            f"topic {missing!r} (role uploads) does not exist",
        ),
    ]
    for args, extra, message in cases:
        result = sg({**cli_env, **extra}, "submit", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(f"error: {message}"), result.stderr
        assert len(result.stderr.splitlines()) <= 2
    assert keys(s3, stack.bucket, f"uploads/{uid}/") == []
    assert keys(s3, stack.bucket, "uploads/bad id") == []
    assert read(stack.bootstrap, topics.uploads, 1, timeout=3) == []
    assert missing not in topic_names(stack.bootstrap)
