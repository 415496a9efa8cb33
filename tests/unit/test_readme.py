"""The README stays true: every setting documented, the two commands, CI runs the tests."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from stream_guard.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _env_names(model: type[BaseModel], prefix: str = "STREAM_GUARD_"):
    for name, field in model.model_fields.items():
        if isinstance(field.default, BaseModel):
            yield from _env_names(type(field.default), f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in _env_names(Settings) if f"`{n}`" not in readme]
    assert not missing, f"README configuration reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
