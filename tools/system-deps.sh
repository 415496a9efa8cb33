#!/usr/bin/env bash
# System packages the local stack and the tests need, from Debian's archive (idempotent):
#   libpython3.11      tritonserver's Python-backend stub links it
#   chromium, chromium-driver   the review console's end-to-end browser test
#   kcat               "Talking to it with standard Kafka tools" (README), tested with a newer librdkafka
# Installs only what is missing; without root it says what to install and goes on.
set -euo pipefail
missing=()
ldconfig -p | grep -q 'libpython3.11.so.1.0' || missing+=(libpython3.11)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v kcat >/dev/null || missing+=(kcat)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "warning: install these Debian packages for the full test suite: ${missing[*]}" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
