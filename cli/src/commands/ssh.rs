//! `devmesh ssh WS[.AGENT] [-- CMD…]`: OpenSSH into a workspace through its
//! deployment's HTTPS, and `devmesh ssh --stdio WS[.AGENT]`, the
//! `ProxyCommand` that carries the connection (stdin and stdout spliced to
//! one streamed request; see `POST /api/v2/workspaceagents/{id}/ssh`).

use anyhow::Context;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::Global;
use crate::client::Client;

/// `WS`, `WS.AGENT`, `OWNER/WS` or `OWNER/WS.AGENT`: names only, so the
/// target is safe in a `ProxyCommand` line and as a host name.
pub(crate) fn parse_target(target: &str) -> anyhow::Result<(&str, Option<&str>)> {
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
    openssh(g, &target, &[], &command)
}

/// `devmesh port-forward WS --tcp [ADDR:]LOCAL:REMOTE… --udp [ADDR:]LOCAL:REMOTE…`,
/// until interrupted. TCP goes through OpenSSH's local forwards (`-L`),
/// each connection a channel to the workspace's `127.0.0.1:REMOTE`; UDP
/// (which SSH cannot carry) goes through devmesh's own flows, one stream
/// per client address.
pub(crate) async fn port_forward(
    g: &Global,
    target: String,
    tcp: Vec<String>,
    udp: Vec<String>,
) -> anyhow::Result<()> {
    let (ws, agent) = parse_target(&target)?;
    anyhow::ensure!(
        !tcp.is_empty() || !udp.is_empty(),
        "say what to forward: --tcp LOCAL:REMOTE or --udp LOCAL:REMOTE"
    );
    // INFO: OpenSSH then says when a connection's remote port refused.
    let mut args = vec![
        "-N".to_owned(),
        "-o".to_owned(),
        "ExitOnForwardFailure=yes".to_owned(),
        "-o".to_owned(),
        "LogLevel=INFO".to_owned(),
    ];
    for spec in &tcp {
        let (addr, local, remote) = parse_forward(spec)?;
        eprintln!("Forwarding TCP {addr}:{local} to port {remote} in {target}.");
        args.push("-L".into());
        args.push(format!("{addr}:{local}:127.0.0.1:{remote}"));
    }
    let mut sockets = Vec::new();
    for spec in &udp {
        let (addr, local, remote) = parse_forward(spec)?;
        let socket = tokio::net::UdpSocket::bind((addr.as_str(), local))
            .await
            .with_context(|| format!("cannot listen for UDP on {addr}:{local}"))?;
        eprintln!("Forwarding UDP {addr}:{local} to port {remote} in {target}.");
        sockets.push((socket, remote));
    }
    if sockets.is_empty() {
        return openssh(g, &target, &args, &[]);
    }
    let short = g.client()?;
    let agent = find_agent(&short, ws, agent).await?;
    let mut forwards = tokio::task::JoinSet::new();
    for (socket, remote) in sockets {
        let (g, short) = (g.clone(), short.clone());
        forwards.spawn(async move { crate::udp::forward(&g, &short, agent, socket, remote).await });
    }
    let mut ssh = if tcp.is_empty() {
        None
    } else {
        Some(
            openssh_command(g, &target, &args, &[])?
                .spawn()
                .context("cannot run ssh")?,
        )
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        status = async { ssh.as_mut().expect("ssh runs").wait().await }, if ssh.is_some() => {
            let status = status?;
            anyhow::ensure!(status.success(), "ssh ended ({status})");
            Ok(())
        }
        Some(done) = forwards.join_next() => done?,
    }
}

/// `[ADDR:]LOCAL:REMOTE` → (address to listen on, local port, remote port).
fn parse_forward(spec: &str) -> anyhow::Result<(String, u16, u16)> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (addr, local, remote) = match parts.as_slice() {
        [l, r] => ("127.0.0.1", *l, *r),
        [a, l, r] => (*a, *l, *r),
        _ => anyhow::bail!("{spec:?}: write a forward as [ADDR:]LOCAL:REMOTE"),
    };
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .with_context(|| format!("{spec:?}: {p:?} is not a port"))
    };
    anyhow::ensure!(
        addr.parse::<std::net::IpAddr>().is_ok() || addr == "localhost",
        "{spec:?}: {addr:?} is not an address to listen on"
    );
    Ok((addr.to_owned(), port(local)?, port(remote)?))
}

/// Becomes OpenSSH to `target` with `options` and `command`, this binary
/// as its ProxyCommand (so the exit status is ssh's).
fn openssh(g: &Global, target: &str, options: &[String], command: &[String]) -> anyhow::Result<()> {
    let mut ssh = openssh_command(g, target, options, command)?;
    // This process becomes ssh: signals (Ctrl-C, a kill) reach it
    // directly, and no ssh outlives a killed devmesh.
    let e = std::os::unix::process::CommandExt::exec(ssh.as_std_mut());
    Err(anyhow::Error::new(e).context("cannot run ssh (install the OpenSSH client)"))
}

/// OpenSSH to `target` with `options` and `command`, this binary as its
/// ProxyCommand.
fn openssh_command(
    g: &Global,
    target: &str,
    options: &[String],
    command: &[String],
) -> anyhow::Result<tokio::process::Command> {
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
    let mut ssh = tokio::process::Command::new("ssh");
    ssh.arg("-o")
        .arg(format!("ProxyCommand='{exe}' ssh --stdio '{target}'"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(options)
        // Quiet unless the caller asks (options come first: OpenSSH keeps
        // the first value of an option).
        .args(["-o", "LogLevel=ERROR"])
        .arg(format!("devmesh.{}", target.replace('/', "--")))
        .args(command)
        .env("DEVMESH_URL", client.base())
        .env("DEVMESH_SESSION_TOKEN", token);
    if let Some(ca) = &g.ca_cert {
        ssh.env("DEVMESH_CA_CERT", ca);
    }
    if let Some(region) = &g.region {
        ssh.env("DEVMESH_REGION", region);
    }
    ssh.kill_on_drop(true);
    Ok(ssh)
}

/// The id of `ws`'s agent `agent` (its first without a name).
pub(crate) async fn find_agent(
    client: &Client,
    ws: &str,
    agent: Option<&str>,
) -> anyhow::Result<uuid::Uuid> {
    let (owner, name) = ws.split_once('/').unwrap_or(("me", ws));
    let workspace: devmesh_shared::api::Workspace = client
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
    Ok(found.id)
}

/// A stream session opened through a region.
pub(crate) struct Opened {
    pub(crate) resp: reqwest::Response,
    pub(crate) region: crate::regions::Ranked,
}

/// POSTs `path` (a stream endpoint, `/workspaceagents/{id}/…`) through the
/// nearest region that accepts it (or the one `--region` pins), trying the
/// next when a region cannot be reached or cannot reach the agent.
/// `body` makes each try's request body from a signal that fires once the
/// region accepted: a body that waits for it loses nothing to a refusal.
pub(crate) async fn through_region(
    g: &Global,
    short: &Client,
    path: &str,
    mut body: impl FnMut(tokio::sync::oneshot::Receiver<()>) -> reqwest::Body,
) -> anyhow::Result<Opened> {
    let token = g
        .token
        .clone()
        .or_else(|| crate::session::load().ok().flatten().map(|s| s.token));
    let mut regions =
        crate::regions::ranked(short, g.region.as_deref(), g.ca_cert.as_deref()).await?;
    if regions.is_empty() {
        regions.push(crate::regions::Ranked {
            name: "primary".into(),
            url: short.base().to_owned(),
            wildcard: None,
            rtt_ms: None,
        });
    }
    let mut failure = None;
    for region in regions {
        let client = Client::long_lived(&region.url, token.clone(), g.ca_cert.as_deref())?;
        let (go, accepted) = tokio::sync::oneshot::channel::<()>();
        match client.post_stream(path, body(accepted)).await {
            Ok(resp) => {
                let _ = go.send(());
                return Ok(Opened { resp, region });
            }
            Err(e) if region_failed(&e) => {
                eprintln!(
                    "devmesh: region {} failed ({e:#}); trying the next",
                    region.name
                );
                crate::regions::forget();
                failure = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(failure.unwrap_or_else(|| anyhow::anyhow!("no region to go through")))
}

/// A request body of `stream` that starts once `accepted` fires (and is
/// empty if it never does).
pub(crate) fn after<S>(accepted: tokio::sync::oneshot::Receiver<()>, stream: S) -> reqwest::Body
where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Sync + 'static,
{
    let mut stream = Some(stream);
    let gated = futures_util::stream::once(accepted).flat_map(move |r| match (r, stream.take()) {
        (Ok(()), Some(s)) => s.left_stream(),
        _ => futures_util::stream::empty().right_stream(),
    });
    reqwest::Body::wrap_stream(gated)
}

/// The most read from stdin at once: each read costs a hop to a blocking
/// thread, an HTTP chunk and a QUIC write, so big reads carry bulk copies
/// (a keystroke is still sent as soon as it is read).
const STDIO_CHUNK: usize = 256 * 1024;

/// Splices stdin and stdout to the agent's SSH server.
async fn pipe(g: &Global, ws: &str, agent: Option<&str>) -> anyhow::Result<()> {
    let short = g.client()?;
    let agent = find_agent(&short, ws, agent).await?;
    let path = format!("/workspaceagents/{agent}/ssh");
    // Nothing is read from stdin until a region accepts, so the next
    // region gets it all.
    let opened = through_region(g, &short, &path, |accepted| {
        after(
            accepted,
            tokio_util::io::ReaderStream::with_capacity(tokio::io::stdin(), STDIO_CHUNK),
        )
    })
    .await?;
    splice_out(opened.resp).await
}

/// Whether another region might do better: this one could not be reached
/// or could not reach the agent.
fn region_failed(e: &anyhow::Error) -> bool {
    use reqwest::StatusCode;
    match e.downcast_ref::<crate::client::ApiFailure>() {
        Some(f) => matches!(
            f.status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ),
        None => e.chain().any(|c| c.is::<reqwest::Error>()),
    }
}

/// Copies the session's answer to stdout until it ends.
async fn splice_out(mut resp: reqwest::Response) -> anyhow::Result<()> {
    let mut out = tokio::io::stdout();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                out.write_all(&chunk).await?;
                out.flush().await?;
            }
            Ok(None) => break,
            Err(e) => {
                eprintln!(
                    "devmesh: the connection to the workspace was lost: its agent, or a region \
                     on the way, went away ({e})"
                );
                std::process::exit(255);
            }
        }
    }
    // The connection is over (the session ended, or the region ended it).
    // Exit now: the read of stdin blocks a thread the runtime would wait
    // for, and OpenSSH notices the end only when this process goes.
    std::process::exit(0);
}

/// The lines that delimit the block `config-ssh` manages.
const BLOCK_START: &str = "# ------------START-DEVMESH------------";
const BLOCK_END: &str = "# ------------END-DEVMESH------------";

/// `devmesh config-ssh`: a managed block in `~/.ssh/config` with one
/// `Host devmesh.WS` per workspace, so plain `ssh devmesh.WS`, `scp`,
/// `sftp` and editors' remote-SSH work. Lines outside the block are never
/// touched; running it again changes nothing unless the workspaces did.
pub(crate) async fn config_ssh(
    g: &Global,
    file: Option<std::path::PathBuf>,
    yes: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let client = g.client()?;
    let list: devmesh_shared::api::WorkspacesResponse = client.get("/workspaces").await?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let exe = exe.to_str().context("this binary's path is not UTF-8")?;
    anyhow::ensure!(
        !exe.contains('\''),
        "this binary's path holds a quote; move it"
    );
    let path = match file {
        Some(f) => f,
        None => dirs::home_dir()
            .context("no home directory")?
            .join(".ssh/config"),
    };
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut block = vec![
        BLOCK_START.to_owned(),
        format!(
            "# Managed by `devmesh config-ssh` for {}: what is inside is replaced.",
            client.base()
        ),
    ];
    let mut names: Vec<&str> = list.workspaces.iter().map(|w| w.name.as_str()).collect();
    names.sort_unstable();
    for name in names {
        block.push(format!("Host devmesh.{name}"));
        block.push(format!(
            "    ProxyCommand '{exe}' --url '{}' ssh --stdio {name}",
            client.base()
        ));
        block.push("    StrictHostKeyChecking no".into());
        block.push("    UserKnownHostsFile /dev/null".into());
        block.push("    LogLevel ERROR".into());
    }
    block.push(BLOCK_END.to_owned());
    // Replace the block where it is, or append it.
    let lines: Vec<&str> = old.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == BLOCK_START);
    let end = lines.iter().position(|l| l.trim_end() == BLOCK_END);
    let (before, current, after): (Vec<&str>, Vec<&str>, Vec<&str>) = match (start, end) {
        (Some(s), Some(e)) if s < e => (
            lines[..s].to_vec(),
            lines[s..=e].to_vec(),
            lines[e + 1..].to_vec(),
        ),
        (None, None) => (lines.clone(), Vec::new(), Vec::new()),
        _ => anyhow::bail!(
            "{} has a broken devmesh block (a start without an end, or the reverse); fix it by hand",
            path.display()
        ),
    };
    if current == block.iter().map(String::as_str).collect::<Vec<_>>() {
        println!("{} is up to date.", path.display());
        return Ok(());
    }
    for l in &current {
        if !block.iter().any(|b| b == l) {
            println!("- {l}");
        }
    }
    for l in &block {
        if !current.contains(&l.as_str()) {
            println!("+ {l}");
        }
    }
    if dry_run {
        println!("(dry run: {} not changed)", path.display());
        return Ok(());
    }
    if !yes {
        anyhow::ensure!(
            std::io::stdin().is_terminal(),
            "pass --yes to change {} when not at a terminal",
            path.display()
        );
        eprint!("Change {}? [y/N] ", path.display());
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("Nothing changed.");
            return Ok(());
        }
    }
    let mut text = String::new();
    for l in before {
        text.push_str(l);
        text.push('\n');
    }
    if !text.is_empty() && !text.ends_with("\n\n") && current.is_empty() {
        text.push('\n');
    }
    for l in &block {
        text.push_str(l);
        text.push('\n');
    }
    for l in after {
        text.push_str(l);
        text.push('\n');
    }
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // Whole or not at all: a new file renamed over the old one.
    let tmp = path.with_extension("devmesh-tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    println!(
        "Updated {}: ssh devmesh.WORKSPACE now reaches each of your workspaces.",
        path.display()
    );
    Ok(())
}
