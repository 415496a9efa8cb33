"""The served models on the real tritonserver: the ensemble equals the worker's three calls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from stream_guard.dev.demo import landscape
from stream_guard.media.decode import decode_image, preprocess_for_detector
from stream_guard.settings import TritonSettings
from stream_guard.triton import GuardModels

pytestmark = pytest.mark.integration


def test_guard_ensemble_matches_the_three_step_path(stack):
    image = preprocess_for_detector(decode_image(landscape(5), content_type="image/jpeg").rgb).image
    texts = ["I am going to kill you", "a walk on the beach"]
    client = grpcclient.InferenceServerClient(stack.triton_url)
    t = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
    t.set_data_from_numpy(np.array([[x.encode()] for x in texts], dtype=np.object_))
    i = grpcclient.InferInput("IMAGE", [2, 320, 320, 3], "UINT8")
    i.set_data_from_numpy(np.stack([image, image]))
    ensemble = client.infer("guard_llama_guard_4", [t, i]).as_numpy("SCORES")

    async def three_steps():
        m = GuardModels(TritonSettings(url=stack.triton_url))
        try:
            emb = await m.embed_texts(texts)
            sig = await m.detect(np.stack([image, image]))
            meta = await m.client.get_model_metadata("guard_head_llama_guard_4")
            version = max(int(v) for v in meta.versions)
            return await m.score("guard_head_llama_guard_4", version, emb, sig)
        finally:
            await m.close()

    direct = asyncio.run(three_steps())
    assert ensemble.shape == direct.shape == (2, 14)
    np.testing.assert_allclose(ensemble, direct, atol=1e-5)
    assert ensemble[0].argmax() == 0  # S1 for the threat
    assert ensemble[1].max() < 0.35  # nothing for the beach walk


def test_dynamic_batching_merges_concurrent_requests(stack):
    """Triton's own statistics show more inferences than executions under concurrency."""
    import tritonclient.grpc.aio as aio

    async def burst():
        c = aio.InferenceServerClient(stack.triton_url)
        try:

            async def one(n):
                inp = aio.InferInput("TEXT", [1, 1], "BYTES")
                inp.set_data_from_numpy(np.array([[f"caption {n}".encode()]], dtype=np.object_))
                await c.infer("text_encoder", [inp])

            before = await c.get_inference_statistics("text_encoder")
            await asyncio.gather(*(one(n) for n in range(64)))
            # Triton counts an execution after its responses are sent: on a loaded machine the
            # statistics can trail the last answer for a moment.
            first = before.model_stats[0].inference_count
            for _ in range(50):
                after = await c.get_inference_statistics("text_encoder")
                if after.model_stats[0].inference_count - first >= 64:
                    break
                await asyncio.sleep(0.1)
            return before, after
        finally:
            await c.close()

    before, after = asyncio.run(burst())
    s0, s1 = before.model_stats[0], after.model_stats[0]
    inferences = s1.inference_count - s0.inference_count
    executions = s1.execution_count - s0.execution_count
    assert inferences == 64
    assert executions < inferences, "requests were batched together"


def test_a_batch_split_across_detector_instances_keeps_each_images_signals(stack):
    """The CPU detector runs two single-threaded instances, each dynamic batch in onnxruntime
    calls of 8 (``run_batch``): the worker sends a batch as one request per instance. Every
    image still gets its own signals, in order, whatever request, instance or call it ran in
    (landscapes score near 0 but measurably unlike a blank square; rows of one image differ
    only by batch-size arithmetic, under 1e-3)."""
    photo = preprocess_for_detector(decode_image(landscape(1), content_type="image/jpeg").rgb)
    blank = np.zeros_like(photo.image)
    images = np.stack([photo.image if n % 4 else blank for n in range(19)])

    async def signals():
        m = GuardModels(TritonSettings(url=stack.triton_url))
        try:
            instances = await m.cpu_instances("image_detector")
            together = await m.detect(images)
            alone = [await m.detect(images[n : n + 1]) for n in range(2)]
            return instances, together, alone
        finally:
            await m.close()

    instances, together, (blank_alone, photo_alone) = asyncio.run(signals())
    assert instances == 2
    assert together.shape == (19, 18)
    assert np.abs(photo_alone - blank_alone).max() > 2e-3  # the two are told apart
    for n in range(19):
        expected = photo_alone[0] if n % 4 else blank_alone[0]
        np.testing.assert_allclose(together[n], expected, atol=1e-3, err_msg=f"row {n}")
