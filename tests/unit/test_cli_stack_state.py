"""What `stack down` relies on, on real processes: groups, PID checks, state file, exports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stream_guard.dev.processes import (
    SHM_DIR,
    descendants,
    process_info,
    remove_shm,
    spawn,
    stop_group,
)
from stream_guard.dev.state import (
    Component,
    StackState,
    export_lines,
    owner_alive,
    read_state,
    write_state,
)

# A leader that starts two children ignoring SIGTERM (like tritonserver's backend stubs).
FAMILY = """
import subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
for _ in range(2):
    subprocess.Popen([sys.executable, "-c", stubborn, sys.argv[1]])
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    info = process_info(pid)
    return info is not None and not info.zombie


def _wait_for(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


@pytest.fixture
def family(tmp_path):
    marker = f"family-{uuid.uuid4().hex}"
    proc = spawn("family", [sys.executable, "-c", FAMILY, marker], tmp_path)
    _wait_for(lambda: len(descendants(proc.pid)) == 2)
    yield proc, marker
    proc.kill()


def test_a_process_is_stopped_with_its_whole_group(family):
    proc, _ = family
    children = descendants(proc.pid)
    proc.stop(timeout=5)
    assert proc.popen.returncode is not None
    assert not [c.pid for c in children if _alive(c.pid)]


def test_stop_group_kills_the_orphans_of_a_leader_that_died_hard(family):
    proc, marker = family
    ticks = process_info(proc.pid).start_ticks
    children = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(5)
    assert all(_alive(c.pid) for c in children)  # orphans, as after a hard death
    stopped = stop_group(proc.pid, marker, ticks, timeout=5)
    assert sorted(m.pid for m in stopped) == sorted(c.pid for c in children)
    _wait_for(lambda: not any(_alive(c.pid) for c in children))


def test_stop_group_leaves_processes_it_cannot_prove_are_ours(family):
    proc, marker = family
    ticks = process_info(proc.pid).start_ticks
    assert stop_group(proc.pid, "another-marker", ticks, timeout=1) == []
    assert stop_group(proc.pid, marker, ticks + 10**9, timeout=1) == []  # started "later"
    assert _alive(proc.pid) and len(descendants(proc.pid)) == 2


def test_shared_memory_is_removed_by_our_prefix_only(tmp_path):
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    prefix = f"stream_guard_{uuid.uuid4().hex[:12]}_"
    ours = [SHM_DIR / f"{prefix}{n}" for n in range(2)]
    theirs = SHM_DIR / f"stream_guard_{uuid.uuid4().hex[:12]}_0"
    for p in [*ours, theirs]:
        p.write_bytes(b"x")
    try:
        assert sorted(remove_shm(prefix)) == sorted(p.name for p in ours)
        assert theirs.exists() and not any(p.exists() for p in ours)
        with pytest.raises(ValueError):
            remove_shm("triton_")
    finally:
        theirs.unlink(missing_ok=True)


def test_state_file_round_trip_and_owner_check(tmp_path):
    state = StackState.for_this_process(tmp_path)
    state.components.append(
        Component("kafka", 1, 2, "tcp://127.0.0.1:9", {"kafka": 9}, None, "/x.log")
    )
    state.env = {"STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9"}
    write_state(tmp_path, state)
    back = read_state(tmp_path)
    assert back == state
    assert owner_alive(back)
    back.owner_start_ticks += 1  # the same PID, another process: not our owner
    assert not owner_alive(back)
    (tmp_path / "stack.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a stack state file"):
        read_state(tmp_path)


def test_export_lines_survive_a_posix_shell_eval():
    env = {"STREAM_GUARD_A": "plain", "STREAM_GUARD_B": """it's "quoted" $HOME `x`"""}
    script = "\n".join(export_lines(env)) + '\nprintf "%s|%s" "$STREAM_GUARD_A" "$STREAM_GUARD_B"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == f"plain|{env['STREAM_GUARD_B']}"


def test_state_dir_lives_where_it_is_asked(tmp_path):
    state = StackState.for_this_process(tmp_path / "nested")
    write_state(Path(state.state_dir), state)
    assert (tmp_path / "nested" / "stack.json").is_file()
