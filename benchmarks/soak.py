"""Hostile soak: thousands of hostile events interleaved with valid uploads, through real workers.

``python -m benchmarks.soak`` (``make soak``). On 127.0.0.1 only, it starts the real local stack
(Tansu in memory, moto S3, tritonserver: ``LocalStack``) and ``--workers`` fast workers
(``stream-guard serve`` child processes, default settings) in one consumer group. A plain Kafka
client (aiokafka) then publishes, in a seeded shuffled order at ``--rate`` per second:

- ``--hostile`` generated hostile events: deep nesting in the value and inside ``metadata``,
  invalid UTF-8, lone surrogates, events just over and far over every size limit
  (``kafka.max_event_bytes``, the text's maximum characters, the image count,
  ``s3.max_object_bytes``), wrong types, null tombstones, unknown and newer schema versions,
  missing, unsupported and hostile images (``tests/hostile.py``), buckets not allowed, hostile
  keys and headers;
- ``--valid`` valid uploads (captions, titles, prompts and responses, one to three images).

Every input carries a unique upload id (and key) where it has one; an input without a parseable
id is matched to its dead letter by the dead letter's ``source`` (topic, partition, offset), as
recorded by the producer. The run reads ``verdicts``, ``escalations`` and ``dlq`` until every
input has an outcome (a verdict; for an escalated upload its provisional verdict counts; or a
dead letter with a code) or ``--drain-timeout`` passes, then reports inputs, outcomes per kind and
error code, lost inputs (no outcome), conflicting outcomes (two outcomes of different content for
one input), the stall bound (the longest time a partition with waiting inputs went without an
outcome, and without its committed offset moving, polled every second), worker RSS from /proc,
wall time and the machine. The report is appended to ``benchmarks/SOAK_RESULTS.md`` (``--out``);
the exit status is 1 when an input was lost or got conflicting outcomes, when a partition stalled
longer than ``--stall-bound`` (60 s) or a worker's peak RSS passed ``--rss-bound-mib`` (1 GiB), or
when the run was interrupted. An outcome other than the kind's expected one (say, a verdict for an
event that should be dead-lettered) is listed but does not fail the run: it is one outcome, and
the list is for a person to judge.

Events far over 1 MB need a producer whose ``max_request_size`` is above them: this harness's
producer uses 64 MiB (Tansu accepts such records); the workers keep their defaults.

Bounded: ``--timeout`` is a global deadline; SIGINT and SIGTERM stop the run, the workers and the
stack it started, in that order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import signal
import sys
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks.procstat import machine, memory_kib
from stream_guard.dev.demo import landscape
from stream_guard.dev.stack import LocalStack, Process, create_topics, s3_client, start_worker
from stream_guard.events import MAX_IMAGES, MAX_TEXT_CHARS
from stream_guard.settings import KafkaSettings, S3Settings

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".stream-guard" / "soak"
RESULTS = Path(__file__).resolve().parent / "SOAK_RESULTS.md"
LOCAL = "127.0.0.1"
PRODUCER_MAX_REQUEST = 64 * 1024 * 1024  # far over the workers' 1 MB event limit, on purpose
CAPTIONS = [
    "Sunset over the hills on our hike today",
    "our family trip to the lake, the kids loved it",
    "new recipe: lemon cake with blueberries",
    "morning run along the river, 10k done",
    "my cat sleeping on the keyboard again",
    "that knife is sharp enough to really hurt somebody",
    "I know where you live and I am going to [THREAT]",
    "first day at the new job, wish me luck",
    "selling my old bike, barely used",
    "you are a [SLUR] and everyone here hates you",
    "Ünïcödé caption with emoji 🌄🚲 and RTL text مرحبا",
]


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]] | None = None


@dataclass(frozen=True)
class Case:
    """One kind of input: ``expected`` is "verdict", "dlq:<code>", "dlq" (any code) or "any"."""

    kind: str
    expected: str
    make: Callable[[str, random.Random], Payload]
    cap: int = 1 << 30  # at most this many of the kind per run (the expensive ones)


@dataclass
class Input:
    n: int
    case: Case
    uid: str
    size: int = 0
    partition: int = -1
    offset: int = -1
    sent_ms: int = 0


@dataclass(frozen=True)
class Limits:
    event_bytes: int
    object_bytes: int
    text_chars: int = MAX_TEXT_CHARS
    images: int = MAX_IMAGES


@dataclass(frozen=True)
class Media:
    bucket: str
    ok: list[str]  # valid images in the allowed bucket
    hostile: dict[str, tuple[str, str | None, str]]  # name -> (uri, content type, expected)


def js(obj: object) -> bytes:
    return json.dumps(obj).encode()


def event(uid: str, caption: str | None = "a quiet walk in the park", **fields: object) -> dict:
    return {"upload_id": uid, "text": {"caption": caption}, **fields}


def keyed(uid: str, value: bytes | None, headers=None) -> Payload:
    return Payload(value, uid.encode(), headers)


def sized(uid: str, total: int) -> bytes:
    """A valid event of exactly ``total`` bytes: only the metadata padding makes it big."""
    base = js(event(uid, metadata={"pad": ""}))
    return js(event(uid, metadata={"pad": "x" * (total - len(base))}))


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def raw_caption(uid: str, caption: bytes) -> bytes:
    return b'{"upload_id": "' + uid.encode() + b'", "text": {"caption": "' + caption + b'"}}'


def words(chars: int) -> str:
    return ("a calm lake at dawn " * (chars // 20 + 1))[:chars]


def valid_cases(media: Media) -> list[Case]:
    def caption(uid, rng):
        return keyed(uid, js(event(uid, rng.choice(CAPTIONS))))

    def with_images(uid, rng):
        imgs = [{"uri": rng.choice(media.ok), "content_type": "image/jpeg"}]
        imgs += [{"uri": rng.choice(media.ok)} for _ in range(rng.randrange(3))]
        return keyed(uid, js(event(uid, rng.choice(CAPTIONS), images=imgs)))

    def image_only(uid, rng):
        return keyed(uid, js(event(uid, None, images=[{"uri": rng.choice(media.ok)}])))

    def forms(uid, rng):
        text = rng.choice(
            [
                {"title": rng.choice(CAPTIONS), "caption": rng.choice(CAPTIONS)},
                {"prompt": rng.choice(CAPTIONS)},
                {"prompt": rng.choice(CAPTIONS), "response": rng.choice(CAPTIONS)},
            ]
        )
        return keyed(uid, js({"upload_id": uid, "text": text, "metadata": {"app": "soak"}}))

    return [
        Case("valid.caption", "verdict", caption),
        Case("valid.caption_images", "verdict", with_images),
        Case("valid.image_only", "verdict", image_only),
        Case("valid.text_forms", "verdict", forms),
    ]


def nesting_cases() -> list[Case]:
    bad = "dlq:event.malformed"

    def value(depth):
        return lambda uid, rng: keyed(uid, nested(depth).encode())

    def objects(depth):
        return lambda uid, rng: keyed(uid, (('{"a":' * depth) + "1" + "}" * depth).encode())

    def in_metadata(depth):
        def make(uid, rng):
            head = f'{{"upload_id": "{uid}", "text": {{"caption": "hi"}}, "metadata": {{"k": '
            return keyed(uid, (head + nested(depth) + "}}").encode())

        return make

    def in_caption(depth):
        def make(uid, rng):
            head = f'{{"upload_id": "{uid}", "text": {{"caption": '
            return keyed(uid, (head + '{"a":' * depth + "1" + "}" * depth + "}}").encode())

        return make

    def in_images(depth):
        def make(uid, rng):
            head = f'{{"upload_id": "{uid}", "text": {{"caption": "hi"}}, "images": '
            return keyed(uid, (head + nested(depth) + "}").encode())

        return make

    return [
        Case("nesting.value_list_1k", bad, value(1_000)),
        Case("nesting.value_list_100k", bad, value(100_000)),
        Case("nesting.value_objects_50k", bad, objects(50_000)),
        Case("nesting.metadata_50", bad, in_metadata(50)),
        Case("nesting.metadata_5k", bad, in_metadata(5_000)),
        Case("nesting.metadata_100k", bad, in_metadata(100_000)),
        Case("nesting.caption_20k", bad, in_caption(20_000)),
        Case("nesting.images_100k", bad, in_images(100_000)),
    ]


def encoding_cases() -> list[Case]:
    bad = "dlq:event.malformed"

    def raw(caption: bytes):
        return lambda uid, rng: keyed(uid, raw_caption(uid, caption))

    def escaped(where: str):
        def make(uid, rng):
            fields = {
                "caption": event(uid, "lone \ud800 surrogate"),
                "metadata_value": event(uid, metadata={"k": "\udfff"}),
                "metadata_key": event(uid, metadata={"\ud83d": "v"}),
                "image_uri": event(uid, images=[{"uri": "s3://uploads/a\udc80.jpg"}]),
                "upload_id": event(uid + "\ud800"),
            }[where]
            return keyed(uid, json.dumps(fields).encode())  # ensure_ascii: \\udXXX escapes

        return make

    def utf16(uid, rng):
        return keyed(uid, json.dumps(event(uid)).encode("utf-16"))

    def bom(uid, rng):
        return keyed(uid, b"\xef\xbb\xbf" + js(event(uid)))

    def latin1(uid, rng):
        return keyed(
            uid, json.dumps(event(uid, "café crème"), ensure_ascii=False).encode("latin-1")
        )

    def pair(uid, rng):
        return keyed(uid, js(event(uid, "paired \ud83c\udf04 surrogates are one emoji")))

    def key_bytes(uid, rng):
        return Payload(js(event(uid)), b"\xff\xfe\xc0\xaf" + uid.encode())

    return [
        Case("utf8.raw_ff_bytes", bad, raw(b"caf\xff\xfe")),
        Case("utf8.overlong_slash", bad, raw(b"\xc0\xaf etc")),
        Case("utf8.cesu_surrogate_bytes", bad, raw(b"\xed\xa0\x80")),
        Case("utf8.truncated_multibyte", bad, raw(b"emoji \xf0\x9f\x8c")),
        Case("utf8.latin1_encoded_json", bad, latin1),
        Case("utf8.nul_and_controls", bad, raw(b"a\x00b\x01c")),
        Case("surrogate.caption", bad, escaped("caption")),
        Case("surrogate.metadata_value", bad, escaped("metadata_value")),
        Case("surrogate.metadata_key", bad, escaped("metadata_key")),
        Case("surrogate.image_uri", bad, escaped("image_uri")),
        Case("surrogate.upload_id", bad, escaped("upload_id")),
        Case("encoding.paired_surrogates_escaped", "verdict", pair),
        Case("encoding.utf16_json", "any", utf16),
        Case("encoding.utf8_bom", "any", bom),
        Case("encoding.key_invalid_utf8", "verdict", key_bytes),
    ]


def size_cases(limits: Limits, media: Media) -> list[Case]:
    too_large, bad = "dlq:event.too_large", "dlq:event.malformed"
    ok = media.ok[0]

    def event_of(total: int):
        return lambda uid, rng: keyed(uid, sized(uid, total))

    def caption_of(chars: int):
        return lambda uid, rng: keyed(uid, js(event(uid, words(chars))))

    def wide_caption(uid, rng):
        return keyed(uid, js(event(uid, "🌄" * limits.text_chars)))

    def images(count: int, uri: str = ok):
        return lambda uid, rng: keyed(uid, js(event(uid, images=[{"uri": uri}] * count)))

    def hostile_key(uid, rng):
        return Payload(js(event(uid)), uid.encode() + b"k" * (2 << 20))

    def bad_value_key(uid, rng):
        return Payload(b"not json" * 10, uid.encode() + b"k" * (2 << 20))

    over = limits.object_bytes * 3
    return [
        Case("size.event_at_limit", "any", event_of(limits.event_bytes), cap=15),
        Case("size.event_limit_plus_1", too_large, event_of(limits.event_bytes + 1), cap=15),
        Case("size.event_1.2mb", too_large, event_of(1_200_000), cap=10),
        Case("size.event_5mb", too_large, event_of(5_000_000), cap=6),
        Case("size.event_16mb", too_large, event_of(16_000_000), cap=3),
        Case("size.text_at_limit", "verdict", caption_of(limits.text_chars)),
        Case("size.text_4byte_chars_at_limit", "verdict", wide_caption),
        Case("size.text_limit_plus_1", bad, caption_of(limits.text_chars + 1)),
        Case("size.text_500k_chars", bad, caption_of(500_000), cap=20),
        Case("size.images_at_limit", "verdict", images(limits.images), cap=20),
        Case("size.images_limit_plus_1", bad, images(limits.images + 1)),
        Case("size.images_2000", bad, images(2_000)),
        Case(
            "size.metadata_33_keys",
            bad,
            lambda u, r: keyed(u, js(event(u, metadata={f"k{i}": "v" for i in range(33)}))),
        ),
        Case("size.key_2mb_valid_value", "verdict", hostile_key, cap=5),
        Case("size.key_2mb_bad_value", bad, bad_value_key, cap=5),
        Case(
            f"size.object_{over >> 20}mib",
            "dlq:media.too_large",
            images(1, media.hostile["far_over_size_limit"][0]),
            cap=10,
        ),
    ]


def type_cases() -> list[Case]:
    bad = "dlq:event.malformed"

    def ev(**fields):
        return lambda uid, rng: keyed(uid, js({**event(uid), **fields}))

    def raw(value: bytes | None):
        return lambda uid, rng: Payload(value, uid.encode())

    return [
        Case("type.upload_id_int", bad, ev(upload_id=12345)),
        Case("type.upload_id_null", bad, ev(upload_id=None)),
        Case("type.upload_id_list", bad, ev(upload_id=["a"])),
        Case("type.upload_id_129_chars", bad, ev(upload_id="u" * 129)),
        Case("type.upload_id_path", bad, ev(upload_id="../../etc/passwd")),
        Case("type.tenant_id_spaces", bad, ev(tenant_id="ten ant")),
        Case("type.text_string", bad, ev(text="just a string")),
        Case("type.caption_int", bad, ev(text={"caption": 5})),
        Case(
            "type.caption_nan",
            bad,
            lambda u, r: keyed(
                u, b'{"upload_id": "' + u.encode() + b'", "text": {"caption": NaN}}'
            ),
        ),
        Case(
            "type.caption_huge_int_literal",
            bad,
            lambda u, r: keyed(
                u,
                b'{"upload_id": "' + u.encode() + b'", "text": {"caption": ' + b"9" * 5000 + b"}}",
            ),
        ),
        Case(
            "type.caption_float_overflow",
            bad,
            lambda u, r: keyed(
                u, b'{"upload_id": "' + u.encode() + b'", "text": {"caption": 1e999}}'
            ),
        ),
        Case("type.images_string", bad, ev(images="s3://uploads/x.jpg")),
        Case("type.images_ints", bad, ev(images=[5, 6])),
        Case("type.image_uri_int", bad, ev(images=[{"uri": 5}])),
        Case("type.metadata_int_value", bad, ev(metadata={"a": 1})),
        Case("type.metadata_list", bad, ev(metadata=["a", "b"])),
        Case("type.created_at_garbage", bad, ev(created_at="yesterday-ish")),
        Case("type.empty_upload", bad, lambda u, r: keyed(u, js({"upload_id": u}))),
        Case("type.empty_object", bad, raw(b"{}")),
        Case("type.json_array", bad, raw(b"[1, 2, 3]")),
        Case("type.json_string", bad, raw(b'"upload"')),
        Case("type.json_number", bad, raw(b"42")),
        Case("type.json_null", bad, raw(b"null")),
        Case("type.json_true", bad, raw(b"true")),
        Case("type.not_json", bad, raw(b"<xml>nope</xml>")),
        Case("type.truncated_json", bad, lambda u, r: keyed(u, js(event(u))[:-7])),
        Case("type.trailing_garbage", bad, lambda u, r: keyed(u, js(event(u)) + b"}}")),
        Case("type.empty_value", bad, raw(b"")),
        Case("type.whitespace_value", bad, raw(b" \n\t ")),
        Case("tombstone.with_key", bad, raw(None)),
        Case("tombstone.empty_key", bad, lambda u, r: Payload(None, b"")),
        Case(
            "type.duplicate_keys",
            "verdict",
            lambda u, r: keyed(
                u,
                b'{"upload_id": "x", "upload_id": "'
                + u.encode()
                + b'", "text": {"caption": "hi"}}',
            ),
        ),
        Case("type.unknown_fields", "verdict", ev(extra={"deep": [1, 2, {"x": None}]}, v=2)),
    ]


def schema_cases() -> list[Case]:
    unsupported, bad = "dlq:event.unsupported_schema", "dlq:event.malformed"

    def version(v: object, **extra):
        return lambda uid, rng: keyed(uid, js({**event(uid), "schema_version": v, **extra}))

    def future(uid, rng):
        return keyed(uid, js({"schema_version": 3, "upload_id": uid, "content": {"blocks": []}}))

    return [
        Case("schema.version_2", unsupported, version(2)),
        Case("schema.version_99", unsupported, version(99)),
        Case("schema.version_2_pow_63", unsupported, version(2**63)),
        Case("schema.future_shape", unsupported, future),
        Case("schema.version_0", bad, version(0)),
        Case("schema.version_negative", bad, version(-1)),
        Case("schema.version_string", bad, version("2")),
        Case("schema.version_float", "dlq", version(1.5)),
        Case("schema.version_null", "dlq", version(None)),
        Case("schema.version_1_explicit", "verdict", version(1)),
    ]


def media_cases(media: Media) -> list[Case]:
    def image(uri: str, content_type: str | None = None, caption: str | None = "look"):
        ref = {"uri": uri} | ({"content_type": content_type} if content_type else {})
        return lambda uid, rng: keyed(uid, js(event(uid, caption, images=[ref])))

    def good_then(uri: str, content_type: str | None):
        def make(uid, rng):
            refs = [{"uri": rng.choice(media.ok)}, {"uri": uri, "content_type": content_type}]
            return keyed(uid, js(event(uid, images=refs)))

        return make

    def missing(uid, rng):
        return keyed(
            uid, js(event(uid, images=[{"uri": f"s3://{media.bucket}/soak/no/{uid}.jpg"}]))
        )

    b = media.bucket
    cases = [
        Case("media.missing_object", "dlq:media.not_found", missing),
        Case(
            "media.bucket_not_allowed",
            "dlq:media.bucket_not_allowed",
            image("s3://someone-elses-bucket/x.jpg"),
        ),
        Case("media.dotdot_key", "dlq:media.uri_invalid", image(f"s3://{b}/../secrets/x.jpg")),
        Case("media.http_uri", "dlq:event.malformed", image("http://127.0.0.1:1/x.jpg")),
        Case("media.file_uri", "dlq:event.malformed", image("file:///etc/passwd")),
        Case("media.bucket_only_uri", "dlq:event.malformed", image(f"s3://{b}/")),
    ]
    for name, (uri, ctype, expected) in sorted(media.hostile.items()):
        if name == "far_over_size_limit":  # its own size case
            continue
        cap = 4 if name in ("over_size_limit_by_one_byte", "png_6000x6000_huge_but_allowed") else 40
        cases.append(Case(f"image.{name}", expected, image(uri, ctype), cap=cap))
        if expected != "verdict":
            cases.append(Case(f"image.ok_then_{name}", expected, good_then(uri, ctype), cap=cap))
    return cases


def header_cases() -> list[Case]:
    def with_headers(headers):
        return lambda uid, rng: keyed(uid, js(event(uid)), headers)

    return [
        Case(
            "headers.traceparent_garbage",
            "verdict",
            with_headers([("traceparent", b"\xff\xfe\x00 not a trace")]),
        ),
        Case(
            "headers.traceparent_zero_ids",
            "verdict",
            with_headers([("traceparent", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01")]),
        ),
        Case("headers.500_headers", "verdict", with_headers([(f"h{i}", b"v") for i in range(500)])),
        Case("headers.64kb_value", "verdict", with_headers([("tracestate", b"x" * 65536)])),
    ]


def hostile_cases(limits: Limits, media: Media) -> list[Case]:
    return [
        *nesting_cases(),
        *encoding_cases(),
        *size_cases(limits, media),
        *type_cases(),
        *schema_cases(),
        *media_cases(media),
        *header_cases(),
    ]


def plan(cfg: Config, limits: Limits, media: Media) -> list[Input]:
    """The seeded list of inputs in publishing order: hostile kinds round-robin (each up to its
    cap), valid kinds round-robin, shuffled together."""
    rng = random.Random(cfg.seed)
    hostile = hostile_cases(limits, media)
    valid = valid_cases(media)
    picks: list[Case] = []
    used: Counter[str] = Counter()
    while len(picks) < cfg.hostile:
        before = len(picks)
        for case in rng.sample(hostile, len(hostile)):
            if used[case.kind] < case.cap and len(picks) < cfg.hostile:
                picks.append(case)
                used[case.kind] += 1
        if len(picks) == before:
            raise SystemExit("--hostile is larger than the sum of the kinds' caps")
    picks += [valid[n % len(valid)] for n in range(cfg.valid)]
    rng.shuffle(picks)
    run = uuid.uuid4().hex[:6]
    return [Input(n, case, f"s{run}-{n:06d}") for n, case in enumerate(picks)]


def payload(cfg: Config, item: Input) -> Payload:
    return item.case.make(item.uid, random.Random(cfg.seed * 1_000_003 + item.n))


# -- media in S3 --------------------------------------------------------------------------------


def upload_media(stack: LocalStack, limits: Limits) -> Media:
    from tests.hostile import hostile_corpus

    s3 = s3_client(stack.s3_endpoint)
    bucket = stack.bucket
    ok = []
    for n in range(16):
        s3.put_object(Bucket=bucket, Key=f"soak/ok/{n}.jpg", Body=landscape(n, (320, 200)))
        ok.append(f"s3://{bucket}/soak/ok/{n}.jpg")
    hostile: dict[str, tuple[str, str | None, str]] = {}
    for case in hostile_corpus():
        s3.put_object(Bucket=bucket, Key=f"soak/hostile/{case.name}", Body=case.data)
        expected = f"dlq:{case.expected_code}" if case.expected_code else "verdict"
        hostile[case.name] = (
            f"s3://{bucket}/soak/hostile/{case.name}",
            case.content_type,
            expected,
        )
    far = b"\xff\xd8\xff" + b"\x00" * (limits.object_bytes * 3)
    s3.put_object(Bucket=bucket, Key="soak/hostile/far_over", Body=far)
    hostile["far_over_size_limit"] = (
        f"s3://{bucket}/soak/hostile/far_over",
        "image/jpeg",
        "dlq:media.too_large",
    )
    return Media(bucket, ok, hostile)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Config:
    hostile: int
    valid: int
    workers: int
    partitions: int
    rate: float
    drain_timeout: float
    timeout: float
    seed: int
    out: Path
    stall_bound: float
    rss_bound_mib: float


@dataclass
class Outcome:
    kind: str  # "verdict" | "dlq"
    code: str  # decision (allow/block/escalate) or the dead letter's error code
    content: bytes  # what must be identical across duplicates
    ts_ms: int
    reason: str = ""  # a dead letter's reason


@dataclass
class Run:
    inputs: list[Input] = field(default_factory=list)
    published: int = 0
    verdicts: dict[str, list[Outcome]] = field(default_factory=lambda: defaultdict(list))
    letters: dict[tuple[int, int], list[Outcome]] = field(default_factory=lambda: defaultdict(list))
    escalations: Counter[str] = field(default_factory=Counter)
    foreign_letters: int = 0  # dead letters whose source is not our uploads topic
    ends: dict[int, int] = field(default_factory=dict)  # partition -> published end offset
    commit_stall: dict[int, float] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)  # last committed offset read
    commit_reads: int = 0
    rss: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    hwm: dict[str, int] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: str | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def outcomes(self, item: Input) -> list[Outcome]:
        return self.verdicts.get(item.uid, []) + self.letters.get((item.partition, item.offset), [])

    def undecided(self) -> int:
        sent = self.inputs[: self.published]
        return sum(1 for i in sent if i.offset < 0 or not self.outcomes(i))


def outcome_of(topic_role: str, value: bytes, ts_ms: int) -> tuple[str | tuple[int, int], Outcome]:
    data = json.loads(value)
    if topic_role == "verdicts":
        return data["upload_id"], Outcome("verdict", data["decision"], value, ts_ms)
    source = data.get("source") or {}
    data.pop("failed_at", None)  # the only field a redelivered dead letter may change
    content = json.dumps(data, sort_keys=True).encode()
    where = (source.get("partition", -1), source.get("offset", -1))
    outcome = Outcome(
        "dlq",
        data["error_code"],
        content,
        ts_ms,
        str(data.get("reason", ""))[:160].replace("`", "'"),
    )
    return (source.get("topic"), where), outcome


async def produce(cfg: Config, run: Run, bootstrap: str, topic: str) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_request_size=PRODUCER_MAX_REQUEST,
        request_timeout_ms=60_000,
    )
    await producer.start()
    start = time.monotonic()
    try:
        pending = []
        for item in run.inputs:
            if run.stop.is_set():
                break
            due = start + item.n / cfg.rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            p = payload(cfg, item)
            item.size = len(p.value or b"") + len(p.key or b"")
            fut = await producer.send(topic, p.value, key=p.key, headers=p.headers)
            pending.append((item, fut))
            run.published += 1
            if len(pending) >= 64:
                await settle(run, pending)
        await settle(run, pending)
    finally:
        await producer.stop()
    run.timings["publish_s"] = time.monotonic() - start


async def settle(run: Run, pending: list) -> None:
    for item, fut in pending:
        meta = await fut
        item.partition, item.offset = meta.partition, meta.offset
        item.sent_ms = meta.timestamp if meta.timestamp and meta.timestamp > 0 else _now_ms()
        run.ends[meta.partition] = max(run.ends.get(meta.partition, 0), meta.offset + 1)
    pending.clear()


def _now_ms() -> int:
    return int(time.time() * 1000)


async def collect(run: Run, bootstrap: str, topics: dict[str, str], done: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer

    roles = {topics[r]: r for r in ("verdicts", "escalations", "dlq")}
    consumer = AIOKafkaConsumer(
        *roles,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        while not done.is_set():
            batch = await consumer.getmany(timeout_ms=300, max_records=5000)
            for tp, records in batch.items():
                for r in records:
                    add(run, roles[tp.topic], topics["uploads"], r)
    finally:
        await consumer.stop()


def add(run: Run, role: str, uploads: str, record) -> None:
    if role == "escalations":
        run.escalations[(record.key or b"").decode(errors="replace")] += 1
        return
    where, outcome = outcome_of(role, record.value, record.timestamp)
    if role == "verdicts":
        run.verdicts[where].append(outcome)
    elif where[0] != uploads:
        run.foreign_letters += 1
    else:
        run.letters[where[1]].append(outcome)


async def poll_commits(run: Run, bootstrap: str, group: str, topic: str, partitions: int) -> None:
    """Per partition with waiting inputs (committed < published end): the longest time its
    committed offset did not move."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    moved: dict[int, tuple[int, float]] = {}  # partition -> (committed, since)
    try:
        while not run.stop.is_set():
            now = time.monotonic()
            try:
                # Partitions named: Tansu's answer to "all of the group's offsets" does not decode.
                tps = [TopicPartition(topic, p) for p in range(partitions)]
                offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
            except Exception as e:  # the broker's answer is a measurement, never fatal
                print(f"committed offsets not read: {e!r}", flush=True)
                offsets = {}
            committed = {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic}
            run.commit_reads += bool(offsets)
            run.committed |= committed
            for p, end in run.ends.items():
                c = max(committed.get(p, 0), 0)
                if c >= end or moved.get(p, (None,))[0] != c:
                    moved[p] = (c, now)
                stall = now - moved[p][1]
                run.commit_stall[p] = max(run.commit_stall.get(p, 0.0), stall)
            await asyncio.sleep(1.0)
    finally:
        await admin.close()


async def watch_workers(
    run: Run, workers: dict[str, Process], ports: dict[str, int], env: dict, logs: Path
) -> None:
    """RSS of every worker once a second; a worker that dies is recorded and restarted."""
    while not run.stop.is_set():
        for name, proc in list(workers.items()):
            if proc.popen.poll() is not None:
                run.crashes.append(f"{name} exited with {proc.popen.returncode}")
                print(f"worker {name} died ({proc.popen.returncode}); restarting", flush=True)
                workers[name], ports[name] = start_worker(
                    "serve", env, logs, name=name, wait_ready=False
                )
                continue
            mem = memory_kib(proc.popen.pid)
            if "VmRSS" in mem:
                run.rss[name].append(mem["VmRSS"])
                run.hwm[name] = max(run.hwm.get(name, 0), mem.get("VmHWM", 0))
        await asyncio.sleep(1.0)


async def until_ready(
    run: Run, workers: dict[str, Process], ports: dict[str, int], timeout: float = 300.0
) -> None:
    """Wait for every worker's /readyz, interruptible (a worker is only ever started here, so
    the caller always knows every process to stop)."""
    deadline = time.monotonic() + timeout
    waiting = set(workers)
    async with httpx.AsyncClient() as client:
        while waiting and not run.stop.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout:.0f} s: {sorted(waiting)}")
            for name in sorted(waiting):
                if workers[name].popen.poll() is not None:
                    raise RuntimeError(f"{name} exited at start; see {workers[name].log_path}")
                try:
                    r = await client.get(f"http://{LOCAL}:{ports[name]}/readyz", timeout=1)
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    waiting.discard(name)
            await asyncio.sleep(0.5)


async def wait_for_outcomes(cfg: Config, run: Run) -> None:
    deadline = time.monotonic() + cfg.drain_timeout
    last = None
    while time.monotonic() < deadline and not run.stop.is_set():
        left = run.undecided()
        if left == 0:
            await asyncio.sleep(3.0)  # late duplicates of redelivered batches still count
            return
        if left != last:
            print(f"  waiting for {left} outcomes", flush=True)
            last = left
        await asyncio.sleep(1.0)


def worker_env(stack: LocalStack, topics: dict[str, str], group: str) -> dict[str, str]:
    env = {
        **stack.env(),
        "STREAM_GUARD_KAFKA__CONSUMER_GROUP": group,
        "STREAM_GUARD_TELEMETRY__LOG_JSON": "true",
    }
    env |= {f"STREAM_GUARD_KAFKA__TOPICS__{role.upper()}": name for role, name in topics.items()}
    for name, value in env.items():  # nothing but this machine's loopback, ever
        if name.endswith(("SERVERS", "URL")) and LOCAL not in value:
            raise SystemExit(f"{name}={value} is not on {LOCAL}")
    return env


def probe(ports: dict[str, int]) -> dict[str, str]:
    out = {}
    for name, port in ports.items():
        try:
            h = httpx.get(f"http://{LOCAL}:{port}/healthz", timeout=2).status_code
            r = httpx.get(f"http://{LOCAL}:{port}/readyz", timeout=2).status_code
            out[name] = f"healthz {h}, readyz {r}"
        except httpx.HTTPError as e:
            out[name] = f"no answer ({type(e).__name__})"
    return out


async def soak(cfg: Config, run: Run, stack: LocalStack, logs: Path) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: interrupt(run, s))
    tag = uuid.uuid4().hex[:6]
    topics = {r: f"soak{tag}.{r}" for r in ("uploads", "verdicts", "escalations", "review", "dlq")}
    group = f"soak-{tag}"
    await create_topics(stack.bootstrap, list(topics.values()), cfg.partitions)
    env = worker_env(stack, topics, group)
    workers: dict[str, Process] = {}
    ports: dict[str, int] = {}
    background: list[asyncio.Future] = []
    done = asyncio.Event()
    t0 = time.monotonic()
    try:
        # One worker first: a worker that finds no head for the policy compiles one and writes
        # it into the shared model repository, and two doing that at once can collide (a start-up
        # race of its own, not what this run measures); the others then find the head written.
        for i in range(cfg.workers):
            name = f"soak-w{i}"
            workers[name], ports[name] = start_worker(
                "serve", env, logs, name=name, wait_ready=False
            )
            if i == 0:
                await until_ready(run, workers, ports)
        await until_ready(run, workers, ports)
        run.timings["workers_ready_s"] = time.monotonic() - t0
        print(f"{cfg.workers} workers ready; publishing {len(run.inputs)} inputs", flush=True)
        background = [
            asyncio.ensure_future(collect(run, stack.bootstrap, topics, done)),
            asyncio.ensure_future(
                poll_commits(run, stack.bootstrap, group, topics["uploads"], cfg.partitions)
            ),
            asyncio.ensure_future(watch_workers(run, workers, ports, env, logs)),
        ]
        t0 = time.monotonic()
        await produce(cfg, run, stack.bootstrap, topics["uploads"])
        print(f"published {run.published}; waiting for every outcome", flush=True)
        await wait_for_outcomes(cfg, run)
        run.timings["outcomes_s"] = time.monotonic() - t0
        return probe(ports)
    finally:
        run.stop.set()
        done.set()
        await asyncio.gather(*background, return_exceptions=True)
        for w in workers.values():  # SIGTERM all at once, then wait for each
            if w.popen.poll() is None:
                w.popen.send_signal(signal.SIGTERM)
        for w in workers.values():
            w.stop()


def interrupt(run: Run, sig: int) -> None:
    run.interrupted = signal.Signals(sig).name
    print(f"{run.interrupted}: stopping", flush=True)
    run.stop.set()


# -- the report ---------------------------------------------------------------------------------


def judge(run: Run) -> dict:
    """Per input: its outcome, whether it matches the expectation, lost / conflicting."""
    kinds: dict[str, Counter] = defaultdict(Counter)
    codes: Counter[str] = Counter()
    lost, conflicting, mismatched = [], [], []
    duplicates = provisional_alone = 0
    for item in run.inputs[: run.published]:
        outs = run.outcomes(item) if item.offset >= 0 else []
        k = kinds[item.case.kind]
        k["inputs"] += 1
        if not outs:
            lost.append(item)
            k["lost"] += 1
            continue
        distinct = {(o.kind, o.content) for o in outs}
        duplicates += len(outs) - len(distinct)
        if len(distinct) > 1:
            conflicting.append((item, sorted({f"{o.kind}:{o.code}" for o in outs})))
        first = min(outs, key=lambda o: o.ts_ms)
        label = f"{first.kind}:{first.code}"
        k[label] += 1
        codes[first.code if first.kind == "dlq" else f"verdict {first.code}"] += 1
        provisional_alone += first.code == "escalate" and not run.escalations.get(item.uid)
        if not matches(item.case.expected, first):
            mismatched.append((item, label, first.reason))
    return {
        "kinds": kinds,
        "codes": codes,
        "lost": lost,
        "conflicting": conflicting,
        "mismatched": mismatched,
        "duplicates": duplicates,
        "provisional_without_escalation": provisional_alone,
    }


def over_bounds(cfg: Config, run: Run) -> list[str]:
    """The stated bounds this run broke: stall (outcomes or commits) and worker memory."""
    stall = max([*outcome_stalls(run).values(), *run.commit_stall.values()], default=0.0)
    rss = max(run.hwm.values(), default=0) / 1024
    broken = []
    if stall > cfg.stall_bound:
        broken.append(
            f"a partition went {stall:.1f} s without progress (bound {cfg.stall_bound:.0f} s)"
        )
    if rss > cfg.rss_bound_mib:
        broken.append(f"a worker peaked at {rss:.0f} MiB (bound {cfg.rss_bound_mib:.0f} MiB)")
    return broken


def matches(expected: str, outcome: Outcome) -> bool:
    if expected == "any":
        return True
    if expected == "verdict":
        return outcome.kind == "verdict"
    if expected == "dlq":
        return outcome.kind == "dlq"
    return outcome.kind == "dlq" and expected == f"dlq:{outcome.code}"


def outcome_stalls(run: Run) -> dict[int, float]:
    """Per input partition: the longest time, while some of its inputs waited, between two
    outcomes (or between an input becoming the oldest waiting one and the next outcome), from
    the records' own timestamps (producer and workers share this machine's clock)."""
    events: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for item in run.inputs[: run.published]:
        if item.offset < 0:
            continue
        outs = run.outcomes(item)
        events[item.partition].append((item.sent_ms, +1))
        end = min(o.ts_ms for o in outs) if outs else _now_ms()
        events[item.partition].append((end, -1))
    stalls = {}
    for p, evs in events.items():
        waiting, since, worst = 0, 0, 0
        for ts, step in sorted(evs, key=lambda e: (e[0], -e[1])):
            if step < 0:
                worst = max(worst, ts - since)
                since = ts
            elif waiting == 0:
                since = ts
            waiting += step
        stalls[p] = worst / 1000
    return stalls


def rss_summary(run: Run) -> list[str]:
    rows = []
    for name, samples in sorted(run.rss.items()):
        mib = [s / 1024 for s in samples]
        rows.append(
            f"| {name} | {mib[0]:.0f} | {max(mib):.0f} | {run.hwm.get(name, 0) / 1024:.0f} "
            f"| {mib[-1]:.0f} | {len(mib)} |"
        )
    return rows


def log_counts(logs: Path) -> dict[str, int]:
    needles = {
        "unexpected error": "unexpected error on",
        "batch task failed": "batch task failed",
        "Task exception was never retrieved": "Task exception was never retrieved",
        "Traceback": "Traceback",
        "publishing ... failed (retried)": "records failed",
        "MessageSizeTooLarge": "MessageSizeTooLarge",
        "dead-lettered": "dead-lettered",
    }
    text = "".join(p.read_text(errors="replace") for p in logs.glob("soak-w*.log"))
    return {label: text.count(needle) for label, needle in needles.items()}


def code_state() -> str:
    """What code ran: the tree under test moves while people work, so beyond the commit, the
    uncommitted files and a hash of every file the workers import from."""
    import hashlib
    import subprocess

    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "stream_guard", "model_repository"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.splitlines()
    digest = hashlib.sha256()
    for path in sorted((ROOT / "stream_guard").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    tree = digest.hexdigest()[:16]
    return f"{len(changed)} uncommitted files; sha256 of stream_guard/**/*.py {tree}"


def describe(item: Input) -> str:
    return f"`{item.case.kind}` uid {item.uid} at p{item.partition}@{item.offset} ({item.size} B)"


def report(cfg: Config, run: Run, verdict: dict, health: dict[str, str], logs: Path) -> str:
    m = machine()
    stalls = outcome_stalls(run)
    hostile = sum(1 for i in run.inputs[: run.published] if not i.case.kind.startswith("valid."))
    cmd = " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.soak", *sys.argv[1:]])
    lines = [
        f"## Soak run, {m['date']}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
        f"Python {m['python']}; commit {m['git_commit'][:10]}"
        + f" ({code_state()})"
        + f"; load average at start {m['load_avg_at_start']} (machine shared).",
        "",
        f"Setup: Tansu (memory), moto S3, CPU tritonserver; {cfg.workers} fast worker(s) with "
        f"default settings in one group; {cfg.partitions} partitions; seed {cfg.seed}; "
        f"{cfg.rate:.0f} inputs/s; producer `max_request_size` {PRODUCER_MAX_REQUEST >> 20} MiB "
        "(raised from aiokafka's 1 MB so events far over the worker's 1 MB limit can be sent).",
        "",
        "| | |",
        "| --- | --- |",
        f"| inputs | {run.published} of {len(run.inputs)} planned: {hostile} hostile, "
        f"{run.published - hostile} valid ({len(verdict['kinds'])} kinds) |",
        f"| lost (no outcome) | **{len(verdict['lost'])}** |",
        f"| conflicting (outcomes of different content) | **{len(verdict['conflicting'])}** |",
        f"| identical duplicates | {verdict['duplicates']} |",
        f"| outcome other than expected | {len(verdict['mismatched'])} |",
        f"| provisional verdicts without their escalation | "
        f"{verdict['provisional_without_escalation']} |",
        f"| dead letters from another topic | {run.foreign_letters} |",
        f"| worker crashes | {len(run.crashes)} {run.crashes or ''} |",
        f"| stall bound, outcomes (max per partition) | {max(stalls.values(), default=0):.1f} s "
        f"({', '.join(f'p{p} {s:.1f}' for p, s in sorted(stalls.items()))}) |",
        f"| stall bound, committed offset (max per partition) | "
        f"{max(run.commit_stall.values(), default=0):.1f} s "
        f"({', '.join(f'p{p} {s:.1f}' for p, s in sorted(run.commit_stall.items()))}) |",
        f"| committed / published end offsets at the end ({run.commit_reads} reads) | "
        + ", ".join(f"p{p} {run.committed.get(p, -1)}/{e}" for p, e in sorted(run.ends.items()))
        + " |",
        f"| wall time | {run.timings.get('total_s', 0):.0f} s (stack "
        f"{run.timings.get('stack_s', 0):.0f} s, workers ready "
        f"{run.timings.get('workers_ready_s', 0):.0f} s, publishing "
        f"{run.timings.get('publish_s', 0):.0f} s, all outcomes "
        f"{run.timings.get('outcomes_s', 0):.0f} s after the first publish) |",
        f"| workers at the end | {health or 'not probed'} |",
        f"| bounds (stall {cfg.stall_bound:.0f} s, worker peak RSS {cfg.rss_bound_mib:.0f} MiB) "
        f"| {'; '.join(over_bounds(cfg, run)) or 'kept'} |",
        f"| interrupted | {run.interrupted or 'no'} |",
        "",
        "Worker memory (MiB, from /proc, sampled every second):",
        "",
        "| worker | RSS start | RSS peak | VmHWM | RSS end | samples |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rss_summary(run),
        "",
        "Outcomes per code (the first outcome of each input):",
        "",
        "| outcome | inputs |",
        "| --- | ---: |",
        *(f"| {c} | {n} |" for c, n in sorted(verdict["codes"].items())),
        "",
        f"Worker log counts ({logs.relative_to(ROOT)}): "
        + ", ".join(f"{k} {v}" for k, v in log_counts(logs).items()),
        "",
        *problem_lines(verdict),
        "<details><summary>Outcomes per kind</summary>",
        "",
        "| kind | expected | inputs | outcomes |",
        "| --- | --- | ---: | --- |",
        *kind_rows(run, verdict),
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def problem_lines(verdict: dict) -> list[str]:
    lines = []
    for title, items in (
        ("Lost", [describe(i) for i in verdict["lost"]]),
        ("Conflicting", [f"{describe(i)}: {outs}" for i, outs in verdict["conflicting"]]),
    ):
        if items:
            lines += [f"{title} ({len(items)}, first 30):", ""]
            lines += [f"- {line}" for line in items[:30]] + [""]
    by_kind: dict[tuple[str, str], list[tuple[Input, str]]] = defaultdict(list)
    for item, got, reason in verdict["mismatched"]:
        by_kind[(item.case.kind, got)].append((item, reason))
    if by_kind:
        lines += ["Outcome other than expected, per kind (one example each):", ""]
        for (kind, got), items in sorted(by_kind.items()):
            first, reason = items[0]
            lines.append(
                f"- `{kind}`: expected {first.case.expected}, got {got} for {len(items)} of "
                f"them, e.g. {describe(first)}" + (f": reason `{reason}`" if reason else "")
            )
        lines.append("")
    return lines


def kind_rows(run: Run, verdict: dict) -> list[str]:
    expected = {i.case.kind: i.case.expected for i in run.inputs}
    rows = []
    for kind, counts in sorted(verdict["kinds"].items()):
        outs = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "inputs")
        rows.append(f"| {kind} | {expected[kind]} | {counts['inputs']} | {outs} |")
    return rows


# -- main ---------------------------------------------------------------------------------------


def parse_args() -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hostile", type=int, default=1000, help="hostile events to publish")
    p.add_argument("--valid", type=int, default=1000, help="valid uploads to publish")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rate", type=float, default=40.0, help="inputs published per second")
    p.add_argument(
        "--drain-timeout", type=float, default=600.0, help="seconds to wait for outcomes"
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="global deadline, stack start included"
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown file to append to")
    p.add_argument(
        "--stall-bound",
        type=float,
        default=60.0,
        help="seconds a partition may go without progress",
    )
    p.add_argument(
        "--rss-bound-mib", type=float, default=1024.0, help="peak resident memory per worker"
    )
    a = p.parse_args()
    return Config(
        a.hostile,
        a.valid,
        a.workers,
        a.partitions,
        a.rate,
        a.drain_timeout,
        a.timeout,
        a.seed,
        a.out,
        a.stall_bound,
        a.rss_bound_mib,
    )


def write(out: Path, text: str) -> None:
    if not out.exists():
        out.write_text(
            "# Hostile soak results\n\nAppended by `python -m benchmarks.soak` (`make soak`); "
            "newest last. See the module docstring for what is measured.\n\n"
        )
    with out.open("a") as fh:
        fh.write(text + "\n")


def main() -> None:
    cfg = parse_args()
    begin = time.monotonic()
    logs = STATE / "workers" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    logs.mkdir(parents=True)
    stack = LocalStack(state=STATE, partitions=cfg.partitions)
    run = Run()
    health: dict[str, str] = {}
    limits = Limits(KafkaSettings().max_event_bytes, S3Settings().max_object_bytes)
    try:
        stack.start()
        run.inputs = plan(cfg, limits, upload_media(stack, limits))
        run.timings["stack_s"] = time.monotonic() - begin
        left = cfg.timeout - (time.monotonic() - begin)
        health = asyncio.run(asyncio.wait_for(soak(cfg, run, stack, logs), left))
    except TimeoutError:
        print(f"global deadline of {cfg.timeout:.0f} s reached: stopping", flush=True)
    except KeyboardInterrupt:
        run.interrupted = run.interrupted or "SIGINT"
    except Exception as e:  # still stop everything and report what was seen
        traceback.print_exc()
        run.interrupted = f"harness error {e!r}"
    finally:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # the loop reset it on close
        stack.stop()
    run.timings["total_s"] = time.monotonic() - begin
    verdict = judge(run)
    text = report(cfg, run, verdict, health, logs)
    print(text)
    if not run.interrupted:
        write(cfg.out, text)
        print(f"appended to {cfg.out}")
    failed = verdict["lost"] or verdict["conflicting"] or over_bounds(cfg, run) or run.interrupted
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop children on SIGTERM too
    main()
