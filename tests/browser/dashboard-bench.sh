#!/usr/bin/env bash
# The dashboard's workspaces page with N workspaces (default 500) beside the
# JSON API call for the same list: starts a primary (embedded PostgreSQL)
# from the given binary, creates the workspaces, and runs dashboard-bench.js.
#
#   cargo build --release -p devmesh-cli
#   bash tests/browser/dashboard-bench.sh target/release/devmesh [N]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
. "$here/../lib.sh"
bin=$(realpath "${1:-target/release/devmesh}")
n=${2:-500}
[ -d "$here/node_modules/playwright-core" ] || (cd "$here" && npm ci --no-audit --no-fund >/dev/null)
work=$(mktemp -d); chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
start_primary "$bin" "$work" || exit 1
export DEVMESH_CONFIG_DIR="$work/cfg"
"$bin" login "$url" --username bench --email bench@example.com --password bench-password >/dev/null
printf '{"agents":[{"name":"main","apps":[{"slug":"web","port":8000}]}]}' >"$work/t.json"
"$bin" templates create byo --file "$work/t.json" >/dev/null
token=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$DEVMESH_CONFIG_DIR/session.json")
python3 - "$url" "$token" "$n" <<'PY'
import json, sys, urllib.request, concurrent.futures
url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def create(i):
    req = urllib.request.Request(f"{url}/api/v2/workspaces", method="POST",
        data=json.dumps({"name": f"ws{i:04d}", "template": "byo"}).encode(),
        headers={"Content-Type": "application/json", "Devmesh-Session-Token": token})
    urllib.request.urlopen(req).read()
with concurrent.futures.ThreadPoolExecutor(8) as ex:
    list(ex.map(create, range(n)))
PY
(cd "$here" && node dashboard-bench.js "$url" bench bench-password 7)
