"""Child processes of the dev tools, each in its own process group, stopped as a group.

Everything the local stack, the demo and the harnesses start goes through ``spawn`` and is
remembered here, so one signal (``dev.signals``) stops all of it. A program is stopped by
SIGTERM to its leader (tritonserver shuts its models down itself), then SIGKILL to whatever is
left of its group: tritonserver's Python-backend stubs ignore SIGTERM and outlive a tritonserver
that died hard. Their POSIX shared-memory regions carry a prefix of ours and are removed last.

``/proc`` helpers let ``stream-guard stack down`` stop a stack another process started, checking
each PID's start time and command line first, so a reused PID is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SHM_DIR",
    "Process",
    "ProcessInfo",
    "descendants",
    "group_members",
    "live_processes",
    "process_info",
    "remove_shm",
    "spawn",
    "stop_all",
    "stop_group",
]

SHM_DIR = Path("/dev/shm")
_MIN_SHM_PREFIX = 12  # never remove by a short (shared) prefix such as Triton's default

_lock = threading.Lock()
_live: list[Process] = []


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def remove_shm(prefix: str) -> list[str]:
    """Remove the POSIX shared-memory regions whose names start with ``prefix``."""
    if len(prefix) < _MIN_SHM_PREFIX:
        raise ValueError(f"shared-memory prefix {prefix!r} is too short to be ours alone")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in SHM_DIR.iterdir():
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = process_info(int(entry.name))
            if info is not None and info.pgid == pgid and not info.zombie:
                return True
    return False


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass(eq=False)
class Process:
    """A child program we started, leader of its own process group (and session)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    shm_prefix: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the program, wait up to ``timeout``, then SIGKILL what is left of its group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self._sweep()

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, as the chaos harness and tests want it."""
        _signal_group(self.popen.pid, signal.SIGKILL)
        self._sweep()

    def _sweep(self) -> None:
        # The group outlives its leader while a member (a backend stub) is alive.
        _signal_group(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        _wait_group_gone(self.popen.pid, 5.0)  # SIGKILL is asynchronous; shm goes after them
        if self.shm_prefix:
            remove_shm(self.shm_prefix)
        with _lock:
            if self in _live:
                _live.remove(self)


def spawn(
    name: str,
    cmd: Sequence[str],
    state: Path,
    env: dict[str, str] | None = None,
    *,
    shm_prefix: str | None = None,
    on_spawn: Callable[[Process], None] | None = None,
) -> Process:
    """Start ``cmd`` in a new session, output appended to ``state/<name>.log``."""
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / f"{name}.log"
    with open(log_path, "ab") as fh:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # A terminal's Ctrl-C goes to the foreground group only: the owner decides when
            # children stop, in order, instead of all of them dying at once mid-request.
            start_new_session=True,
        )
    proc = Process(name, popen, log_path, shm_prefix)
    with _lock:
        _live.append(proc)
    if on_spawn is not None:
        on_spawn(proc)
    return proc


def live_processes() -> list[Process]:
    with _lock:
        return list(_live)


def stop_all(timeout: float = 10.0) -> None:
    """Stop every process ``spawn`` started that is still tracked, newest first."""
    for proc in reversed(live_processes()):
        proc.stop(timeout)


# -- processes started by someone else (a state file's PIDs) -------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    pgid: int
    start_ticks: int  # clock ticks after boot: with the PID, names the process uniquely
    zombie: bool
    cmdline: str


def process_info(pid: int) -> ProcessInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcessInfo(
        pid=pid,
        pgid=int(fields[2]),
        start_ticks=int(fields[19]),
        zombie=fields[0] in ("Z", "X"),
        cmdline=raw.replace(b"\0", b" ").decode(errors="replace").strip(),
    )


def group_members(pgid: int, marker: str, since_ticks: int) -> list[ProcessInfo]:
    """Live processes of group ``pgid`` started no earlier than ``since_ticks`` whose command
    line contains ``marker``: the ones that are provably ours."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = process_info(int(entry.name))
        if (
            info is not None
            and info.pgid == pgid
            and not info.zombie
            and info.start_ticks >= since_ticks
            and marker in info.cmdline
        ):
            found.append(info)
    return found


def _same_and_alive(info: ProcessInfo) -> bool:
    now = process_info(info.pid)
    return now is not None and now.start_ticks == info.start_ticks and not now.zombie


def stop_group(
    pgid: int, marker: str, since_ticks: int, *, timeout: float = 10.0
) -> list[ProcessInfo]:
    """Stop the verified members of a group we did not start: SIGTERM to its leader, then
    SIGKILL to whatever is left (a leader that died hard leaves orphans that ignore SIGTERM)."""
    members = group_members(pgid, marker, since_ticks)
    leader = next((m for m in members if m.pid == pgid), None)
    if leader is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _same_and_alive(leader):
            time.sleep(0.1)
    left = group_members(pgid, marker, since_ticks)
    for m in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGKILL)
    if left:
        _wait_group_gone(pgid, 5.0)
    return members


def descendants(pid: int) -> list[ProcessInfo]:
    """Every live process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        info = process_info(child)
        if info is not None and not info.zombie:
            found.append(info)
        todo.extend(children.get(child, []))
    return found
