"""Detector scores on a reduced JPEG decode vs today's full decode (issue 14), and CPU per image.

``python -m benchmarks.decode_parity`` decodes a small corpus of real photos that ship in
installed wheels (a portrait from matplotlib's sample data, two photos from scikit-learn) and
the benchmark's synthetic landscape, each re-encoded as JPEG at common upload sizes, three ways:

- *today*: full decode, then the detector's bilinear resize (OpenCV INTER_LINEAR arithmetic);
- *reduced*: decoded at 1/2, 1/4 or 1/8 scale (``NeededSize`` of the detector, 320 px on the
  longest side), then the same resize;
- *ideal*: full decode, then an anti-aliased area resize (what neither path does; the yardstick).

It prints, per image, the largest change of any of the 18 detector signals (NudeNet 320n through
the served wrapper, onnxruntime on CPU), the mean input difference in grey levels, and the CPU
milliseconds of decode + preprocess both ways. The tolerance the unit tests hold
(tests/unit/test_media_draft.py) is stated there; this prints the numbers behind it.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stream_guard.media.decode import DETECTOR_SIZE, decode_image, preprocess_for_detector

SIZES = [(640, 400), (640, 480), (1024, 768), (1280, 720), (1920, 1080), (2048, 1536)]
SIZES += [(4032, 3024), (3024, 4032), (777, 333)]


def corpus() -> dict[str, Image.Image]:
    import matplotlib
    import sklearn.datasets

    from stream_guard.dev.demo import landscape

    sample = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    images = Path(sklearn.datasets.__file__).parent / "images"
    paths = {"portrait": sample, "building": images / "china.jpg", "flower": images / "flower.jpg"}
    out = {name: Image.open(p).convert("RGB") for name, p in paths.items()}
    out["landscape"] = Image.open(io.BytesIO(landscape(seed=3, size=(640, 400)))).convert("RGB")
    return out


def detector():
    import onnxruntime as ort

    from stream_guard.build.detector import default_nudenet_path, wrap_detector

    path = wrap_detector(default_nudenet_path(), Path(tempfile.mkdtemp()) / "detector.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"IMAGE": x[None]})[0][0]


def _ideal(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    square = np.zeros((max(h, w), max(h, w), 3), np.uint8)
    square[:h, :w] = rgb
    return np.asarray(Image.fromarray(square).resize((320, 320), Image.Resampling.BOX))


def _cpu_ms(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return 1000 * best


def main() -> int:
    score = detector()
    print(
        "| image | size | scale | max signal change vs today | vs ideal: today / reduced | "
        "mean input diff (grey levels) | CPU ms decode+preprocess: today / reduced |"
    )
    print("|---|---|---|---|---|---|---|")
    worst, to_ideal = 0.0, {"today": [], "reduced": []}
    for name, im in corpus().items():
        for size in SIZES:
            buf = io.BytesIO()
            im.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            full = decode_image(data, content_type="image/jpeg")
            reduced = decode_image(data, content_type="image/jpeg", needed=DETECTOR_SIZE)
            a = preprocess_for_detector(full.rgb).image
            b = preprocess_for_detector(reduced.rgb).image
            sa, sb, si = score(a), score(b), score(_ideal(full.rgb))
            change = float(np.abs(sa - sb).max())
            worst = max(worst, change)
            to_ideal["today"].append(float(np.abs(sa - si).max()))
            to_ideal["reduced"].append(float(np.abs(sb - si).max()))

            def today_path(d=data):
                preprocess_for_detector(decode_image(d, content_type="image/jpeg").rgb)

            def reduced_path(d=data):
                rgb = decode_image(d, content_type="image/jpeg", needed=DETECTOR_SIZE).rgb
                preprocess_for_detector(rgb)

            print(
                f"| {name} | {size[0]}x{size[1]} | 1/{reduced.reduced} | {change:.4f} | "
                f"{to_ideal['today'][-1]:.4f} / {to_ideal['reduced'][-1]:.4f} | "
                f"{np.abs(a.astype(np.int16) - b).mean():.2f} | "
                f"{_cpu_ms(today_path):.2f} / {_cpu_ms(reduced_path):.2f} |"
            )
    print(
        f"\nlargest signal change {worst:.4f}; mean distance to the ideal: today "
        f"{np.mean(to_ideal['today']):.4f}, reduced {np.mean(to_ideal['reduced']):.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
