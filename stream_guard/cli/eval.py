"""`stream-guard eval | calibrate | eval-baselines | head train`: guard quality on labelled data.

``eval`` and ``calibrate`` score a labelled manifest through the same path as the fast-mode
worker: every row becomes an UploadEvent, its images are decoded and validated by the worker's
own decoder (``Moderator.decode_local``; s3:// images are fetched with the worker's object
store first), and ``Moderator.judge`` scores it through Triton (text tower, image detector,
the policy's compiled head) and applies the policy's thresholds. Rows are sent concurrently,
so Triton's dynamic batcher batches them as it does the worker's traffic.

Registered on the main app by one line in ``cli.py`` (``register(app)``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import numpy as np
import typer

from stream_guard.errors import (
    ConfigError,
    StreamGuardError,
)
from stream_guard.quality.scoring import (
    DEFAULT_CONCURRENCY,
    ScoredManifest,
    score_manifest,
)

__all__ = [
    "ConcurrencyOpt",
    "ManifestArg",
    "PolicyOpt",
    "ProgressOpt",
    "SkipOpt",
    "TritonOpt",
    "VersionOpt",
    "calibrate_command",
    "eval_baselines",
    "eval_command",
    "head_train",
    "register",
]

if TYPE_CHECKING:
    from stream_guard.policy.model import Policy
    from stream_guard.quality.manifest import ManifestRow
    from stream_guard.quality.metrics import EscalateAs
    from stream_guard.settings import Settings

log = logging.getLogger(__name__)


def _with_triton_url(settings: Settings, url: str | None) -> Settings:
    if not url:
        return settings
    return settings.model_copy(update={"triton": settings.triton.model_copy(update={"url": url})})


def _score_with_progress(
    settings: Settings,
    policy: Policy,
    rows: list[ManifestRow],
    *,
    head_version: int | None,
    concurrency: int,
    skip_bad_rows: bool,
    progress: bool,
) -> ScoredManifest:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("scoring", total=len(rows))
        return asyncio.run(
            score_manifest(
                settings,
                policy,
                rows,
                head_version=head_version,
                concurrency=concurrency,
                skip_bad_rows=skip_bad_rows,
                on_row=lambda: bar.advance(task),
            )
        )


def _load(manifest: Path, policy_path: Path | None, triton_url: str | None):
    from stream_guard.cli.common import settings as load_settings
    from stream_guard.policy.model import load_policy
    from stream_guard.quality.manifest import read_manifest

    settings = _with_triton_url(load_settings(), triton_url)
    policy_file = policy_path or settings.policy.path
    policy = load_policy(policy_file)
    rows = read_manifest(manifest, codes=policy.codes, check_files=True)
    return settings, policy, policy_file, rows


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


ManifestArg = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, help="labelled manifest (JSONL or CSV)")
]
PolicyOpt = Annotated[Path | None, typer.Option(help="policy file (default: settings)")]
TritonOpt = Annotated[str | None, typer.Option(help="Triton gRPC host:port (default: settings)")]
VersionOpt = Annotated[
    int | None,
    typer.Option(help="score with this head version (default: the one serving the policy)"),
]
ConcurrencyOpt = Annotated[int, typer.Option(min=1, help="uploads in flight to Triton")]
SkipOpt = Annotated[bool, typer.Option(help="leave out rows whose images fail, listing them")]
ProgressOpt = Annotated[bool, typer.Option(help="progress bar on stderr")]


def eval_command(
    manifest: ManifestArg,
    policy: PolicyOpt = None,
    out: Annotated[Path, typer.Option(help="directory for report.json, scores and plots")] = Path(
        "eval-report"
    ),
    triton_url: TritonOpt = None,
    head_version: VersionOpt = None,
    escalate_as: Annotated[
        str, typer.Option(help="count escalations as 'unsafe' (flagged) or 'safe'")
    ] = "unsafe",
    concurrency: ConcurrencyOpt = DEFAULT_CONCURRENCY,
    skip_bad_rows: SkipOpt = False,
    progress: ProgressOpt = True,
    worst: Annotated[
        int, typer.Option(min=0, help="list this many worst false positives and negatives")
    ] = 10,
) -> None:
    """Score a labelled manifest through Triton and report SafeVision's metrics and plots,
    per slice when rows name one, with the worst false positives and false negatives."""
    from stream_guard.quality.metrics import evaluate, format_report, write_plots

    if escalate_as not in ("unsafe", "safe"):
        raise typer.BadParameter("--escalate-as must be 'unsafe' or 'safe'")
    try:
        settings, pol, policy_file, rows = _load(manifest, policy, triton_url)
        scored = _score_with_progress(
            settings,
            pol,
            rows,
            head_version=head_version,
            concurrency=concurrency,
            skip_bad_rows=skip_bad_rows,
            progress=progress,
        )
    except StreamGuardError as e:
        raise _fail(e) from e
    report = evaluate(
        scored.codes,
        scored.labels,
        scored.scores,
        scored.decisions,
        escalate_as=cast("EscalateAs", escalate_as),
    )
    thresholds = {c.code: _pair(pol.thresholds_for(c)) for c in pol.categories}
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, scored.scores, scored.labels, out, thresholds=thresholds)
    run = _run_info(scored, manifest, policy_file, settings, len(rows))
    run["head_version_pinned"] = head_version is not None
    document = {
        **report.to_dict(),
        "run": run,
        "thresholds": {c: {"allow": a, "block": b} for c, (a, b) in thresholds.items()},
        "plots": {k: p.name for k, p in plots.items()},
        **_failures(scored, cast("EscalateAs", escalate_as), worst),
    }
    (out / "report.json").write_text(json.dumps(document, indent=2) + "\n")
    _write_scores(out / "scores.jsonl", scored)
    typer.echo(_scored_with(scored, head_version))
    typer.echo(format_report(report))
    typer.echo(_format_failures(document))
    _echo_run(scored, out)


def _failures(scored: ScoredManifest, escalate_as: EscalateAs, k: int) -> dict[str, Any]:
    """report.json's ``slices`` (metrics per manifest slice) and ``worst`` (errors to read)."""
    from stream_guard.quality.failures import slice_summaries, worst_errors

    slices = [r.slice for r in scored.rows]
    summaries = slice_summaries(
        scored.codes,
        slices,
        scored.labels,
        scored.scores,
        scored.decisions,
        escalate_as=escalate_as,
    )
    worst = worst_errors(
        scored.codes,
        [r.id for r in scored.rows],
        [r.text for r in scored.rows],
        slices,
        scored.labels,
        scored.scores,
        scored.verdicts,
        k=k,
        escalate_as=escalate_as,
    )
    return {
        "slices": {s.name: {k: v for k, v in vars(s).items() if k != "name"} for s in summaries},
        "worst": {kind: [r.to_dict() for r in rows] for kind, rows in worst.items()},
    }


def _format_failures(document: dict[str, Any]) -> str:
    from stream_guard.quality.failures import ErrorRow, SliceSummary, format_slices, format_worst

    slices = [SliceSummary(name=n, **v) for n, v in document["slices"].items()]
    worst = {k: [ErrorRow(**r) for r in rows] for k, rows in document["worst"].items()}
    parts = [format_slices(slices), format_worst(worst)]
    return "\n" + "\n\n".join(p for p in parts if p)


def calibrate_command(
    manifest: ManifestArg,
    policy: Annotated[Path, typer.Option(help="policy file whose thresholds to calibrate")],
    target_precision: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="precision the block threshold must reach")
    ] = 0.9,
    max_escalation_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="largest share of uploads escalated")
    ] = 0.05,
    write: Annotated[
        Path | None,
        typer.Option(help="calibrated policy file (default: <policy>.calibrated.yaml here)"),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the calibration as JSON")
    ] = None,
    skip_unreachable: Annotated[
        bool, typer.Option(help="keep the current thresholds where the precision is unreachable")
    ] = False,
    fallback_block: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="block threshold where it is unreachable")
    ] = 1.0,
    triton_url: TritonOpt = None,
    head_version: VersionOpt = None,
    concurrency: ConcurrencyOpt = DEFAULT_CONCURRENCY,
    skip_bad_rows: SkipOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Pick per-category allow / block thresholds and write them into a copy of the policy."""
    from stream_guard.quality.calibration import apply_to_policy_yaml, calibrate, format_calibration

    try:
        settings, pol, policy_file, rows = _load(manifest, policy, triton_url)
        scored = _score_with_progress(
            settings,
            pol,
            rows,
            head_version=head_version,
            concurrency=concurrency,
            skip_bad_rows=skip_bad_rows,
            progress=progress,
        )
        result = calibrate(
            scored.codes,
            scored.labels,
            scored.scores,
            target_precision=target_precision,
            max_escalation_rate=max_escalation_rate,
            fallback_block=fallback_block,
        )
        text = apply_to_policy_yaml(
            policy_file.read_text(encoding="utf-8"), result, skip_unreachable=skip_unreachable
        )
    except StreamGuardError as e:
        raise _fail(e) from e
    target = write or Path(f"{policy_file.stem}.calibrated.yaml")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        f"# Thresholds calibrated by `stream-guard calibrate` on {manifest.name} "
        f"({len(scored.rows)} uploads)\n# with {scored.model_name}:{scored.model_version}: "
        f"target precision {target_precision:g}, max escalation rate {max_escalation_rate:g}.\n"
        + text
    )
    if json_out is not None:
        document = {
            **result.to_dict(),
            "run": _run_info(scored, manifest, policy_file, settings, len(rows)),
        }
        json_out.write_text(json.dumps(document, indent=2) + "\n")
    typer.echo(_scored_with(scored, head_version))
    typer.echo(format_calibration(result))
    if result.unreachable:
        typer.echo(
            f"\nprecision {target_precision:g} unreachable for {', '.join(result.unreachable)}: "
            + ("thresholds kept" if skip_unreachable else f"block set to {fallback_block:g}"),
        )
    typer.echo(f"\ncalibrated policy written to {target}")
    _echo_run(scored, None)


def head_train(
    manifest: ManifestArg,
    policy: Annotated[Path, typer.Option(help="policy file the head serves")],
    repository: Annotated[Path, typer.Option(help="model repository to add the head to")] = Path(
        ".stream-guard/model_repository"
    ),
    load: Annotated[
        bool, typer.Option(help="ask Triton (EXPLICIT model control) to load the new version")
    ] = False,
    triton_url: TritonOpt = None,
) -> None:
    """Compile the policy plus the manifest's labelled texts into a new head version.

    The labelled rows join the policy's texts as training data (compile_head extra_texts).
    Rows without text are left out: the trained part reads the text embedding only.
    """
    from stream_guard.build.repository import build_text_encoder, write_head
    from stream_guard.build.text_encoder import served_tower
    from stream_guard.policy.compiler import compile_head
    from stream_guard.policy.model import load_policy
    from stream_guard.quality.manifest import label_matrix, read_manifest

    try:
        pol = load_policy(policy)
        rows = read_manifest(manifest, codes=pol.codes)
        with_text = [r for r in rows if r.text]
        if not with_text:
            raise ConfigError(f"{manifest} has no rows with text to train on")
        labels = label_matrix(with_text, pol.codes)
        build_text_encoder(repository)  # MiniLM unless an exported tower is served there
        embed, signals = served_tower(repository)
        compiled = compile_head(
            pol,
            embed,
            extra_texts=[r.text for r in with_text],
            extra_labels=labels,
            text_signals=signals,
        )
        head = write_head(repository, compiled)
        _add_training_metadata(
            repository / head.model_name / str(head.version) / "policy.json",
            {
                "manifest": str(manifest),
                "rows": len(with_text),
                "rows_without_text": len(rows) - len(with_text),
                "positives": {c: int(labels[:, j].sum()) for j, c in enumerate(pol.codes)},
                "safe": int((~labels.any(axis=1)).sum()),
            },
        )
        if load:
            asyncio.run(_load_in_triton(triton_url, head.model_name))
    except StreamGuardError as e:
        raise _fail(e) from e
    typer.echo(
        f"{head.model_name} version {head.version}: {pol.policy_id} {pol.effective_version}, "
        f"trained on {len(with_text)} labelled rows "
        f"({len(rows) - len(with_text)} without text left out)"
        + ("; loaded in Triton" if load else "")
    )


def eval_baselines(
    manifests: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="labelled sets to score")
    ],
    policy: PolicyOpt = None,
    train: Annotated[
        Path | None,
        typer.Option(help="labelled split for the `head train` system (disjoint from the sets)"),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write the results as JSON")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(min=0, help="paired bootstrap rounds for the differences (0: none)")
    ] = 1000,
) -> None:
    """Compiled head vs the naive nearest-prototype head and a TF-IDF classifier (in-process)."""
    from stream_guard.build.text_encoder import TextEmbedder, default_minilm_dir
    from stream_guard.cli.common import settings as load_settings
    from stream_guard.policy.model import load_policy
    from stream_guard.quality.compare import (
        LabelledTexts,
        compare,
        differences,
        format_differences,
        format_markdown,
    )
    from stream_guard.quality.manifest import read_manifest
    from stream_guard.triton import N_SIGNALS

    try:
        pol = load_policy(policy or load_settings().policy.path)
        datasets = {
            m.stem: LabelledTexts.from_rows(read_manifest(m, codes=pol.codes), pol.codes)
            for m in manifests
        }
        split = (
            LabelledTexts.from_rows(read_manifest(train, codes=pol.codes), pol.codes)
            if train is not None
            else None
        )
        if split is not None:
            overlap = set(split.texts) & {t for d in datasets.values() for t in d.texts}
            if overlap:
                raise ConfigError(
                    f"--train shares {len(overlap)} texts with the evaluated sets, e.g. "
                    f"{sorted(overlap)[0]!r}: the split must be disjoint"
                )
        embedder = TextEmbedder.from_model_dir(default_minilm_dir())
        results = compare(pol, _cached(embedder.embed), datasets, split, n_signals=N_SIGNALS)
    except (StreamGuardError, RuntimeError) as e:
        raise _fail(e) from e
    typer.echo(format_markdown(results, pol.codes))
    diffs = differences(results, rounds=bootstrap) if bootstrap else []
    if diffs:
        typer.echo("\n" + format_differences(diffs))
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "policy_id": pol.policy_id,
                    "policy_version": pol.effective_version,
                    "results": [r.to_dict() for r in results],
                    "differences": [vars(d) for d in diffs],
                },
                indent=2,
            )
            + "\n"
        )


def _cached(embed: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
    table: dict[str, np.ndarray] = {}

    def cached(texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in table]
        if missing:
            table.update(zip(missing, embed(missing), strict=True))
        return np.stack([table[t] for t in texts])

    return cached


async def _load_in_triton(url: str | None, model_name: str) -> None:
    from stream_guard.cli.common import settings as load_settings
    from stream_guard.triton import GuardModels

    models = GuardModels(_with_triton_url(load_settings(), url).triton)
    try:
        await models.load_model(model_name)
    finally:
        await models.close()


def _add_training_metadata(path: Path, training: dict[str, Any]) -> None:
    meta = json.loads(path.read_text())
    meta["training"] = training
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


def _pair(t: Any) -> tuple[float, float]:
    return (float(t.allow), float(t.block))


def _run_info(
    scored: ScoredManifest, manifest: Path, policy_file: Path, settings: Settings, n_rows: int
) -> dict[str, Any]:
    return {
        "manifest": str(manifest),
        "policy_file": str(policy_file),
        "policy_id": scored.policy_id,
        "policy_version": scored.policy_version,
        "model_name": scored.model_name,
        "model_version": scored.model_version,
        "triton_url": settings.triton.url,
        "rows": n_rows,
        "ocr_applied": False,  # Moderator.judge has no OCR stage (see score_manifest)
        "scored": len(scored.rows),
        "skipped": scored.skipped,
        "seconds": round(scored.seconds, 3),
        "uploads_per_s": round(len(scored.rows) / scored.seconds, 2) if scored.seconds else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _scored_with(scored: ScoredManifest, head_version: int | None) -> str:
    """Which policy and head made these numbers: a new head version changes them."""
    how = (
        "pinned by --head-version"
        if head_version is not None
        else ("the newest version Triton serves; pin one with --head-version")
    )
    return (
        f"policy {scored.policy_id} {scored.policy_version}, head {scored.model_name} "
        f"version {scored.model_version} ({how})"
    )


def _write_scores(path: Path, scored: ScoredManifest) -> None:
    with path.open("w") as fh:
        for i, row in enumerate(scored.rows):
            fh.write(
                json.dumps(
                    {
                        "id": row.id,
                        "slice": row.slice,
                        "labels": list(row.labels),
                        "decision": scored.verdicts[i],
                        "scores": dict(zip(scored.codes, scored.scores[i].tolist(), strict=True)),
                    }
                )
                + "\n"
            )


def _echo_run(scored: ScoredManifest, out: Path | None) -> None:
    rate = len(scored.rows) / scored.seconds if scored.seconds else 0.0
    msg = (
        f"{len(scored.rows)} uploads scored by {scored.model_name}:{scored.model_version} "
        f"({scored.policy_id} {scored.policy_version}) in {scored.seconds:.1f}s "
        f"({rate:.1f}/s)"
    )
    if scored.skipped:
        msg += f"; {len(scored.skipped)} rows skipped: " + ", ".join(
            s["id"] for s in scored.skipped[:10]
        )
    if out is not None:
        msg += f"; report in {out}"
    typer.echo(msg, err=True)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the main ``stream-guard`` app."""
    app.command("eval")(eval_command)
    app.command("calibrate")(calibrate_command)
    app.command("eval-baselines")(eval_baselines)
    head_app = typer.Typer(no_args_is_help=True, help="Train classification heads from labels.")
    head_app.command("train")(head_train)
    app.add_typer(head_app, name="head")
