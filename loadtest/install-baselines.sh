#!/usr/bin/env bash
# Installs what devmesh-loadtest's baselines need: nginx (Debian package) and,
# unless --no-rathole, rathole (built from crates.io with cargo, ~5 min on
# two cores). A baseline whose program is still missing afterwards is
# reported as "missing" in the report, never silently skipped.
set -euo pipefail
rathole=1
for a in "$@"; do
  case "$a" in
    --no-rathole) rathole=0 ;;
    *) echo "usage: $0 [--no-rathole]" >&2; exit 64 ;;
  esac
done
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
  # The package starts a system nginx on port 80; the load test runs its own.
  (systemctl stop nginx || service nginx stop || nginx -s stop) >/dev/null 2>&1 || true
fi
if [ "$rathole" = 1 ] && ! command -v rathole >/dev/null 2>&1; then
  # Not --locked: rathole 0.5.0's lock file pins a `time` release that no
  # longer compiles on current Rust. The plain TCP and the Noise transports
  # (the two baselines); no TLS, so no OpenSSL headers are needed.
  nice -n 10 cargo install rathole --no-default-features --features server,client,noise
fi
