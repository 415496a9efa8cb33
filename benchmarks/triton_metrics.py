"""Triton's own counters from its Prometheus port, as deltas over a phase.

Average batch size = d(nv_inference_count) / d(nv_inference_exec_count): inferences per model
execution, i.e. how well the dynamic batcher (and client-side batching) merged work. Queue time
per request = d(nv_inference_queue_duration_us) / d(nv_inference_request_success).
"""

from __future__ import annotations

import re

import httpx

COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_duration_us",
)
LINE = re.compile(r"^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$")


def scrape(url: str | None) -> dict[tuple[str, str], float]:
    """{(metric, model): value}, summed over versions; empty if there is no metrics URL."""
    if not url:
        return {}
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or m.group(1) not in COUNTERS:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = (m.group(1), labels.get("model", "?"))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def summarize(before: dict, after: dict) -> dict[str, dict[str, float | None]]:
    """Per model: requests, inferences, executions, avg batch, queue and compute us per request."""
    models = sorted({model for (_, model) in after})
    out: dict[str, dict[str, float | None]] = {}
    for model in models:
        d = {
            name: after.get((name, model), 0.0) - before.get((name, model), 0.0)
            for name in COUNTERS
        }
        requests = d["nv_inference_request_success"]
        if requests <= 0:
            continue
        execs = d["nv_inference_exec_count"]
        out[model] = {
            "requests": int(requests),
            "inferences": int(d["nv_inference_count"]),
            "executions": int(execs),
            "avg_batch": round(d["nv_inference_count"] / execs, 2) if execs else None,
            "queue_us_per_request": round(d["nv_inference_queue_duration_us"] / requests, 0),
            # Triton charges each request of a batch the whole batch's compute time.
            "compute_us_per_request": round(
                d["nv_inference_compute_infer_duration_us"] / requests, 0
            ),
        }
    return out
