"""Gives a fresh primary something to fuzz: an owner, a member, a template,
and two of each of a workspace with an agent, an edge and a provisioner key:
the first for the fuzzer's credentials, the second for it to stop, delete or
re-key (run.sh names only the second in its dictionaries). Prints ids and
credentials as shell assignments for run.sh."""

import json
import shlex
import sys
import urllib.request

base = sys.argv[1] + "/api/v2"


def call(method, path, body=None, token=None):
    req = urllib.request.Request(base + path, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Devmesh-Session-Token", token)
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(req, data) as resp:
        text = resp.read()
        return json.loads(text) if text else None


password = "fuzzing-password"
owner = call("POST", "/users/first", {"email": "owner@example.com", "username": "owner", "password": password})
token = call("POST", "/users/login", {"email": "owner", "password": password})["session_token"]
member = call("POST", "/users", {"email": "member@example.com", "username": "member", "password": password}, token)
template = call(
    "POST",
    "/templates",
    {"name": "web", "definition": {"agents": [{"name": "main", "apps": [{"slug": "site", "port": 8080}]}]}},
    token,
)


def edge(name):
    return call("POST", "/edges", {"name": name, "access_url": f"https://{name}.example.com",
                                   "wildcard_hostname": f"*.{name}.example.com", "relay_hosts": ["127.0.0.1"]}, token)


created = call("POST", "/workspaces", {"name": "dev", "template": "web"}, token)
scratch = call("POST", "/workspaces", {"name": "scratch", "template": "web"}, token)
eu = edge("eu")
us = edge("us")
provisioner = call("POST", "/provisioner-keys", {"name": "fuzz"}, token)
call("POST", "/provisioner-keys", {"name": "spare"}, token)
values = {
    "DEVMESH_TOKEN": token,
    "DEVMESH_AGENT_TOKEN": created["agent_tokens"][0]["token"],
    "DEVMESH_EDGE_TOKEN": eu["edge_token"],
    "DEVMESH_PROVISIONER_KEY": provisioner["secret"],
    "OWNER_ID": owner["id"],
    "MEMBER_ID": member["id"],
    "TEMPLATE_ID": template["id"],
    "WORKSPACE_ID": scratch["workspace"]["id"],
    "AGENT_ID": scratch["agent_tokens"][0]["agent_id"],
    "EDGE_ID": us["edge"]["id"],
}
for k, v in values.items():
    print(f"{k}={shlex.quote(str(v))}")
