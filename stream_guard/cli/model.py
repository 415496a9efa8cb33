"""`stream-guard model ...`: export dual encoders, write model repositories, build engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, cast

import typer

__all__ = [
    "build_engines",
    "export",
    "model_app",
    "register",
    "repository",
]

model_app = typer.Typer(
    no_args_is_help=True, help="Export encoders, write model repositories, build TensorRT engines."
)


@model_app.command("export")
def export(
    source: Annotated[str, typer.Argument(help="Hugging Face hub id or local model directory")],
    out: Annotated[Path, typer.Option(help="directory for the ONNX towers and export.json")],
    kind: Annotated[
        str, typer.Option(help="auto | clip | siglip | text (a text encoder for the text tower)")
    ] = "auto",
    exporter: Annotated[str, typer.Option(help="auto | dynamo | torchscript")] = "auto",
    verify: Annotated[bool, typer.Option(help="compare with PyTorch on random inputs")] = True,
    tolerance: Annotated[
        float, typer.Option(help="fail when an embedding or score differs by more")
    ] = 1e-4,
    repository: Annotated[
        Path | None, typer.Option(help="also write the towers into this model repository")
    ] = None,
    flavour: Annotated[str, typer.Option(help="repository flavour: cpu | gpu")] = "cpu",
    prefix: Annotated[
        str | None, typer.Option(help="model name prefix in the repository (default: kind)")
    ] = None,
    signals: Annotated[
        list[str] | None,
        typer.Option(help="--kind text: a sequence classifier whose labels become text signals"),
    ] = None,
    pooling: Annotated[str, typer.Option(help="--kind text: mean | cls")] = "mean",
    max_length: Annotated[int, typer.Option(min=8, help="--kind text: tokens read")] = 128,
    text_prefix: Annotated[
        str, typer.Option(help='--kind text: prepended to every text (E5: "query: ")')
    ] = "",
    trust_remote_code: Annotated[
        bool, typer.Option(help="--kind text: run the checkpoint's own modelling code")
    ] = False,
) -> None:
    """Export a CLIP / SigLIP model's image and text towers, or (--kind text) a Hugging Face
    text encoder and sequence classifiers as the guard's text tower, to ONNX with dynamic batch."""
    from stream_guard.build.export import Exporter, Kind, export_dual_encoder, write_towers
    from stream_guard.build.text_export import is_text_encoder
    from stream_guard.errors import StreamGuardError

    if kind not in ("auto", "clip", "siglip", "text"):
        raise typer.BadParameter(f"--kind must be auto, clip, siglip or text, not {kind!r}")
    try:
        text = kind == "text" or (kind == "auto" and is_text_encoder(source, trust_remote_code))
    except StreamGuardError as e:
        typer.echo(f"export failed: {e}", err=True)
        raise typer.Exit(1) from e
    if text:
        _export_text(
            source,
            out,
            dict(
                signals=signals or [],
                pooling=pooling,
                max_length=max_length,
                prefix=text_prefix,
                trust_remote_code=trust_remote_code,
            ),
            repository,
            flavour,
            tolerance,
        )
        return
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise typer.BadParameter(
            f"--exporter must be auto, dynamo or torchscript, not {exporter!r}"
        )
    try:
        report = export_dual_encoder(
            source, out, kind=cast(Kind, kind), exporter=cast(Exporter, exporter), verify=verify
        )
        names = write_towers(out, repository, prefix=prefix, flavour=flavour) if repository else {}
    except (StreamGuardError, OSError) as e:
        typer.echo(f"export failed: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(json.dumps({"report": json.loads(report.to_json()), "models": names}, indent=2))
    worst = max(report.max_abs_error.values(), default=0.0)
    if verify and worst > tolerance:
        typer.echo(f"max abs error {worst:.3g} exceeds the tolerance {tolerance:g}", err=True)
        raise typer.Exit(3)


def _export_text(source, out, options, repository, flavour, tolerance) -> None:
    from stream_guard.build.text_export import export_text_tower, signal_names, write_text_tower
    from stream_guard.errors import StreamGuardError

    try:
        report = export_text_tower(source, out, **options)
        model = write_text_tower(out, repository, flavour=flavour) if repository else None
    except (StreamGuardError, OSError) as e:
        typer.echo(f"export failed: {e}", err=True)
        raise typer.Exit(1) from e
    document = {"report": json.loads(report.to_json()), "text_signals": signal_names(report)}
    typer.echo(json.dumps({**document, "models": {"text": model} if model else {}}, indent=2))
    if model:
        typer.echo(
            f"{repository}/{model} now serves this tower: recompile heads on it "
            f"(`stream-guard model repository {repository}`, or a worker given the repository)",
            err=True,
        )
    worst = max(report.max_abs_error.values(), default=0.0)
    if worst > tolerance:
        typer.echo(f"max abs error {worst:.3g} exceeds the tolerance {tolerance:g}", err=True)
        raise typer.Exit(3)


@model_app.command("repository")
def repository(
    out: Annotated[Path, typer.Argument(help="directory to write the repository to")],
    flavour: Annotated[str, typer.Option(help="cpu | gpu")] = "cpu",
    policy: Annotated[
        list[Path] | None, typer.Option(help="policy file(s); default: the settings' policy")
    ] = None,
) -> None:
    """Write a complete model repository (towers, OCR, one head per policy) in a flavour."""
    from stream_guard.build.repository import build_repository
    from stream_guard.cli.common import settings as load_settings
    from stream_guard.policy.model import load_policy

    if flavour not in ("cpu", "gpu"):
        raise typer.BadParameter(f"--flavour must be cpu or gpu, not {flavour!r}")
    paths = policy or [load_settings().policy.path]
    heads = build_repository(out, [load_policy(p) for p in paths], flavour=flavour)
    for h in heads:
        typer.echo(f"{h.model_name} version {h.version}: {h.policy_id} {h.policy_version}")
    if flavour == "gpu":
        typer.echo(f"next, on the GPU host: stream-guard model build-engines {out}", err=True)


@model_app.command("build-engines")
def build_engines(
    repo: Annotated[Path, typer.Argument(help="GPU-flavour model repository")],
    fp16: Annotated[bool, typer.Option(help="allow FP16 kernels")] = False,
    force: Annotated[bool, typer.Option(help="rebuild plans that look up to date")] = False,
    opt_batch: Annotated[int, typer.Option(help="batch size TensorRT tunes for")] = 32,
) -> None:
    """Convert each tensorrt_plan model's ONNX to a TensorRT plan (needs an NVIDIA GPU)."""
    from stream_guard.build.engines import GpuUnavailable
    from stream_guard.build.engines import build_engines as build
    from stream_guard.errors import StreamGuardError

    try:
        results = build(repo, fp16=fp16, force=force, opt_batch=opt_batch)
    except GpuUnavailable as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from e
    except StreamGuardError as e:
        typer.echo(f"engine build failed: {e}", err=True)
        raise typer.Exit(1) from e
    for r in results:
        typer.echo(json.dumps(r.__dict__))
    if not results:
        typer.echo("all plans are up to date", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
