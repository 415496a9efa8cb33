# syntax=docker/dockerfile:1
# The stream-guard worker image: `stream-guard serve` (fast worker) or `stream-guard reason`
# (reasoning worker). Installs the package without the `local` and `reasoning` extras: Kafka, S3,
# Triton and the reasoning model server run elsewhere (see helm/stream-guard).
#
#   docker build -t stream-guard:0.1.0 .
#   docker run --rm stream-guard:0.1.0 --help
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/stream-guard \
 && /opt/stream-guard/bin/pip install --upgrade pip
WORKDIR /src
# Dependencies first, so that a code-only change reuses this layer.
COPY pyproject.toml README.md* ./
RUN mkdir stream_guard && touch stream_guard/__init__.py \
 && /opt/stream-guard/bin/pip install . \
 && /opt/stream-guard/bin/pip uninstall -y stream-guard
COPY stream_guard ./stream_guard
RUN /opt/stream-guard/bin/pip install --no-deps .
# The Triton config templates the policy compiler writes head versions from;
# stream_guard.build.repository looks for them next to the installed package.
COPY model_repository /opt/stream-guard/lib/python3.11/site-packages/model_repository
# Byte-compile now: the root filesystem is read-only at run time.
RUN /opt/stream-guard/bin/python -m compileall -q /opt/stream-guard/lib/python3.11/site-packages

FROM ${PYTHON_IMAGE}
# Numeric, so that Kubernetes can verify runAsNonRoot (the chart runs it as 10001 too).
ARG UID=10001
RUN groupadd --system --gid ${UID} stream-guard \
 && useradd --system --uid ${UID} --gid ${UID} --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin stream-guard
COPY --from=build /opt/stream-guard /opt/stream-guard
ENV PATH=/opt/stream-guard/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    STREAM_GUARD_TELEMETRY__HTTP_HOST=0.0.0.0
USER ${UID}:${UID}
WORKDIR /tmp
# /metrics, /healthz, /readyz (config.telemetry.metrics_port)
EXPOSE 9464
# Exec form: the worker is PID 1 and gets SIGTERM itself; it drains in-flight batches within
# STREAM_GUARD_SHUTDOWN_GRACE_S, then exits.
ENTRYPOINT ["stream-guard"]
CMD ["serve"]
