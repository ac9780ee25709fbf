#!/usr/bin/env python3
"""SSH through devmesh beside plain OpenSSH, in one script on one machine.

Starts a devmesh primary (embedded PostgreSQL) with one workspace whose
agent runs here, and a plain OpenSSH server (sshd) on loopback; then
measures, alternating between the two so that both see the same machine:

  connect   wall time of `ssh HOST true` (a whole new connection)
  upload    `scp` of a file (1 GiB by default) to the host
  download  `scp` of it back
  raw       the same size through an SSH channel without SFTP (`cat`)
  echo      keystroke echo time at an interactive terminal, alone and
            while a bulk upload runs through the same host (p50 and p99)

Both sides use the same OpenSSH client with the same key exchange and
cipher (curve25519-sha256, chacha20-poly1305: what the agent's server
offers first). The devmesh
side goes client -> primary (HTTP on loopback) -> QUIC relay -> agent ->
its SSH server; the baseline goes client -> sshd.

    cargo build --release -p devmesh-cli
    apt install openssh-server            # the baseline's sshd
    python3 loadtest/ssh-bench.py --devmesh target/release/devmesh

Prints a Markdown table (also written to --out). Run as root or as a user
whose home the `postgres` user may not need: the script keeps everything
in a temporary directory it makes world-traversable for the embedded
database.
"""

import argparse
import json
import os
import pty
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def api(base, method, path, body=None, token=None):
    req = urllib.request.Request(
        f"{base}/api/v2{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if token:
        req.add_header("Devmesh-Session-Token", token)
    with urllib.request.urlopen(req) as resp:
        text = resp.read()
        return json.loads(text) if text else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="devmesh-ssh-bench-")
        os.chmod(self.dir, 0o755)
        self.procs = []

    def spawn(self, name, cmd, env=None):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs.append(p)
        return p

    def close(self):
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- the baseline: sshd on loopback, a fresh key ---
    def start_sshd(self):
        d = self.dir
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/host_key"], check=True
        )
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/client_key"], check=True
        )
        shutil.copy(f"{d}/client_key.pub", f"{d}/authorized_keys")
        os.chmod(f"{d}/authorized_keys", 0o600)
        self.sshd_port = free_port()
        with open(f"{d}/sshd_config", "w") as f:
            f.write(
                f"Port {self.sshd_port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
                f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
                f"PidFile {d}/sshd.pid\n"
            )
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        os.makedirs("/run/sshd", exist_ok=True)
        self.spawn("sshd", [sshd, "-D", "-e", "-f", f"{d}/sshd_config"])
        wait_for("sshd", lambda: socket.create_connection(("127.0.0.1", self.sshd_port)))

    # --- devmesh: a primary, one workspace, its agent here ---
    def start_devmesh(self):
        d, exe = self.dir, self.args.devmesh
        http, relay = free_port(), free_port()
        self.url = f"http://127.0.0.1:{http}"
        env = dict(os.environ, XDG_DATA_HOME=f"{d}/xdg")
        self.spawn(
            "primary",
            [exe, "server", "--data-dir", f"{d}/data", "--http-address", f"127.0.0.1:{http}",
             "--relay-address", f"127.0.0.1:{relay}"],
            env,
        )
        wait_for("the primary", lambda: urllib.request.urlopen(f"{self.url}/healthz"), 120)
        api(self.url, "POST", "/users/first",
            {"email": "bench@example.com", "username": "bench", "password": "bench-password"})
        self.token = api(self.url, "POST", "/users/login",
                         {"email": "bench@example.com", "password": "bench-password"})["session_token"]
        api(self.url, "POST", "/templates",
            {"name": "byo", "definition": {"agents": [{"name": "main", "directory": d}]}},
            self.token)
        created = api(self.url, "POST", "/workspaces", {"name": "bench", "template": "byo"},
                      self.token)
        ws = created["workspace"]["id"]
        agent_env = dict(os.environ, DEVMESH_URL=self.url,
                         DEVMESH_AGENT_TOKEN=created["agent_tokens"][0]["token"])
        self.spawn("agent", [exe, "agent"], agent_env)
        wait_for("the agent", lambda: api(self.url, "GET", f"/workspaces/{ws}", None, self.token)
                 ["agents"][0]["status"] == "connected")

    def ssh_config(self):
        d, exe = self.dir, self.args.devmesh
        cfg = f"{d}/ssh_config"
        common = (
            "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
            "    LogLevel ERROR\n    Ciphers chacha20-poly1305@openssh.com\n"
            "    KexAlgorithms curve25519-sha256\n"
        )
        with open(cfg, "w") as f:
            f.write(
                f"Host sshd\n    HostName 127.0.0.1\n    Port {self.sshd_port}\n"
                f"    IdentityFile {d}/client_key\n    IdentitiesOnly yes\n{common}"
                f"Host devmesh\n    ProxyCommand {exe} ssh --stdio bench\n{common}"
            )
        self.cfg = cfg
        self.env = dict(os.environ, DEVMESH_URL=self.url, DEVMESH_SESSION_TOKEN=self.token,
                        DEVMESH_CONFIG_DIR=f"{d}/cli")

    def ssh(self, host, *args, **kw):
        return subprocess.run(["ssh", "-F", self.cfg, host, *args], env=self.env,
                              stdin=subprocess.DEVNULL, check=True, **kw)

    # --- measures ---
    def connect(self, rounds):
        times = {"sshd": [], "devmesh": []}
        for _ in range(rounds):
            for host in times:
                t = time.monotonic()
                self.ssh(host, "true")
                times[host].append(time.monotonic() - t)
        return {h: statistics.median(v) * 1000 for h, v in times.items()}

    def copy(self, rounds):
        src = f"{self.dir}/payload.bin"
        with open(src, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(self.args.megabytes):
                f.write(chunk)
        size = os.path.getsize(src)
        out = {"sshd": {"up": [], "down": []}, "devmesh": {"up": [], "down": []}}
        for _ in range(rounds):
            for host in out:
                remote = f"{self.dir}/copied-{host}.bin"
                t = time.monotonic()
                subprocess.run(["scp", "-F", self.cfg, src, f"{host}:{remote}"], env=self.env,
                               check=True, stdin=subprocess.DEVNULL)
                out[host]["up"].append(size / (time.monotonic() - t) / 1e6)
                back = f"{self.dir}/back-{host}.bin"
                t = time.monotonic()
                subprocess.run(["scp", "-F", self.cfg, f"{host}:{remote}", back], env=self.env,
                               check=True, stdin=subprocess.DEVNULL)
                out[host]["down"].append(size / (time.monotonic() - t) / 1e6)
                if os.path.getsize(back) != size:
                    sys.exit(f"{host}: the copy came back short")
                os.remove(back)
                os.remove(remote)
        os.remove(src)
        return {h: {k: statistics.median(v) for k, v in d.items()} for h, d in out.items()}

    def raw(self, rounds):
        """An SSH channel's own throughput, without SFTP: zeros through
        `cat` each way."""
        size = self.args.megabytes << 20
        out = {"sshd": {"up": [], "down": []}, "devmesh": {"up": [], "down": []}}
        for _ in range(rounds):
            for host in out:
                t = time.monotonic()
                subprocess.run(
                    f"head -c {size} /dev/zero | ssh -F {self.cfg} {host} 'cat > /dev/null'",
                    shell=True, env=self.env, check=True)
                out[host]["up"].append(size / (time.monotonic() - t) / 1e6)
                t = time.monotonic()
                subprocess.run(
                    f"ssh -F {self.cfg} {host} 'head -c {size} /dev/zero' > /dev/null",
                    shell=True, env=self.env, check=True, stdin=subprocess.DEVNULL)
                out[host]["down"].append(size / (time.monotonic() - t) / 1e6)
        return {h: {k: statistics.median(v) for k, v in d.items()} for h, d in out.items()}

    def echo(self, host, samples, during_bulk=False):
        """Times one keystroke's round trip through an interactive `cat`
        at a terminal, `samples` times, 20 ms apart."""
        pid, fd = pty.fork()
        if pid == 0:
            os.execvpe("ssh", ["ssh", "-F", self.cfg, "-tt", host, "stty raw -echo; cat"], self.env)
        # Wait for the remote cat.
        deadline = time.monotonic() + 30
        ready = b""
        while time.monotonic() < deadline:
            os.write(fd, b"R")
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                ready += os.read(fd, 4096)
                if b"R" in ready:
                    break
        time.sleep(0.3)
        while select.select([fd], [], [], 0.1)[0]:
            os.read(fd, 4096)
        bulk = None
        if during_bulk:
            # An endless upload through the same host (and, for devmesh,
            # the same agent), until the samples are taken.
            bulk = subprocess.Popen(
                ["ssh", "-F", self.cfg, host, "cat > /dev/null"],
                env=self.env, stdin=open("/dev/zero", "rb"))
            time.sleep(1.0)
        times = []
        for i in range(samples):
            if bulk and bulk.poll() is not None:
                sys.exit(f"{host}: the bulk upload ended early")
            key = bytes([ord("a") + i % 26])
            t = time.monotonic()
            os.write(fd, key)
            got = b""
            while key not in got:
                r, _, _ = select.select([fd], [], [], 5)
                if not r:
                    sys.exit(f"{host}: no echo in 5 s")
                got += os.read(fd, 4096)
            times.append((time.monotonic() - t) * 1000)
            time.sleep(0.02)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)
        if bulk:
            bulk.terminate()
            bulk.wait()
        times.sort()
        p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
        return {"n": len(times), "p50": p(0.5), "p99": p(0.99)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devmesh", default="target/release/devmesh")
    ap.add_argument("--megabytes", type=int, default=1024, help="size of the copied file")
    ap.add_argument("--rounds", type=int, default=3, help="copies each way per side")
    ap.add_argument("--connects", type=int, default=20)
    ap.add_argument("--samples", type=int, default=300, help="keystrokes per echo measure")
    ap.add_argument("--out", default="ssh-bench.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    args.devmesh = os.path.abspath(args.devmesh)
    b = Bench(args)
    try:
        b.start_sshd()
        b.start_devmesh()
        b.ssh_config()
        b.ssh("devmesh", "true")
        b.ssh("sshd", "true")
        connect = b.connect(args.connects)
        copy = b.copy(args.rounds)
        raw = b.raw(args.rounds)
        echo = {h: b.echo(h, args.samples) for h in ("sshd", "devmesh")}
        busy = {h: b.echo(h, args.samples, True) for h in ("sshd", "devmesh")}
    finally:
        b.close()
    mib = args.megabytes
    rows = [
        ("`ssh HOST true`, median ms", connect["devmesh"], connect["sshd"], "lower"),
        (f"scp {mib} MiB up, MB/s", copy["devmesh"]["up"], copy["sshd"]["up"], "higher"),
        (f"scp {mib} MiB down, MB/s", copy["devmesh"]["down"], copy["sshd"]["down"], "higher"),
        (f"raw channel {mib} MiB up (`cat`), MB/s", raw["devmesh"]["up"], raw["sshd"]["up"], "higher"),
        (f"raw channel {mib} MiB down, MB/s", raw["devmesh"]["down"], raw["sshd"]["down"], "higher"),
        ("keystroke echo p50, ms", echo["devmesh"]["p50"], echo["sshd"]["p50"], "lower"),
        ("keystroke echo p99, ms", echo["devmesh"]["p99"], echo["sshd"]["p99"], "lower"),
        ("echo p50 during a bulk upload, ms", busy["devmesh"]["p50"], busy["sshd"]["p50"], "lower"),
        ("echo p99 during a bulk upload, ms", busy["devmesh"]["p99"], busy["sshd"]["p99"], "lower"),
    ]
    lines = ["| measure | devmesh | sshd (baseline) | devmesh / sshd |", "|---|---:|---:|---:|"]
    for name, dm, base, _ in rows:
        lines.append(f"| {name} | {dm:.2f} | {base:.2f} | {dm / base:.2f}× |")
    lines.append("")
    lines.append(f"Echo samples: {echo['devmesh']['n']} alone, {busy['devmesh']['n']} (devmesh) and "
                 f"{busy['sshd']['n']} (sshd) during the copy. Connect: {args.connects} each, "
                 f"alternating. Copies: {args.rounds} each way per side, alternating; medians.")
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
