"""`stream-guard eval` names what it scored with, and refuses labels the policy does not define.

Through the real CLI (subprocess) against the session's Triton.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream_guard.build.repository import head_versions
from stream_guard.policy.model import head_model_name, load_policy
from stream_guard.settings import DEFAULT_POLICY

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "stream-guard")
ROWS = [
    {"id": "threat", "text": "I'm going to kill you and your whole family", "labels": ["S1"]},
    {"id": "cake", "text": "Lemon cake with blueberries for Sunday", "labels": []},
    {"id": "cat", "text": "My cat fell asleep on the keyboard again", "labels": ["safe"]},
]


@pytest.fixture
def cli_env(stack) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_GUARD_")}
    return {**base, **stack.env(), "STREAM_GUARD_POLICY__PATH": str(DEFAULT_POLICY)}


def sg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_names_the_policy_head_and_version_it_scored_with(cli_env, stack, tmp_path):
    policy = load_policy(DEFAULT_POLICY)
    head = head_model_name("guard_head", policy.policy_id)
    newest = head_versions(stack.model_repository, head)[-1]
    manifest = write_manifest(tmp_path / "m.jsonl", ROWS)

    plain = sg(cli_env, "eval", str(manifest), "--out", str(tmp_path / "a"), "--no-progress")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0] == (
        f"policy {policy.policy_id} {policy.effective_version}, head {head} version {newest} "
        "(the newest version Triton serves; pin one with --head-version)"
    )
    run = json.loads((tmp_path / "a" / "report.json").read_text())["run"]
    assert (run["policy_id"], run["policy_version"]) == (
        policy.policy_id,
        policy.effective_version,
    )
    assert (run["model_name"], run["model_version"], run["head_version_pinned"]) == (
        head,
        newest,
        False,
    )

    pinned = sg(
        cli_env,
        "eval",
        str(manifest),
        "--out",
        str(tmp_path / "b"),
        "--no-progress",
        "--head-version",
        str(newest),
    )
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.splitlines()[0].endswith(
        f"head {head} version {newest} (pinned by --head-version)"
    )
    run = json.loads((tmp_path / "b" / "report.json").read_text())["run"]
    assert run["head_version_pinned"] is True


def test_eval_refuses_labels_the_policy_does_not_define(cli_env, tmp_path):
    rows = [*ROWS, {"id": "other", "text": "a picture of a fight", "labels": ["violence"]}]
    manifest = write_manifest(tmp_path / "other-taxonomy.jsonl", rows)
    out = tmp_path / "report"
    result = sg(cli_env, "eval", str(manifest), "--out", str(out), "--no-progress")
    assert result.returncode == 2
    err = result.stderr.splitlines()
    assert len(err) == 1, err
    assert re.match(
        rf"error: {re.escape(str(manifest))}:4: unknown labels \['violence'\]; "
        r"policy categories: \['S1', ",
        err[0],
    ), err[0]
    assert not out.exists()
