"""`stream-guard`: run the workers, talk to a deployment, and run the local stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
policy_app = typer.Typer(no_args_is_help=True, help="Validate and compile policies.")
stack_app = typer.Typer(no_args_is_help=True, help="The local stack (real broker, S3, Triton).")
app.add_typer(policy_app, name="policy")
app.add_typer(stack_app, name="stack")


def _settings():
    from stream_guard.settings import Settings

    return Settings()


# -- workers --------------------------------------------------------------------------------


@app.command()
def serve(loglevel: str = "info") -> None:
    """Run the fast-mode worker (Faust agent on the uploads topic)."""
    from stream_guard.agents.fast import create_worker
    from stream_guard.observability import setup_logging

    settings = _settings()
    setup_logging(settings.telemetry.log_level, settings.telemetry.log_json)
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
    from stream_guard.observability import setup_logging

    settings = _settings()
    setup_logging(settings.telemetry.log_level, settings.telemetry.log_json)
    _run_faust(create_reasoning_worker(settings).app, loglevel, settings)


# -- clients --------------------------------------------------------------------------------


def _upload_files(settings, upload_id: str, files: list[Path]) -> list[dict[str, str]]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3.endpoint_url,
        region_name=settings.s3.region,
        aws_access_key_id=settings.s3.access_key_id,
        aws_secret_access_key=settings.s3.secret_access_key.get_secret_value()
        if settings.s3.secret_access_key
        else None,
    )
    bucket = settings.s3.allowed_buckets[0]
    refs = []
    for n, path in enumerate(files):
        key = f"uploads/{upload_id}/{n}-{path.name}"
        s3.upload_file(str(path), bucket, key)
        refs.append({"uri": f"s3://{bucket}/{key}"})
    return refs


@app.command()
def submit(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)] = None,  # type: ignore[assignment]
    text: Annotated[str, typer.Option(help="caption / post text")] = "",
    prompt: str = "",
    response: str = "",
    tenant: str = "default",
    upload_id: Annotated[str | None, typer.Option(help="default: a new UUID")] = None,
) -> None:
    """Upload local image files to S3 and publish an UploadEvent for them."""
    from stream_guard.events import UploadEvent

    settings = _settings()
    upload_id = upload_id or uuid.uuid4().hex
    images = _upload_files(settings, upload_id, list(files or []))
    event = UploadEvent.model_validate(
        {
            "upload_id": upload_id,
            "tenant_id": tenant,
            "images": images,
            "text": {
                "caption": text or None,
                "prompt": prompt or None,
                "response": response or None,
            },
        }
    )
    asyncio.run(
        _produce(settings, settings.kafka.topics.uploads, upload_id.encode(), event.to_bytes())
    )
    typer.echo(upload_id)


async def _produce(settings, topic: str, key: bytes, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


@app.command()
def tail(
    topic: Annotated[
        str, typer.Option(help="verdicts | escalations | review | dlq, or a name")
    ] = "verdicts",
    count: Annotated[int, typer.Option(help="stop after N records (0 = forever)")] = 0,
    timeout: Annotated[
        float, typer.Option(help="stop after this many seconds idle (0 = never)")
    ] = 0,
    upload_id: Annotated[str | None, typer.Option(help="only this upload")] = None,
) -> None:
    """Print records of a topic as JSON lines, from the beginning."""
    settings = _settings()
    name = getattr(settings.kafka.topics, topic, topic)
    asyncio.run(_tail(settings, name, count, timeout, upload_id))


async def _tail(settings, topic: str, count: int, timeout: float, upload_id: str | None) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
        enable_auto_commit=False,
    )
    await consumer.start()
    seen, last = 0, time.monotonic()
    try:
        while count == 0 or seen < count:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                for m in msgs:
                    if upload_id and (m.key or b"").decode(errors="replace") != upload_id:
                        continue
                    typer.echo(m.value.decode(errors="replace"))
                    seen += 1
                    last = time.monotonic()
            if timeout and time.monotonic() - last > timeout:
                break
    finally:
        await consumer.stop()


@app.command()
def moderate(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)] = None,  # type: ignore[assignment]
    text: str = "",
    policy: Annotated[Path | None, typer.Option(help="policy file (default: settings)")] = None,
) -> None:
    """Moderate local files plus text straight through Triton (no Kafka, no S3)."""
    from stream_guard.cli.moderate import moderate_local
    from stream_guard.errors import StreamGuardError

    settings = _settings()
    try:
        verdict = asyncio.run(moderate_local(settings, list(files or []), text, policy))
    except StreamGuardError as e:
        typer.echo(json.dumps({"error": str(e)}), err=True)
        raise typer.Exit(2) from e
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
    """Compile a policy into a new head version in a model repository (local text tower)."""
    from stream_guard.build.repository import build_text_encoder, write_head
    from stream_guard.build.text_encoder import TextEmbedder, default_minilm_dir
    from stream_guard.policy.compiler import compile_head
    from stream_guard.policy.model import load_policy

    p = load_policy(path)
    onnx_path = build_text_encoder(repository)
    embedder = TextEmbedder.from_model_dir(default_minilm_dir(), onnx_path=onnx_path)
    head = write_head(repository, compile_head(p, embedder.embed))
    typer.echo(f"{head.model_name} version {head.version}: {p.policy_id} {p.effective_version}")


# -- local stack ----------------------------------------------------------------------------


@stack_app.command("up")
def stack_up(
    reasoning: bool = typer.Option(False, help="also start the llama.cpp reasoning server"),
) -> None:
    """Start the local stack and print the environment that points workers at it (Ctrl-C stops)."""
    from stream_guard.dev.stack import LocalStack

    stack = LocalStack(with_reasoning=reasoning)
    with stack.running():
        from stream_guard.settings import Settings

        stack.create_topics(_topic_names(Settings()))
        for k, v in stack.env().items():
            typer.echo(f"export {k}='{v}'")
        typer.echo("# stack is up; Ctrl-C to stop", err=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _topic_names(settings) -> list[str]:
    t = settings.kafka.topics
    return [t.uploads, t.verdicts, t.escalations, t.review, t.dlq]


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
    "stack_app",
    "stack_up",
    "submit",
    "tail",
]

_register_model(app)
_register_eval(app)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
