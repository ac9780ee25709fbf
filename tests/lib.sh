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
