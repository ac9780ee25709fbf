#!/usr/bin/env bash
# End-to-end in a real browser: headless Chromium signs in through the app
# auth redirect of a real primary (HTTPS, self-signed) and opens an app and a
# dev URL served by a real agent; then the same through a regional edge
# (its own app domain, the sign-in still at the primary, the agent reached
# over the relay mesh). Needs chromium, node and the devmesh
# binary (cargo build --bin devmesh). Fails, never skips, when one is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
. "$here/../lib.sh"
root=$(cd "$here/../.." && pwd)
bin=${DEVMESH_BIN:-$root/target/debug/devmesh}
for need in "$bin" "$(command -v chromium || true)" "$(command -v node || true)"; do
  [ -n "$need" ] && [ -x "$need" ] || { echo "browser test: missing $need (chromium, node or $bin)"; exit 1; }
done
[ -d "$here/node_modules/playwright-core" ] || (cd "$here" && npm ci --no-audit --no-fund >/dev/null)

work=$(mktemp -d); chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=$(free_port)
app_port=$(free_port)
"$bin" server --data-dir "$work/data" --http-address "127.0.0.1:$port" --relay-address 127.0.0.1:0 \
  --tls-self-signed >"$work/server.out" 2>"$work/server.err" &
pids+=($!)
wait_listening "$work/server.out" "$work/server.err" || exit 1

export DEVMESH_CONFIG_DIR="$work/cfg" DEVMESH_CA_CERT="$work/data/tls/ca.pem"
url="https://127.0.0.1:$port"
"$bin" login "$url" --username browser --email browser@example.com --password browser-password >/dev/null
printf '{"agents":[{"name":"main","apps":[{"slug":"web","port":%s}]}]}' "$app_port" >"$work/t.json"
"$bin" templates create web --file "$work/t.json" >/dev/null
token=$("$bin" create dev --template web | sed -n 's/.*DEVMESH_AGENT_TOKEN=\([A-Za-z0-9]*\).*/\1/p' | head -1)

mkdir -p "$work/site" && echo "<h1>Hello from the workspace</h1>" >"$work/site/index.html"
(cd "$work/site" && exec python3 -m http.server "$app_port" --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)
DEVMESH_URL="$url" DEVMESH_AGENT_TOKEN="$token" "$bin" agent >"$work/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do "$bin" list | grep -q "connected" && break; sleep 0.1; done

node "$here/app-sign-in.js" \
  "https://web--dev--browser.apps.localhost:$port/" \
  "https://$app_port--dev--browser.apps.localhost:$port/" \
  browser browser-password "Hello from the workspace"

# The same through an edge: its app domain, its own cookies, one sign-in at
# the primary, and the request crossing the mesh to the agent's relay.
edge_port=$(free_port)
edge_token=$("$bin" edges create eu --access-url "https://eu.localhost:$edge_port" \
  --wildcard-hostname "*.eu.apps.localhost:$edge_port" --relay-host 127.0.0.1 2>&1 \
  | grep -oE '[0-9a-f-]{36}:[A-Za-z0-9]{32}')
"$bin" edge --primary-url "$url" --edge-token "$edge_token" --access-url "https://eu.localhost:$edge_port" \
  --listen "127.0.0.1:$edge_port" --wildcard-access-url "*.eu.apps.localhost:$edge_port" \
  --relay-address 127.0.0.1:0 --tls-self-signed --tls-dir "$work/data/tls" \
  >"$work/edge.out" 2>"$work/edge.err" &
pids+=($!)
for _ in $(seq 300); do "$bin" regions | grep -qE "^eu +eu +ok" && break; sleep 0.1; done
"$bin" regions | grep -qE "^eu +eu +ok" || { cat "$work/edge.err"; exit 1; }
node "$here/app-sign-in.js" \
  "https://web--dev--browser.eu.apps.localhost:$edge_port/" \
  "https://$app_port--dev--browser.eu.apps.localhost:$edge_port/" \
  browser browser-password "Hello from the workspace"

# The dashboard on a fresh deployment of its own (no users yet), over plain
# HTTP as the README's quick start runs it: the whole user journey.
dash_port=$(free_port)
web_port=$(free_port)
mkdir -p "$work/dash" "$work/dash-site"
echo "<h1>Hello from the dashboard workspace</h1>" >"$work/dash-site/index.html"
(cd "$work/dash-site" && exec python3 -m http.server "$web_port" --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)
env -u DEVMESH_CA_CERT "$bin" server --data-dir "$work/dash/data" --http-address "127.0.0.1:$dash_port" \
  --relay-address 127.0.0.1:0 >"$work/dash.out" 2>"$work/dash.err" &
pids+=($!)
wait_listening "$work/dash.out" "$work/dash.err" || exit 1
shots=${DASHBOARD_SCREENSHOTS:-$work/shots}
mkdir -p "$shots"
(cd "$here" && env -u DEVMESH_CA_CERT node dashboard.js "http://127.0.0.1:$dash_port" "$work" "$web_port" "$shots" "$bin") \
  || { tail -50 "$work/dash.err"; exit 1; }
