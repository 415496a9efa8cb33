"""`stream-guard review-console | review-worker | review export-manifest | policy promote`.

Human review and the loop it closes: the console where people settle ``guard.review``, the worker
that turns their decisions into final verdicts and labelled rows, exporting those rows as one
manifest for ``head train`` / ``calibrate`` / ``eval``, and promoting a candidate policy that beat
the live one on them. Registered on the main app by one line in ``app.py`` (``register(app)``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["export_manifest_command", "promote", "register", "review_console", "review_worker"]

review_app = typer.Typer(no_args_is_help=True, help="Labelled data from reviewer decisions.")


def _settings():
    from stream_guard.settings import Settings

    return Settings()


def _logging(settings) -> None:
    from stream_guard.observability import setup_logging

    setup_logging(settings.telemetry.log_level, settings.telemetry.log_json)


def review_console() -> None:
    """Serve the review console (queue from guard.review, decisions to guard.review.decisions)."""
    from stream_guard.review.console import run_console

    settings = _settings()
    _logging(settings)
    r = settings.review
    typer.echo(f"review console on http://{r.console_host}:{r.console_port}", err=True)
    run_console(settings)


def review_worker(loglevel: str = "info") -> None:
    """Run the review worker: decisions -> final verdicts (mode human) and labelled rows."""
    import faust

    from stream_guard.agents.review import create_review_worker
    from stream_guard.observability import faust_logging_config

    settings = _settings()
    _logging(settings)
    t = settings.telemetry
    faust.Worker(
        create_review_worker(settings).app,
        loglevel=loglevel,
        redirect_stdouts=False,
        logging_config=faust_logging_config(t.log_level, t.log_json),
    ).execute_from_commandline()


def export_manifest_command(
    out: Annotated[Path, typer.Argument(dir_okay=False, help="JSONL manifest to write")],
    source: Annotated[
        str | None,
        typer.Option(help="folder or s3://bucket/prefix (default: STREAM_GUARD_REVIEW__MANIFEST)"),
    ] = None,
) -> None:
    """Gather the labelled rows of reviewer decisions into one manifest (one row per upload)."""
    from stream_guard.errors import StreamGuardError
    from stream_guard.review.labels import export_manifest, open_label_store

    settings = _settings()
    spec = source or settings.review.manifest
    if not spec:
        raise typer.BadParameter("no --source and STREAM_GUARD_REVIEW__MANIFEST is not set")
    try:
        n = export_manifest(open_label_store(spec, settings.s3), out)
    except (StreamGuardError, OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if n == 0:
        typer.echo(f"no labelled rows in {spec} yet", err=True)
        raise typer.Exit(1)
    typer.echo(f"{n} labelled uploads written to {out}")


def promote(
    candidate: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="policy file")],
    manifest: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="labelled manifest both are scored on"),
    ] = None,
    live: Annotated[
        Path | None,
        typer.Option(
            help="live policy file to replace (default: the configured file with the "
            "candidate's policy_id)"
        ),
    ] = None,
    min_gain: Annotated[float, typer.Option(min=0.0, help="accuracy the candidate must add")] = 0.0,
    max_recall_drop: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="recall the candidate may lose")
    ] = 0.0,
    force: Annotated[bool, typer.Option(help="promote without the labelled comparison")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the comparison")] = None,
) -> None:
    """Make a candidate policy live once it beats the live one on labelled data.

    Both are scored on the manifest through Triton as `eval` does; then the candidate's text
    replaces the live policy file atomically and the running workers switch on their next
    reload (no restart, no lost upload)."""
    from stream_guard.errors import StreamGuardError
    from stream_guard.policy.model import load_policy
    from stream_guard.review.promotion import judge, live_policy_file, replace_policy_file

    settings = _settings()
    try:
        cand = load_policy(candidate)
        live_path = live or live_policy_file(settings, cand.policy_id)
        current = load_policy(live_path)
        if current.policy_id != cand.policy_id:
            raise typer.BadParameter(
                f"{live_path} declares {current.policy_id!r}, the candidate {cand.policy_id!r}"
            )
        if current.effective_version == cand.effective_version:
            typer.echo(f"{cand.policy_id} {cand.effective_version} is already live")
            return
        if not force:
            if manifest is None:
                raise typer.BadParameter("--manifest is required (or --force)")
            reports = asyncio.run(_score_both(settings, current, cand, manifest))
            verdict = judge(*reports, min_gain=min_gain, max_recall_drop=max_recall_drop)
            _report(verdict, current, cand, json_out)
            if not verdict.beats:
                typer.echo("not promoted: " + "; ".join(verdict.reasons), err=True)
                raise typer.Exit(1)
        now = replace_policy_file(candidate.read_text(encoding="utf-8"), cand, live_path)
    except StreamGuardError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(
        f"promoted: {live_path} now holds {now.policy_id} {now.effective_version}; workers "
        f"switch within policy.reload_interval_s ({settings.policy.reload_interval_s:g}s)"
    )


async def _score_both(settings, live, candidate, manifest: Path) -> tuple[Any, Any]:
    from stream_guard.errors import ConfigError
    from stream_guard.quality.manifest import read_manifest
    from stream_guard.quality.metrics import evaluate
    from stream_guard.quality.scoring import score_manifest

    rows = read_manifest(manifest, codes=live.codes, check_files=True)
    missing = sorted({label for r in rows for label in r.labels} - set(candidate.codes))
    if missing:
        raise ConfigError(f"the candidate has no categories {missing} that the labels use")
    reports = []
    for policy in (live, candidate):
        scored = await score_manifest(settings, policy, rows)
        reports.append(evaluate(scored.codes, scored.labels, scored.scores, scored.decisions))
    return reports[0], reports[1]


def _report(verdict, live, candidate, json_out: Path | None) -> None:
    typer.echo(
        f"{'':24}{'live':>12}{'candidate':>12}\n"
        f"{'version':24}{live.effective_version:>12}{candidate.effective_version:>12}\n"
        f"{'binary accuracy':24}{verdict.live_accuracy:>12.3f}{verdict.candidate_accuracy:>12.3f}\n"
        f"{'recall':24}{_num(verdict.live_recall):>12}{_num(verdict.candidate_recall):>12}"
    )
    if json_out is not None:
        document = {
            "policy_id": live.policy_id,
            "live": live.effective_version,
            "candidate": candidate.effective_version,
            **{k: v for k, v in vars(verdict).items()},
        }
        json_out.write_text(json.dumps(document, indent=2) + "\n")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main ``stream-guard`` app (and its `policy` group)."""
    app.command("review-console")(review_console)
    app.command("review-worker")(review_worker)
    review_app.command("export-manifest")(export_manifest_command)
    app.add_typer(review_app, name="review")
    for group in app.registered_groups:
        if group.name == "policy" and group.typer_instance is not None:
            group.typer_instance.command("promote")(promote)
