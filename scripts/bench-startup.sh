#!/usr/bin/env bash
# Measures how long `devmesh server` takes to become healthy on the embedded
# database (first start, with initdb; later start, reusing the cluster) and
# the RSS of the idle server, next to a baseline run in the same script:
# bare `initdb` + `postgres` on the same binaries, to ready.
#
#   scripts/bench-startup.sh [runs]      (default 5; builds --release first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin devmesh -q
bin=target/release/devmesh
pgbin=$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")")
as_pg=()
[ "$(id -u)" = 0 ] && as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)

now() { date +%s.%N; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_healthy() { until curl -sf "http://127.0.0.1:$1/healthz" >/dev/null; do sleep 0.01; done; }
wait_pg_ready() { until [ "$(sed -n 8p "$1/postmaster.pid" 2>/dev/null | tr -d ' ')" = ready ]; do sleep 0.01; done; }

first=(); later=(); rss=(); base_first=(); base_later=()
for i in $(seq "$runs"); do
  dir=$(mktemp -d); chmod 755 "$dir"
  p=$(port)
  t0=$(now); $bin server --data-dir "$dir/data" --http-address "127.0.0.1:$p" >/dev/null 2>&1 & pid=$!
  wait_healthy "$p"; t1=$(now); first+=("$(echo "$t1 - $t0" | bc)")
  sleep 2; rss+=("$(awk '/VmRSS/ {print $2}' /proc/$pid/status)")
  kill -TERM $pid; wait $pid || true
  t0=$(now); $bin server --data-dir "$dir/data" --http-address "127.0.0.1:$p" >/dev/null 2>&1 & pid=$!
  wait_healthy "$p"; t1=$(now); later+=("$(echo "$t1 - $t0" | bc)")
  kill -TERM $pid; wait $pid || true

  # Baseline: the same PostgreSQL binaries, no devmesh.
  b="$dir/base"; mkdir -p "$b"; chmod 777 "$b"
  t0=$(now)
  "${as_pg[@]}" "$pgbin/initdb" -D "$b/pg" -U devmesh --auth=trust --encoding=UTF8 --locale=C >/dev/null
  "${as_pg[@]}" "$pgbin/postgres" -D "$b/pg" -c listen_addresses= -c unix_socket_directories="$b" >/dev/null 2>&1 & bpid=$!
  wait_pg_ready "$b/pg"; t1=$(now); base_first+=("$(echo "$t1 - $t0" | bc)")
  kill -INT $bpid; wait $bpid || true
  t0=$(now)
  "${as_pg[@]}" "$pgbin/postgres" -D "$b/pg" -c listen_addresses= -c unix_socket_directories="$b" >/dev/null 2>&1 & bpid=$!
  wait_pg_ready "$b/pg"; t1=$(now); base_later+=("$(echo "$t1 - $t0" | bc)")
  kill -INT $bpid; wait $bpid || true
  rm -rf "$dir"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mf=$(median "${first[@]}"); ml=$(median "${later[@]}"); bf=$(median "${base_first[@]}"); bl=$(median "${base_later[@]}")
printf 'runs: %s (medians)\n' "$runs"
printf 'first start (initdb) to healthy: devmesh %.2fs, bare initdb+postgres %.2fs, ratio %.2f\n' "$mf" "$bf" "$(echo "$mf / $bf" | bc -l)"
printf 'later start to healthy:          devmesh %.2fs, bare postgres %.2fs, ratio %.2f\n' "$ml" "$bl" "$(echo "$ml / $bl" | bc -l)"
printf 'idle server RSS (devmesh process, PostgreSQL excluded): %s KiB\n' "$(median "${rss[@]}")"
