#!/usr/bin/env bash
# Install Debian's prometheus package (as root) unless a prometheus binary is already on PATH.
# The package's own system service (port 9090) is never started: the tests and
# scripts/deploy/monitoring/run_local.sh run their own Prometheus with their own config and data dir.
set -euo pipefail
command -v prometheus >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"   # "do not start services", for this install only
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null
