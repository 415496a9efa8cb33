"""Async client of an OpenAI-compatible chat-completions server (vLLM, llama.cpp, hosted APIs).

One call = build the prompt, ask the model, parse the answer. Around it:

- retries with exponential backoff and jitter on timeouts, connection errors, HTTP 408/429/5xx,
  and on out-of-schema answers (a JSON format gets a repair turn), all within ``attempts``;
- a circuit breaker: ``breaker_failures`` consecutive server failures open it for
  ``breaker_cooldown_s``, during which calls fail fast with ``DependencyUnavailable``; then one
  probe call is let through, and its outcome closes or re-opens the breaker;
- a concurrency semaphore around each request and an async token bucket (requests per second);
- JSON-schema constrained output for the JSON formats. Servers disagree on how to ask for it, so
  with ``response_format_fallback`` a request the server rejects because of ``response_format``
  is re-sent with the next style (``json_schema`` -> ``json_object_schema`` -> ``json_object`` ->
  ``none``) and the client keeps the style that worked. llama-cpp-python, for one, answers the
  OpenAI ``json_schema`` style with HTTP 500 and accepts ``{"type": "json_object", "schema": ...}``.

The API key is a ``SecretStr``: it goes into the Authorization header and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal, NamedTuple

import httpx
from pydantic import SecretStr

from stream_guard.errors import DependencyUnavailable, ReasoningError
from stream_guard.events import Escalation
from stream_guard.policy.model import Policy
from stream_guard.reasoning.parsers import (
    RATIONALE_FIRST,
    WANTS_JSON,
    ReasoningResult,
    json_schema_for,
    parse_answer,
)
from stream_guard.reasoning.prompts import (
    DEFAULT_LIMITS,
    Message,
    PromptLimits,
    answer_spec,
    build_messages,
    clip,
)
from stream_guard.retry import backoff_delay
from stream_guard.settings import ReasoningSettings

__all__ = [
    "CircuitBreaker",
    "DEPENDENCY",
    "ReasoningAnswer",
    "ReasoningClient",
    "ResponseFormatStyle",
    "TokenBucket",
    "response_format_payload",
]

log = logging.getLogger(__name__)

DEPENDENCY = "reasoning server"
ResponseFormatStyle = Literal["json_schema", "json_object_schema", "json_object", "none"]
_DOWNGRADE: dict[str, ResponseFormatStyle] = {
    "json_schema": "json_object_schema",
    "json_object_schema": "json_object",
    "json_object": "none",
}
_REJECTION_HINTS = ("response_format", "json_schema", "guided", "grammar")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CONFIG_STATUS = {401, 403, 404}


class ReasoningAnswer(NamedTuple):
    """The parsed answer and how many requests (attempts) it took."""

    result: ReasoningResult
    attempts: int


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Misconfigured(Exception):
    """401/403/404: wrong key, model name or URL; retrying will not help."""


class _Rejected(Exception):
    """Another 4xx: this request cannot be served (e.g. the prompt exceeds the context)."""


class CircuitBreaker:
    """Consecutive-failure breaker: closed -> open (fail fast) -> half-open (one probe)."""

    def __init__(
        self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def before_call(self) -> None:
        """Let a call through, or raise ``DependencyUnavailable`` while the breaker is open."""
        if self._opened_at is None:
            return
        remaining = self.cooldown_s - (self._clock() - self._opened_at)
        if remaining > 0:
            raise DependencyUnavailable(
                DEPENDENCY,
                f"circuit open after {self._failures} failures; retry in {remaining:.1f}s",
            )
        if self._probing:
            raise DependencyUnavailable(DEPENDENCY, "circuit half-open; a probe call is in flight")
        self._probing = True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self._opened_at is not None or self._failures >= self.threshold:
            self._opened_at = self._clock()

    def release(self) -> None:
        """A probe ended without an outcome (cancelled): let the next call probe."""
        self._probing = False


class TokenBucket:
    """Async token bucket: ``rate_per_s`` requests per second with bursts up to ``burst``."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.rate = rate_per_s
        self.capacity = max(1.0, burst if burst is not None else rate_per_s)
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self) -> None:
        # Waiters queue on the lock, so tokens are handed out in arrival order.
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1


def response_format_payload(style: ResponseFormatStyle, schema: dict[str, Any]) -> dict | None:
    """The ``response_format`` request field in the given server dialect (None: leave it out)."""
    if style == "json_schema":  # OpenAI, vLLM, SGLang, OpenRouter
        return {
            "type": "json_schema",
            "json_schema": {"name": "guard_verdict", "strict": True, "schema": schema},
        }
    if style == "json_object_schema":  # llama-cpp-python, Anyscale
        return {"type": "json_object", "schema": schema}
    if style == "json_object":
        return {"type": "json_object"}
    return None


def _schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    return response_format.get("schema") or response_format.get("json_schema", {}).get("schema", {})


def _answer_of(body: Any) -> tuple[str, Any, str | None]:
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise ReasoningError(
            f"response has no choices[0].message.content: {clip(str(body), 200)}"
        ) from e
    if not isinstance(content, str) or not content.strip():
        raise ReasoningError("the model returned an empty answer")
    return content, choice.get("logprobs"), choice.get("finish_reason")


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(float(resp.headers.get("retry-after", "")), 0.0)
    except ValueError:
        return None


class ReasoningClient:
    """Asks a guard model about an escalated upload; see the module docstring for the policies."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: SecretStr | str | None = None,
        prompt_format: str = "safevision",
        vision: bool = False,
        timeout_s: float = 60.0,
        max_tokens: int = 256,
        temperature: float = 0.0,
        retry_temperature: float = 0.7,
        attempts: int = 3,
        max_concurrency: int = 2,
        rate_limit_per_s: float = 5.0,
        rate_burst: float | None = None,
        response_format: ResponseFormatStyle = "json_schema",
        response_format_fallback: bool = True,
        logprobs: bool = True,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 8.0,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 30.0,
        limits: PromptLimits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if prompt_format not in WANTS_JSON:
            raise ValueError(
                f"unknown prompt format {prompt_format!r}; known: {sorted(WANTS_JSON)}"
            )
        if attempts < 1 or max_concurrency < 1:
            raise ValueError("attempts and max_concurrency must be at least 1")
        self.model = model
        self.prompt_format = prompt_format
        self.vision = vision
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retry_temperature = retry_temperature
        self.attempts = attempts
        self.response_format = response_format
        self.response_format_fallback = response_format_fallback
        self.logprobs = logprobs and prompt_format == "llama_guard_4"
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # A rationale cut off by max_tokens is truncated JSON: ask for one that fits (about two
        # characters a token, leaving room for the rest of the object).
        fitting = max(60, (max_tokens - 48) * 2)
        self.limits = replace(limits, rationale_chars=min(limits.rationale_chars, fitting))
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self._bucket = TokenBucket(rate_limit_per_s, rate_burst)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        key = SecretStr(api_key) if isinstance(api_key, str) else api_key
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
            transport=transport,
        )
        self.base_url = str(self._http.base_url)

    @classmethod
    def from_settings(cls, settings: ReasoningSettings, **overrides: Any) -> ReasoningClient:
        kwargs: dict[str, Any] = {
            "base_url": settings.base_url,
            "api_key": settings.api_key,
            "model": settings.model,
            "prompt_format": settings.prompt_format,
            "vision": settings.vision,
            "timeout_s": settings.timeout_s,
            "max_tokens": settings.max_tokens,
            "attempts": settings.attempts,
            "max_concurrency": settings.max_concurrency,
            "rate_limit_per_s": settings.rate_limit_per_s,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return (
            f"ReasoningClient(base_url={self.base_url!r}, model={self.model!r}, "
            f"prompt_format={self.prompt_format!r}, breaker={self.breaker.state!r})"
        )

    async def __aenter__(self) -> ReasoningClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def messages_for(
        self, policy: Policy, escalation: Escalation, image_parts: Sequence[str] = ()
    ) -> list[Message]:
        """The prompt this client sends (images only when the backend has ``vision``)."""
        parts = list(image_parts) if self.vision else []
        return build_messages(self.prompt_format, policy, escalation, parts, limits=self.limits)

    async def ping(self) -> None:
        """``GET /models``: raises ``DependencyUnavailable`` unless the server answers 200."""
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._http.get("models")
        except (TimeoutError, httpx.HTTPError) as e:
            raise DependencyUnavailable(DEPENDENCY, f"{type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise DependencyUnavailable(DEPENDENCY, f"GET /models answered HTTP {resp.status_code}")

    async def classify(
        self, policy: Policy, escalation: Escalation, image_parts: Sequence[str] = ()
    ) -> ReasoningAnswer:
        """Ask the model about ``escalation``; ``image_parts`` are data URLs or presigned URLs.

        Raises ``DependencyUnavailable`` when the server stays down (or the breaker is open) and
        ``ReasoningError`` when the answers stay out of schema or the server refuses the request.
        """
        messages = self.messages_for(policy, escalation, image_parts)
        schema = None
        if WANTS_JSON[self.prompt_format]:
            schema = json_schema_for(
                policy,
                rationale_first=RATIONALE_FIRST[self.prompt_format],
                max_rationale_chars=self.limits.rationale_chars,
            )
        upload_id = escalation.upload.upload_id
        conversation = messages
        temperature = self.temperature
        problem = ""
        for attempt in range(1, self.attempts + 1):
            body = await self._attempt(conversation, schema, temperature, attempt, upload_id)
            if body is None:
                continue
            text = ""
            try:
                text, logprobs, finish = _answer_of(body)
                result = parse_answer(self.prompt_format, text, policy, logprobs=logprobs)
            except ReasoningError as e:
                problem = str(e)
                log.warning(
                    "reasoning attempt %d/%d for upload %s: out-of-schema answer: %s",
                    attempt,
                    self.attempts,
                    upload_id,
                    problem,
                )
                if attempt == self.attempts:
                    raise ReasoningError(
                        f"out-of-schema answer after {attempt} attempts: {problem}"
                    ) from e
                conversation = self._repair(messages, text, problem)
                if conversation is messages:
                    # The same prompt at temperature 0 would give the same answer again.
                    temperature = max(self.temperature, self.retry_temperature)
                continue
            if finish == "length":
                log.info(
                    "reasoning answer for upload %s hit max_tokens=%d", upload_id, self.max_tokens
                )
            return ReasoningAnswer(result, attempt)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _repair(self, messages: list[Message], answer: str, problem: str) -> list[Message]:
        """The retry's messages. JSON formats get a repair turn; Llama Guard does not, because
        its chat template would judge the extra turns as part of the conversation (its retry is
        sampled at ``retry_temperature`` instead)."""
        if not WANTS_JSON[self.prompt_format] or not answer:
            return messages
        spec = answer_spec(self.limits, rationale_first=RATIONALE_FIRST[self.prompt_format])
        return [
            *messages,
            {"role": "assistant", "content": clip(answer, 500)},
            {
                "role": "user",
                "content": f"That answer is out of format ({clip(problem, 200)}). Answer again "
                f"with one complete JSON object and nothing else, with a short rationale: {spec}",
            },
        ]

    async def _attempt(
        self,
        conversation: list[Message],
        schema: dict[str, Any] | None,
        temperature: float,
        attempt: int,
        upload_id: str,
    ) -> dict[str, Any] | None:
        """One request through the breaker: the body, or None after a retryable failure
        (having waited its backoff); raises when no attempt is left or retrying cannot help."""
        self.breaker.before_call()
        try:
            body = await self._request(conversation, schema, temperature)
        except _Retryable as e:
            self.breaker.record_failure()
            log.warning(
                "reasoning attempt %d/%d for upload %s failed: %s",
                attempt,
                self.attempts,
                upload_id,
                e,
            )
            if attempt == self.attempts:
                raise DependencyUnavailable(DEPENDENCY, f"{e} (after {attempt} attempts)") from e
            await asyncio.sleep(self._backoff(attempt, e.retry_after))
            return None
        except _Misconfigured as e:
            self.breaker.record_failure()
            raise DependencyUnavailable(
                DEPENDENCY, f"{e}; check the reasoning base_url, model and api_key"
            ) from e
        except _Rejected as e:
            self.breaker.record_success()
            raise ReasoningError(f"the reasoning server refused the request: {e}") from e
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record_success()
        return body

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = backoff_delay(attempt - 1, self.backoff_initial_s, self.backoff_max_s)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def _payload(
        self, messages: list[Message], schema: dict[str, Any] | None, temperature: float
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": temperature,
        }
        if schema is not None:
            response_format = response_format_payload(self.response_format, schema)
            if response_format is not None:
                payload["response_format"] = response_format
        if self.logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = 5
        return payload

    async def _request(
        self, messages: list[Message], schema: dict[str, Any] | None, temperature: float
    ) -> Any:
        """One logical request; re-sent only when the server rejects an optional feature."""
        while True:
            payload = self._payload(messages, schema, temperature)
            await self._bucket.acquire()
            async with self._semaphore:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        resp = await self._http.post("chat/completions", json=payload)
                except TimeoutError as e:
                    raise _Retryable(f"no answer within {self.timeout_s:g}s") from e
                except httpx.TimeoutException as e:
                    raise _Retryable(f"timed out ({type(e).__name__})") from e
                except httpx.TransportError as e:
                    raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from e
            status = resp.status_code
            if 200 <= status < 300:
                try:
                    return resp.json()
                except ValueError:
                    return resp.text  # garbage: the caller treats it as an out-of-schema answer
            if status in (400, 422, 500) and self._drop_rejected_feature(payload, resp.text):
                continue
            detail = f"HTTP {status}: {clip(resp.text, 300)}"
            if status in _RETRY_STATUS or status >= 500:
                raise _Retryable(detail, _retry_after(resp))
            if status in _CONFIG_STATUS:
                raise _Misconfigured(detail)
            raise _Rejected(detail)

    def _drop_rejected_feature(self, payload: dict[str, Any], body: str) -> bool:
        """Downgrade ``response_format`` or drop ``logprobs`` when the error names them."""
        lowered = body.lower()
        sent = payload.get("response_format")
        if (
            sent is not None
            and self.response_format_fallback
            and any(h in lowered for h in _REJECTION_HINTS)
        ):
            if sent == response_format_payload(self.response_format, _schema_of(sent)):
                # Only the first of several concurrent rejections downgrades.
                old = self.response_format
                self.response_format = _DOWNGRADE[old]
                log.warning(
                    "reasoning server rejected response_format %s; using %s from now on",
                    old,
                    self.response_format,
                )
            return True
        if "logprobs" in payload and "logprob" in lowered:
            self.logprobs = False
            log.warning("reasoning server rejected logprobs; asking without them from now on")
            return True
        return False
