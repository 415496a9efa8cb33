"""The client against a scripted OpenAI-compatible server on 127.0.0.1 (aiohttp, real HTTP)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from stream_guard.errors import DependencyUnavailable, ReasoningError
from stream_guard.events import Decision, UploadText
from stream_guard.policy.model import Policy
from stream_guard.reasoning.client import CircuitBreaker, ReasoningClient, TokenBucket
from stream_guard.settings import ReasoningSettings

from .conftest import EscalationFactory

Behaviour = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]
BLOCK_S1 = json.dumps({"decision": "unsafe", "categories": ["S1"], "rationale": "a threat"})
IMAGE = "data:image/png;base64,iVBORw0KGgo="


def ok(content: str = BLOCK_S1, *, delay: float = 0.0, logprobs: Any = None) -> Behaviour:
    async def behaviour(body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(delay)
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": "stop", "logprobs": logprobs}  # fmt: skip
        return web.json_response({"id": "c1", "object": "chat.completion", "choices": [choice]})

    return behaviour


def status(code: int, text: str = "", headers: dict[str, str] | None = None) -> Behaviour:
    async def behaviour(body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=code, text=text or f"error {code}", headers=headers)

    return behaviour


def raw(text: str) -> Behaviour:
    async def behaviour(body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=200, text=text, content_type="text/html")

    return behaviour


def llama_cpp_like(content: str = BLOCK_S1) -> Behaviour:
    """llama-cpp-python 0.3: OpenAI's json_schema style is a 500; json_object + schema works."""
    accept = ok(content)

    async def behaviour(body: dict[str, Any]) -> web.StreamResponse:
        if body.get("response_format", {}).get("type") == "json_schema":
            msg = (
                "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
                "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"}"
            )
            return web.json_response({"error": {"message": msg}}, status=500)
        return await accept(body)

    return behaviour


class Backend:
    """A scripted chat-completions endpoint that records what it was sent."""

    def __init__(self) -> None:
        self.script: list[Behaviour] = []
        self.default: Behaviour = ok()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            behaviour = self.script.pop(0) if self.script else self.default
            return await behaviour(body)
        finally:
            self.in_flight -= 1

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": "guard"}]})


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", b.chat)
    app.router.add_get("/v1/models", b.models)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    b.url = f"http://127.0.0.1:{port}/v1"
    yield b
    await runner.cleanup()


def make_client(backend: Backend, **overrides: Any) -> ReasoningClient:
    kwargs: dict[str, Any] = dict(
        base_url=backend.url,
        model="guard",
        prompt_format="safevision",
        timeout_s=2.0,
        attempts=3,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        rate_limit_per_s=1000.0,
        max_concurrency=4,
    )
    kwargs.update(overrides)
    return ReasoningClient(**kwargs)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- retries -------------------------------------------------------------------------------


async def test_http_500_then_success_returns_the_answer_after_two_attempts(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.script = [status(500)]
    async with make_client(backend) as client:
        answer = await client.classify(policy, escalation_factory())
    assert answer.attempts == 2 and len(backend.requests) == 2
    assert answer.result.decision == Decision.BLOCK and answer.result.categories == ["S1"]


async def test_a_request_that_times_out_is_retried(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.script = [ok(delay=0.6)]
    async with make_client(backend, timeout_s=0.2) as client:
        answer = await client.classify(policy, escalation_factory())
    assert answer.attempts == 2


async def test_http_429_is_retried(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.script = [status(429, headers={"Retry-After": "0"})]
    async with make_client(backend) as client:
        assert (await client.classify(policy, escalation_factory())).attempts == 2


async def test_a_server_that_stays_down_raises_dependency_unavailable_after_bounded_attempts(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = status(503)
    async with make_client(backend, attempts=3) as client:
        with pytest.raises(DependencyUnavailable, match="HTTP 503.*after 3 attempts"):
            await client.classify(policy, escalation_factory())
    assert len(backend.requests) == 3


async def test_nothing_listening_is_dependency_unavailable(
    policy: Policy, escalation_factory: EscalationFactory
) -> None:
    client = ReasoningClient(
        base_url=f"http://127.0.0.1:{closed_port()}/v1", model="guard", attempts=2,
        backoff_initial_s=0.01, timeout_s=1.0,
    )  # fmt: skip
    async with client:
        with pytest.raises(DependencyUnavailable, match="connection failed"):
            await client.classify(policy, escalation_factory())
        with pytest.raises(DependencyUnavailable):
            await client.ping()


async def test_a_garbage_answer_is_retried_with_a_repair_turn(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.script = [ok("I think it is fine, really.")]
    async with make_client(backend) as client:
        answer = await client.classify(policy, escalation_factory())
    assert answer.attempts == 2
    first, second = backend.requests
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert second["messages"][-2] == {"role": "assistant", "content": "I think it is fine, really."}
    assert "out of format" in second["messages"][-1]["content"]


async def test_answers_that_stay_out_of_schema_raise_reasoning_error_and_keep_the_circuit_closed(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = ok('{"decision": "unsafe", "categories": ["S1",')  # cut by max_tokens
    async with make_client(backend, attempts=3, breaker_failures=1) as client:
        with pytest.raises(ReasoningError, match="after 3 attempts"):
            await client.classify(policy, escalation_factory())
        assert client.breaker.state == "closed"
    assert len(backend.requests) == 3


async def test_a_non_json_http_body_counts_as_an_out_of_schema_answer(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.script = [raw("<html>proxy error</html>")]
    async with make_client(backend) as client:
        assert (await client.classify(policy, escalation_factory())).attempts == 2


async def test_llama_guard_garbage_is_retried_with_the_same_prompt_at_a_higher_temperature(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.script = [ok("Sure, here is my assessment"), ok("unsafe\nS1")]
    async with make_client(backend, prompt_format="llama_guard_4") as client:
        answer = await client.classify(policy, escalation_factory())
    assert answer.attempts == 2 and answer.result.categories == ["S1"]
    first, second = backend.requests
    assert first["messages"] == second["messages"]
    assert (first["temperature"], second["temperature"]) == (0.0, 0.7)


async def test_misconfiguration_is_not_retried_and_says_what_to_check(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = status(401, "invalid api key")
    async with make_client(backend) as client:
        with pytest.raises(DependencyUnavailable, match="api_key"):
            await client.classify(policy, escalation_factory())
    assert len(backend.requests) == 1


async def test_a_request_the_server_refuses_is_a_reasoning_error_and_not_retried(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = status(400, "Requested tokens (4000) exceed context window of 2048")
    async with make_client(backend) as client:
        with pytest.raises(ReasoningError, match="context window"):
            await client.classify(policy, escalation_factory())
        assert client.breaker.state == "closed"
    assert len(backend.requests) == 1


# -- circuit breaker -----------------------------------------------------------------------


async def test_the_circuit_opens_fails_fast_and_closes_after_the_cooldown(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = status(503)
    async with make_client(backend, attempts=2, breaker_failures=2, breaker_cooldown_s=0.3) as c:
        with pytest.raises(DependencyUnavailable, match="503"):
            await c.classify(policy, escalation_factory())
        assert c.breaker.state == "open"
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="circuit open"):
            await c.classify(policy, escalation_factory())
        assert time.monotonic() - started < 0.1 and len(backend.requests) == 2  # failed fast
        backend.default = ok()
        await asyncio.sleep(0.35)
        assert c.breaker.state == "half_open"
        answer = await c.classify(policy, escalation_factory())
        assert answer.result.decision == Decision.BLOCK and c.breaker.state == "closed"


async def test_a_failed_probe_reopens_the_circuit(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = status(502)
    async with make_client(backend, attempts=1, breaker_failures=1, breaker_cooldown_s=0.2) as c:
        with pytest.raises(DependencyUnavailable):
            await c.classify(policy, escalation_factory())
        await asyncio.sleep(0.25)
        with pytest.raises(DependencyUnavailable, match="502"):  # the probe reached the server
            await c.classify(policy, escalation_factory())
        assert c.breaker.state == "open" and len(backend.requests) == 2
        with pytest.raises(DependencyUnavailable, match="circuit open"):
            await c.classify(policy, escalation_factory())


def test_breaker_lets_one_probe_through_when_half_open() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"
    now[0] = 10.0
    breaker.before_call()  # the probe
    with pytest.raises(DependencyUnavailable, match="probe"):
        breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_call()


# -- limits --------------------------------------------------------------------------------


async def test_the_rate_limit_spaces_requests(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    async with make_client(backend, rate_limit_per_s=20.0, rate_burst=1) as client:
        started = time.monotonic()
        for _ in range(5):
            await client.classify(policy, escalation_factory())
        assert time.monotonic() - started >= 0.19  # 4 waits of 1/20 s after the first token


async def test_token_bucket_allows_a_burst_then_waits() -> None:
    bucket = TokenBucket(rate_per_s=50.0, burst=3)
    started = time.monotonic()
    for _ in range(3):
        await bucket.acquire()
    assert time.monotonic() - started < 0.02
    await bucket.acquire()
    assert time.monotonic() - started >= 0.018


async def test_concurrent_calls_never_exceed_max_concurrency(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = ok(delay=0.1)
    async with make_client(backend, max_concurrency=2) as client:
        answers = await asyncio.gather(
            *(client.classify(policy, escalation_factory()) for _ in range(6))
        )
    assert len(answers) == 6 and backend.max_in_flight == 2


# -- what is sent --------------------------------------------------------------------------


async def test_a_rejected_json_schema_falls_back_to_the_dialect_the_server_accepts(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = llama_cpp_like()
    async with make_client(backend) as client:
        answer = await client.classify(policy, escalation_factory())
        assert answer.attempts == 1 and client.response_format == "json_object_schema"
        await client.classify(policy, escalation_factory())
    sent = [r["response_format"] for r in backend.requests]
    assert sent[0]["type"] == "json_schema"
    assert sent[0]["json_schema"]["schema"]["properties"]["categories"]["items"]["enum"] == [
        "S1", "S10", "S12"
    ]  # fmt: skip
    assert sent[1]["type"] == "json_object" and "schema" in sent[1]
    assert sent[2] == sent[1] and len(sent) == 3  # the working dialect is kept


async def test_without_fallback_a_rejected_json_schema_is_not_downgraded(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.default = llama_cpp_like()
    async with make_client(backend, attempts=2, response_format_fallback=False) as client:
        with pytest.raises(DependencyUnavailable):
            await client.classify(policy, escalation_factory())
    assert {r["response_format"]["type"] for r in backend.requests} == {"json_schema"}


async def test_the_request_is_deterministic_and_bounded(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    async with make_client(backend, prompt_format="shieldvlm", max_tokens=128) as client:
        await client.classify(policy, escalation_factory())
    body = backend.requests[0]
    assert body["model"] == "guard" and body["temperature"] == 0.0 and body["max_tokens"] == 128
    schema = body["response_format"]["json_schema"]["schema"]
    assert list(schema["properties"])[0] == "rationale"  # ShieldVLM reasons first
    assert schema["properties"]["rationale"]["maxLength"] == 160  # fits in max_tokens
    assert "under 160 characters" in body["messages"][1]["content"]


async def test_llama_guard_asks_for_logprobs_not_json_and_reports_the_score(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    logprobs = {"content": [{"token": "unsafe", "logprob": -0.05,
                             "top_logprobs": [{"token": "unsafe", "logprob": -0.05},
                                              {"token": "safe", "logprob": -3.0}]}]}  # fmt: skip
    backend.default = ok("unsafe\nS1,S1,S1,S1,S", logprobs=logprobs)
    async with make_client(backend, prompt_format="llama_guard_4") as client:
        answer = await client.classify(policy, escalation_factory())
    assert answer.result.categories == ["S1"] and answer.result.score == pytest.approx(0.95, 0.01)
    body = backend.requests[0]
    assert body["logprobs"] is True and "response_format" not in body


async def test_a_server_rejecting_logprobs_is_asked_again_without_them(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    backend.script = [status(400, "logprobs is not supported for this model")]
    backend.default = ok("safe")
    async with make_client(backend, prompt_format="llama_guard_4") as client:
        answer = await client.classify(policy, escalation_factory())
    assert answer.result.decision == Decision.ALLOW and answer.attempts == 1
    assert "logprobs" not in backend.requests[1]


@pytest.mark.parametrize(("vision", "expected"), [(True, [IMAGE]), (False, [])])
async def test_images_are_sent_only_to_a_vision_backend(
    vision: bool,
    expected: list[str],
    backend: Backend,
    policy: Policy,
    escalation_factory: EscalationFactory,
) -> None:
    async with make_client(backend, vision=vision) as client:
        await client.classify(policy, escalation_factory(text=UploadText(caption="hi")), [IMAGE])
    content = backend.requests[0]["messages"][1]["content"]
    parts = content if isinstance(content, list) else []
    assert [p["image_url"]["url"] for p in parts if p["type"] == "image_url"] == expected


async def test_the_api_key_is_sent_as_a_bearer_token_and_never_shown(
    backend: Backend, policy: Policy, escalation_factory: EscalationFactory
) -> None:
    settings = ReasoningSettings(base_url=backend.url, api_key=SecretStr("sk-very-secret"))
    client = ReasoningClient.from_settings(settings, backoff_initial_s=0.01)
    async with client:
        await client.classify(policy, escalation_factory())
        await client.ping()
    assert backend.headers[0]["Authorization"] == "Bearer sk-very-secret"
    assert "sk-very-secret" not in repr(client)
    assert client.model == settings.model and client.prompt_format == settings.prompt_format
