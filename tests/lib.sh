# Shared by the end-to-end scripts (tests/browser, tests/api-fuzz): source it.

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_listening OUT ERR: waits up to 30 s for the server logging to OUT to
# say it listens; otherwise shows its error log ERR and fails.
wait_listening() {
  for _ in $(seq 300); do
    grep -q "Started HTTP listener" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  cat "$2" >&2
  return 1
}

# start_primary BIN WORK: starts `BIN server` on a free loopback port with
# its data and logs in WORK, adds its pid to the caller's `pids`, waits
# until it listens, and sets `port` and `url`.
start_primary() {
  port=$(free_port)
  "$1" server --data-dir "$2/data" --http-address "127.0.0.1:$port" --relay-address 127.0.0.1:0 \
    >"$2/server.out" 2>"$2/server.err" &
  pids+=($!)
  wait_listening "$2/server.out" "$2/server.err" || return 1
  url="http://127.0.0.1:$port"
}
