"""Worker CPU per stage (issue 14): ``stream_guard_cpu_seconds_total{stage}``.

Thread CPU time, not wall time: a stage that waits costs nothing, one that computes counts what
it computed. The numbers themselves are the benchmark's business (benchmarks/e2e.py).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from stream_guard import observability as obs
from stream_guard.dev.demo import landscape
from stream_guard.media.decode import DETECTOR_SIZE, decode_image, preprocess_for_detector


def _cpu(stage: str) -> float:
    return REGISTRY.get_sample_value("stream_guard_cpu_seconds_total", {"stage": stage}) or 0.0


def test_every_stage_is_exported_before_any_work_so_dashboards_see_zeros():
    exported = {
        s.labels["stage"]
        for family in REGISTRY.collect()
        if family.name == "stream_guard_cpu_seconds"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert exported == set(obs.CPU_STAGES)
    assert obs.CPU_STAGES == (
        "parse",
        "fetch",
        "decode",
        "preprocess",
        "score",
        "serialise",
        "publish",
    )


def test_a_stage_counts_the_cpu_it_computes_but_not_the_time_it_waits():
    before = _cpu("score")
    with obs.cpu_stage("score"):
        np.linalg.svd(np.random.default_rng(0).random((300, 300)))
    computed = _cpu("score") - before
    assert computed > 0
    before = _cpu("score")
    with obs.cpu_stage("score"):
        time.sleep(0.3)
    assert _cpu("score") - before < 0.3, "a sleep is wall time, not CPU"


def test_a_stage_counts_only_its_own_thread():
    stop = threading.Event()

    def spin() -> None:  # another thread burning CPU meanwhile
        while not stop.is_set():
            sum(range(1000))

    other = threading.Thread(target=spin)
    other.start()
    try:
        before = _cpu("publish")
        with obs.cpu_stage("publish"):
            time.sleep(0.3)
        assert _cpu("publish") - before < 0.3
    finally:
        stop.set()
        other.join()


def test_work_handed_to_a_pool_is_counted_under_its_stage():
    before = _cpu("fetch")
    timed = obs.cpu_timed("fetch", lambda n: sum(i * i for i in range(n)))
    assert timed(200_000) == sum(i * i for i in range(200_000))
    assert _cpu("fetch") > before


def test_an_unknown_stage_is_refused():
    with pytest.raises(KeyError):
        obs.cpu_stage("everything")


async def test_the_moderator_decodes_at_the_detector_size_and_counts_decode_and_preprocess():
    # async: the Triton client it builds needs a running event loop
    from stream_guard.media.storage import ObjectStore
    from stream_guard.pipeline.moderator import Moderator
    from stream_guard.settings import Settings
    from stream_guard.triton import GuardModels

    settings = Settings()
    moderator = Moderator(settings, GuardModels(settings.triton), ObjectStore(settings.s3), None)
    try:
        decode, preprocess = _cpu("decode"), _cpu("preprocess")
        jpeg = landscape(0)  # 640x400: a 1/2 scale decode is exactly the detector's 320
        prepared = moderator.decode_local(jpeg, "image/jpeg")
        assert _cpu("decode") > decode and _cpu("preprocess") > preprocess
        reduced = decode_image(jpeg, content_type="image/jpeg", needed=DETECTOR_SIZE)
        assert reduced.reduced == 2
        np.testing.assert_array_equal(prepared.detector, preprocess_for_detector(reduced.rgb).image)
    finally:
        moderator.close()
