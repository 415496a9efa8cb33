"""The state file of a running local stack: ``<state dir>/stack.json``.

``stream-guard stack up`` writes it as components start (before they are ready, so a stack
killed mid-start can still be cleaned up) and removes it when it has stopped everything.
``stack down``, ``stack status`` and ``stack env`` read it from any other shell. Each PID is
stored with its start time and a command-line marker, so a PID the kernel has since given to
another program is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from stream_guard.dev.processes import Process, process_info

__all__ = [
    "Component",
    "STATE_FILE",
    "StackState",
    "Status",
    "export_lines",
    "owner_alive",
    "read_state",
    "remove_state",
    "write_state",
]

STATE_FILE = "stack.json"
Status = Literal["starting", "up", "stopping"]


@dataclass
class Component:
    name: str  # kafka, s3, triton, reasoning
    pid: int
    start_ticks: int
    marker: str  # a string every process of its group has on its command line
    ports: dict[str, int]
    health_url: str | None  # None: a TCP connect to the first port is the health check
    log: str
    shm_prefix: str | None = None

    @classmethod
    def of(
        cls, name: str, proc: Process, marker: str, ports: dict[str, int], health: str | None
    ) -> Component:
        info = process_info(proc.pid)
        return cls(
            name=name,
            pid=proc.pid,
            start_ticks=info.start_ticks if info else 0,
            marker=marker,
            ports=ports,
            health_url=health,
            log=str(proc.log_path),
            shm_prefix=proc.shm_prefix,
        )


@dataclass
class StackState:
    owner_pid: int
    owner_start_ticks: int
    state_dir: str
    status: Status = "starting"
    started_at: float = field(default_factory=time.time)
    components: list[Component] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    env_file: str | None = None

    @classmethod
    def for_this_process(cls, state_dir: Path) -> StackState:
        info = process_info(os.getpid())
        return cls(os.getpid(), info.start_ticks if info else 0, str(state_dir))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackState:
        comps = [Component(**c) for c in data.pop("components", [])]
        return cls(**data, components=comps)


def write_state(state_dir: Path, state: StackState) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(state.to_json())
    tmp.replace(state_dir / STATE_FILE)  # readers never see half a file


def read_state(state_dir: Path) -> StackState | None:
    path = state_dir / STATE_FILE
    try:
        return StackState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is not a stack state file ({e}); remove it") from e


def remove_state(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()


def owner_alive(state: StackState) -> bool:
    info = process_info(state.owner_pid)
    return info is not None and not info.zombie and info.start_ticks == state.owner_start_ticks


def export_lines(env: dict[str, str]) -> list[str]:
    """``export NAME='value'`` lines a POSIX shell can ``eval`` or ``source``."""
    return [f"export {k}='{_quote(v)}'" for k, v in env.items()]


def _quote(value: str) -> str:
    return value.replace("'", "'\"'\"'")
