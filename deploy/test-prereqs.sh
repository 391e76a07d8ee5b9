#!/usr/bin/env bash
# Installs what the test suite needs besides the project's venv: checkov in a venv of its own,
# and from Debian a real Prometheus (and promtool) for the monitoring tests and HAProxy for the
# two-replica cluster test (tests/test_cluster.py). PostgreSQL 15 is
# expected to be installed; the tests start their own cluster.
# Without root or apt, it says what is missing and the tests that need it skip with that reason.
set -uo pipefail

# checkov (tests/test_kubernetes.py) pins many packages of its own, so it gets a venv of its own
# next to .venv (about 50 s to install here); the test finds it at .venv-tools/bin/checkov.
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.venv-tools"
if [ ! -x "$tools/bin/checkov" ]; then
  echo "test-prereqs: installing checkov into $tools" >&2
  { python3 -m venv "$tools" && "$tools/bin/pip" install --quiet --disable-pip-version-check checkov; } \
    || echo "test-prereqs: checkov install failed; tests/test_kubernetes.py's checkov test will skip" >&2
fi

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "test-prereqs: missing ${need[*]} and cannot apt-get install it here; tests needing it will skip" >&2
  exit 0
fi
echo "test-prereqs: installing ${need[*]} from Debian" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "test-prereqs: apt-get install ${need[*]} failed; tests needing it will skip" >&2
# The package starts a system-wide server on :9090 where an init system runs; the tests start
# their own on free ports, so stop it if it came up.
(command -v service >/dev/null 2>&1 && service prometheus stop >/dev/null 2>&1) || true
(command -v service >/dev/null 2>&1 && service haproxy stop >/dev/null 2>&1) || true
exit 0
