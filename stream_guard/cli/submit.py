"""`stream-guard submit`: upload local images to S3 and publish one UploadEvent for them.

Everything is checked before anything is written: there is something to submit, the ids are
valid, each file is an image the workers' own decoder accepts under the configured limits, and
the event fits the broker's limit. Only then are the files uploaded and the event published; if
a step fails after that, the objects already uploaded are deleted again, so a failed submit
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from stream_guard.cli.failures import CliError
from stream_guard.errors import MediaError
from stream_guard.events import ID_PATTERN, UploadEvent

if TYPE_CHECKING:
    from stream_guard.settings import Settings

__all__ = [
    "MIME",
    "PlannedImage",
    "Submission",
    "plan",
    "submit",
]

MIME = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_ID = re.compile(ID_PATTERN)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class PlannedImage:
    path: Path
    key: str
    content_type: str


@dataclass(frozen=True)
class Submission:
    event: UploadEvent
    bucket: str
    images: list[PlannedImage]


def _check_id(option: str, value: str) -> None:
    if not _ID.match(value):
        raise CliError(
            f"{option} {value!r} is not a valid id",
            "use 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit",
        )


def _check_image(settings: Settings, path: Path) -> str:
    """The content type of ``path``, after the workers' own decoder accepted it."""
    from stream_guard.media.decode import ImageLimits, decode_image, sniff_format

    size = path.stat().st_size
    limit = settings.s3.max_object_bytes
    if size > limit:
        raise CliError(
            f"{path} is {size} bytes; workers refuse objects over {limit} bytes",
            "STREAM_GUARD_S3__MAX_OBJECT_BYTES sets the limit",
        )
    data = path.read_bytes()
    fmt = sniff_format(data)
    if fmt is None:
        raise CliError(
            f"{path} is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)",
            "put text in --text, --prompt or --response instead",
        )
    m = settings.media
    limits = ImageLimits(
        max_bytes=limit, max_pixels=m.max_pixels, max_side=m.max_side, max_frames=m.max_frames
    )
    try:
        decode_image(data, content_type=MIME[fmt], limits=limits)
    except MediaError as e:
        raise CliError(f"{path}: {e.reason} ({e.code})", "the workers would dead-letter it") from e
    return MIME[fmt]


def plan(
    settings: Settings,
    files: list[Path],
    *,
    text: str,
    prompt: str,
    response: str,
    tenant: str,
    upload_id: str,
) -> Submission:
    """The upload, checked; raises CliError before anything is written."""
    if not files and not (text or prompt or response):
        raise CliError(
            "nothing to submit: give image files and/or --text, --prompt, --response",
            "e.g. stream-guard submit photo.jpg --text 'caption'",
        )
    _check_id("--upload-id", upload_id)
    _check_id("--tenant", tenant)
    buckets = settings.s3.allowed_buckets
    if files and not buckets:
        raise CliError("no bucket to upload to", "set STREAM_GUARD_S3__ALLOWED_BUCKETS")
    bucket = buckets[0] if buckets else ""
    images = [
        PlannedImage(
            path,
            f"uploads/{upload_id}/{n}-{_KEY_UNSAFE.sub('_', path.name)}",
            _check_image(settings, path),
        )
        for n, path in enumerate(files)
    ]
    event = _event(upload_id, tenant, bucket, images, text, prompt, response)
    size = len(event.to_bytes())
    if size > settings.kafka.max_event_bytes:
        raise CliError(
            f"the upload event would be {size} bytes; workers refuse events over "
            f"{settings.kafka.max_event_bytes}",
            "shorten the text (STREAM_GUARD_KAFKA__MAX_EVENT_BYTES sets the limit)",
        )
    return Submission(event, bucket, images)


def _event(
    upload_id: str,
    tenant: str,
    bucket: str,
    images: list[PlannedImage],
    text: str,
    prompt: str,
    response: str,
) -> UploadEvent:
    try:
        return UploadEvent.model_validate(
            {
                "upload_id": upload_id,
                "tenant_id": tenant,
                "images": [
                    {"uri": f"s3://{bucket}/{i.key}", "content_type": i.content_type}
                    for i in images
                ],
                "text": {
                    "caption": text or None,
                    "prompt": prompt or None,
                    "response": response or None,
                },
            }
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "upload"
        raise CliError(f"the upload is not valid: {where}: {first['msg']}") from e


def submit(settings: Settings, sub: Submission) -> None:
    """Check the broker and topic, upload the images, publish the event; a failure after an
    upload deletes what was uploaded."""
    asyncio.run(_submit(settings, sub))


async def _submit(settings: Settings, sub: Submission) -> None:
    from aiokafka import AIOKafkaProducer

    from stream_guard.cli.clients import kafka_options, start_kafka_client

    topic = settings.kafka.topics.uploads
    producer: Any = AIOKafkaProducer(**kafka_options(settings.kafka), acks="all")
    await start_kafka_client(producer, settings.kafka)
    try:
        metadata = await producer.client.fetch_all_metadata()
        if topic not in metadata.topics():
            raise CliError(
                f"topic {topic!r} (role uploads) does not exist on "
                f"{settings.kafka.bootstrap_servers}; nothing was uploaded",
                "create it (`stream-guard stack up` creates the local ones) or set "
                "STREAM_GUARD_KAFKA__TOPICS__UPLOADS",
            )
        uploaded: list[str] = []
        try:
            await asyncio.to_thread(_upload, settings, sub, uploaded)
            await producer.send_and_wait(
                topic, sub.event.to_bytes(), key=sub.event.upload_id.encode()
            )
        except BaseException:
            await asyncio.to_thread(_delete, settings, sub.bucket, uploaded)
            raise
    finally:
        await producer.stop()


def _upload(settings: Settings, sub: Submission, uploaded: list[str]) -> None:
    from stream_guard.cli.clients import s3_client

    if not sub.images:
        return
    s3 = s3_client(settings.s3)
    for image in sub.images:
        s3.upload_file(
            str(image.path), sub.bucket, image.key, ExtraArgs={"ContentType": image.content_type}
        )
        uploaded.append(image.key)


def _delete(settings: Settings, bucket: str, keys: list[str]) -> None:
    from stream_guard.cli.clients import s3_client

    if not keys:
        return
    s3 = s3_client(settings.s3)
    for key in keys:
        with contextlib.suppress(Exception):  # best effort: the original error is what matters
            s3.delete_object(Bucket=bucket, Key=key)
