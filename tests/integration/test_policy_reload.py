"""Policy following: a new category goes live in a running deployment, no restart, no loss."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml

from stream_guard.settings import DEFAULT_POLICY
from tests.conftest import publish, read, upload

pytestmark = pytest.mark.integration

GAMBLING = {
    "code": "gambling",
    "name": "Gambling",
    "definition": "Content that promotes betting, casinos, online gambling or wagering money "
    "on games of chance.",
    "examples": [
        "Place your bets now at our online casino and double your money",
        "Join my poker site, first deposit bonus 200 percent",
        "Bet on tonight's match, guaranteed odds at our sportsbook",
        "Spin the slot machines and win the jackpot today",
    ],
}
GAMBLING_TEXT = "Try our new online casino tonight, bet big and win a huge jackpot"


def test_adding_a_category_flags_matching_uploads_without_restart(
    stack, topics, worker_env, start_worker, tmp_path: Path
):
    policy_id = f"reload_{uuid.uuid4().hex[:6]}"
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["policy_id"] = policy_id
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {
        **worker_env,
        "STREAM_GUARD_POLICY__PATH": str(path),
        "STREAM_GUARD_POLICY__RELOAD_INTERVAL_S": "0.5",
    }
    start_worker(env)

    publish(stack.bootstrap, topics.uploads, [(b"before", upload("before", GAMBLING_TEXT))])
    first = read(stack.bootstrap, topics.verdicts, 1, timeout=60)
    before = json.loads(first[0].value)
    assert "gambling" not in [c["code"] for c in before["categories"]]

    data["categories"].append(GAMBLING)
    data["version"] = "2.0.0"
    path.write_text(yaml.safe_dump(data))
    edited_at = time.monotonic()

    # Keep publishing while the worker recompiles and swaps heads: nothing may be lost.
    sent = ["before"]
    flagged_at = None
    for n in range(60):
        uid = f"probe-{n}"
        publish(stack.bootstrap, topics.uploads, [(uid.encode(), upload(uid, GAMBLING_TEXT))])
        sent.append(uid)
        latest = read(stack.bootstrap, topics.verdicts, len(sent), timeout=20)
        mine = json.loads(latest[-1].value) if latest else {}
        codes = {c["code"]: c for c in mine.get("categories", [])}
        if "gambling" in codes:
            flagged_at = time.monotonic()
            assert codes["gambling"]["decision"] != "allow"
            assert "gambling" in mine["flagged"]
            assert mine["policy_version"].startswith("2.0.0+")
            assert mine["policy_version"] != before["policy_version"]
            assert int(mine["model_version"]) > int(before["model_version"])
            break
        time.sleep(0.5)
    assert flagged_at is not None, "the new category never went live"
    assert flagged_at - edited_at < 60

    verdicts = read(stack.bootstrap, topics.verdicts, len(sent), timeout=30, settle=2)
    keys = [r.key.decode() for r in verdicts]
    assert sorted(keys) == sorted(sent), "every upload exactly one verdict, across the swap"
