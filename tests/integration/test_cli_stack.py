"""`stream-guard stack up | down | status | env` through the real CLI, on real local stacks.

Each test starts its own stack (Tansu, moto, tritonserver) in one state directory shared by the
module, so the model repository is built once. What must hold afterwards is checked on the
process tree captured while the stack ran: no process of it is left, tritonserver's backend
stubs included, and no shared-memory region with the stack's prefix stays in /dev/shm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_guard.dev.processes import SHM_DIR, ProcessInfo, descendants, process_info
from stream_guard.dev.state import StackState, read_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CLI = str(Path(sys.executable).parent / "stream-guard")
STUB = "triton_python_backend_stub"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_GUARD_")}


def sg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def ignore_sigint() -> None:
    """What a non-interactive shell does to `cmd &`: SIGINT ignored, inherited across exec."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack-state")


def wait_up(state_dir: Path, proc: subprocess.Popen | None = None, timeout=600) -> StackState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        state = read_state(state_dir)
        if state is not None and state.status == "up":
            return state
        time.sleep(0.5)
    raise AssertionError(f"stack in {state_dir} not up after {timeout}s")


def alive(p: ProcessInfo) -> bool:
    now = process_info(p.pid)
    return now is not None and not now.zombie and now.start_ticks == p.start_ticks


def assert_all_gone(procs: list[ProcessInfo], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while [p for p in procs if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p.cmdline[:120] for p in procs if alive(p)]
    assert not left, f"still running: {left}"


def shm_regions(state: StackState) -> list[Path]:
    (prefix,) = [c.shm_prefix for c in state.components if c.name == "triton"]
    assert prefix
    return sorted(SHM_DIR.glob(f"{prefix}*"))


def tree(pid: int) -> list[ProcessInfo]:
    procs = descendants(pid)
    owner = process_info(pid)
    assert owner is not None
    assert any(STUB in p.cmdline for p in procs), "tritonserver's backend stubs not found"
    return [owner, *procs]


def test_stack_up_started_with_sigint_ignored_still_stops_everything_on_sigint(state_dir):
    env_file = state_dir.parent / "sg.env"
    proc = subprocess.Popen(
        [CLI, "stack", "up", "--state-dir", str(state_dir), "--env-file", str(env_file)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint,
    )
    try:
        # What a script does after `stream-guard stack up &`: wait for the stack, source its env.
        env = sg("stack", "env", "--state-dir", str(state_dir), "--wait", "600", timeout=660)
        assert env.returncode == 0, env.stderr
        state = wait_up(state_dir, proc, timeout=5)
        assert env.stdout == env_file.read_text()
        assert "export STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS='127.0.0.1:" in env.stdout
        status = sg("stack", "status", "--state-dir", str(state_dir), "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        doc = json.loads(status.stdout)
        assert [c["name"] for c in doc["components"]] == ["kafka", "s3", "triton"]
        assert all(c["running"] and c["healthy"] for c in doc["components"])
        procs = tree(proc.pid)
        assert shm_regions(state)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "SIGINT: stopping the stack" in err and "stack stopped" in err
    assert out == env.stdout  # the exports, printed once the stack was up
    assert_all_gone(procs)
    assert shm_regions(state) == []
    assert not (state_dir / "stack.json").exists()
    assert not env_file.exists()


def test_stack_down_stops_a_detached_stack_started_from_another_shell(state_dir):
    up = sg("stack", "up", "--detach", "--state-dir", str(state_dir), timeout=660)
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("export STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS='127.0.0.1:")
    assert "stream-guard stack down" in up.stderr
    state = read_state(state_dir)
    assert state is not None and state.status == "up"
    procs = tree(state.owner_pid)
    second = sg("stack", "up", "--state-dir", str(state_dir))
    assert second.returncode == 2
    assert second.stderr.startswith(
        f"error: a local stack is already running from {state_dir} (pid {state.owner_pid})"
    )
    down = sg("stack", "down", "--state-dir", str(state_dir), timeout=180)
    assert down.returncode == 0, down.stderr
    assert f"stopped the stack of pid {state.owner_pid} (kafka, s3, triton)" in down.stderr
    assert_all_gone(procs)
    assert shm_regions(state) == []
    assert sg("stack", "status", "--state-dir", str(state_dir)).returncode == 3


def test_stack_down_cleans_up_after_an_owner_and_tritonserver_killed_hard(state_dir):
    up = sg("stack", "up", "--detach", "--state-dir", str(state_dir), timeout=660)
    assert up.returncode == 0, up.stderr
    state = read_state(state_dir)
    procs = tree(state.owner_pid)
    (triton,) = [c for c in state.components if c.name == "triton"]
    stubs = [p for p in procs if STUB in p.cmdline]
    # Frozen, the stubs cannot notice their server died: they stay, as they did when this was
    # reported (about 500 MB each, re-parented to PID 1, deaf to SIGTERM).
    for stub in stubs:
        os.kill(stub.pid, signal.SIGSTOP)
    os.kill(state.owner_pid, signal.SIGKILL)
    os.kill(triton.pid, signal.SIGKILL)
    assert_all_gone([p for p in procs if p.pid in (state.owner_pid, triton.pid)])
    assert all(alive(s) for s in stubs)
    assert shm_regions(state), "the killed server's shared memory should still be there"

    status = sg("stack", "status", "--state-dir", str(state_dir))
    assert status.returncode == 1
    assert f"owner pid {state.owner_pid} (gone" in status.stdout
    assert "triton" in status.stdout and "stopped" in status.stdout
    env = sg("stack", "env", "--state-dir", str(state_dir))
    assert env.returncode == 2
    assert env.stderr.startswith(f"error: the stack recorded in {state_dir} is gone")

    down = sg("stack", "down", "--state-dir", str(state_dir), timeout=180)
    assert down.returncode == 0, down.stderr
    assert "its owner was gone" in down.stderr
    assert "shared-memory regions left behind" in down.stderr
    assert_all_gone(procs)
    assert shm_regions(state) == []
    assert not (state_dir / "stack.json").exists()
