"""Hostile and malformed input, and the security rules, against one real worker.

One worker serves the whole module (its start is the expensive part); every test publishes
uploads with its own key prefix on the module's topics and reads back only its own records. The
worker's log and output topics are checked at the end for secrets.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from stream_guard.dev.stack import SECRET_KEY, Process, s3_client
from stream_guard.events import ID_PATTERN
from stream_guard.settings import DEFAULT_POLICY
from tests.conftest import STATE, Topics, publish, upload
from tests.hostile import encode, hostile_corpus, photo

pytestmark = pytest.mark.integration

SASL_PASSWORD = "sasl-canary-7f3e9b2d"  # set in the worker's settings; must never be printed
MAX_EVENT_BYTES = 64_000
# The worker's peak resident memory (VmHWM) after the corpus: measured 347 MB here (2026-11,
# the 36-megapixel PNG decoded at full size is the largest part). Asserted with 2x headroom.
MEMORY_BOUND_MB = 700


@dataclass
class Worker:
    proc: Process
    port: int
    topics: Topics

    def vm_hwm_mb(self) -> float:
        status = Path(f"/proc/{self.proc.popen.pid}/status").read_text()
        line = next(ln for ln in status.splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def ready(self) -> bool:
        r = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
        return r.status_code == 200 and self.proc.popen.poll() is None


@pytest.fixture(scope="module")
def strict_policy(tmp_path_factory) -> Path:
    """The default policy with a band covering every score: all of its uploads escalate."""
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["policy_id"] = "escalate_all"
    data["thresholds"] = {"allow": 0.0, "block": 1.0}
    for cat in data["categories"]:
        cat.pop("thresholds", None)
    path = tmp_path_factory.mktemp("policies") / "escalate_all.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def worker(stack, strict_policy) -> Iterator[Worker]:
    from stream_guard.dev.stack import start_worker

    tag = uuid.uuid4().hex[:8]
    topics = Topics(
        *(f"h{tag}.{n}" for n in ("uploads", "verdicts", "escalations", "review", "dlq")),
        group=f"g{tag}",
    )
    stack.create_topics(
        [topics.uploads, topics.verdicts, topics.escalations, topics.review, topics.dlq]
    )
    env = {
        **stack.env(),
        **topics.env(),
        "STREAM_GUARD_BATCH__WINDOW_S": "0.05",
        "STREAM_GUARD_RETRY__MAX_BACKOFF_S": "1.0",
        "STREAM_GUARD_KAFKA__MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        # A password the worker holds but never needs here (PLAINTEXT broker): it must not leak.
        "STREAM_GUARD_KAFKA__SASL_USERNAME": "stream-guard",
        "STREAM_GUARD_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
        "STREAM_GUARD_POLICY__TENANTS": json.dumps({"strict-tenant": str(strict_policy)}),
        # Debug logs: the strictest place for a secret to slip out.
        "STREAM_GUARD_TELEMETRY__LOG_LEVEL": "DEBUG",
    }
    proc, port = start_worker("serve", env, STATE / "workers", timeout=180)
    yield Worker(proc, port, topics)
    proc.kill()


def _read_all(bootstrap: str, topic: str, timeout: float = 10.0) -> list:
    """Every record on ``topic`` now: read from the start until a poll comes back empty."""
    from aiokafka import AIOKafkaConsumer

    async def run() -> list:
        c = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
            enable_auto_commit=False,
        )
        await c.start()
        out: list = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=400)
                if not batch and (out or time.monotonic() > deadline - timeout + 2):
                    break
                for msgs in batch.values():
                    out.extend(msgs)
        finally:
            await c.stop()
        return out

    return asyncio.run(run())


def _records_for(bootstrap: str, topic: str, keys: set[str]) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in _read_all(bootstrap, topic):
        k = (r.key or b"").decode(errors="replace")
        if k in keys:
            out.setdefault(k, []).append(r)
    return out


def _outcomes(
    stack, worker: Worker, keys: set[str], timeout: float = 90, settle: float = 1.0
) -> tuple[dict, dict]:
    """(verdicts, dead letters) by key, once every key has one or the other."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        verdicts = _records_for(stack.bootstrap, worker.topics.verdicts, keys)
        dlq = _records_for(stack.bootstrap, worker.topics.dlq, keys)
        if set(verdicts) | set(dlq) >= keys:
            break
        time.sleep(0.5)
    time.sleep(settle)  # a duplicate would show up now
    verdicts = _records_for(stack.bootstrap, worker.topics.verdicts, keys)
    dlq = _records_for(stack.bootstrap, worker.topics.dlq, keys)
    return verdicts, dlq


# -- the hostile corpus and malformed events -----------------------------------------------


def _malformed_events(prefix: str) -> dict[str, tuple[bytes | None, str]]:
    """key -> (value, expected error code)."""

    def event(uid: str, **fields) -> bytes:
        return json.dumps({"upload_id": uid, "text": {"caption": "hello"}, **fields}).encode()

    k = prefix
    return {
        f"{k}not-json": (b"{not json", "event.malformed"),
        f"{k}not-utf8": (b'{"upload_id": "\xff\xfe"}', "event.malformed"),
        f"{k}json-array": (b'[{"upload_id": "x"}]', "event.malformed"),
        f"{k}json-string": (b'"just a string"', "event.malformed"),
        f"{k}empty-value": (b"", "event.malformed"),
        f"{k}tombstone": (None, "event.malformed"),
        f"{k}empty-object": (b"{}", "event.malformed"),
        f"{k}missing-upload-id": (
            json.dumps({"text": {"caption": "hi"}}).encode(),
            "event.malformed",
        ),
        f"{k}wrong-types": (
            json.dumps({"upload_id": 42, "text": "hi", "images": "a.png"}).encode(),
            "event.malformed",
        ),
        f"{k}bad-upload-id": (event("../../etc/passwd"), "event.malformed"),
        f"{k}nothing-to-judge": (json.dumps({"upload_id": "empty"}).encode(), "event.malformed"),
        f"{k}oversized": (event("big", metadata={"pad": "x" * MAX_EVENT_BYTES}), "event.too_large"),
        f"{k}schema-v2": (event("v2", schema_version=2), "event.unsupported_schema"),
        f"{k}20-images": (
            event("many", images=[{"uri": f"s3://uploads/hostile/png_1x1#{n}"} for n in range(20)]),
            "event.malformed",
        ),
        f"{k}http-uri": (
            event("http", images=[{"uri": "http://169.254.169.254/latest/x"}]),
            "event.malformed",
        ),
        f"{k}file-uri": (event("file", images=[{"uri": "file:///etc/passwd"}]), "event.malformed"),
        f"{k}bucket-not-allowed": (
            event("bucket", images=[{"uri": "s3://private/secret.png"}]),
            "media.bucket_not_allowed",
        ),
        f"{k}path-traversal": (
            event("dots", images=[{"uri": "s3://uploads/../private/s.png"}]),
            "media.uri_invalid",
        ),
        f"{k}missing-object": (
            event("gone", images=[{"uri": "s3://uploads/hostile/nope.png"}]),
            "media.not_found",
        ),
    }


def test_every_hostile_file_and_malformed_event_ends_in_the_dlq_with_its_code(stack, worker):
    s3 = s3_client(stack.s3_endpoint)
    cases = hostile_corpus()
    records: list[tuple[bytes | None, bytes | None]] = []
    expected: dict[str, str | None] = {}
    for n, case in enumerate(cases):
        key = f"hostile/{case.name}"
        ref: dict[str, str] = {"uri": f"s3://uploads/{key}"}
        put: dict = {}
        if case.content_type is not None:  # half declared in the event, half by S3 metadata
            if n % 2:
                ref["content_type"] = case.content_type
            else:
                put["ContentType"] = case.content_type
        s3.put_object(Bucket="uploads", Key=key, Body=case.data, **put)
        uid = f"hc-{case.name}"
        records.append(
            (
                uid.encode(),
                json.dumps(
                    {"upload_id": uid, "text": {"caption": "my picture"}, "images": [ref]}
                ).encode(),
            )
        )
        expected[uid] = str(case.expected_code) if case.expected_code else None
    malformed = _malformed_events("hm-")
    records += [(k.encode(), v) for k, (v, _) in malformed.items()]
    expected |= {k: code for k, (_, code) in malformed.items()}
    publish(stack.bootstrap, worker.topics.uploads, records)

    verdicts, dlq = _outcomes(stack, worker, set(expected), timeout=150)

    missing = sorted(set(expected) - set(verdicts) - set(dlq))
    assert not missing, f"no verdict and no dead letter for {missing}"
    got = {k: json.loads(v[0].value)["error_code"] for k, v in dlq.items()}
    want = {k: c for k, c in expected.items() if c is not None}
    assert got == want
    assert set(verdicts) == {k for k, c in expected.items() if c is None}
    assert all(len(v) == 1 for v in [*verdicts.values(), *dlq.values()]), "one outcome each"
    originals = dict(records)
    for key, recs in dlq.items():
        letter = json.loads(recs[0].value)
        assert base64.b64decode(letter["original_value_b64"]) == (originals[key.encode()] or b"")
        assert letter["source"]["topic"] == worker.topics.uploads
        assert letter["reason"]
    # The worker survived all of it, within its memory bound.
    assert worker.ready()
    hwm = worker.vm_hwm_mb()
    print(f"worker VmHWM after {len(records)} hostile uploads: {hwm:.0f} MB")
    assert hwm < MEMORY_BOUND_MB


# -- property-based: arbitrary event documents ---------------------------------------------

_VALID_IMAGES = {  # put by the property test itself
    "hypo/ok.png": encode(photo(24, 16), "PNG"),
    "hypo/ok.jpg": encode(photo(40, 30), "JPEG"),
    "hypo/ok.gif": encode(photo(12, 12), "GIF"),
}
_BAD_OBJECTS = [
    "s3://uploads/hypo/nope",
    "s3://private/secret.png",
    "s3://uploads/",
    "http://127.0.0.1:1/x.png",
    "s3://uploads/a/../../b",
]
_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,40}", fullmatch=True)
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_URI = st.one_of(
    st.sampled_from([f"s3://uploads/{k}" for k in _VALID_IMAGES]),  # most often
    st.sampled_from([f"s3://uploads/{k}" for k in _VALID_IMAGES]),
    st.sampled_from(_BAD_OBJECTS),
    st.just("generated"),
    st.just("generated"),
)
_IMAGE_REF = st.fixed_dictionaries(
    {"uri": _URI},
    optional={
        "content_type": st.sampled_from(
            ["image/png", "image/jpeg", "image/gif", "text/html", "", "application/octet-stream"]
        )
    },
)
# A valid upload apart from what the images hold; _upload_documents then breaks some fields.
_VALID_DOC = st.fixed_dictionaries(
    {
        "text": st.fixed_dictionaries(
            {"caption": st.text(min_size=1, max_size=300)},
            optional={f: st.text(max_size=100) for f in ("title", "prompt", "response")},
        )
    },
    optional={
        "images": st.lists(_IMAGE_REF, max_size=3),
        "tenant_id": _ID,
        "schema_version": st.just(1),
        "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "created_at": st.datetimes().map(lambda d: d.isoformat()),
        "unknown_field": _JUNK,
    },
)
_BREAKABLE = [
    "upload_id",
    "text",
    "images",
    "tenant_id",
    "schema_version",
    "metadata",
    "created_at",
]


@st.composite
def _upload_documents(draw, key: str) -> tuple[bytes, dict[str, bytes]]:
    """One event value for record ``key``, and the objects it needs put into S3 first.

    The upload id is ``key`` unless broken, so a verdict (keyed by upload id) and a dead letter
    (keyed by the record key) are both found under ``key``.
    """
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200)), {}  # not even JSON, mostly
    doc = {"upload_id": key, **draw(_VALID_DOC)}
    objects: dict[str, bytes] = {}
    for n, ref in enumerate(doc.get("images", [])):
        if ref["uri"] == "generated":  # image bytes from hypothesis: raw, or a PNG with flips
            name = f"hypo/{key}-{n}"
            ref["uri"] = f"s3://uploads/{name}"
            objects[name] = draw(
                st.one_of(
                    st.binary(max_size=3000),
                    st.builds(
                        _mutate,
                        st.just(_VALID_IMAGES["hypo/ok.png"]),
                        st.lists(st.integers(0, 10_000), max_size=4),
                    ),
                )
            )
    broken = draw(st.lists(st.sampled_from(_BREAKABLE), max_size=2, unique=True))
    for field in broken if draw(st.booleans()) else []:
        if draw(st.booleans()):
            doc.pop(field, None)
        else:  # junk, but never a valid id under another key
            doc[field] = draw(_JUNK.filter(_not_an_id) if field == "upload_id" else _JUNK)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass"), objects


def _not_an_id(value: object) -> bool:
    return not (isinstance(value, str) and re.fullmatch(ID_PATTERN, value))


def _mutate(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p % len(out)] ^= 0xA5
    return bytes(out)


def test_any_event_document_gets_exactly_one_verdict_or_one_dead_letter(stack, worker):
    s3 = s3_client(stack.s3_endpoint)
    for name, body in _VALID_IMAGES.items():
        s3.put_object(Bucket="uploads", Key=name, Body=body)
    batches = iter(range(100))
    tally: Counter[str] = Counter()

    @settings(
        max_examples=5,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def check(data) -> None:
        batch = next(batches)
        keys = [f"hy{batch}-{n}" for n in range(8)]  # 5 x 8 = 40 documents in all
        docs = [data.draw(_upload_documents(k), label=k) for k in keys]
        for _, objects in docs:
            for name, body in objects.items():
                s3.put_object(Bucket="uploads", Key=name, Body=body)
        publish(
            stack.bootstrap,
            worker.topics.uploads,
            [(k.encode(), value) for k, (value, _) in zip(keys, docs, strict=True)],
        )
        verdicts, dlq = _outcomes(stack, worker, set(keys), timeout=60, settle=0.5)
        for k in keys:
            n = len(verdicts.get(k, [])) + len(dlq.get(k, []))
            note(f"{k}: {len(verdicts.get(k, []))} verdicts, {len(dlq.get(k, []))} dead letters")
            assert n == 1, f"{k} has {n} outcomes"
            tally["verdict" if k in verdicts else json.loads(dlq[k][0].value)["error_code"]] += 1

    check()
    print(f"hypothesis documents by outcome: {dict(tally)}")
    assert worker.ready()


# -- security ----------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"\x89PNG\r\n\x1a\n")

    def log_message(self, *args) -> None:
        pass


def test_only_allow_listed_buckets_over_s3_are_ever_fetched(stack, worker):
    s3 = s3_client(stack.s3_endpoint)
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="secret.png", Body=encode(photo(8, 8), "PNG"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    uris = {
        "sec-http": f"http://{host}/x.png",
        "sec-https": f"https://{host}/x.png",
        "sec-ftp": f"ftp://{host}/x.png",
        "sec-private": "s3://private/secret.png",
        "sec-case": "s3://Uploads/hostile/png_1x1",
        "sec-suffix": "s3://uploads.evil/x.png",
        "sec-traversal": "s3://uploads/hostile/../../private/secret.png",
    }
    publish(
        stack.bootstrap,
        worker.topics.uploads,
        [(k.encode(), upload(k, "look at this", [u])) for k, u in uris.items()],
    )
    try:
        verdicts, dlq = _outcomes(stack, worker, set(uris), timeout=60)
    finally:
        server.shutdown()
    assert verdicts == {}
    assert {k: json.loads(v[0].value)["error_code"] for k, v in dlq.items()} == {
        "sec-http": "event.malformed",
        "sec-https": "event.malformed",
        "sec-ftp": "event.malformed",
        "sec-private": "media.bucket_not_allowed",
        "sec-case": "media.bucket_not_allowed",
        "sec-suffix": "media.bucket_not_allowed",
        "sec-traversal": "media.uri_invalid",
    }
    assert _Recorder.hits == []
    moto_log = stack.processes["s3"].log_path.read_text(errors="replace")
    assert "GET /private/" not in moto_log and "HEAD /private/" not in moto_log
    assert "/uploads.evil/" not in moto_log and "/Uploads/" not in moto_log


def test_a_tenants_policy_never_applies_to_another_tenants_uploads(stack, worker):
    caption = "a quiet afternoon in the park"
    tenants = {
        "ten-strict": "strict-tenant",
        "ten-other": "other-tenant",
        "ten-case": "Strict-Tenant",
        "ten-prefix": "strict-tenant2",
        "ten-default": None,
    }
    records = [
        (k.encode(), upload(k, caption, **({"tenant_id": t} if t else {})))
        for k, t in tenants.items()
    ]
    # The event cannot choose a policy: such fields are ignored.
    records.append(
        (
            b"ten-asks",
            upload(
                "ten-asks",
                caption,
                tenant_id="other-tenant",
                policy_id="escalate_all",
                metadata={"policy": "escalate_all"},
            ),
        )
    )
    publish(stack.bootstrap, worker.topics.uploads, records)
    keys = {k.decode() for k, _ in records}
    verdicts, dlq = _outcomes(stack, worker, keys, timeout=60)
    assert dlq == {}
    policy = {k: json.loads(v[0].value)["policy_id"] for k, v in verdicts.items()}
    assert policy == {k: "escalate_all" if k == "ten-strict" else "llama_guard_4" for k in keys}
    escalated = _records_for(stack.bootstrap, worker.topics.escalations, keys)
    assert set(escalated) == {"ten-strict"}


def test_secrets_never_appear_in_logs_verdicts_or_dead_letters(stack, worker):
    # Runs last: by now the worker has logged (at DEBUG) every path above, including errors.
    publish(stack.bootstrap, worker.topics.uploads, [(b"sec-last", upload("sec-last", "bye"))])
    _outcomes(stack, worker, {"sec-last"}, timeout=60, settle=0)
    secrets = [SECRET_KEY.encode(), SASL_PASSWORD.encode()]
    log = worker.proc.log_path.read_bytes()
    assert len(log) > 10_000, "the worker logged almost nothing: the check would be empty"
    outputs = [
        r
        for t in (worker.topics.verdicts, worker.topics.dlq, worker.topics.escalations)
        for r in _read_all(stack.bootstrap, t)
    ]
    assert len(outputs) > 50
    for secret in secrets:
        assert secret not in log
        for r in outputs:
            assert secret not in r.value
            assert all(secret not in (v or b"") for _, v in (r.headers or []))
            if b"original_value_b64" in r.value:
                assert secret not in base64.b64decode(json.loads(r.value)["original_value_b64"])


def test_a_worker_failing_sasl_authentication_never_prints_its_password(stack, start_worker):
    # Tansu (no --authentication) refuses the SASL handshake: the worker logs connection
    # errors at every level down to DEBUG, and the password it holds appears in none of them.
    password = "sasl-canary-handshake-41c7"
    env = {
        **stack.env(),
        "STREAM_GUARD_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "STREAM_GUARD_KAFKA__SASL_MECHANISM": "PLAIN",
        "STREAM_GUARD_KAFKA__SASL_USERNAME": "stream-guard",
        "STREAM_GUARD_KAFKA__SASL_PASSWORD": password,
        "STREAM_GUARD_TELEMETRY__LOG_LEVEL": "DEBUG",
    }
    proc, _ = start_worker(env, wait_ready=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.popen.poll() is None:
        if b"Unable to bootstrap" in proc.log_path.read_bytes():
            break
        time.sleep(0.5)
    time.sleep(1.0)  # whatever it logs on the way out
    log = proc.log_path.read_bytes()
    assert b"SaslHandShake" in log and b"Unable to bootstrap" in log, "no failed handshake seen"
    assert password.encode() not in log
    assert SECRET_KEY.encode() not in log
