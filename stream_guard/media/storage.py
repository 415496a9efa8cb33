"""Fetching upload media from S3, with an allow-list, a size cap and timeouts.

boto3 is synchronous; calls run in a bounded thread pool so the event loop never blocks, and
the pool size bounds concurrent GETs. Missing or forbidden objects are permanent (dead-letter);
connection failures, throttling and 5xx are transient (retry, never dead-letter).

A GET that succeeds skips boto3's per-call machinery (``SignedGet``: about half its CPU per
object); every other answer is asked again through boto3, so errors keep its retries and its
classification.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import boto3
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from stream_guard.errors import DependencyUnavailable, ErrorCode, MediaError
from stream_guard.events import ImageRef
from stream_guard.observability import cpu_timed
from stream_guard.settings import S3Settings

__all__ = [
    "BUCKET_MISSING",
    "ByteBudget",
    "DENIED",
    "FetchedObject",
    "NOT_FOUND",
    "ObjectStore",
    "SignedGet",
    "check_allowed",
]

# A missing key is the upload's problem (permanent). A missing *bucket* that is on the
# allow-list is the platform's: an endpoint that came back empty, or a bucket being re-created;
# waiting is right, dead-lettering every upload of the outage is not (transient).
NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
BUCKET_MISSING = {"NoSuchBucket"}
DENIED = {"AccessDenied", "403", "AllAccessDisabled", "InvalidObjectState"}


@dataclass(frozen=True)
class FetchedObject:
    uri: str
    data: bytes
    content_type: str | None


def check_allowed(ref: ImageRef, allowed_buckets: list[str]) -> None:
    """Only s3:// URIs in allow-listed buckets are ever fetched (no arbitrary URLs)."""
    if ref.bucket not in allowed_buckets:
        raise MediaError(
            ErrorCode.MEDIA_BUCKET_NOT_ALLOWED,
            f"bucket {ref.bucket!r} is not on the allow-list (STREAM_GUARD_S3__ALLOWED_BUCKETS)",
            stage="fetch",
        )
    if not ref.key or ".." in ref.key.split("/"):
        raise MediaError(
            ErrorCode.MEDIA_URI_INVALID, f"invalid object key in {ref.uri}", stage="fetch"
        )


class ByteBudget:
    """An async semaphore counted in bytes: ``reserve(n)`` waits until ``n`` more bytes fit
    under the cap (a reservation larger than the cap waits for an empty budget, so it still
    runs, alone)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, n: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + n <= self.cap)
            self.used += n
        try:
            yield
        finally:
            async with self._changed:
                self.used -= n
                self._changed.notify_all()


def _too_large(ref: ImageRef, limit: int, length: int | None = None) -> MediaError:
    size = f"is {length} bytes, over" if length is not None else "is over"
    return MediaError(
        ErrorCode.MEDIA_TOO_LARGE, f"{ref.uri} {size} the {limit}-byte limit", stage="fetch"
    )


class SignedGet:
    """A plain GET of one object: botocore signs it (SigV4) and sends it on the client's own
    connection pool (its TLS, proxy and timeout settings), without the client's per-call
    events, parameter validation, endpoint rules, response parsing and retry handlers (measured
    against moto on one thread: 0.45-0.54 ms of CPU per 21 KiB object vs 0.98-1.0 through
    ``get_object``).

    ``get`` answers only a 200; anything else returns None and the caller asks boto3, which
    retries and classifies the error as it always has. A timeout is not asked twice (the
    request timeout would pass again): it is transient at once, as boto3's would be.
    """

    def __init__(self, client, credentials) -> None:
        self._client = client
        # botocore's pooled urllib3 session; should a release rename it, every GET goes
        # through boto3 again (``get`` answers None).
        self._http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self._credentials = credentials  # refreshable ones renew when get_frozen_* is called
        self._region = client.meta.region_name
        self._bases: dict[str, str] = {}

    def _base(self, bucket: str) -> str:
        """The bucket's URL as boto3 addresses it (virtual-hosted or path style, per its
        endpoint rules), learned once from a presigned URL."""
        base = self._bases.get(bucket)
        if base is None:
            url = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=60
            )
            base = self._bases[bucket] = url.split("?", 1)[0][:-1]
        return base

    def get(self, ref: ImageRef, limit: int) -> FetchedObject | None:
        if self._credentials is None or self._http is None:  # boto3 raises its own error
            return None
        request = AWSRequest(method="GET", url=self._base(ref.bucket) + quote(ref.key, safe="/~"))
        frozen = self._credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, "s3", self._region).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True
        try:
            response = self._http.send(prepared)
        except (ConnectTimeoutError, ReadTimeoutError) as e:
            raise DependencyUnavailable("s3", f"{type(e).__name__} fetching {ref.uri}") from e
        except BotoCoreError:
            return None
        return self._read(ref, response, limit)

    @staticmethod
    def _read(ref: ImageRef, response, limit: int) -> FetchedObject | None:
        raw = response.raw
        reusable = False
        try:
            if response.status_code != 200:
                raw.drain_conn()  # an error document: small, and the connection stays pooled
                reusable = True
                return None
            length = response.headers.get("content-length")
            if length is not None and int(length) > limit:
                raise _too_large(ref, limit, int(length))
            data = raw.read(limit + 1)
            if len(data) > limit:
                raise _too_large(ref, limit)
            if length is not None and len(data) != int(length):  # cut short, as boto3 checks
                raise DependencyUnavailable(
                    "s3", f"{ref.uri}: {len(data)} of {length} bytes before the connection closed"
                )
            reusable = True
            return FetchedObject(ref.uri, data, response.headers.get("content-type"))
        except urllib3.exceptions.HTTPError as e:  # the body cut short or timed out: transient
            raise DependencyUnavailable("s3", f"{type(e).__name__} fetching {ref.uri}") from e
        finally:
            if reusable:
                raw.release_conn()
            else:  # unread bytes would corrupt the next response on this connection
                raw.close()


def s3_client(settings: S3Settings, session: boto3.session.Session | None = None) -> Any:
    """The boto3 S3 client every part of stream-guard uses (worker fetches, CLI, label store):
    endpoint, region, the configured key (else the default credential chain), TLS verification,
    timeouts, two retries (three attempts) in standard retry mode, a connection pool as large as
    the fetch concurrency and never under boto3's default of 10 (the CLI's uploads use that
    many threads)."""
    secret = settings.secret_access_key
    return (session or boto3.session.Session()).client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        verify=str(settings.ca_bundle) if settings.ca_bundle else settings.verify_tls,
        config=Config(
            connect_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=max(settings.max_concurrency, 10),
        ),
    )


class ObjectStore:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="s3")
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        session = boto3.session.Session()
        self._client = s3_client(settings, session)
        # The client's own credentials: the configured key, else the default chain.
        secret = settings.secret_access_key
        credentials = (
            Credentials(settings.access_key_id, secret.get_secret_value() if secret else "")
            if settings.access_key_id
            else session.get_credentials()
        )
        self._signed = SignedGet(self._client, credentials)

    def _fetch(self, ref: ImageRef) -> FetchedObject:
        return self._signed.get(ref, self.settings.max_object_bytes) or self._get(ref)

    def _get(self, ref: ImageRef) -> FetchedObject:
        limit = self.settings.max_object_bytes
        try:
            obj = self._client.get_object(Bucket=ref.bucket, Key=ref.key)
            length = int(obj.get("ContentLength") or 0)
            body = obj["Body"]
            try:
                if length > limit:
                    raise _too_large(ref, limit, length)
                data = body.read(limit + 1)
            finally:
                body.close()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in NOT_FOUND:
                raise MediaError(
                    ErrorCode.MEDIA_NOT_FOUND, f"{ref.uri} does not exist", stage="fetch"
                ) from e
            if code in BUCKET_MISSING:
                raise DependencyUnavailable("s3", f"bucket {ref.bucket!r} does not exist") from e
            if code in DENIED:
                raise MediaError(
                    ErrorCode.MEDIA_ACCESS_DENIED, f"access to {ref.uri} denied", stage="fetch"
                ) from e
            raise DependencyUnavailable("s3", f"{code or 'error'} fetching {ref.uri}") from e
        except BotoCoreError as e:
            raise DependencyUnavailable("s3", f"{type(e).__name__} fetching {ref.uri}") from e
        if len(data) > limit:
            raise _too_large(ref, limit)
        return FetchedObject(ref.uri, data, obj.get("ContentType"))

    async def fetch(self, ref: ImageRef) -> FetchedObject:
        check_allowed(ref, self.settings.allowed_buckets)
        loop = asyncio.get_running_loop()
        # The deadline covers the request only: a fetch waits for a free connection first, so
        # time queued behind other fetches never counts against it.
        async with self._slots:
            try:
                get = cpu_timed("fetch", self._fetch)  # the GET's CPU per object (issue 14)
                return await asyncio.wait_for(
                    loop.run_in_executor(self._pool, get, ref), self.settings.timeout_s * 3
                )
            except TimeoutError as e:
                raise DependencyUnavailable("s3", f"timed out fetching {ref.uri}") from e

    def ping(self) -> bool:
        """Readiness: can we reach the first allowed bucket?"""
        try:
            self._client.head_bucket(Bucket=self.settings.allowed_buckets[0])
            return True
        except (ClientError, BotoCoreError):
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
