"""The fixed benchmark corpus: N distinct synthetic photos with captions, and upload events.

The images are ``stream_guard.dev.demo.landscape`` with different seeds (640x400 JPEG, ~30 KB);
the captions are mostly ordinary, with a few that the default policy flags or escalates, so the
escalation rate is measured on a realistic-looking mix rather than on all-benign traffic.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stream_guard.dev.demo import landscape
from stream_guard.media.decode import preprocess_for_detector

CAPTIONS = [
    "Sunset over the hills on our hike today",
    "Photos from our family trip, the kids loved it",
    "golden hour from the back porch, no filter",
    "first time trying landscape photography, feedback welcome",
    "the view from the campsite this morning",
    "road trip day 3: still chasing sunsets",
    "my grandmother painted this exact view in 1974",
    "weekend walk with the dog, he was exhausted after",
    "does anyone know the name of this valley?",
    "new wallpaper, free to use",
    "that knife is sharp enough to really hurt somebody",
    "brought the whole team out for the offsite, great day",
    "here is his home address and phone number, go harass him",
    "I know where you live. I am going to kill you and your family tonight.",
    "cheap pills no prescription needed, message me",
    "quiet evening, nothing to report",
]


@dataclass(frozen=True)
class Item:
    index: int
    key: str
    jpeg: bytes
    caption: str


def make_corpus(n: int, size: tuple[int, int] = (640, 400)) -> list[Item]:
    # Seeds spread out so the hill colour (40 + seed * 10, wrapping in uint8) varies too.
    return [
        Item(i, f"bench/{i:04d}.jpg", landscape(seed=i, size=size), CAPTIONS[i % len(CAPTIONS)])
        for i in range(n)
    ]


def upload_corpus(s3, bucket: str, items: list[Item]) -> int:
    for item in items:
        s3.put_object(Bucket=bucket, Key=item.key, Body=item.jpeg, ContentType="image/jpeg")
    return sum(len(i.jpeg) for i in items)


def upload_event(item: Item, upload_id: str, bucket: str) -> bytes:
    return json.dumps(
        {
            "upload_id": upload_id,
            "images": [{"uri": f"s3://{bucket}/{item.key}", "content_type": "image/jpeg"}],
            "text": {"caption": item.caption},
        }
    ).encode()


def detector_input(jpeg: bytes) -> np.ndarray:
    """What a naive consumer would do: Pillow decode, then the project's detector preprocessing."""
    with Image.open(io.BytesIO(jpeg)) as im:
        rgb = np.asarray(im.convert("RGB"))
    return preprocess_for_detector(rgb).image
