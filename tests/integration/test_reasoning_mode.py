"""Reasoning mode end to end: escalations answered by the real llama.cpp server, or reviewed."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stream_guard.dev.stack import free_port, start_reasoning_server
from tests.conftest import STATE, publish, read, upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama_server():
    port = free_port()
    proc = start_reasoning_server(STATE, port)
    yield f"http://127.0.0.1:{port}/v1"
    proc.stop()


@pytest.fixture
def escalating_env(worker_env, escalate_all_policy: Path) -> dict[str, str]:
    """Tenant `esc` gets a policy whose band covers every score: its uploads always escalate."""
    return {
        **worker_env,
        "STREAM_GUARD_POLICY__TENANTS": json.dumps({"esc": str(escalate_all_policy)}),
        "STREAM_GUARD_REASONING__ATTEMPTS": "2",
        "STREAM_GUARD_REASONING__TIMEOUT_S": "60",
    }


def _finals(stack, topics, n: int, timeout: float = 180) -> list[dict]:
    verdicts = read(stack.bootstrap, topics.verdicts, 0, timeout=2)
    review = read(stack.bootstrap, topics.review, 0, timeout=2)
    deadline_records = []
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        verdicts = read(stack.bootstrap, topics.verdicts, 1, timeout=3)
        review = read(stack.bootstrap, topics.review, 0, timeout=1)
        deadline_records = [
            {**json.loads(r.value), "_topic": r.topic}
            for r in [*verdicts, *review]
            if json.loads(r.value).get("mode") == "reasoning"
        ]
        if len(deadline_records) >= n:
            break
        time.sleep(1)
    return deadline_records


def test_escalated_upload_gets_a_final_verdict_with_rationale_from_llama_cpp(
    stack, topics, escalating_env, start_worker, llama_server
):
    env = {**escalating_env, "STREAM_GUARD_REASONING__BASE_URL": llama_server}
    start_worker(env)
    start_worker(env, kind="reason")
    publish(
        stack.bootstrap,
        topics.uploads,
        [(b"esc-1", upload("esc-1", "I am going to hurt you badly tomorrow", tenant_id="esc"))],
    )
    finals = _finals(stack, topics, 1)
    assert len(finals) == 1
    final = finals[0]
    assert final["final"] is True and final["upload_id"] == "esc-1"
    assert final["reasoning"]["model"] == "smollm2-135m-instruct"
    assert final["reasoning"]["trust"] == "advisory"  # the local default
    assert final["reasoning"]["rationale"], "the model's explanation travels with the verdict"
    assert final["policy_id"] == "escalate_all"
    if final["_topic"] == topics.review:
        assert final["decision"] == "review" and final["review_reason"]
    # The provisional verdict came first, from the fast tier.
    fast = [json.loads(r.value) for r in read(stack.bootstrap, topics.verdicts, 1, timeout=10)]
    assert fast[0]["mode"] == "fast" and fast[0]["decision"] == "escalate"


class _Garbage(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - /v1/models
        self._send({"data": [{"id": "garbage"}]})

    def do_POST(self):  # noqa: N802 - /v1/chat/completions
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._send(
            {"choices": [{"message": {"role": "assistant", "content": "S1,S1,S1 lorem ipsum {{{"}}]}
        )

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_garbage_answers_end_in_review(stack, topics, escalating_env, start_worker):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **escalating_env,
        "STREAM_GUARD_REASONING__BASE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1",
        "STREAM_GUARD_REASONING__TIMEOUT_S": "5",
    }
    try:
        start_worker(env)
        start_worker(env, kind="reason")
        publish(stack.bootstrap, topics.uploads, _uploads("g", 3))
        finals = _finals(stack, topics, 3, timeout=120)
    finally:
        server.shutdown()
    assert sorted(f["upload_id"] for f in finals) == ["g-0", "g-1", "g-2"], "nothing lost"
    for f in finals:
        assert f["_topic"] == topics.review and f["decision"] == "review"
        assert f["review_reason"]
    reasons = " ".join(f["review_reason"] for f in finals).lower()
    assert "schema" in reasons or "answer" in reasons or "reasoningerror" in reasons


def _uploads(prefix: str, n: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"{prefix}-{i}".encode(), upload(f"{prefix}-{i}", f"caption {i}", tenant_id="esc"))
        for i in range(n)
    ]


def test_a_reasoning_server_that_is_down_holds_escalations_until_it_answers(
    stack, topics, escalating_env, start_worker
):
    """Down is transient: nothing goes to people as if the model had disagreed; once a server
    answers on that address, every escalation gets its final outcome."""
    port = free_port()
    env = {
        **escalating_env,
        "STREAM_GUARD_REASONING__BASE_URL": f"http://127.0.0.1:{port}/v1",
        "STREAM_GUARD_REASONING__TIMEOUT_S": "5",
    }
    start_worker(env)
    start_worker(env, kind="reason")
    publish(stack.bootstrap, topics.uploads, _uploads("d", 3))
    early = _finals(stack, topics, 1, timeout=12)
    assert early == [], "no final verdict or review while the model server is down"
    server = ThreadingHTTPServer(("127.0.0.1", port), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        finals = _finals(stack, topics, 3, timeout=120)
    finally:
        server.shutdown()
    assert sorted(f["upload_id"] for f in finals) == ["d-0", "d-1", "d-2"], "nothing lost"
    # each outcome comes from the server's (garbage) answer, none from it being down
    for f in finals:
        reason = (f.get("review_reason") or "").lower()
        assert "schema" in reason and "connect" not in reason, reason
