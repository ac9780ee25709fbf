//! Starts a whole deployment from a [`Scenario`]: a primary on the embedded
//! database with a generated wildcard certificate, one edge per region that
//! asks for one, `devmesh agent` processes per region, and the WAN relays in
//! front of every cross-region path. Or attaches to an existing deployment
//! by URL and API key and only starts agents. Processes are killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::procstat::Monitor;
use crate::scenario::{Protocol, Scenario};
use crate::wan::{LinkSpec, TcpRelay};

/// Where the app domain lives; every `*.localhost` name resolves to loopback.
pub const APPS_DOMAIN: &str = "apps.localhost";

/// How to get a deployment.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `devmesh` binary.
    pub devmesh: PathBuf,
    /// Logs and generated files go here.
    pub out: PathBuf,
    /// An existing deployment instead of starting one.
    pub existing: Option<Existing>,
}

/// An existing deployment to target.
#[derive(Clone)]
pub struct Existing {
    /// Its URL.
    pub url: String,
    /// An owner's API key.
    pub api_key: String,
    /// Extra CA to trust for its HTTPS.
    pub ca_cert: Option<PathBuf>,
}

impl std::fmt::Debug for Existing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Existing")
            .field("url", &self.url)
            .field("api_key", &"****")
            .finish()
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Its pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, as a crash would, and reap.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// One edge.
#[derive(Debug)]
pub struct EdgeNode {
    /// Its region (and name).
    pub region: String,
    /// Where its HTTPS listens.
    pub listen: SocketAddr,
    /// The process, `None` after a kill.
    pub proc: Option<Proc>,
    /// How an app is reached through it, when it serves apps.
    pub app_host_suffix: Option<String>,
    /// Why the edge path is unavailable, when it is.
    pub unavailable: Option<String>,
    /// The command to start it again.
    pub args: Vec<String>,
}

/// One `devmesh agent`.
#[derive(Debug)]
pub struct AgentNode {
    /// Its region.
    pub region: String,
    /// Its workspace.
    pub workspace: String,
    /// The process.
    pub proc: Proc,
}

/// An HTTP path to the app: a base URL and whether it needs the session token.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    /// Label in the report: `devmesh`, `direct`, `nginx`, ….
    pub name: String,
    /// `scheme://host:port`.
    pub base: String,
    /// Send `Devmesh-Session-Token`.
    #[serde(skip)]
    pub token: Option<String>,
}

/// A running deployment.
#[derive(Debug)]
pub struct Deployment {
    /// Temporary files (database, certificates).
    pub dir: tempfile::TempDir,
    /// The CA every HTTPS endpoint here chains to.
    pub ca_pem: PathBuf,
    /// The wildcard certificate and key (also served by nginx).
    pub cert: PathBuf,
    /// Key of `cert`.
    pub key: PathBuf,
    /// The primary, when this run started it.
    pub primary: Option<Proc>,
    /// The primary's URL.
    pub url: String,
    /// The primary's socket address.
    pub primary_addr: SocketAddr,
    /// Session token or API key.
    pub token: String,
    /// The user whose workspaces these are.
    pub user: String,
    /// Prefix of this run's template and workspaces.
    pub run_id: String,
    /// The upstream app's port.
    pub app_port: u16,
    /// Edges by region.
    pub edges: Vec<EdgeNode>,
    /// Agents.
    pub agents: Vec<AgentNode>,
    /// The API client.
    pub http: reqwest::Client,
    /// CPU and RSS sampling of every devmesh process.
    pub monitor: Monitor,
    /// `(from region, to region)` → the WAN relay in front of the target.
    pub wan: Vec<WanFront>,
    /// UDP fronts of the edges' relays (agent→relay and relay→relay links).
    pub relay_fronts: Vec<(String, crate::wan::UdpRelay)>,
    /// The scenario's client region.
    pub client_region: String,
    /// The primary's region.
    pub primary_region: String,
    /// The devmesh binary.
    pub devmesh: PathBuf,
    /// Logs.
    pub out: PathBuf,
    stop: CancellationToken,
}

/// A WAN relay in front of an entry point.
#[derive(Debug)]
pub struct WanFront {
    /// Where the traffic comes from.
    pub from: String,
    /// Which entry point it reaches (`primary` or an edge's region).
    pub to: String,
    /// The relay.
    pub relay: TcpRelay,
    /// The link it emulates.
    pub spec: LinkSpec,
}

/// Resolves every name to 127.0.0.1 (so `*.apps.localhost` reaches the
/// deployment whatever the resolver thinks of `.localhost`).
#[derive(Debug, Clone)]
pub struct Loopback;

impl reqwest::dns::Resolve for Loopback {
    fn resolve(&self, _: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async {
            let addrs: reqwest::dns::Addrs =
                Box::new(std::iter::once(SocketAddr::from(([127, 0, 0, 1], 0))));
            Ok(addrs)
        })
    }
}

/// An HTTP client for app traffic: loopback DNS, the run's CA, no redirects.
pub fn app_client(ca_pem: &Path, proto: Protocol) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_pem)?)?;
    let mut b = reqwest::Client::builder()
        .dns_resolver(Arc::new(Loopback))
        .add_root_certificate(ca)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(600));
    b = match proto {
        Protocol::Http1 => b.http1_only(),
        Protocol::Http2 => b.http2_prior_knowledge(),
    };
    Ok(b.build()?)
}

/// A free TCP port on loopback (bound and released: a small race that the
/// start-up check catches).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn log_file(out: &Path, name: &str) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let path = out.join("logs").join(format!("{name}.log"));
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let f = std::fs::File::create(&path)?;
    Ok((path, f))
}

/// Spawns `devmesh <args>`, stderr to a log, and waits for the stdout line
/// starting with `ready` (returning the rest of it).
async fn spawn_ready(
    devmesh: &Path,
    args: &[String],
    envs: &[(&str, String)],
    out: &Path,
    name: &str,
    ready: &str,
    timeout: Duration,
) -> anyhow::Result<(Proc, String)> {
    let (log, f) = log_file(out, name)?;
    let mut child = Command::new(devmesh)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DEVMESH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(f)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", devmesh.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let found = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(ready) {
                return Some(rest.to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let Some(rest) = found else {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: String = tail.lines().rev().take(10).collect::<Vec<_>>().join("\n");
        bail!("{name} did not start (log {}):\n{tail}", log.display());
    };
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Proc { child, log }, rest))
}

impl Deployment {
    /// Starts (or attaches to) the deployment the scenario describes.
    pub async fn start(
        scenario: &Scenario,
        opts: &Options,
        app_port: u16,
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("devmesh-loadtest-")
            .tempdir()?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The embedded PostgreSQL runs as `postgres` when we are root.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            format!("*.{APPS_DOMAIN}"),
        ];
        for r in &scenario.topology.regions {
            names.push(format!("*.{}.{APPS_DOMAIN}", r.name));
            names.push(format!("{}.localhost", r.name));
        }
        let (ca_pem, cert, key) = devmesh_net::tls::self_signed(&dir.path().join("tls"), &names)?;
        let monitor = Monitor::start(Duration::from_millis(250));
        let run_id = format!("lt{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);

        let mut primary_relay: Option<SocketAddr> = None;
        let stop = CancellationToken::new();
        let link = |a: &str, b: &str| LinkSpec {
            jitter: Duration::from_secs_f64(scenario.wan.jitter_ms / 1000.0),
            loss: scenario.wan.loss,
            bytes_per_s: (scenario.wan.bandwidth_mbit > 0.0)
                .then(|| scenario.wan.bandwidth_mbit * 1e6 / 8.0),
            ..LinkSpec::rtt(scenario.wan.rtt(a, b))
        };
        // Fronts that must exist before the process behind them starts.
        let mut early_fronts: Vec<WanFront> = Vec::new();
        let (primary, url, token, http) = match &opts.existing {
            Some(e) => {
                let mut b = reqwest::Client::builder().timeout(Duration::from_secs(60));
                if let Some(ca) = &e.ca_cert {
                    b = b
                        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
                }
                (
                    None,
                    e.url.trim_end_matches('/').to_owned(),
                    e.api_key.clone(),
                    b.build()?,
                )
            }
            None => {
                progress.set_message("starting devmesh server (embedded PostgreSQL)");
                let port = free_port()?;
                primary_relay = Some(([127, 0, 0, 1], free_udp_port()?).into());
                // Clients in other regions reach the primary over their link,
                // and its access URL names that front, so the app sign-in
                // redirects (checked against it) come back the same way.
                let mut access_port = port;
                let (client, home) = (
                    &scenario.topology.client_region,
                    &scenario.topology.primary_region,
                );
                if scenario.wan.enabled && client != home {
                    let spec = link(client, home);
                    let relay =
                        TcpRelay::start(([127, 0, 0, 1], port).into(), spec, stop.clone()).await?;
                    access_port = relay.addr.port();
                    early_fronts.push(WanFront {
                        from: client.clone(),
                        to: "primary".into(),
                        relay,
                        spec,
                    });
                }
                // Every load client is 127.0.0.1: no per-IP cap.
                let args: Vec<String> = [
                    "server",
                    "--max-connections-per-ip",
                    "0",
                    "--http-address",
                    &format!("127.0.0.1:{port}"),
                    "--relay-address",
                    &primary_relay
                        .map(|a: SocketAddr| a.to_string())
                        .unwrap_or_default(),
                    "--access-url",
                    &format!("https://localhost:{access_port}"),
                    "--wildcard-access-url",
                    &format!("*.{APPS_DOMAIN}"),
                    "--data-dir",
                    &dir.path().join("data").display().to_string(),
                    "--tls-cert",
                    &cert.display().to_string(),
                    "--tls-key",
                    &key.display().to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let (proc, url) = spawn_ready(
                    &opts.devmesh,
                    &args,
                    &[],
                    &opts.out,
                    "primary",
                    "Started HTTP listener at ",
                    Duration::from_secs(120),
                )
                .await?;
                monitor.add("primary", proc.pid().unwrap_or(0));
                let http = reqwest::Client::builder()
                    .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca_pem)?)?)
                    .timeout(Duration::from_secs(60))
                    .build()?;
                let url = url.replace("127.0.0.1", "localhost");
                let api = |p: &str| format!("{url}/api/v2{p}");
                call(&http, http.post(api("/users/first")), None, json!({"email": "loadtest@example.com", "username": "loadtest", "password": "loadtest-password"})).await?;
                let login = call(
                    &http,
                    http.post(api("/users/login")),
                    None,
                    json!({"email": "loadtest", "password": "loadtest-password"}),
                )
                .await?;
                let token = login["session_token"]
                    .as_str()
                    .context("session token")?
                    .to_owned();
                (Some(proc), url, token, http)
            }
        };
        let api = |p: &str| format!("{url}/api/v2{p}");
        let me = call(&http, http.get(api("/users/me")), Some(&token), Value::Null).await?;
        let user = me["username"].as_str().context("username")?.to_owned();
        let primary_addr = tokio::net::lookup_host(
            url.split("://")
                .nth(1)
                .context("url")?
                .split('/')
                .next()
                .context("host")?,
        )
        .await?
        .find(|a| a.is_ipv4())
        .context("the primary's address does not resolve")?;

        let mut dep = Deployment {
            dir,
            ca_pem,
            cert,
            key,
            primary,
            url: url.clone(),
            primary_addr,
            token: token.clone(),
            user,
            run_id: run_id.clone(),
            app_port,
            edges: Vec::new(),
            agents: Vec::new(),
            http,
            monitor,
            wan: early_fronts,
            relay_fronts: Vec::new(),
            client_region: scenario.topology.client_region.clone(),
            primary_region: scenario.topology.primary_region.clone(),
            devmesh: opts.devmesh.clone(),
            out: opts.out.clone(),
            stop,
        };

        // The template: one agent serving the upstream app.
        dep.api_post(
            "/templates",
            json!({"name": run_id, "definition": {"agents": [{"name": "main", "apps": [{"slug": "app", "port": app_port}]}]}}),
        )
        .await?;

        // Edges. Each relay's socket port is chosen first: with WAN
        // emulation, an edge advertises a UDP front that applies its own
        // region's link to agents and each peer's link to datagrams from
        // that peer relay's socket (the mesh), so every relay link is
        // emulated too.
        let edge_regions: Vec<String> = scenario
            .topology
            .regions
            .iter()
            .filter(|r| r.edges > 0)
            .map(|r| r.name.clone())
            .collect();
        let mut relay_binds = std::collections::HashMap::new();
        for name in &edge_regions {
            relay_binds.insert(
                name.clone(),
                SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
            );
        }
        for r in scenario.topology.regions.iter().filter(|r| r.edges > 0) {
            progress.set_message(format!("starting edge {}", r.name));
            let edge_name = if opts.existing.is_some() {
                format!("{}-{}", r.name, &run_id[2..])
            } else {
                r.name.clone()
            };
            let port = free_port()?;
            let bind = relay_binds[&r.name];
            let mut advertised = bind;
            if scenario.wan.enabled {
                let mut by_source = std::collections::HashMap::new();
                for (other, addr) in &relay_binds {
                    if other != &r.name {
                        by_source.insert(*addr, link(other, &r.name));
                    }
                }
                if let Some(p) = primary_relay {
                    by_source.insert(p, link(&dep.primary_region, &r.name));
                }
                let front = crate::wan::UdpRelay::start_by_source(
                    bind,
                    link(&r.name, &r.name),
                    by_source,
                    dep.stop.clone(),
                )
                .await?;
                advertised = front.addr;
                dep.relay_fronts.push((r.name.clone(), front));
            }
            // The edge reaches the primary over its region's link, and
            // clients reach the edge over theirs: its access URL names the
            // client's front, so sign-in redirects come back through it.
            let (mut primary_url, mut access_port) = (url.clone(), port);
            if scenario.wan.enabled {
                let spec = link(&r.name, &dep.primary_region);
                let relay = TcpRelay::start(dep.primary_addr, spec, dep.stop.clone()).await?;
                primary_url = format!("https://localhost:{}", relay.addr.port());
                dep.wan.push(WanFront {
                    from: r.name.clone(),
                    to: "primary".into(),
                    relay,
                    spec,
                });
                let spec = link(&dep.client_region, &r.name);
                let relay =
                    TcpRelay::start(([127, 0, 0, 1], port).into(), spec, dep.stop.clone()).await?;
                access_port = relay.addr.port();
                dep.wan.push(WanFront {
                    from: dep.client_region.clone(),
                    to: r.name.clone(),
                    relay,
                    spec,
                });
            }
            // The owner sets where the edge is; it registers with exactly that.
            let access_url = format!("https://{}.localhost:{access_port}", r.name);
            let created = dep
                .api_post(
                    "/edges",
                    json!({
                        "name": edge_name,
                        "access_url": access_url,
                        "wildcard_hostname": format!("*.{}.{APPS_DOMAIN}", r.name),
                        "relay_hosts": [advertised.ip().to_string()],
                    }),
                )
                .await?;
            let edge_token = created["edge_token"]
                .as_str()
                .context("edge token")?
                .to_owned();
            let args: Vec<String> = vec![
                "edge".into(),
                "--max-connections-per-ip".into(),
                "0".into(),
                "--access-checks-per-minute".into(),
                "0".into(),
                "--primary-url".into(),
                primary_url,
                "--edge-token".into(),
                edge_token,
                "--access-url".into(),
                access_url,
                "--wildcard-access-url".into(),
                format!("*.{}.{APPS_DOMAIN}", r.name),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--relay-address".into(),
                advertised.to_string(),
                "--relay-bind".into(),
                bind.to_string(),
                "--tls-cert".into(),
                dep.cert.display().to_string(),
                "--tls-key".into(),
                dep.key.display().to_string(),
                "--ca-cert".into(),
                dep.ca_pem.display().to_string(),
            ];
            let (proc, _) = spawn_ready(
                &dep.devmesh,
                &args,
                &[],
                &dep.out,
                &format!("edge-{}", r.name),
                "Started edge listener at ",
                Duration::from_secs(30),
            )
            .await?;
            dep.monitor
                .add(format!("edge {}", r.name), proc.pid().unwrap_or(0));
            dep.edges.push(EdgeNode {
                region: r.name.clone(),
                listen: ([127, 0, 0, 1], port).into(),
                proc: Some(proc),
                app_host_suffix: None,
                unavailable: None,
                args,
            });
        }

        // WAN relays in front of every entry point, from the client's region
        // and from each agent region to the primary.
        if scenario.wan.enabled {
            let spec_for = |a: &str, b: &str| LinkSpec {
                jitter: Duration::from_secs_f64(scenario.wan.jitter_ms / 1000.0),
                loss: scenario.wan.loss,
                bytes_per_s: (scenario.wan.bandwidth_mbit > 0.0)
                    .then(|| scenario.wan.bandwidth_mbit * 1e6 / 8.0),
                ..LinkSpec::rtt(scenario.wan.rtt(a, b))
            };
            let mut fronts = vec![(dep.client_region.clone(), "primary".to_owned())];
            for e in &dep.edges {
                fronts.push((dep.client_region.clone(), e.region.clone()));
            }
            for r in &scenario.topology.regions {
                if r.agents > 0 && !fronts.contains(&(r.name.clone(), "primary".to_owned())) {
                    fronts.push((r.name.clone(), "primary".to_owned()));
                }
            }
            for (from, to) in fronts {
                if dep.wan_front(&from, &to).is_some() {
                    continue;
                }
                let (target, to_region) = if to == "primary" {
                    (dep.primary_addr, dep.primary_region.clone())
                } else {
                    let e = dep.edges.iter().find(|e| e.region == to).expect("edge");
                    (e.listen, e.region.clone())
                };
                let spec = spec_for(&from, &to_region);
                let relay = TcpRelay::start(target, spec, dep.stop.clone()).await?;
                dep.wan.push(WanFront {
                    from,
                    to,
                    relay,
                    spec,
                });
            }
        }

        // Agents: one workspace each.
        for r in &scenario.topology.regions {
            for i in 0..r.agents {
                let ws = format!("{run_id}-{}-{i}", r.name);
                progress.set_message(format!("starting agent {ws}"));
                let created = dep
                    .api_post("/workspaces", json!({"name": ws, "template": run_id}))
                    .await?;
                let agent_token = created["agent_tokens"][0]["token"]
                    .as_str()
                    .context("agent token")?
                    .to_owned();
                // An agent outside the primary's region reaches the primary's
                // API through its WAN link (its QUIC relay address comes from
                // the manifest and is not emulated).
                let primary_url = match dep.wan_front(&r.name, "primary") {
                    Some(f) if r.name != dep.primary_region => {
                        format!("https://localhost:{}", f.relay.addr.port())
                    }
                    _ => dep.url.clone(),
                };
                let (log, f) = log_file(&dep.out, &format!("agent-{ws}"))?;
                let child = Command::new(&dep.devmesh)
                    .arg("agent")
                    .env("DEVMESH_URL", primary_url)
                    .env("DEVMESH_AGENT_TOKEN", agent_token)
                    .env("DEVMESH_CA_CERT", &dep.ca_pem)
                    // Agents stay in their region while its edge answers
                    // (on loopback every relay is equally near).
                    .env("DEVMESH_RELAY_REGION", &r.name)
                    .env("DEVMESH_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(f)
                    .kill_on_drop(true)
                    .spawn()?;
                let proc = Proc { child, log };
                dep.monitor
                    .add(format!("agent {}/{i}", r.name), proc.pid().unwrap_or(0));
                dep.agents.push(AgentNode {
                    region: r.name.clone(),
                    workspace: ws,
                    proc,
                });
            }
        }
        progress.set_message("waiting for the agents to attach");
        for i in 0..dep.agents.len() {
            dep.wait_attached(i, Duration::from_secs(60)).await?;
        }
        for i in 0..dep.edges.len() {
            dep.probe_edge(i).await;
        }
        Ok(dep)
    }

    /// The WAN relay from `from` to `to` (`primary` or an edge's region).
    pub fn wan_front(&self, from: &str, to: &str) -> Option<&WanFront> {
        self.wan.iter().find(|f| f.from == from && f.to == to)
    }

    /// The app host of agent `i` under `suffix` (the primary's app domain by default).
    pub fn app_host(&self, i: usize, suffix: Option<&str>) -> String {
        format!(
            "app--main--{}--{}.{}",
            self.agents[i].workspace,
            self.user,
            suffix.unwrap_or(APPS_DOMAIN)
        )
    }

    /// The devmesh path to agent `i`'s app through the primary, from the client's region.
    /// With `wan`, through the emulated link from the client's region.
    pub fn via_primary(&self, i: usize, wan: bool) -> Endpoint {
        let port = self
            .wan_front(&self.client_region, "primary")
            .filter(|_| wan)
            .map_or(self.primary_addr.port(), |f| f.relay.addr.port());
        Endpoint {
            name: "devmesh".into(),
            base: format!("https://{}:{port}", self.app_host(i, None)),
            token: Some(self.token.clone()),
        }
    }

    /// The path through edge `e`, when it serves apps.
    pub fn via_edge(&self, e: usize, agent: usize, wan: bool) -> Option<Endpoint> {
        let edge = &self.edges[e];
        let suffix = edge.app_host_suffix.as_deref()?;
        let port = self
            .wan_front(&self.client_region, &edge.region)
            .filter(|_| wan)
            .map_or(edge.listen.port(), |f| f.relay.addr.port());
        Some(Endpoint {
            name: format!("devmesh via edge {}", edge.region),
            base: format!("https://{}:{port}", self.app_host(agent, Some(suffix))),
            token: Some(self.token.clone()),
        })
    }

    /// Whether agent `i`'s app answers through the primary.
    pub async fn app_ok(&self, i: usize) -> bool {
        let Ok(client) = app_client(&self.ca_pem, Protocol::Http1) else {
            return false;
        };
        let url = format!(
            "https://{}:{}/echo?size=16",
            self.app_host(i, None),
            self.primary_addr.port()
        );
        matches!(
            client
                .get(url)
                .header("Devmesh-Session-Token", &self.token)
                .timeout(Duration::from_secs(5))
                .send()
                .await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Polls until agent `i`'s app answers through the primary.
    pub async fn wait_attached(&self, i: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if self.app_ok(i).await {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "agent {} did not attach within {timeout:?} (log {})",
                    self.agents[i].workspace,
                    self.agents[i].proc.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Finds out whether edge `e` proxies apps: tries the region's app
    /// domain and the global one on the edge's listener.
    pub async fn probe_edge(&mut self, e: usize) {
        let Ok(client) = app_client(&self.ca_pem, Protocol::Http1) else {
            return;
        };
        let region = self.edges[e].region.clone();
        let port = self.edges[e].listen.port();
        let agent = self
            .agents
            .iter()
            .position(|a| a.region == region)
            .unwrap_or(0);
        let mut last = String::new();
        for suffix in [format!("{region}.{APPS_DOMAIN}"), APPS_DOMAIN.to_owned()] {
            let url = format!(
                "https://{}:{port}/echo?size=16",
                self.app_host(agent, Some(&suffix))
            );
            match client
                .get(&url)
                .header("Devmesh-Session-Token", &self.token)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let body = r.bytes().await.unwrap_or_default();
                    if body.len() == 16 {
                        self.edges[e].app_host_suffix = Some(suffix);
                        self.edges[e].unavailable = None;
                        return;
                    }
                    last = format!("{url}: unexpected body of {} bytes", body.len());
                }
                Ok(r) => last = format!("{url}: HTTP {}", r.status()),
                Err(err) => last = format!("{url}: {err}"),
            }
        }
        self.edges[e].unavailable = Some(format!(
            "edge path unavailable: the edge does not serve apps yet ({last}); measured through the primary instead"
        ));
    }

    /// Kills edge `e` (SIGKILL).
    pub async fn kill_edge(&mut self, e: usize) {
        let region = self.edges[e].region.clone();
        if let Some(mut p) = self.edges[e].proc.take() {
            p.kill().await;
        }
        self.monitor.remove(&format!("edge {region}"));
    }

    /// POST to the API with the run's token.
    pub async fn api_post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let req = self.http.post(format!("{}/api/v2{path}", self.url));
        call(&self.http, req, Some(&self.token), body).await
    }

    /// GET from the API with the run's token.
    pub async fn api_get(&self, path: &str) -> anyhow::Result<Value> {
        let req = self.http.get(format!("{}/api/v2{path}", self.url));
        call(&self.http, req, Some(&self.token), Value::Null).await
    }

    /// Every devmesh process by name and pid, for the report.
    pub fn processes(&self) -> Vec<(String, u32)> {
        let mut v = Vec::new();
        if let Some(p) = self.primary.as_ref().and_then(Proc::pid) {
            v.push(("primary".to_owned(), p));
        }
        for e in &self.edges {
            if let Some(p) = e.proc.as_ref().and_then(Proc::pid) {
                v.push((format!("edge {}", e.region), p));
            }
        }
        v
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends a JSON request and returns the JSON answer, failing on a non-2xx status.
pub async fn call(
    _http: &reqwest::Client,
    req: reqwest::RequestBuilder,
    token: Option<&str>,
    body: Value,
) -> anyhow::Result<Value> {
    let mut req = req;
    if !body.is_null() {
        req = req.json(&body);
    }
    if let Some(t) = token {
        req = req.header("Devmesh-Session-Token", t);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    Ok(if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    })
}
