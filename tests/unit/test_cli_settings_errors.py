"""Settings errors name the variable, the value and the expected format; unknown names warn."""

from __future__ import annotations

import pytest

from stream_guard.config_errors import SettingsInvalid, load, unknown_variables
from stream_guard.settings import Settings


@pytest.fixture
def env(monkeypatch):
    """Set STREAM_GUARD_ variables for one test, starting from none."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("STREAM_GUARD_"):
            monkeypatch.delenv(name)

    def set_env(**values: str) -> dict[str, str]:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        return dict(os.environ)

    return set_env


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "STREAM_GUARD_S3__ALLOWED_BUCKETS",
            "uploads",
            "STREAM_GUARD_S3__ALLOWED_BUCKETS='uploads' is not JSON: expected a JSON list of "
            "strings, e.g. '[\"uploads\"]'",
        ),
        (
            "STREAM_GUARD_POLICY__TENANTS",
            "{kids: a.yaml}",
            "STREAM_GUARD_POLICY__TENANTS='{kids: a.yaml}' is not JSON: expected a JSON object",
        ),
        (
            "STREAM_GUARD_S3__MAX_OBJECT_BYTES",
            "20MB",
            "STREAM_GUARD_S3__MAX_OBJECT_BYTES='20MB' is not valid: expected a whole number > 0",
        ),
        (
            "STREAM_GUARD_BATCH__MAX_SIZE",
            "0",
            "STREAM_GUARD_BATCH__MAX_SIZE='0' is not valid: expected a whole number >= 1",
        ),
        (
            "STREAM_GUARD_KAFKA__SECURITY_PROTOCOL",
            "TLS",
            "STREAM_GUARD_KAFKA__SECURITY_PROTOCOL='TLS' is not valid: expected one of "
            "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
        ),
        (
            "STREAM_GUARD_TELEMETRY__LOG_JSON",
            "maybe",
            "STREAM_GUARD_TELEMETRY__LOG_JSON='maybe' is not valid: expected true or false",
        ),
        (
            "STREAM_GUARD_KAFKA__BOOTSTRAP",
            "b1:9092",
            "STREAM_GUARD_KAFKA__BOOTSTRAP is not a stream-guard setting; did you mean "
            "STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS?",
        ),
        (
            "stream_guard_kafka__topics__upload",
            "x",
            "STREAM_GUARD_KAFKA__TOPICS__UPLOAD is not a stream-guard setting; did you mean "
            "STREAM_GUARD_KAFKA__TOPICS__UPLOADS?",
        ),
    ],
)
def test_a_bad_variable_is_named_with_its_value_and_the_format_expected(env, name, value, expected):
    with pytest.raises(SettingsInvalid) as info:
        load(Settings, env(**{name: value}))
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith(expected), info.value.lines[0]


def test_a_secret_value_is_never_shown(env):
    environ = env(STREAM_GUARD_KAFKA='{"sasl_password": "hunter2", "bootstrap_servers": }')
    with pytest.raises(SettingsInvalid) as info:
        load(Settings, environ)
    assert info.value.lines[0].startswith("STREAM_GUARD_KAFKA='***' is not JSON: expected")
    assert "hunter2" not in str(info.value)


def test_every_bad_variable_gets_its_own_line(env):
    environ = env(STREAM_GUARD_BATCH__MAX_SIZE="x", STREAM_GUARD_RETRY__ATTEMPTS="-1")
    with pytest.raises(SettingsInvalid) as info:
        load(Settings, environ)
    assert sorted(line.split("=")[0] for line in info.value.lines) == [
        "STREAM_GUARD_BATCH__MAX_SIZE",
        "STREAM_GUARD_RETRY__ATTEMPTS",
    ]


def test_an_unknown_top_level_variable_warns_with_the_nearest_name(env):
    environ = env(STREAM_GUARD_SHUTDOWN_GRACE="5", STREAM_GUARD_TOTALLY_UNRELATED="1")
    settings, warnings = load(Settings, environ)
    assert settings.shutdown_grace_s == 25.0  # ignored, as the warning says
    assert warnings == [
        "STREAM_GUARD_SHUTDOWN_GRACE is not a stream-guard setting and is ignored; "
        "did you mean STREAM_GUARD_SHUTDOWN_GRACE_S?",
        "STREAM_GUARD_TOTALLY_UNRELATED is not a stream-guard setting and is ignored",
    ]


def test_known_variables_and_the_state_dir_raise_no_warning(env):
    environ = env(
        STREAM_GUARD_STATE_DIR="/tmp/x",
        STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS="b1:9092",
        STREAM_GUARD_S3__ALLOWED_BUCKETS='["a", "b"]',
        STREAM_GUARD_KAFKA__TOPICS='{"uploads": "u"}',
    )
    settings, warnings = load(Settings, environ)
    assert warnings == []
    assert settings.s3.allowed_buckets == ["a", "b"]
    assert settings.kafka.topics.uploads == "u"
    assert unknown_variables(environ, Settings) == []
