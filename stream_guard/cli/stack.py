"""`stream-guard stack up | down | status | env`: the local stack as a well-behaved service.

``up`` runs in the foreground (Ctrl-C, SIGTERM or SIGHUP stop every component, including
tritonserver's backend stubs and their shared memory) or, with ``--detach``, in the background
until ``stack down``. Either way ``<state dir>/stack.json`` records each component's PIDs,
ports and health check, and the environment that points workers at it, which ``stack env``
prints for ``eval`` and ``--env-file`` writes for ``source``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from stream_guard.cli.failures import CliError

__all__ = [
    "register",
    "stack_app",
    "stack_down",
    "stack_env",
    "stack_status",
    "stack_up",
]

stack_app = typer.Typer(
    no_args_is_help=True, help="The local stack: real broker, S3 server, Triton (and llama.cpp)."
)

StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="logs, model repository and stack.json (default: ./.stream-guard, "
        "or $STREAM_GUARD_STATE_DIR)",
    ),
]


def _state_dir(value: Path | None) -> Path:
    from stream_guard.dev.stack import STATE_DIR

    return (value or STATE_DIR).absolute()


def _clear_stale(state_dir: Path) -> None:
    """Refuse a second stack in one directory; clean up after one whose owner died."""
    from stream_guard.dev.control import sweep_components
    from stream_guard.dev.state import owner_alive, remove_state

    state = _read(state_dir)
    if state is None:
        return
    if owner_alive(state):
        raise CliError(
            f"a local stack is already running from {state_dir} (pid {state.owner_pid})",
            "`stream-guard stack down` stops it; --state-dir DIR starts a second one",
        )
    swept, shm = sweep_components(state)
    remove_state(state_dir)
    typer.echo(
        f"cleaned up after a stack whose owner (pid {state.owner_pid}) died: "
        f"stopped {', '.join(swept) or 'nothing'}, removed {shm} shared-memory regions",
        err=True,
    )


def _read(state_dir: Path):
    from stream_guard.dev.state import read_state

    try:
        return read_state(state_dir)
    except ValueError as e:
        raise CliError(str(e)) from e


def _topic_names(settings) -> list[str]:
    from stream_guard.cli.tail import roles

    return list(dict.fromkeys(roles(settings).values()))


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    from stream_guard.dev.state import export_lines

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(export_lines(env)) + "\n")
    tmp.replace(path)


def _watch(stack) -> None:
    """Sleep until a signal; say so once when a component exits on its own."""
    reported: set[str] = set()
    while True:
        for name, proc in stack.processes.items():
            code = proc.popen.poll()
            if code is not None and name not in reported:
                reported.add(name)
                typer.echo(
                    f"warning: {name} exited with code {code}; see {proc.log_path}", err=True
                )
        time.sleep(1.0)


def _run_foreground(reasoning: bool, state_dir: Path, env_file: Path | None) -> None:
    from stream_guard.cli.common import settings as load_settings
    from stream_guard.dev.signals import Interrupted, stop_on_signals
    from stream_guard.dev.stack import LocalStack
    from stream_guard.dev.state import (
        StackState,
        export_lines,
        remove_state,
        write_state,
    )

    topics = _topic_names(load_settings())  # a settings error stops us before anything starts
    _clear_stale(state_dir)
    with stop_on_signals():
        state = StackState.for_this_process(state_dir)
        state.env_file = str(env_file.absolute()) if env_file else None
        write_state(state_dir, state)

        def recorded(component) -> None:
            state.components.append(component)
            write_state(state_dir, state)

        stack = LocalStack(state=state_dir, with_reasoning=reasoning, on_component=recorded)
        try:
            typer.echo(f"starting the local stack in {state_dir} ...", err=True)
            try:
                stack.start()
            except (RuntimeError, TimeoutError, FileNotFoundError) as e:
                raise CliError(f"the local stack did not start: {e}", code=1) from e
            stack.create_topics(topics)
            state.env, state.status = stack.env(), "up"
            if env_file:
                _write_env_file(env_file, state.env)
            write_state(state_dir, state)
            typer.echo("\n".join(export_lines(state.env)))
            sys.stdout.flush()
            typer.echo(
                f"# stack is up (pid {os.getpid()}); Ctrl-C or `stream-guard stack down` stops it",
                err=True,
            )
            _watch(stack)
        except Interrupted as e:
            typer.echo(f"{e.signame}: stopping the stack ...", err=True)
        finally:
            state.status = "stopping"
            write_state(state_dir, state)
            stack.stop()
            remove_state(state_dir)
            if env_file:
                env_file.unlink(missing_ok=True)
    typer.echo("stack stopped", err=True)


def _wait_detached(popen: subprocess.Popen, state_dir: Path, log: Path, timeout: float):
    from stream_guard.dev.state import read_state

    deadline = time.monotonic() + timeout
    while True:
        code = popen.poll()
        if code is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise CliError(
                f"the stack did not start (exit {code}): {tail[0]}", f"see {log}", code=1
            )
        state = read_state(state_dir)
        if state is not None and state.owner_pid == popen.pid and state.status == "up":
            return state
        if time.monotonic() > deadline:
            raise CliError(f"the stack was not up after {timeout:.0f}s", f"see {log}", code=1)
        time.sleep(0.3)


def _run_detached(reasoning: bool, state_dir: Path, env_file: Path | None, timeout: float) -> None:
    from stream_guard.cli.common import settings as load_settings
    from stream_guard.dev.signals import stop_on_signals
    from stream_guard.dev.state import export_lines

    load_settings()
    _clear_stale(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "stream_guard.cli.app", "stack", "up"]
    argv += ["--state-dir", str(state_dir)] + (["--reasoning"] if reasoning else [])
    argv += ["--env-file", str(env_file.absolute())] if env_file else []
    log = state_dir / "stack-up.log"
    with log.open("ab") as fh:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True
        )
    try:
        with stop_on_signals(quiet=True):  # SIGTERM while waiting unwinds like Ctrl-C
            state = _wait_detached(popen, state_dir, log, timeout)
    except BaseException:  # a failure, a timeout or a signal while waiting: nothing stays behind
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            popen.wait(120)
        raise
    typer.echo("\n".join(export_lines(state.env)))
    typer.echo(
        f"# stack is up in the background (pid {popen.pid}, log {log}); "
        "`stream-guard stack down` stops it",
        err=True,
    )


@stack_app.command("up")
def stack_up(
    reasoning: Annotated[
        bool, typer.Option(help="also start the llama.cpp reasoning server")
    ] = False,
    state_dir: StateDirOpt = None,
    env_file: Annotated[
        Path | None,
        typer.Option(help="also write the export lines to this file once up; removed at stop"),
    ] = None,
    detach: Annotated[
        bool, typer.Option(help="run in the background; print the export lines once up and return")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="with --detach: seconds to wait for the stack")
    ] = 600.0,
) -> None:
    """Start the local stack; print `export STREAM_GUARD_...` lines once it is up.

    In the foreground Ctrl-C, SIGTERM or SIGHUP stop every component. `eval "$(stream-guard
    stack up --detach)"` starts it in the background and returns.
    """
    state = _state_dir(state_dir)
    if detach:
        _run_detached(reasoning, state, env_file, timeout)
    else:
        _run_foreground(reasoning, state, env_file)


@stack_app.command("down")
def stack_down(
    state_dir: StateDirOpt = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="seconds the stack gets to stop before SIGKILL")
    ] = 60.0,
) -> None:
    """Stop the stack recorded in the state directory, started from any shell."""
    from stream_guard.dev.control import stop_stack

    state = _state_dir(state_dir)
    _read(state)  # a damaged state file is named, not a traceback
    report = stop_stack(state, timeout)
    if report is None:
        typer.echo(f"no local stack recorded in {state}; nothing to stop", err=True)
        return
    names = ", ".join(c.name for c in report.state.components) or "no components"
    pid = report.state.owner_pid
    if report.by_owner:
        msg = f"stopped the stack of pid {pid} ({names})"
    else:
        msg = (
            f"stopped the stack of pid {pid} ({names}); its owner was gone or too slow, "
            f"so these were stopped here: {', '.join(report.swept) or 'none were left'}"
        )
    if report.shm_removed:
        msg += f"; removed {report.shm_removed} shared-memory regions left behind"
    typer.echo(msg, err=True)


def _age(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


@stack_app.command("status")
def stack_status(
    state_dir: StateDirOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="one JSON object instead of a table")
    ] = False,
) -> None:
    """Each component: PID, ports, process and health. Exit 0 when all are healthy, 1 when
    not, 3 when no stack is recorded."""
    import json

    from stream_guard.dev.control import probe
    from stream_guard.dev.state import owner_alive

    state_path = _state_dir(state_dir)
    state = _read(state_path)
    if state is None:
        typer.echo(f"no local stack recorded in {state_path}", err=True)
        raise typer.Exit(3)
    owner = owner_alive(state)
    checks = [probe(c) for c in state.components]
    healthy = owner and state.status == "up" and all(h.healthy for h in checks)
    if json_out:
        typer.echo(json.dumps(_status_document(state, owner, checks, healthy), indent=2))
    else:
        _print_status(state, owner, checks)
    raise typer.Exit(0 if healthy else 1)


def _status_document(state, owner: bool, checks, healthy: bool) -> dict:
    return {
        "state_dir": state.state_dir,
        "status": state.status,
        "owner_pid": state.owner_pid,
        "owner_running": owner,
        "healthy": healthy,
        "components": [
            {
                "name": h.component.name,
                "pid": h.component.pid,
                "ports": h.component.ports,
                "running": h.running,
                "healthy": h.healthy,
                "detail": h.detail,
                "log": h.component.log,
            }
            for h in checks
        ],
    }


def _print_status(state, owner: bool, checks) -> None:
    who = f"pid {state.owner_pid}" + ("" if owner else " (gone: `stack down` cleans up)")
    typer.echo(
        f"stack in {state.state_dir}: {state.status}, owner {who}, "
        f"started {_age(time.time() - state.started_at)} ago"
    )
    typer.echo(f"{'component':<10} {'pid':>7}  {'ports':<34} {'process':<8} health")
    for h in checks:
        ports = " ".join(f"{k}={v}" for k, v in h.component.ports.items())
        process = "running" if h.running else "stopped"
        health = ("ok" if h.healthy else "FAILING") + f" ({h.detail})"
        typer.echo(
            f"{h.component.name:<10} {h.component.pid:>7}  {ports:<34} {process:<8} {health}"
        )


@stack_app.command("env")
def stack_env(
    state_dir: StateDirOpt = None,
    wait: Annotated[
        float, typer.Option(min=0, help="seconds to wait for a stack that is still starting")
    ] = 0.0,
) -> None:
    """Print the export lines of the running stack: eval "$(stream-guard stack env)"."""
    from stream_guard.dev.control import wait_until_up
    from stream_guard.dev.state import export_lines, owner_alive

    state_path = _state_dir(state_dir)
    _read(state_path)
    state = wait_until_up(state_path, wait)
    if state is None:
        raise CliError(
            f"no local stack recorded in {state_path}",
            "start one: `stream-guard stack up --detach` (or pass --state-dir)",
        )
    if not owner_alive(state):
        raise CliError(
            f"the stack recorded in {state_path} is gone (pid {state.owner_pid} exited)",
            "`stream-guard stack down` cleans up after it; then `stream-guard stack up`",
        )
    if state.status != "up":
        raise CliError(
            f"the stack in {state_path} is still {state.status}",
            "wait for it: `stream-guard stack env --wait 600`",
        )
    typer.echo("\n".join(export_lines(state.env)))


def register(app: typer.Typer) -> None:
    app.add_typer(stack_app, name="stack")
