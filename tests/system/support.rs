//! Fixtures for tests that run the real binaries.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_devmesh");

/// A `devmesh server` process, killed on drop.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) url: String,
    pub(crate) log: PathBuf,
}

impl ServerProcess {
    pub(crate) async fn start(args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("server-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(BIN);
        cmd.arg("server");
        // Free ports by default: tests run in parallel.
        if !args.contains(&"--http-address") {
            cmd.args(["--http-address", "127.0.0.1:0"]);
        }
        if !args.contains(&"--relay-address") {
            cmd.args(["--relay-address", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn devmesh server");
        let url = started_url(&mut child, "Started HTTP listener at ", 90, &log).await;
        Self { child, url, log }
    }

    pub(crate) fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id().expect("running") as i32), sig).expect("signal server");
    }

    /// SIGTERM and wait for a clean exit.
    pub(crate) async fn stop(mut self) {
        self.signal(Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("stops in time")
            .unwrap();
        assert!(
            status.success(),
            "exit {status}:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// SIGTERM and wait, keeping the value (to replace it afterwards).
    pub(crate) async fn terminate(&mut self) {
        self.signal(Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("stops in time")
            .unwrap();
        assert!(status.success(), "exit {status}");
    }

    /// SIGKILL, as a crash would.
    pub(crate) async fn crash(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// Runs the CLI with its own config directory.
pub(crate) async fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DEVMESH_CONFIG_DIR", config)
        .env_remove("DEVMESH_URL")
        .env_remove("DEVMESH_SESSION_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run devmesh")
}

#[track_caller]
pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `devmesh agent` process, killed on drop.
pub(crate) struct AgentProcess {
    child: Child,
    pub(crate) log: PathBuf,
}

impl AgentProcess {
    pub(crate) fn start(primary_url: &str, token: &str, log_dir: &Path) -> Self {
        Self::start_with(primary_url, token, log_dir, &[])
    }

    pub(crate) fn start_with(
        primary_url: &str,
        token: &str,
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = log_dir.join(format!("agent-{}.log", uuid::Uuid::new_v4().simple()));
        let child = Command::new(BIN)
            .arg("agent")
            .envs(env.iter().copied())
            .env("DEVMESH_URL", primary_url)
            .env("DEVMESH_AGENT_TOKEN", token)
            .env(
                "DEVMESH_LOG",
                "debug,hyper=info,reqwest=info,quinn=info,rustls=info",
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn devmesh agent");
        Self { child, log }
    }

    pub(crate) fn signal(&self, sig: Signal) {
        if let Some(id) = self.child.id() {
            let _ = kill(Pid::from_raw(id as i32), sig);
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub(crate) async fn stop(mut self) -> std::process::ExitStatus {
        self.signal(Signal::SIGTERM);
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("agent stops in time")
            .unwrap()
    }

    pub(crate) async fn kill(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// Polls `check` until it returns `Some`, failing after `secs` seconds.
pub(crate) async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resolves every name to 127.0.0.1, so `*.apps.localhost` reaches the test servers.
#[derive(Debug, Clone)]
pub(crate) struct Loopback;

impl reqwest::dns::Resolve for Loopback {
    fn resolve(&self, _: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async {
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once(std::net::SocketAddr::from(
                ([127, 0, 0, 1], 0),
            )));
            Ok(addrs)
        })
    }
}

/// An HTTP client for app hosts: loopback DNS, no automatic redirects.
pub(crate) fn app_client(cookies: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(std::sync::Arc::new(Loopback))
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(cookies)
        .build()
        .unwrap()
}

/// Like [`app_client`], with a cookie jar the test can add to.
pub(crate) fn app_client_with_jar(jar: std::sync::Arc<reqwest::cookie::Jar>) -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(std::sync::Arc::new(Loopback))
        .redirect(reqwest::redirect::Policy::none())
        .cookie_provider(jar)
        .build()
        .unwrap()
}

/// A `devmesh edge` process (HTTP and relay on free loopback ports), killed
/// on drop.
pub(crate) struct EdgeProcess {
    child: Child,
    /// `http://127.0.0.1:<port>` (or https).
    pub(crate) url: String,
    pub(crate) log: PathBuf,
}

/// The value following `flag` in `args`.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1).copied())
}

/// Registers one replica of the edge whose token is `token` by hand, as a
/// (possibly hostile) edge process would: access URL
/// `https://edge.example.com`, its relay at `relay_address`, overridden or
/// extended by the fields of `with`. Returns the primary's answer.
pub(crate) async fn register(
    primary: &str,
    token: &str,
    replica: uuid::Uuid,
    relay_address: &str,
    with: serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let (_, csr) = csr();
    let mut body = serde_json::json!({
        "replica_id": replica, "version": env!("CARGO_PKG_VERSION"),
        "access_url": "https://edge.example.com", "relay_address": relay_address, "csr_pem": csr,
    });
    for (k, v) in with.as_object().unwrap() {
        body[k] = v.clone();
    }
    let resp = reqwest::Client::new()
        .post(format!("{primary}/api/v2/edges/me/register"))
        .header(devmesh_shared::api::EDGE_TOKEN_HEADER, token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or_default())
}

/// A fresh key and a certificate signing request for it, as an edge makes.
pub(crate) fn csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, csr)
}

/// The sum of the samples of a metric whose lines start with `prefix`, as
/// the process at `base_url` exports them on `/metrics`.
pub(crate) async fn metric(base_url: &str, prefix: &str) -> u64 {
    metric_where(base_url, |l| l.starts_with(prefix)).await
}

/// The sum of the metric samples at `base_url` whose lines `keep` accepts.
pub(crate) async fn metric_where(base_url: &str, keep: impl Fn(&str) -> bool) -> u64 {
    let text = reqwest::get(format!("{base_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| keep(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A free loopback TCP port.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

impl EdgeProcess {
    /// Has `owner` create the edge `region` with the addresses it will
    /// register with (those [`EdgeProcess::start`] gives it on a free port,
    /// or the ones in `extra`), then starts it; returns it with its token.
    pub(crate) async fn create(
        owner: &devmesh_tests::Api,
        primary: &str,
        region: &str,
        extra: &[&str],
        log_dir: &Path,
    ) -> (Self, String) {
        let port = free_port();
        let access_url = flag_value(extra, "--access-url")
            .map_or_else(|| format!("http://127.0.0.1:{port}"), str::to_owned);
        let wildcard = flag_value(extra, "--wildcard-access-url")
            .map_or_else(|| format!("*.{region}.apps.localhost"), str::to_owned);
        let (status, created) = owner
            .post(
                "/edges",
                serde_json::json!({
                    "name": region,
                    "access_url": access_url,
                    "wildcard_hostname": wildcard,
                    "global_wildcard_hostname": flag_value(extra, "--global-wildcard-access-url"),
                    "relay_hosts": ["127.0.0.1"],
                }),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{created}");
        let token = created["edge_token"].as_str().unwrap().to_owned();
        let edge = Self::start(primary, &token, region, port, extra, log_dir).await;
        (edge, token)
    }

    /// Starts an edge for `region` listening on `port`, with apps on
    /// `*.<region>.apps.localhost`, plus `extra` flags.
    pub(crate) async fn start(
        primary: &str,
        token: &str,
        region: &str,
        port: u16,
        extra: &[&str],
        log_dir: &Path,
    ) -> Self {
        let log = log_dir.join(format!(
            "edge-{region}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let mut cmd = Command::new(BIN);
        cmd.args(["edge", "--primary-url", primary]);
        // The access URL must name the real port: the primary calls the
        // edge's /healthz-report there.
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        if !extra.contains(&"--relay-address") {
            cmd.args(["--relay-address", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--access-url") {
            cmd.args(["--access-url", &format!("http://127.0.0.1:{port}")]);
        }
        if !extra.contains(&"--wildcard-access-url") {
            cmd.args([
                "--wildcard-access-url",
                &format!("*.{region}.apps.localhost"),
            ]);
        }
        cmd.args(extra).env("DEVMESH_EDGE_TOKEN", token);
        Self::spawn(cmd, log).await
    }

    /// Starts `devmesh edge` with nothing but a settings file.
    pub(crate) async fn start_with_config(config: &Path, log_dir: &Path) -> Self {
        let log = log_dir.join(format!("edge-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(BIN);
        cmd.args(["edge", "--config"]).arg(config);
        Self::spawn(cmd, log).await
    }

    async fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let mut child = cmd
            .env(
                "DEVMESH_LOG",
                "debug,hyper=info,reqwest=info,quinn=info,rustls=info,h2=info",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn devmesh edge");
        let url = started_url(&mut child, "Started edge listener at ", 30, &log).await;
        Self { child, url, log }
    }

    /// The HTTP port.
    pub(crate) fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub(crate) fn signal(&self, sig: Signal) {
        if let Some(id) = self.child.id() {
            let _ = kill(Pid::from_raw(id as i32), sig);
        }
    }

    /// Waits for the process to exit on its own.
    pub(crate) async fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(secs), self.child.wait())
            .await
            .expect("the edge exits in time")
            .unwrap()
    }

    /// What the edge logged.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub(crate) async fn kill(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// Reads `child`'s stdout until the line starting with `prefix` and returns
/// the rest of it (the URL it listens at), then keeps draining stdout so the
/// process never blocks on a full pipe. Fails with the process's log.
async fn started_url(child: &mut Child, prefix: &str, secs: u64, log: &Path) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(secs), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(u) = line.strip_prefix(prefix) {
                return Some(u.to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        panic!(
            "{} did not start:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    });
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    url
}
