//! `devmesh ssh WS[.AGENT] [-- CMD…]`: OpenSSH into a workspace through its
//! deployment's HTTPS, and `devmesh ssh --stdio WS[.AGENT]`, the
//! `ProxyCommand` that carries the connection (stdin and stdout spliced to
//! one streamed request; see `POST /api/v2/workspaceagents/{id}/ssh`).

use anyhow::Context;
use tokio::io::AsyncWriteExt;

use super::Global;
use crate::client::Client;

/// `WS`, `WS.AGENT`, `OWNER/WS` or `OWNER/WS.AGENT`: names only, so the
/// target is safe in a `ProxyCommand` line and as a host name.
fn parse_target(target: &str) -> anyhow::Result<(&str, Option<&str>)> {
    let ok = !target.is_empty()
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    anyhow::ensure!(
        ok,
        "{target:?} is not a workspace name (WS, WS.AGENT or OWNER/WS)"
    );
    Ok(match target.rsplit_once('.') {
        Some((ws, agent)) => (ws, Some(agent)),
        None => (target, None),
    })
}

pub(crate) async fn ssh(
    g: &Global,
    target: String,
    stdio: bool,
    command: Vec<String>,
) -> anyhow::Result<()> {
    let (ws, agent) = parse_target(&target)?;
    if stdio {
        return pipe(g, ws, agent).await;
    }
    // OpenSSH does the rest: terminals, scp, port forwards, its own
    // options. This binary is its ProxyCommand; the deployment and key go
    // in the environment, not on command lines that `ps` shows.
    let client = g.client()?;
    let token = g
        .token
        .clone()
        .or_else(|| crate::session::load().ok().flatten().map(|s| s.token))
        .context("not signed in: run `devmesh login <url>` first")?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let exe = exe.to_str().context("this binary's path is not UTF-8")?;
    anyhow::ensure!(
        !exe.contains('\''),
        "this binary's path holds a quote; move it"
    );
    let mut ssh = std::process::Command::new("ssh");
    ssh.arg("-o")
        .arg(format!("ProxyCommand='{exe}' ssh --stdio '{target}'"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("devmesh.{}", target.replace('/', "--")))
        .args(&command)
        .env("DEVMESH_URL", client.base())
        .env("DEVMESH_SESSION_TOKEN", token);
    if let Some(ca) = &g.ca_cert {
        ssh.env("DEVMESH_CA_CERT", ca);
    }
    let status = ssh
        .status()
        .context("cannot run ssh (install the OpenSSH client)")?;
    // The remote command's status is ssh's; pass it on.
    std::process::exit(status.code().unwrap_or(255));
}

/// Splices stdin and stdout to the agent's SSH server.
async fn pipe(g: &Global, ws: &str, agent: Option<&str>) -> anyhow::Result<()> {
    let short = g.client()?;
    let (owner, name) = ws.split_once('/').unwrap_or(("me", ws));
    let workspace: devmesh_shared::api::Workspace = short
        .get(&format!("/users/{owner}/workspaces/{name}"))
        .await?;
    let found = match agent {
        Some(a) => workspace.agents.iter().find(|x| x.name == a),
        None => workspace.agents.first(),
    };
    let Some(found) = found else {
        anyhow::bail!(
            "{ws} has no {}agent running: start it first",
            agent.map(|a| format!("{a} ")).unwrap_or_default()
        );
    };
    let token = g
        .token
        .clone()
        .or_else(|| crate::session::load().ok().flatten().map(|s| s.token));
    let client = Client::long_lived(short.base(), token, g.ca_cert.as_deref())?;
    let up = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin()));
    let mut resp = client
        .post_stream(&format!("/workspaceagents/{}/ssh", found.id), up)
        .await?;
    let mut out = tokio::io::stdout();
    while let Some(chunk) = resp.chunk().await? {
        out.write_all(&chunk).await?;
        out.flush().await?;
    }
    Ok(())
}
