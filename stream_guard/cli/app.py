"""`stream-guard`: run the workers, talk to a deployment, and run the local stack."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer

from stream_guard.cli.common import settings as _settings
from stream_guard.cli.plain_help import plain_help

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False
)
policy_app = typer.Typer(no_args_is_help=True, help="Validate and compile policies.")
app.add_typer(policy_app, name="policy")
plain_help()
log = logging.getLogger("stream_guard.cli")


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show tracebacks instead of one-line errors")
    ] = False,
) -> None:
    """Handled by `main` (accepted anywhere on the line); declared here for --help."""


def _worker_settings():
    """Settings for a worker: errors before logging starts, warnings as log records."""
    from stream_guard.cli.common import load, log_warnings
    from stream_guard.observability import setup_logging

    settings, _ = load()
    setup_logging(settings.telemetry.log_level, settings.telemetry.log_json)
    log_warnings(log)
    return settings


# -- workers --------------------------------------------------------------------------------


@app.command()
def serve(loglevel: str = "info") -> None:
    """Run the fast-mode worker (Faust agent on the uploads topic)."""
    from stream_guard.agents.fast import create_worker

    settings = _worker_settings()
    worker = create_worker(settings)
    _run_faust(worker.app, loglevel, settings)


def _run_faust(faust_app, loglevel: str, settings) -> None:
    import faust

    from stream_guard.observability import faust_logging_config

    t = settings.telemetry
    faust.Worker(
        faust_app,
        loglevel=loglevel,
        redirect_stdouts=False,
        logging_config=faust_logging_config(t.log_level, t.log_json),
    ).execute_from_commandline()


@app.command()
def reason(loglevel: str = "info") -> None:
    """Run the reasoning-mode worker (Faust agent on the escalations topic)."""
    from stream_guard.agents.reasoning import create_reasoning_worker

    settings = _worker_settings()
    _run_faust(create_reasoning_worker(settings).app, loglevel, settings)


# -- clients --------------------------------------------------------------------------------


@app.command()
def submit(
    files: Annotated[
        list[Path] | None,
        typer.Argument(exists=True, dir_okay=False, help="image files to upload"),
    ] = None,
    text: Annotated[str, typer.Option(help="caption / post text")] = "",
    prompt: Annotated[str, typer.Option(help="a user's chat prompt")] = "",
    response: Annotated[str, typer.Option(help="a model's response to --prompt")] = "",
    tenant: Annotated[str, typer.Option(help="tenant id (selects its policy)")] = "default",
    upload_id: Annotated[str | None, typer.Option(help="default: a new UUID")] = None,
) -> None:
    """Upload local images to S3 and publish an UploadEvent; prints the upload id.

    Everything is checked first (ids, each image with the workers' decoder, the topic); a
    failure after an upload removes what was uploaded.
    """
    from stream_guard.cli.submit import plan
    from stream_guard.cli.submit import submit as run_submit

    settings = _settings()
    sub = plan(
        settings,
        list(files or []),
        text=text,
        prompt=prompt,
        response=response,
        tenant=tenant,
        upload_id=upload_id or uuid.uuid4().hex,
    )
    run_submit(settings, sub)
    typer.echo(sub.event.upload_id)


@app.command()
def tail(
    topic: Annotated[
        str,
        typer.Option(
            help="a role (uploads, verdicts, escalations, review, dlq, ...) or an existing topic"
        ),
    ] = "verdicts",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep waiting for new records until Ctrl-C")
    ] = False,
    idle: Annotated[
        float,
        typer.Option(min=0.1, help="without --follow: stop after this many seconds with no record"),
    ] = 5.0,
    count: Annotated[int, typer.Option(min=0, help="stop after N records (0: no limit)")] = 0,
    upload_id: Annotated[str | None, typer.Option(help="only records of this upload")] = None,
) -> None:
    """Print a topic's records as JSON lines, from the beginning; never creates a topic."""
    from stream_guard.cli.tail import TailOptions
    from stream_guard.cli.tail import tail as run_tail

    opts = TailOptions(topic, count, follow, idle, upload_id)
    seen = asyncio.run(run_tail(_settings(), opts))
    if not follow and seen == 0:
        typer.echo(f"no records (waited {idle:g}s idle; --follow waits for new ones)", err=True)


@app.command()
def moderate(
    files: Annotated[
        list[Path] | None, typer.Argument(exists=True, dir_okay=False, help="image files")
    ] = None,
    text: Annotated[str, typer.Option(help="caption / post text")] = "",
    policy: Annotated[Path | None, typer.Option(help="policy file (default: settings)")] = None,
) -> None:
    """Moderate local files plus text straight through Triton (no Kafka, no S3)."""
    from stream_guard.cli.moderate import moderate_local

    settings = _settings()
    verdict = asyncio.run(moderate_local(settings, list(files or []), text, policy))
    typer.echo(verdict.model_dump_json(indent=2, exclude_none=True))


# -- policies -------------------------------------------------------------------------------


@policy_app.command("validate")
def policy_validate(path: Path) -> None:
    """Check a policy file; exits 1 with the reason when it is invalid."""
    from stream_guard.errors import PolicyError
    from stream_guard.policy.model import load_policy

    try:
        p = load_policy(path)
    except PolicyError as e:
        typer.echo(f"invalid: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"ok: {p.policy_id} {p.effective_version}, {len(p.categories)} categories")


@policy_app.command("compile")
def policy_compile(
    path: Path,
    repository: Annotated[Path, typer.Option(help="model repository to add the head to")] = Path(
        ".stream-guard/model_repository"
    ),
) -> None:
    """Compile a policy into a new head version in a model repository, with the text tower the
    repository serves (MiniLM unless an exported tower is there), run locally."""
    from stream_guard.build.repository import build_text_encoder, cached_embed, write_head
    from stream_guard.build.text_encoder import served_tower
    from stream_guard.policy.compiler import compile_head
    from stream_guard.policy.model import load_policy

    p = load_policy(path)
    build_text_encoder(repository)
    embed, signals = served_tower(repository)
    head = write_head(
        repository, compile_head(p, cached_embed(embed, repository), text_signals=signals)
    )
    typer.echo(f"{head.model_name} version {head.version}: {p.policy_id} {p.effective_version}")


# -- local stack and demo ----------------------------------------------------------------


@app.command()
def demo(
    reasoning: bool = typer.Option(True, help="also run the reasoning tier (llama.cpp)"),
) -> None:
    """Start the local stack, push sample uploads, print their verdicts, stop."""
    from stream_guard.dev.demo import run_demo

    sys.exit(run_demo(with_reasoning=reasoning))


@app.command()
def config() -> None:
    """Print the effective settings (secrets masked)."""
    typer.echo(json.dumps(_settings().as_dict(), indent=2, default=str))


# Command groups living in their own modules (imported last: they import this module's app).
from stream_guard.cli.eval import register as _register_eval  # noqa: E402
from stream_guard.cli.model import register as _register_model  # noqa: E402
from stream_guard.cli.stack import register as _register_stack  # noqa: E402

__all__ = [
    "app",
    "config",
    "demo",
    "main",
    "moderate",
    "policy_app",
    "policy_compile",
    "policy_validate",
    "reason",
    "serve",
    "submit",
    "tail",
]

_register_stack(app)
_register_model(app)
_register_eval(app)
__import__("stream_guard.cli.review", fromlist=["register"]).register(app)  # review, promote


def main() -> None:
    """The `stream-guard` entry point: errors as one or two lines (see cli/failures.py)."""
    from stream_guard.cli.failures import run

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(run(typer.main.get_command(app), sys.argv[1:]))


if __name__ == "__main__":
    main()
