"""The chaos and benchmark harnesses stop everything they started on SIGINT and SIGTERM.

Started the way a script starts them in the background (SIGINT ignored), each harness is
signalled while its workers run; afterwards no process of its tree is left (tritonserver's
backend stubs included) and no shared-memory region of its tritonserver stays. Each run starts
its own stack, so these are slow.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_guard.dev.processes import SHM_DIR, ProcessInfo, descendants, process_info

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def alive(p: ProcessInfo) -> bool:
    now = process_info(p.pid)
    return now is not None and not now.zombie and now.start_ticks == p.start_ticks


def start(module: str, args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_GUARD_")}
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ignore_sigint,
    )


def wait_for_workers(proc: subprocess.Popen, timeout: float = 600) -> list[ProcessInfo]:
    """The harness's process tree once a worker and tritonserver's stubs run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        procs = descendants(proc.pid)
        lines = [p.cmdline for p in procs]
        if any("stream_guard.cli.app serve" in c for c in lines) and any(
            "triton_python_backend_stub" in c for c in lines
        ):
            return procs
        time.sleep(0.5)
    raise AssertionError("no worker started")


def shm_prefix(procs: list[ProcessInfo]) -> str:
    (server,) = [p for p in procs if "tritonserver --model-repository" in p.cmdline]
    match = re.search(r"shm-region-prefix-name=(\S+)", server.cmdline)
    assert match
    return match.group(1)


def stop_and_check(proc: subprocess.Popen, sig: signal.Signals, procs: list[ProcessInfo]) -> str:
    prefix = shm_prefix(procs)
    assert list(SHM_DIR.glob(f"{prefix}*"))
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    deadline = time.monotonic() + 30
    while [p for p in procs if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p.cmdline[:120] for p in procs if alive(p)]
    assert list(SHM_DIR.glob(f"{prefix}*")) == []
    assert proc.returncode == 128 + sig, out[-2000:]
    return out


def test_chaos_harness_stops_every_child_on_sigint(tmp_path):
    proc = start(
        "benchmarks.chaos",
        ["--uploads", "400", "--workers", "1", "--kills", "2", "--kill-gap", "20", "30"]
        + ["--partitions", "2", "--rate", "10", "--timeout", "800"],
        tmp_path,  # its state (.stream-guard/chaos) goes under the working directory
    )
    try:
        procs = wait_for_workers(proc)
        time.sleep(3)  # publishing and collecting: the asyncio part is running
        out = stop_and_check(proc, signal.SIGINT, procs)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGINT: chaos run stopped, no result" in out


def test_benchmark_harness_stops_every_child_on_sigterm(tmp_path):
    proc = start(
        "benchmarks.e2e",
        ["--quiet-wait", "0", "--no-write", "--results", str(tmp_path / "r.md")]
        + ["--concurrency", "1", "--client-batches", "--ceiling-seconds", "1"]
        + ["--naive-count", "20", "--naive-seconds", "3", "--workers", "1"]
        + ["--loads", "0.5", "--phase-seconds", "60", "--burst-min", "50"],
        tmp_path,
    )
    try:
        procs = wait_for_workers(proc)
        out = stop_and_check(proc, signal.SIGTERM, procs)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM: benchmark stopped, nothing recorded" in out
    assert not (tmp_path / "r.md").exists()
