"""Policy configuration checks at load: one policy id, one file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stream_guard.errors import ConfigError
from stream_guard.policy.live import load_configured
from stream_guard.settings import DEFAULT_POLICY, Settings


def _policy(tmp_path: Path, name: str, policy_id: str) -> Path:
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["policy_id"] = policy_id
    data.pop("pack", None)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _settings(default: Path, tenants: dict[str, Path]) -> Settings:
    return Settings().model_copy(
        update={
            "policy": Settings().policy.model_copy(update={"path": default, "tenants": tenants})
        }
    )


def test_two_tenant_files_declaring_one_policy_id_are_refused_naming_both(tmp_path: Path):
    a = _policy(tmp_path, "a", "shared_id")
    b = _policy(tmp_path, "b", "shared_id")
    with pytest.raises(ConfigError) as e:
        load_configured(_settings(_policy(tmp_path, "d", "default_id"), {"t1": a, "t2": b}))
    assert "shared_id" in str(e.value) and "a.yaml" in str(e.value) and "b.yaml" in str(e.value)


def test_tenants_sharing_one_file_or_distinct_ids_load(tmp_path: Path):
    a = _policy(tmp_path, "a", "one")
    b = _policy(tmp_path, "b", "two")
    loaded = load_configured(_settings(_policy(tmp_path, "d", "base"), {"t1": a, "t2": a, "t3": b}))
    assert {t: p.policy_id for t, p in loaded.items()} == {
        "": "base",
        "t1": "one",
        "t2": "one",
        "t3": "two",
    }
