"""Text in images through the `ocr` model on the real tritonserver and the real worker.

An image carrying a rendered threat, uploaded with a harmless caption, is flagged S1 under a
policy with `ocr: true` and allowed under the same policy with `ocr: false` (the default policy);
the only difference between the two uploads is the tenant, hence the policy.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont

from stream_guard.settings import DEFAULT_POLICY
from stream_guard.triton import MAX_SIDE, image_text, prepare_for_ocr
from tests.conftest import publish, read, upload

pytestmark = pytest.mark.integration
THREAT = "I WILL KILL YOU"
CAPTION = "my weekend photos"


def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Bold (shipped with matplotlib, a dependency), else Pillow's built-in font."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def render(text: str, size: tuple[int, int] = (960, 400)) -> Image.Image:
    image = Image.new("RGB", size, (236, 228, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, size[0] - 40, size[1] - 40), outline=(90, 60, 40), width=6)
    font = _font(72)
    box = draw.textbbox((0, 0), text, font=font)
    xy = ((size[0] - (box[2] - box[0])) // 2, (size[1] - (box[3] - box[1])) // 2)
    draw.text(xy, text, fill=(20, 20, 20), font=font)
    return image


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- pure helpers ------------------------------------------------------------------------------


def test_ocr_input_is_capped_on_its_longest_side_and_keeps_its_aspect():
    big = np.zeros((3000, 1500, 3), np.uint8)
    small = prepare_for_ocr(big)
    assert small.shape == (MAX_SIDE, MAX_SIDE // 2, 3) and small.dtype == np.uint8
    tiny = np.zeros((20, 30, 3), np.uint8)
    assert prepare_for_ocr(tiny).shape == (20, 30, 3)


def test_image_text_drops_blank_reads():
    assert image_text(["", " I WILL ", "KILL YOU", "  "]) == "I WILL\nKILL YOU"


# -- through Triton ----------------------------------------------------------------------------


def _ocr(url: str, rgb: np.ndarray) -> str:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    batch = np.ascontiguousarray(rgb[None])
    inp = grpcclient.InferInput("IMAGE", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    try:
        result = client.infer("ocr", [inp], outputs=[grpcclient.InferRequestedOutput("TEXT")])
    finally:
        client.close()
    return result.as_numpy("TEXT").reshape(-1)[0].decode()


def test_ocr_model_reads_rendered_text_and_reports_latency(stack):
    rgb = np.asarray(render(THREAT))
    read_back = _ocr(stack.triton_url, rgb)  # also the warm-up
    print(f"OCR read {read_back!r} from an image of {THREAT!r}")
    # PP-OCR's Chinese-English recogniser may merge the narrow gap after "I" ("IWILL KILL YOU").
    assert read_back.replace(" ", "").upper() == THREAT.replace(" ", "")
    blank = np.full((400, 960, 3), 230, np.uint8)
    assert _ocr(stack.triton_url, blank) == ""
    latencies = []
    for _ in range(5):
        started = time.perf_counter()
        _ocr(stack.triton_url, rgb)
        latencies.append(time.perf_counter() - started)
    print(
        f"OCR latency per 960x400 image through Triton (gRPC round trip, CPU): "
        f"median {np.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    )


@pytest.fixture
def ocr_policy(tmp_path: Path) -> Path:
    """The default policy with `ocr: true` under its own id (its own head)."""
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["policy_id"] = "llama_guard_4_ocr"
    data["ocr"] = True
    path = tmp_path / "ocr.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_threat_rendered_in_an_image_is_flagged_only_when_the_policy_reads_images(
    stack, topics, worker_env, start_worker, s3, ocr_policy
):
    assert yaml.safe_load(DEFAULT_POLICY.read_text()).get("ocr", False) is False
    s3.put_object(Bucket=stack.bucket, Key="ocr/poster.png", Body=png(render(THREAT)))
    env = {**worker_env, "STREAM_GUARD_POLICY__TENANTS": json.dumps({"reads": str(ocr_policy)})}
    start_worker(env)
    uri = f"s3://{stack.bucket}/ocr/poster.png"
    publish(
        stack.bootstrap,
        topics.uploads,
        [
            (b"ocr-on", upload("ocr-on", CAPTION, [uri], tenant_id="reads")),
            (b"ocr-off", upload("ocr-off", CAPTION, [uri])),
        ],
    )
    records = read(stack.bootstrap, topics.verdicts, 2, timeout=90, settle=1)
    verdicts = {r.key.decode(): json.loads(r.value) for r in records}
    assert sorted(verdicts) == ["ocr-off", "ocr-on"]

    on, off = verdicts["ocr-on"], verdicts["ocr-off"]
    scores = {c["code"]: c["score"] for c in on["categories"]}
    print(f"ocr: true -> {on['decision']} flagged={on['flagged']} S1={scores['S1']}")
    assert on["policy_id"] == "llama_guard_4_ocr"
    assert on["decision"] != "allow" and "S1" in on["flagged"], on
    assert max(scores, key=scores.get) == "S1"
    assert off["policy_id"] == "llama_guard_4"
    assert off["decision"] == "allow" and off["flagged"] == [], off
