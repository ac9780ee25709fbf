//! Starts a whole deployment from a [`Scenario`]: a primary on the embedded
//! database with a generated wildcard certificate, one edge per region that
//! asks for one, `devmesh agent` processes per region, and the WAN relays in
//! front of every cross-region path. Or attaches to an existing deployment
//! by URL and API key and only starts agents. Processes are killed on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use devmesh_tests::process::{AgentProcess, EdgeProcess, Launch, ServerProcess};
pub use devmesh_tests::process::{Loopback, Process, free_port, free_udp_port};
use serde::Serialize;
use serde_json::{Value, json};
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

/// One edge.
#[derive(Debug)]
pub struct EdgeNode {
    /// Its region (and name).
    pub region: String,
    /// Where its HTTPS listens.
    pub listen: SocketAddr,
    /// The process, `None` after a kill.
    pub proc: Option<Process>,
    /// How an app is reached through it, when it serves apps.
    pub app_host_suffix: Option<String>,
    /// Why the edge path is unavailable, when it is.
    pub unavailable: Option<String>,
    /// How it was started, to start it again (chaos).
    pub relaunch: Launch,
}

/// One `devmesh agent`.
#[derive(Debug)]
pub struct AgentNode {
    /// Its region.
    pub region: String,
    /// Its workspace.
    pub workspace: String,
    /// The process.
    pub proc: Process,
    /// How it was started, to start it again (chaos): the primary URL it
    /// was given, its token, and the launch.
    pub relaunch: (String, String, Launch),
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
    pub primary: Option<Process>,
    /// How the primary was started, when this run started it.
    pub primary_launch: Option<Launch>,
    /// The primary's URL.
    pub url: String,
    /// The primary's socket address.
    pub primary_addr: SocketAddr,
    /// The primary's relay address, when this run started the primary.
    pub primary_relay: Option<SocketAddr>,
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
    /// Whether this run attached to an existing deployment.
    pub existing: bool,
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

/// The WAN link settings between two regions of the scenario.
fn link_between(scenario: &Scenario, a: &str, b: &str) -> LinkSpec {
    LinkSpec {
        jitter: Duration::from_secs_f64(scenario.wan.jitter_ms / 1000.0),
        loss: scenario.wan.loss,
        bytes_per_s: (scenario.wan.bandwidth_mbit > 0.0)
            .then(|| scenario.wan.bandwidth_mbit * 1e6 / 8.0),
        ..LinkSpec::rtt(scenario.wan.rtt(a, b))
    }
}

/// How the run reaches the primary's API.
struct PrimaryAccess {
    proc: Option<Process>,
    /// How it was started, to start it again (chaos).
    launch: Option<Launch>,
    url: String,
    token: String,
    http: reqwest::Client,
    /// The primary's own relay address, when this run started it.
    relay: Option<SocketAddr>,
    /// The WAN front from the client's region, when it needs one at start.
    front: Option<WanFront>,
}

/// The run's directory, CA and wildcard certificate.
struct Files {
    dir: tempfile::TempDir,
    ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    /// A temporary directory the embedded PostgreSQL may enter, and one
    /// certificate for the primary's and every region's names.
    fn create(scenario: &Scenario) -> anyhow::Result<Self> {
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
        Ok(Self {
            dir,
            ca_pem,
            cert,
            key,
        })
    }
}

/// A daemon's launch for this run: the run's binary, quiet logs in the
/// run's log folder.
fn launch(bin: &Path, out: &Path, name: &str) -> anyhow::Result<Launch> {
    let log = out.join("logs").join(format!("{name}.log"));
    std::fs::create_dir_all(log.parent().expect("has a parent"))?;
    Ok(Launch {
        bin: bin.to_owned(),
        args: Vec::new(),
        env: Vec::new(),
        log,
        // `DEVMESH_LOADTEST_LOG` sets the processes' log filter (as
        // `DEVMESH_LOG` does one's), to diagnose a run.
        log_filter: std::env::var("DEVMESH_LOADTEST_LOG").unwrap_or_else(|_| "warn".into()),
    })
}

impl Deployment {
    /// Starts (or attaches to) the deployment the scenario describes: the
    /// primary, the template, the edges, the WAN fronts, the agents; then
    /// waits until every agent's app answers.
    pub async fn start(
        scenario: &Scenario,
        opts: &Options,
        app_port: u16,
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<Self> {
        let files = Files::create(scenario)?;
        let stop = CancellationToken::new();
        let access = match &opts.existing {
            Some(e) => Self::existing_primary(e)?,
            None => {
                progress.set_message("starting devmesh server (embedded PostgreSQL)");
                Self::start_primary(scenario, opts, &files, &stop).await?
            }
        };
        let mut dep = Self::assemble(scenario, opts, files, access, app_port, stop).await?;
        dep.api_post(
            "/templates",
            json!({"name": dep.run_id, "definition": {"agents": [{"name": "main", "apps": [{"slug": "app", "port": app_port}]}]}}),
        )
        .await?;
        dep.start_edges(scenario, progress).await?;
        if scenario.wan.enabled {
            dep.start_wan_fronts(scenario).await?;
        }
        dep.start_agents(scenario, progress).await?;
        progress.set_message("waiting for the agents to attach");
        for i in 0..dep.agents.len() {
            dep.wait_attached(i, Duration::from_secs(60)).await?;
        }
        for i in 0..dep.edges.len() {
            dep.probe_edge(i).await;
        }
        Ok(dep)
    }

    /// An existing deployment, reached with its URL and an owner's key.
    fn existing_primary(e: &Existing) -> anyhow::Result<PrimaryAccess> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(60));
        if let Some(ca) = &e.ca_cert {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
        }
        Ok(PrimaryAccess {
            proc: None,
            launch: None,
            url: e.url.trim_end_matches('/').to_owned(),
            token: e.api_key.clone(),
            http: b.build()?,
            relay: None,
            front: None,
        })
    }

    /// Starts `devmesh server` on the embedded database with the run's
    /// certificate, creates the first user and signs in.
    async fn start_primary(
        scenario: &Scenario,
        opts: &Options,
        files: &Files,
        stop: &CancellationToken,
    ) -> anyhow::Result<PrimaryAccess> {
        let port = free_port()?;
        let relay = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        // Clients in other regions reach the primary over their link, and
        // its access URL names that front, so the app sign-in redirects
        // (checked against it) come back the same way.
        let (client, home) = (
            &scenario.topology.client_region,
            &scenario.topology.primary_region,
        );
        let mut front = None;
        let mut access_port = port;
        if scenario.wan.enabled && client != home {
            let spec = link_between(scenario, client, home);
            let relay = TcpRelay::start(([127, 0, 0, 1], port).into(), spec, stop.clone()).await?;
            access_port = relay.addr.port();
            front = Some(WanFront {
                from: client.clone(),
                to: "primary".into(),
                relay,
                spec,
            });
        }
        // Every load client is 127.0.0.1: no per-IP cap.
        let launch = launch(&opts.devmesh, &opts.out, "primary")?.args([
            "--max-connections-per-ip".to_owned(),
            "0".to_owned(),
            "--http-address".to_owned(),
            format!("127.0.0.1:{port}"),
            "--relay-address".to_owned(),
            relay.to_string(),
            "--access-url".to_owned(),
            format!("https://localhost:{access_port}"),
            "--wildcard-access-url".to_owned(),
            format!("*.{APPS_DOMAIN}"),
            "--data-dir".to_owned(),
            files.dir.path().join("data").display().to_string(),
            "--tls-cert".to_owned(),
            files.cert.display().to_string(),
            "--tls-key".to_owned(),
            files.key.display().to_string(),
        ]);
        let server = ServerProcess::launch(launch.clone(), Duration::from_secs(120)).await?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
                &files.ca_pem,
            )?)?)
            .timeout(Duration::from_secs(60))
            .build()?;
        let url = server.url.replace("127.0.0.1", "localhost");
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
        Ok(PrimaryAccess {
            proc: Some(server.process),
            launch: Some(launch),
            url,
            token,
            http,
            relay: Some(relay),
            front,
        })
    }

    /// The deployment around a reachable primary, before edges and agents.
    async fn assemble(
        scenario: &Scenario,
        opts: &Options,
        files: Files,
        access: PrimaryAccess,
        app_port: u16,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let PrimaryAccess {
            proc,
            launch: primary_launch,
            url,
            token,
            http,
            relay,
            front,
        } = access;
        let me = call(
            &http,
            http.get(format!("{url}/api/v2/users/me")),
            Some(&token),
            Value::Null,
        )
        .await?;
        let user = me["username"].as_str().context("username")?.to_owned();
        let host = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .context("the primary's URL has no host")?;
        let primary_addr = tokio::net::lookup_host(host)
            .await?
            .find(|a| a.is_ipv4())
            .context("the primary's address does not resolve")?;
        let monitor = Monitor::start(Duration::from_millis(250));
        if let Some(pid) = proc.as_ref().and_then(Process::pid) {
            monitor.add("primary", pid);
        }
        // The tool itself competes for the same cores: its CPU is shown
        // beside devmesh's.
        monitor.add("load generator", std::process::id());
        Ok(Deployment {
            dir: files.dir,
            ca_pem: files.ca_pem,
            cert: files.cert,
            key: files.key,
            primary: proc,
            primary_launch,
            url,
            primary_addr,
            primary_relay: relay,
            token,
            user,
            run_id: format!("lt{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
            app_port,
            edges: Vec::new(),
            agents: Vec::new(),
            http,
            monitor,
            wan: front.into_iter().collect(),
            relay_fronts: Vec::new(),
            client_region: scenario.topology.client_region.clone(),
            primary_region: scenario.topology.primary_region.clone(),
            devmesh: opts.devmesh.clone(),
            out: opts.out.clone(),
            existing: opts.existing.is_some(),
            stop,
        })
    }

    /// One edge per region that asks for one. Each relay's socket port is
    /// chosen first: with WAN emulation, an edge advertises a UDP front
    /// that applies its own region's link to agents and each peer's link to
    /// datagrams from that peer relay's socket (the mesh), so every relay
    /// link is emulated too.
    async fn start_edges(
        &mut self,
        scenario: &Scenario,
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        let mut relay_binds = HashMap::new();
        for r in scenario.topology.regions.iter().filter(|r| r.edges > 0) {
            relay_binds.insert(
                r.name.clone(),
                SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
            );
        }
        for r in scenario.topology.regions.iter().filter(|r| r.edges > 0) {
            progress.set_message(format!("starting edge {}", r.name));
            self.start_edge(scenario, &r.name, &relay_binds).await?;
        }
        Ok(())
    }

    /// Starts the edge of `region`, behind its WAN fronts when emulating.
    async fn start_edge(
        &mut self,
        scenario: &Scenario,
        region: &str,
        relay_binds: &HashMap<String, SocketAddr>,
    ) -> anyhow::Result<()> {
        let edge_name = if self.existing {
            format!("{region}-{}", &self.run_id[2..])
        } else {
            region.to_owned()
        };
        let port = free_port()?;
        let bind = relay_binds[region];
        let mut advertised = bind;
        // The edge reaches the primary over its region's link, and clients
        // reach the edge over theirs: its access URL names the client's
        // front, so sign-in redirects come back through it.
        let (mut primary_url, mut access_port) = (self.url.clone(), port);
        if scenario.wan.enabled {
            let mut by_source = HashMap::new();
            for (other, addr) in relay_binds {
                if other != region {
                    by_source.insert(*addr, link_between(scenario, other, region));
                }
            }
            if let Some(p) = self.primary_relay {
                by_source.insert(p, link_between(scenario, &self.primary_region, region));
            }
            let front = crate::wan::UdpRelay::start_by_source(
                bind,
                link_between(scenario, region, region),
                by_source,
                self.stop.clone(),
            )
            .await?;
            advertised = front.addr;
            self.relay_fronts.push((region.to_owned(), front));

            let spec = link_between(scenario, region, &self.primary_region);
            let relay = TcpRelay::start(self.primary_addr, spec, self.stop.clone()).await?;
            primary_url = format!("https://localhost:{}", relay.addr.port());
            self.wan.push(WanFront {
                from: region.to_owned(),
                to: "primary".into(),
                relay,
                spec,
            });
            let spec = link_between(scenario, &self.client_region, region);
            let relay =
                TcpRelay::start(([127, 0, 0, 1], port).into(), spec, self.stop.clone()).await?;
            access_port = relay.addr.port();
            self.wan.push(WanFront {
                from: self.client_region.clone(),
                to: region.to_owned(),
                relay,
                spec,
            });
        }
        // The owner sets where the edge is; it registers with exactly that.
        let access_url = format!("https://{region}.localhost:{access_port}");
        let wildcard = format!("*.{region}.{APPS_DOMAIN}");
        let created = self
            .api_post(
                "/edges",
                json!({
                    "name": edge_name,
                    "access_url": access_url,
                    "wildcard_hostname": wildcard,
                    "relay_hosts": [advertised.ip().to_string()],
                }),
            )
            .await?;
        let edge_token = created["edge_token"]
            .as_str()
            .context("edge token")?
            .to_owned();
        let launch = launch(&self.devmesh, &self.out, &format!("edge-{region}"))?
            .args([
                "--max-connections-per-ip".to_owned(),
                "0".to_owned(),
                "--access-checks-per-minute".to_owned(),
                "0".to_owned(),
                "--primary-url".to_owned(),
                primary_url,
                "--access-url".to_owned(),
                access_url,
                "--wildcard-access-url".to_owned(),
                wildcard,
                "--listen".to_owned(),
                format!("127.0.0.1:{port}"),
                "--relay-address".to_owned(),
                advertised.to_string(),
                "--relay-bind".to_owned(),
                bind.to_string(),
                "--tls-cert".to_owned(),
                self.cert.display().to_string(),
                "--tls-key".to_owned(),
                self.key.display().to_string(),
                "--ca-cert".to_owned(),
                self.ca_pem.display().to_string(),
            ])
            .envs([("DEVMESH_EDGE_TOKEN", edge_token)]);
        let edge = EdgeProcess::launch(launch.clone(), Duration::from_secs(30)).await?;
        self.monitor
            .add(format!("edge {region}"), edge.process.pid().unwrap_or(0));
        self.edges.push(EdgeNode {
            region: region.to_owned(),
            listen: ([127, 0, 0, 1], port).into(),
            proc: Some(edge.process),
            app_host_suffix: None,
            unavailable: None,
            relaunch: launch,
        });
        Ok(())
    }

    /// WAN relays in front of every entry point not fronted yet: from the
    /// client's region to the primary and each edge, and from each agent
    /// region to the primary.
    async fn start_wan_fronts(&mut self, scenario: &Scenario) -> anyhow::Result<()> {
        let mut fronts = vec![(self.client_region.clone(), "primary".to_owned())];
        for e in &self.edges {
            fronts.push((self.client_region.clone(), e.region.clone()));
        }
        for r in &scenario.topology.regions {
            if r.agents > 0 && !fronts.contains(&(r.name.clone(), "primary".to_owned())) {
                fronts.push((r.name.clone(), "primary".to_owned()));
            }
        }
        for (from, to) in fronts {
            if self.wan_front(&from, &to).is_some() {
                continue;
            }
            let (target, to_region) = if to == "primary" {
                (self.primary_addr, self.primary_region.clone())
            } else {
                let e = self
                    .edges
                    .iter()
                    .find(|e| e.region == to)
                    .context("a front to an edge that is not there")?;
                (e.listen, e.region.clone())
            };
            let spec = link_between(scenario, &from, &to_region);
            let relay = TcpRelay::start(target, spec, self.stop.clone()).await?;
            self.wan.push(WanFront {
                from,
                to,
                relay,
                spec,
            });
        }
        Ok(())
    }

    /// One workspace and one `devmesh agent` per agent the scenario asks
    /// for in each region.
    async fn start_agents(
        &mut self,
        scenario: &Scenario,
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        for r in &scenario.topology.regions {
            for i in 0..r.agents {
                let ws = format!("{}-{}-{i}", self.run_id, r.name);
                progress.set_message(format!("starting agent {ws}"));
                let created = self
                    .api_post("/workspaces", json!({"name": ws, "template": self.run_id}))
                    .await?;
                let agent_token = created["agent_tokens"][0]["token"]
                    .as_str()
                    .context("agent token")?;
                // An agent outside the primary's region reaches the
                // primary's API through its WAN link (its QUIC relay address
                // comes from the manifest and is not emulated).
                let primary_url = match self.wan_front(&r.name, "primary") {
                    Some(f) if r.name != self.primary_region => {
                        format!("https://localhost:{}", f.relay.addr.port())
                    }
                    _ => self.url.clone(),
                };
                let launch = launch(&self.devmesh, &self.out, &format!("agent-{ws}"))?.envs([
                    ("DEVMESH_CA_CERT", self.ca_pem.display().to_string()),
                    // Agents stay in their region while its edge answers (on
                    // loopback every relay is equally near).
                    ("DEVMESH_RELAY_REGION", r.name.clone()),
                ]);
                let agent = AgentProcess::launch(&primary_url, agent_token, launch.clone())?;
                self.monitor.add(
                    format!("agent {}/{i}", r.name),
                    agent.process.pid().unwrap_or(0),
                );
                self.agents.push(AgentNode {
                    region: r.name.clone(),
                    workspace: ws,
                    proc: agent.process,
                    relaunch: (primary_url, agent_token.to_owned(), launch),
                });
            }
        }
        Ok(())
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
    pub async fn app_ok(&self, client: &reqwest::Client, i: usize) -> bool {
        let url = format!(
            "https://{}:{}/blob/16",
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

    /// Polls until agent `i`'s app answers through the primary, on one
    /// client whose connections are kept: a fresh TLS connection per poll
    /// would add its handshake's round trips to the time measured.
    pub async fn wait_attached(&self, i: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let client = app_client(&self.ca_pem, Protocol::Http1)?;
        loop {
            if self.app_ok(&client, i).await {
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
                "https://{}:{port}/blob/16",
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

    /// Starts edge `e` again the way it was started (after
    /// [`Deployment::kill_edge`]); returns once it listens.
    pub async fn restart_edge(&mut self, e: usize) -> anyhow::Result<()> {
        self.kill_edge(e).await;
        let node = &mut self.edges[e];
        let mut launch = node.relaunch.clone();
        launch.log = launch
            .log
            .with_file_name(format!("edge-{}-restarted.log", node.region));
        let edge = EdgeProcess::launch(launch, Duration::from_secs(30)).await?;
        self.monitor.add(
            format!("edge {}", node.region),
            edge.process.pid().unwrap_or(0),
        );
        node.proc = Some(edge.process);
        Ok(())
    }

    /// SIGKILLs the primary (as a crash would) and starts it again the
    /// same way, on the same data directory and ports; returns once it
    /// listens again.
    pub async fn restart_primary(&mut self) -> anyhow::Result<()> {
        let mut launch = self
            .primary_launch
            .clone()
            .context("this run did not start the primary")?;
        if let Some(mut p) = self.primary.take() {
            p.kill().await;
        }
        launch.log = launch.log.with_file_name("primary-restarted.log");
        let server = ServerProcess::launch(launch, Duration::from_secs(120)).await?;
        self.monitor
            .add("primary", server.process.pid().unwrap_or(0));
        self.primary = Some(server.process);
        Ok(())
    }

    /// SIGKILLs agent `i` and starts it again the same way.
    pub async fn restart_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let region = self.agents[i].region.clone();
        let nth = self.agents[..i]
            .iter()
            .filter(|a| a.region == region)
            .count();
        let node = &mut self.agents[i];
        node.proc.kill().await;
        let (url, token, launch) = &node.relaunch;
        let mut launch = launch.clone();
        launch.log = launch
            .log
            .with_file_name(format!("agent-{}-restarted.log", node.workspace));
        let agent = AgentProcess::launch(url, token, launch)?;
        self.monitor.add(
            format!("agent {region}/{nth}"),
            agent.process.pid().unwrap_or(0),
        );
        node.proc = agent.process;
        Ok(())
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
        if let Some(p) = self.primary.as_ref().and_then(Process::pid) {
            v.push(("primary".to_owned(), p));
        }
        for e in &self.edges {
            if let Some(p) = e.proc.as_ref().and_then(Process::pid) {
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
