"""The docs a new user reads hold no path of the machine that wrote them, and match the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stream_guard.settings import DEFAULT_POLICY

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "helm" / "stream-guard" / "README.md", *ROOT.glob("docs/*.md")]
MACHINE = re.compile(r"(/work/|/home/[a-z]|/root/|/tmp/pytest-|/Users/[A-Za-z])")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_hold_no_machine_specific_path(doc):
    text = doc.read_text()
    assert str(ROOT) not in text
    assert str(DEFAULT_POLICY) not in text
    bad = [line for line in text.splitlines() if MACHINE.search(line)]
    assert not bad, bad


def test_readme_uses_only_stack_commands_and_options_that_exist():
    from typer.main import get_command

    from stream_guard.cli.app import app

    stack = get_command(app).commands["stack"]
    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"stream-guard stack (\w+)", readme))
    assert {"up", "down", "status", "env"} <= used
    assert used <= set(stack.commands), used - set(stack.commands)
    options = {o for p in stack.commands["up"].params for o in p.opts}
    for option in re.findall(r"stream-guard stack up((?: --[\w-]+)+)", readme):
        assert set(option.split()) <= options, option
    assert "grep ^export" not in readme  # `stack up` keeps stdout open: that never returned
