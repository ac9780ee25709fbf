#!/usr/bin/env bash
# The API fuzzer: schemathesis (from PyPI, pinned in requirements.txt)
# drives a real primary from the OpenAPI document it serves, with the
# credentials of an owner, an agent, an edge and a provisioner and real
# names and ids half the time. It fails on any 5xx, on an answer the
# document does not describe (status, content type, schema, headers), on
# invalid input accepted, on auth ignored and on deleted things still
# served. Valid-looking input refused is not a failure: the document gives
# shapes, and rules such as "an email address" or "at least one agent" are
# the server's to enforce.
#
#   tests/api-fuzz/run.sh                 # CI: fixed seed, ~1 minute
#   FUZZ_SECONDS=900 FUZZ_SEED=random tests/api-fuzz/run.sh   # a long run
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
. "$here/../lib.sh"
root=$(cd "$here/../.." && pwd)
bin=${DEVMESH_BIN:-$root/target/debug/devmesh}
seconds=${FUZZ_SECONDS:-60}
seed=${FUZZ_SEED:-20261129}
[ -x "$bin" ] || { echo "api fuzz: missing $bin (cargo build --bin devmesh)"; exit 1; }

venv=$root/target/api-fuzz-venv
if [ ! -x "$venv/bin/st" ] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/requirements.txt"
fi

work=$(mktemp -d); chmod 755 "$work"
pids=()
logs=$root/target/api-fuzz
mkdir -p "$logs"
# The server's log is kept beside the fuzzer's reports for a failed run.
cleanup() {
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  cp "$work"/server.* "$logs"/ 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_primary "$bin" "$work" || exit 1
seeded=$(python3 "$here/seed.py" "$url")
eval "$seeded"
export DEVMESH_TOKEN DEVMESH_AGENT_TOKEN DEVMESH_EDGE_TOKEN DEVMESH_PROVISIONER_KEY

cat >"$work/schemathesis.toml" <<TOML
[auth.openapi.session_header]
api_key = "\${DEVMESH_TOKEN}"
[auth.openapi.agent_token]
api_key = "\${DEVMESH_AGENT_TOKEN}"
[auth.openapi.edge_token]
api_key = "\${DEVMESH_EDGE_TOKEN}"
[auth.openapi.provisioner_key]
api_key = "\${DEVMESH_PROVISIONER_KEY}"

[dictionaries.users]
values = ["owner", "member", "$OWNER_ID", "$MEMBER_ID"]
[dictionaries.templates]
values = ["web", "$TEMPLATE_ID"]
[dictionaries.ids]
values = ["$WORKSPACE_ID", "$AGENT_ID"]
[dictionaries.edges]
values = ["us", "$EDGE_ID"]
[dictionaries.names]
values = ["scratch", "spare"]
[dictionaries.statuses]
values = ["suspend", "activate"]

[parameters]
"path.user" = { dictionary = "users", probability = 0.5 }
"path.template" = { dictionary = "templates", probability = 0.5 }
"path.id" = { dictionary = "ids", probability = 0.5 }
"path.edge" = { dictionary = "edges", probability = 0.5 }
"path.name" = { dictionary = "names", probability = 0.5 }
"path.status" = { dictionary = "statuses", probability = 0.5 }

# Streams to an agent answer 502 when it is not connected (the fuzzer runs
# no agent), as documented.
[[operations]]
include-path-regex = '^/workspaceagents/[{]id[}]/(ssh|probe|udp|pty)'
checks.not_a_server_error.expected-statuses = ["1xx", "2xx", "3xx", "4xx", 502]
TOML

seed_args=(--seed "$seed")
[ "$seed" = random ] && seed_args=()
status=0
# Excluded: signing out ends the fuzzer's own session; the two event
# streams (a user's workspaces, an edge's events) never end by design.
(cd "$work" && "$venv/bin/st" --config-file "$work/schemathesis.toml" run "$url/api/v2/openapi.json" \
  --exclude-path /users/logout --exclude-path /workspaces/watch --exclude-path /edges/me/events \
  --checks all --exclude-checks positive_data_acceptance \
  --max-time "$seconds" "${seed_args[@]}" --workers 1 --request-timeout 15 \
  --report junit,har --report-dir "$logs") || status=$?
if grep -n "panicked" "$work/server.err" "$work/server.out"; then
  echo "api fuzz: the primary panicked"; status=1
fi
exit "$status"
