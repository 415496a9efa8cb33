"""The worker's S3 GET against a real S3 server (moto) that checks request signatures.

A GET that succeeds takes the light signed path (``SignedGet``); every other answer is asked
again through boto3, so errors keep boto3's classification: a missing key or a forbidden object
is permanent, a missing allow-listed bucket, a refused connection and a timeout are transient.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import boto3
import pytest

from stream_guard.dev.stack import free_port, start_s3
from stream_guard.errors import DependencyUnavailable, ErrorCode, MediaError
from stream_guard.events import ImageRef
from stream_guard.media.storage import ObjectStore
from stream_guard.settings import S3Settings

pytestmark = pytest.mark.integration

STATE = Path(__file__).resolve().parents[2] / ".stream-guard" / "test"
BODY = os.urandom(3000) + b"\x00\xff" * 500


def _iam_key(iam) -> tuple[str, str]:
    iam.create_user(UserName="reader")
    iam.put_user_policy(
        UserName="reader",
        PolicyName="read-uploads",
        PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
        '"Action": "s3:*", "Resource": ["arn:aws:s3:::uploads", "arn:aws:s3:::uploads/*", '
        '"arn:aws:s3:::gone/*"]}]}',
    )
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def signed_s3():
    """moto with request authentication on (after the setup calls): a bad signature is refused
    with 403, so a GET that comes back proves the light path signs like boto3."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    STATE.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "9"  # the 9 setup calls, then auth is enforced
    try:
        proc = start_s3(STATE, port)
    finally:
        if before is None:
            os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = before
    try:
        admin = {"aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **admin)
        key, secret = _iam_key(iam)
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )
        s3.create_bucket(Bucket="uploads")
        s3.create_bucket(Bucket="private")  # outside the reader's policy
        for k in ("plain/photo.jpg", "odd keys/ü 1+2=3 (copy)~.jpg", "other/x.jpg"):
            s3.put_object(Bucket="uploads", Key=k, Body=BODY, ContentType="image/jpeg")
        s3.put_object(Bucket="private", Key="p.jpg", Body=BODY)
        yield endpoint, key, secret
    finally:
        proc.stop()


def _store(endpoint: str, key: str, secret: str, **kw) -> ObjectStore:
    settings = {
        "endpoint_url": endpoint,
        "access_key_id": key,
        "secret_access_key": secret,
        "allowed_buckets": ["uploads", "private", "gone"],
        "timeout_s": 2.0,
        **kw,
    }
    return ObjectStore(S3Settings(**settings))


def _fetch(store: ObjectStore, uri: str):
    async def go():
        return await store.fetch(ImageRef(uri=uri))

    return asyncio.run(go())


class _Counting:
    """Counts the GETs that went back to boto3."""

    def __init__(self, store: ObjectStore) -> None:
        self.calls = 0
        inner = store._get

        def counted(ref):
            self.calls += 1
            return inner(ref)

        store._get = counted


@pytest.mark.parametrize("key", ["plain/photo.jpg", "odd keys/ü 1+2=3 (copy)~.jpg"])
def test_an_object_comes_back_whole_with_its_type_on_the_signed_path(signed_s3, key):
    store = _store(*signed_s3)
    fallback = _Counting(store)
    got = _fetch(store, f"s3://uploads/{key}")
    assert got.data == BODY and got.content_type == "image/jpeg"
    assert fallback.calls == 0  # moto checked the signature and answered 200
    for _ in range(3):  # the pooled connection is reused cleanly
        assert _fetch(store, f"s3://uploads/{key}").data == BODY
    store.close()


def test_a_missing_key_is_permanent(signed_s3):
    store = _store(*signed_s3)
    with pytest.raises(MediaError) as e:
        _fetch(store, "s3://uploads/plain/nope.jpg")
    assert e.value.code == ErrorCode.MEDIA_NOT_FOUND
    assert _fetch(store, "s3://uploads/plain/photo.jpg").data == BODY  # connection still fine


def test_a_forbidden_object_is_permanent(signed_s3):
    with pytest.raises(MediaError) as e:
        _fetch(_store(*signed_s3), "s3://private/p.jpg")
    assert e.value.code == ErrorCode.MEDIA_ACCESS_DENIED


def test_a_missing_allow_listed_bucket_is_transient(signed_s3):
    with pytest.raises(DependencyUnavailable):
        _fetch(_store(*signed_s3), "s3://gone/photo.jpg")


def test_a_refused_signature_goes_through_boto3_and_is_not_a_dead_letter(signed_s3):
    endpoint, key, _ = signed_s3
    store = _store(endpoint, key, "not-the-secret")
    fallback = _Counting(store)
    with pytest.raises(DependencyUnavailable):  # SignatureDoesNotMatch: the platform's fault
        _fetch(store, "s3://uploads/plain/photo.jpg")
    assert fallback.calls == 1


def test_an_object_over_the_byte_limit_is_permanent_on_either_path(signed_s3):
    store = _store(*signed_s3, max_object_bytes=len(BODY) - 1)
    with pytest.raises(MediaError) as e:
        _fetch(store, "s3://uploads/plain/photo.jpg")
    assert e.value.code == ErrorCode.MEDIA_TOO_LARGE
    with pytest.raises(MediaError) as e:
        store._get(ImageRef(uri="s3://uploads/plain/photo.jpg"))
    assert e.value.code == ErrorCode.MEDIA_TOO_LARGE
    assert _store(*signed_s3, max_object_bytes=len(BODY))._signed.get(
        ImageRef(uri="s3://uploads/plain/photo.jpg"), len(BODY)
    )


def _serve_once(reply: bytes | None):
    """A one-shot HTTP server on 127.0.0.1: sends ``reply`` to each request (None: never
    answers) and leaves the connection as it is; yields its endpoint."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except TimeoutError:
                continue
            held.append(conn)
            if reply is not None:
                conn.recv(65536)
                conn.sendall(reply)
                conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        t.join(2)
        for s in held:
            s.close()
        listener.close()


_CUT_SHORT = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 3000\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "timeout_s"),
    [
        pytest.param(None, 0.5, id="a server that never answers, within the request timeout"),
        pytest.param(_CUT_SHORT + BODY[:100], 2.0, id="a body cut short, not a corrupt image"),
    ],
)
def test_an_answer_that_never_completes_is_transient(signed_s3, answer, timeout_s):
    _, key, secret = signed_s3
    for endpoint in _serve_once(answer):
        store = _store(endpoint, key, secret, timeout_s=timeout_s)
        with pytest.raises(DependencyUnavailable):
            _fetch(store, "s3://uploads/plain/photo.jpg")
        store.close()


def test_a_refused_connection_is_transient(signed_s3):
    _, key, secret = signed_s3
    with pytest.raises(DependencyUnavailable):
        _fetch(_store(f"http://127.0.0.1:{free_port()}", key, secret), "s3://uploads/x.jpg")
