"""CPU time and memory of process trees, read from /proc (Linux; no psutil needed).

On a 2-core machine every component (Triton and its Python-backend stubs, the broker, the S3
server, the worker, this harness) competes for the same cores; CPU seconds per component per
phase show where the cores went.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime + stime in seconds) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _all() -> dict[int, tuple[int, float]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def tree_cpu_seconds(
    roots: dict[str, int], alone: frozenset[str] = frozenset()
) -> dict[str, float]:
    """CPU seconds used so far by each named process and its live descendants.

    Names in ``alone`` count that process only (the harness is the parent of everything).
    """
    table = _all()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for name, root in roots.items():
        total, stack, seen = 0.0, [root], set()
        while stack:
            pid = stack.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            total += table[pid][1]
            if name not in alone:
                stack.extend(children.get(pid, []))
        out[name] = total
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Percent of ONE core used per component over ``wall_s`` (200 % = both cores here)."""
    return {
        name: round(100 * max(after.get(name, 0.0) - before.get(name, 0.0), 0.0) / wall_s, 1)
        for name in after
    }


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of one process, in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def machine() -> dict[str, object]:
    import datetime
    import platform
    import subprocess

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    root = Path(__file__).resolve().parents[1]
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or "unknown"
        )
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--",
                "stream_guard",
                "model_repository",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git_commit": commit,
        "pipeline_uncommitted_changes": bool(dirty),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def system_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / TICK


def system_nice_seconds() -> float:
    """CPU seconds all cores have spent in user code of processes with a positive nice value
    (background jobs niced out of the way: they use the cores only when nothing else does)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return int(fields[1]) / TICK


def set_autogroup_nice(roots: dict[str, int], nice: int) -> int:
    """Set the scheduler autogroup nice value of each named process tree; how many processes
    were set.

    With ``kernel.sched_autogroup_enabled`` each session is one scheduling group with an equal
    share, so a job run at ``nice 19`` in another session still takes half the cores from a
    benchmark component started in its own session (every stack component is). Raising the
    benchmark's groups restores what the niced job asked for. Needs CAP_SYS_NICE for a value
    below 0; a failure is skipped (the benchmark then records the contention instead).
    """
    table = _all()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    done, stack, seen = 0, list(roots.values()), set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, []))
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
            done += 1
        except OSError:
            pass
    return done
