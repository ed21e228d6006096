#!/usr/bin/env bash
# System packages the test suite drives for real: redis-server (private Redis instances), nginx and
# prometheus (the deploy end-to-end test), docker-compose (validates docker-compose.yml without an
# engine), chromium (the browser tests), node with npm (hub.js under Node, tests/test_node.py, and
# the docs' examples), curl (the docs' examples, run as written) and valgrind (callgrind counts
# Redis's instructions per notify in bench/inbox_redis.py, which a test runs).
# Installs only what is missing, with apt-get (Debian).
set -euo pipefail
declare -A package=(
  [redis-server]=redis-server
  [nginx]=nginx
  [prometheus]=prometheus
  [docker-compose]=docker-compose
  [chromium]=chromium
  [node]=nodejs
  [npm]=npm
  [curl]=curl
  [valgrind]=valgrind
  [callgrind_control]=valgrind
)
missing=()
for cmd in "${!package[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${package[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]}; install them with your package manager" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null || true
# --no-install-recommends keeps prometheus from pulling in its exporters; nothing is started here
# (policy-rc.d), the tests start their own instances.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  trap '$sudo rm -f "$policy"' EXIT
fi
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
