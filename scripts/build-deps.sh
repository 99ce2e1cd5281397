#!/usr/bin/env bash
# System packages the build needs (the bundled librdkafka is compiled with OpenSSL for TLS and
# SASL/SCRAM): installs what is missing from Debian's packages. Idempotent.
set -euo pipefail
missing=()
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v make >/dev/null || missing+=(make)
command -v cc >/dev/null || missing+=(gcc)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
pkg-config --exists zlib 2>/dev/null || missing+=(zlib1g-dev)
if ((${#missing[@]})); then
  echo "build-deps: installing ${missing[*]}"
  as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
