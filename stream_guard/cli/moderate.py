"""`stream-guard moderate`: one upload from local files straight through Triton."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from stream_guard.events import UploadEvent, Verdict
from stream_guard.media.storage import ObjectStore
from stream_guard.pipeline.moderator import Moderator
from stream_guard.policy.heads import ensure_head
from stream_guard.policy.model import load_policy
from stream_guard.policy.registry import PolicyRegistry
from stream_guard.settings import Settings
from stream_guard.triton import GuardModels

__all__ = [
    "moderate_local",
]


async def moderate_local(
    settings: Settings, files: list[Path], text: str, policy_path: Path | None = None
) -> Verdict:
    policy = load_policy(policy_path or settings.policy.path)
    models = GuardModels(settings.triton)
    try:
        head = await ensure_head(
            policy, models, prefix=settings.triton.head_model, repo=settings.triton.model_repository
        )
        moderator = Moderator(settings, models, ObjectStore(settings.s3), PolicyRegistry(head))
        images = [
            moderator.decode_local(f.read_bytes(), mimetypes.guess_type(f.name)[0]) for f in files
        ]
        upload = UploadEvent.model_validate(
            {
                "upload_id": "local",
                "images": [{"uri": f"s3://local/{f.name}"} for f in files],
                "text": {"caption": text or None},
            }
        )
        result = await moderator.judge(upload, images)
        moderator.close()
        return Verdict.model_validate_json(result.outputs[0].value)
    finally:
        await models.close()
