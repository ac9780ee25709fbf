#!/usr/bin/env python3
"""Provisioning figures, each beside its baseline in the same run.

1. `devmesh create` of a local-process workspace until its agent is
   connected, beside `terraform init && terraform apply` of the same
   configuration run by hand (the agent cannot connect there: its token is
   not registered, so the baseline stops at apply).
2. N no-op builds (a template with one devmesh_agent and nothing else),
   created at once through the API and run by 3 built-in daemons: jobs per
   second, and each build's queue latency (created -> its first log line).

Usage: loadtest/provisioning.py [--devmesh target/release/devmesh] [--runs 5] [--builds 100]
Needs terraform on PATH. Prints a Markdown table.
"""

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def api(base, token, method, path, body=None):
    req = urllib.request.Request(
        f"{base}/api/v2{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Devmesh-Session-Token": token} if token else {})},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
        return json.loads(text) if text else None


def archive(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def wait(what, check, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devmesh", default=str(ROOT / "target/release/devmesh"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--builds", type=int, default=100)
    args = ap.parse_args()
    devmesh = str(Path(args.devmesh).resolve())
    work = Path(tempfile.mkdtemp(prefix="devmesh-provisioning-"))
    os.chmod(work, 0o755)
    server = subprocess.Popen(
        [devmesh, "server", "--http-address", "127.0.0.1:0", "--relay-address", "127.0.0.1:0",
         "--data-dir", str(work / "data"), "--provisioner-daemons", "3"],
        stdout=subprocess.PIPE, stderr=open(work / "server.log", "w"), text=True,
        env={**os.environ, "DEVMESH_LOG": "warn"},
    )
    try:
        for line in server.stdout:
            if line.startswith("Started HTTP listener at "):
                base = line.split()[-1]
                break
        api(base, None, "POST", "/users/first",
            {"email": "bench@example.com", "username": "bench", "password": "bench-password"})
        token = api(base, None, "POST", "/users/login",
                    {"email": "bench", "password": "bench-password"})["session_token"]

        def push(name, files):
            api(base, token, "POST", "/templates", {"name": name, "kind": "terraform", "archive": archive(files)})
            wait(f"{name}'s import", lambda: api(base, token, "GET", f"/templates/{name}")
                 ["active_version"]["import"]["status"] == "succeeded")

        main_tf = (ROOT / "examples/templates/local-process/main.tf").read_text()
        push("local", {"main.tf": main_tf})
        homes = work / "homes"

        # 1. create -> agent connected, beside terraform apply by hand.
        create, by_hand = [], []
        for i in range(args.runs):
            t0 = time.monotonic()
            ws = api(base, token, "POST", "/workspaces",
                     {"name": f"ws{i}", "template": "local", "parameters": {"home_root": str(homes)}})["workspace"]
            wait("the agent", lambda: any(
                a["status"] == "connected" for a in api(base, token, "GET", f"/workspaces/{ws['id']}")["agents"]))
            create.append(time.monotonic() - t0)
            api(base, token, "POST", f"/workspaces/{ws['id']}/builds", {"transition": "delete"})
            def gone():
                try:
                    api(base, token, "GET", f"/workspaces/{ws['id']}")
                    return False
                except urllib.error.HTTPError as e:
                    return e.code == 404
            wait("the delete", gone, timeout=120)

            tf = work / f"byhand{i}"
            mirror = tf / "mirror/registry.terraform.io/devmesh/devmesh/0.1.0/linux_amd64"
            mirror.mkdir(parents=True)
            os.symlink(devmesh, mirror / "terraform-provider-devmesh_v0.1.0")
            (tf / "tf.rc").write_text(f'provider_installation {{\n filesystem_mirror {{ path = "{tf / "mirror"}" }}\n}}\n')
            (tf / "t").mkdir()
            (tf / "t/main.tf").write_text(main_tf)
            env = {**os.environ, "TF_CLI_CONFIG_FILE": str(tf / "tf.rc"), "TF_IN_AUTOMATION": "1",
                   "CHECKPOINT_DISABLE": "1", "DEVMESH_WORKSPACE_NAME": f"hand{i}",
                   "DEVMESH_WORKSPACE_TRANSITION": "start", "DEVMESH_WORKSPACE_OWNER": "bench",
                   "DEVMESH_ACCESS_URL": base,
                   "DEVMESH_PARAMETERS": json.dumps({"home_root": str(work / "hand-homes")})}
            t0 = time.monotonic()
            for cmd in (["init", "-input=false"], ["apply", "-auto-approve", "-input=false"]):
                subprocess.run(["terraform", *cmd], cwd=tf / "t", env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            by_hand.append(time.monotonic() - t0)
            env["DEVMESH_WORKSPACE_TRANSITION"] = "delete"
            subprocess.run(["terraform", "destroy", "-auto-approve", "-input=false"], cwd=tf / "t", env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        # 2. no-op builds through 3 daemons.
        push("noop", {"main.tf": 'terraform {\n required_providers {\n  devmesh = { source = "devmesh/devmesh" }\n }\n}\n'
                                 'resource "devmesh_agent" "main" {\n os = "linux"\n arch = "amd64"\n}\n'})
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(16) as pool:
            made = list(pool.map(lambda i: api(base, token, "POST", "/workspaces",
                                               {"name": f"noop{i}", "template": "noop"})["workspace"],
                                 range(args.builds)))
        def all_done():
            ws = [api(base, token, "GET", f"/workspaces/{w['id']}") for w in made]
            return ws if all(w["latest_build"]["status"] in ("succeeded", "failed") for w in ws) else None
        done = wait("the no-op builds", all_done, timeout=1800)
        total = time.monotonic() - t0
        failed = sum(w["latest_build"]["status"] != "succeeded" for w in done)
        latency = []
        for w in done:
            b = w["latest_build"]
            logs = api(base, token, "GET", f"/jobs/{b['job_id']}/logs")["logs"]
            created = datetime.fromisoformat(b["created_at"].replace("Z", "+00:00"))
            first = datetime.fromisoformat(logs[0]["created_at"].replace("Z", "+00:00"))
            latency.append((first - created).total_seconds())

        m = statistics.median
        print(f"| measure | devmesh | baseline | ratio |")
        print(f"|---|---|---|---|")
        print(f"| local-process: create → agent connected vs terraform init+apply by hand (median of {args.runs}) "
              f"| {m(create):.2f} s | {m(by_hand):.2f} s | {m(create) / m(by_hand):.2f}× |")
        print(f"| {args.builds} no-op builds through 3 daemons | {args.builds / total:.1f} builds/s ({total:.1f} s, {failed} failed) | | |")
        print(f"| queue latency (created → first log line) | p50 {pct(latency, 0.5):.2f} s, p99 {pct(latency, 0.99):.2f} s | | |")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
