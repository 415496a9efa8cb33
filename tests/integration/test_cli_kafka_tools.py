"""The README's "Talking to it with standard Kafka tools", run against the local broker.

kcat (Debian package) with the librdkafka of the confluent-kafka wheel on LD_LIBRARY_PATH, as the
README says; Debian's own librdkafka 2.0.2 cannot talk to Tansu, which is checked too so the
README's warning stays true. Skipped where kcat or the wheel is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import publish, read

pytestmark = pytest.mark.integration

KCAT = shutil.which("kcat")
WHEEL_LIBS = Path(sysconfig.get_paths()["purelib"]) / "confluent_kafka.libs"


@pytest.fixture(scope="module")
def librdkafka(tmp_path_factory) -> Path:
    if KCAT is None:
        pytest.skip("kcat is not installed (apt-get install kcat)")
    found = sorted(WHEEL_LIBS.glob("librdkafka-*.so.1"))
    if not found:
        pytest.skip("no recent librdkafka: pip install confluent-kafka (see README)")
    d = tmp_path_factory.mktemp("rdk")
    (d / "librdkafka.so.1").symlink_to(found[0])
    return d


def kcat(*args: str, lib: Path | None = None, stdin: str | None = None, timeout: float = 60):
    env = dict(os.environ)
    if lib is not None:
        env["LD_LIBRARY_PATH"] = str(lib)
    return subprocess.run(
        [KCAT, *args], env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def librdkafka_version(lib: Path | None) -> tuple[int, ...]:
    out = kcat("-V", lib=lib).stdout
    match = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return tuple(int(g) for g in match.groups())


def test_kcat_with_a_recent_librdkafka_lists_consumes_and_produces(stack, topics, librdkafka):
    assert librdkafka_version(librdkafka) >= (2, 6, 0)
    b = stack.bootstrap
    listing = kcat("-b", b, "-L", lib=librdkafka)
    assert listing.returncode == 0, listing.stderr
    assert f'topic "{topics.verdicts}" with 4 partitions' in listing.stdout

    publish(b, topics.verdicts, [(b"u1", b'{"upload_id": "u1"}')])
    consumed = kcat(
        "-b",
        b,
        "-C",
        "-t",
        topics.verdicts,
        "-o",
        "beginning",
        "-e",
        "-f",
        "%k %s\\n",
        lib=librdkafka,
    )
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout.splitlines() == ['u1 {"upload_id": "u1"}']

    event = {"upload_id": "u2", "text": {"caption": "hello"}}
    produced = kcat(
        "-b", b, "-P", "-t", topics.uploads, "-k", "u2", stdin=json.dumps(event), lib=librdkafka
    )
    assert produced.returncode == 0, produced.stderr
    (record,) = read(b, topics.uploads, 1, timeout=30)
    assert (record.key, json.loads(record.value)) == (b"u2", event)


def test_debians_librdkafka_cannot_talk_to_the_local_broker(stack):
    if KCAT is None:
        pytest.skip("kcat is not installed (apt-get install kcat)")
    if librdkafka_version(None) >= (2, 1, 0):
        pytest.skip("this kcat links a newer librdkafka than Debian 12's 2.0.2")
    result = kcat("-b", stack.bootstrap, "-L", "-m", "5", timeout=60)
    assert result.returncode != 0
    assert "ApiVersionRequest failed" in result.stderr
