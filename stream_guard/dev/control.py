"""Stop, inspect and wait for a local stack from its state file, from any shell.

``stop_stack`` asks the owner (``stream-guard stack up``) to stop with SIGTERM and waits for it;
when the owner is gone (SIGKILLed, crashed) or does not finish in time, it stops each recorded
process group itself and removes the shared-memory regions left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from stream_guard.dev.processes import process_info, remove_shm, stop_group
from stream_guard.dev.state import (
    Component,
    StackState,
    owner_alive,
    read_state,
    remove_state,
)

__all__ = [
    "Health",
    "StopReport",
    "probe",
    "stop_stack",
    "sweep_components",
    "wait_until_up",
]


@dataclass(frozen=True)
class Health:
    component: Component
    running: bool
    healthy: bool
    detail: str


def _alive(pid: int, start_ticks: int) -> bool:
    info = process_info(pid)
    return info is not None and not info.zombie and info.start_ticks == start_ticks


def probe(component: Component, timeout: float = 1.0) -> Health:
    """Is the component's process running, and does it answer its health check?"""
    running = _alive(component.pid, component.start_ticks)
    if not running:
        return Health(component, False, False, "not running")
    if component.health_url is None:
        port = next(iter(component.ports.values()))
        with socket.socket() as s:
            s.settimeout(timeout)
            ok = s.connect_ex(("127.0.0.1", port)) == 0
        return Health(component, True, ok, f"tcp {port} {'open' if ok else 'closed'}")
    try:
        code = httpx.get(component.health_url, timeout=timeout).status_code
    except httpx.HTTPError as e:
        return Health(component, True, False, f"{component.health_url}: {type(e).__name__}")
    return Health(component, True, code < 400, f"{component.health_url} -> {code}")


@dataclass(frozen=True)
class StopReport:
    state: StackState
    by_owner: bool  # the owner stopped everything itself
    swept: list[str]  # components whose processes we stopped ourselves
    shm_removed: int


def _wait_gone(pid: int, start_ticks: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid, start_ticks):
            return True
        time.sleep(0.2)
    return not _alive(pid, start_ticks)


def sweep_components(state: StackState, timeout: float = 10.0) -> tuple[list[str], int]:
    """Stop every recorded component group and remove its shared memory; newest first."""
    swept, shm = [], 0
    for c in reversed(state.components):
        if stop_group(c.pid, c.marker, c.start_ticks, timeout=timeout):
            swept.append(c.name)
        if c.shm_prefix:
            shm += len(remove_shm(c.shm_prefix))
    return swept, shm


def stop_stack(state_dir: Path, timeout: float = 60.0) -> StopReport | None:
    """Stop the stack recorded in ``state_dir``; None when none is recorded."""
    state = read_state(state_dir)
    if state is None:
        return None
    by_owner = False
    if owner_alive(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.owner_pid, signal.SIGTERM)
        by_owner = _wait_gone(state.owner_pid, state.owner_start_ticks, timeout)
        if not by_owner:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.owner_pid, signal.SIGKILL)
    # Whatever the owner could not stop (or never got to) is stopped here, verified by group.
    swept, shm = sweep_components(state)
    remove_state(state_dir)
    if state.env_file:
        with contextlib.suppress(FileNotFoundError):
            Path(state.env_file).unlink()
    return StopReport(state, by_owner and not swept, swept, shm)


def wait_until_up(state_dir: Path, timeout: float) -> StackState | None:
    """The recorded state once the stack is up, its owner has died, or ``timeout`` passed
    (whichever comes first; the caller reads ``status`` and ``owner_alive``); None if no stack
    was recorded by then."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(state_dir)
        if state is not None and (state.status == "up" or not owner_alive(state)):
            return state
        if time.monotonic() >= deadline:
            return state
        time.sleep(0.3)
