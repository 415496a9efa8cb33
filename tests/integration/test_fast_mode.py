"""Fast mode end to end on the real broker, S3 server and tritonserver."""

from __future__ import annotations

import json
import signal

import pytest

from stream_guard.dev.demo import landscape
from tests.conftest import publish, read, upload

pytestmark = pytest.mark.integration


def _by_key(records) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r.key.decode(), []).append(json.loads(r.value))
    return out


def test_uploads_get_one_verdict_each_and_bad_ones_land_in_the_dlq(
    stack, topics, worker_env, start_worker, s3, escalate_all_policy
):
    s3.put_object(Bucket="uploads", Key="t/sunset.jpg", Body=landscape(0))
    s3.put_object(Bucket="uploads", Key="t/a.jpg", Body=landscape(1))
    s3.put_object(Bucket="uploads", Key="t/b.jpg", Body=landscape(2))
    s3.put_object(Bucket="uploads", Key="t/corrupt.jpg", Body=landscape(3)[:1200])
    env = {
        **worker_env,
        "STREAM_GUARD_POLICY__TENANTS": json.dumps({"strict-tenant": str(escalate_all_policy)}),
    }
    start_worker(env)
    publish(
        stack.bootstrap,
        topics.uploads,
        [
            (
                b"neutral",
                upload(
                    "neutral", "Sunset over the hills on our hike", ["s3://uploads/t/sunset.jpg"]
                ),
            ),
            (
                b"threat",
                upload("threat", "I know where you live and I am going to kill you tonight"),
            ),
            (b"selfharm", upload("selfharm", "I can't go on, tonight I will end my life")),
            (
                b"multi",
                upload(
                    "multi", "our family trip", ["s3://uploads/t/a.jpg", "s3://uploads/t/b.jpg"]
                ),
            ),
            (b"escalated", upload("escalated", "a quiet afternoon", tenant_id="strict-tenant")),
            (b"corrupt", upload("corrupt", "profile pic", ["s3://uploads/t/corrupt.jpg"])),
            (b"missing", upload("missing", "look", ["s3://uploads/t/nope.jpg"])),
            (b"garbage", b"{not json"),
            (b"other-bucket", upload("other-bucket", "x", ["s3://secrets/passwords.png"])),
        ],
    )
    verdicts = _by_key(read(stack.bootstrap, topics.verdicts, 5, timeout=90, settle=2))
    dlq = _by_key(read(stack.bootstrap, topics.dlq, 4, timeout=30, settle=1))
    escalations = _by_key(read(stack.bootstrap, topics.escalations, 1, timeout=30))

    assert sorted(verdicts) == ["escalated", "multi", "neutral", "selfharm", "threat"]
    assert all(len(v) == 1 for v in verdicts.values()), "exactly one verdict per upload"
    assert {k: v[0]["error_code"] for k, v in dlq.items()} == {
        "corrupt": "image.undecodable",
        "missing": "media.not_found",
        "garbage": "event.malformed",
        "other-bucket": "media.bucket_not_allowed",
    }
    assert dlq["garbage"][0]["source"]["topic"] == topics.uploads
    assert dlq["garbage"][0]["original_value_b64"]  # the original bytes are kept

    def top(uid: str) -> str:
        cats = verdicts[uid][0]["categories"]
        return max(cats, key=lambda c: c["score"])["code"]

    assert top("threat") == "S1" and verdicts["threat"][0]["decision"] != "allow"
    assert top("selfharm") == "S11" and verdicts["selfharm"][0]["decision"] != "allow"
    for uid in ("neutral", "multi"):
        v = verdicts[uid][0]
        assert v["decision"] == "allow" and v["final"], v
    esc = verdicts["escalated"][0]
    assert esc["decision"] == "escalate" and not esc["final"]
    assert esc["policy_id"] == "escalate_all"  # the tenant's policy, nobody else's
    assert verdicts["neutral"][0]["policy_id"] == "llama_guard_4"
    assert "escalated" in escalations
    for uid in escalations:  # an escalation always follows a provisional verdict
        assert verdicts[uid][0]["decision"] == "escalate" and not verdicts[uid][0]["final"]
    assert escalations["escalated"][0]["fast_verdict"]["verdict_id"] == esc["verdict_id"]


def test_an_event_whose_verdict_was_not_published_is_redelivered_after_restart(
    stack, topics, worker_env, start_worker
):
    # First worker: the verdict topic does not exist and cannot be created, so publishing fails
    # and is retried; the event must stay unacked.
    broken = {**worker_env, "STREAM_GUARD_KAFKA__TOPICS__VERDICTS": "no such topic!"}
    proc, _ = start_worker(broken, wait_ready=True)
    publish(stack.bootstrap, topics.uploads, [(b"retry-me", upload("retry-me", "hello world"))])
    import time

    time.sleep(6)  # it consumed the event and is retrying the publish
    assert read(stack.bootstrap, topics.verdicts, 1, timeout=2) == []
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(10)
    # Second worker, same consumer group, working config: the event comes back.
    start_worker(worker_env)
    verdicts = read(stack.bootstrap, topics.verdicts, 1, timeout=60, settle=2)
    assert [r.key for r in verdicts] == [b"retry-me"]
