"""Fetching upload media from S3, with an allow-list, a size cap and timeouts.

boto3 is synchronous; calls run in a bounded thread pool so the event loop never blocks, and
the pool size bounds concurrent GETs. Missing or forbidden objects are permanent (dead-letter);
connection failures, throttling and 5xx are transient (retry, never dead-letter).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

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


class ObjectStore:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="s3")
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=(
                settings.secret_access_key.get_secret_value()
                if settings.secret_access_key
                else None
            ),
            verify=str(settings.ca_bundle) if settings.ca_bundle else settings.verify_tls,
            config=Config(
                connect_timeout=settings.timeout_s,
                read_timeout=settings.timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=settings.max_concurrency,
            ),
        )

    def _get(self, ref: ImageRef) -> FetchedObject:
        limit = self.settings.max_object_bytes
        try:
            obj = self._client.get_object(Bucket=ref.bucket, Key=ref.key)
            length = int(obj.get("ContentLength") or 0)
            body = obj["Body"]
            try:
                if length > limit:
                    raise MediaError(
                        ErrorCode.MEDIA_TOO_LARGE,
                        f"{ref.uri} is {length} bytes, over the {limit}-byte limit",
                        stage="fetch",
                    )
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
            raise MediaError(
                ErrorCode.MEDIA_TOO_LARGE,
                f"{ref.uri} is over the {limit}-byte limit",
                stage="fetch",
            )
        return FetchedObject(ref.uri, data, obj.get("ContentType"))

    async def fetch(self, ref: ImageRef) -> FetchedObject:
        check_allowed(ref, self.settings.allowed_buckets)
        loop = asyncio.get_running_loop()
        # The deadline covers the request only: a fetch waits for a free connection first, so
        # time queued behind other fetches never counts against it.
        async with self._slots:
            try:
                get = cpu_timed("fetch", self._get)  # boto3's CPU per object (issue 14)
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
