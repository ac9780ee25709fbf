//! Fixtures for tests that run the real binaries.

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;

pub(crate) use devmesh_tests::process::{
    AgentProcess, EdgeProcess, Loopback, ServerProcess, eventually, free_port,
};
use tokio::process::Command;

/// The binary under test; cargo builds it before this test crate.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_devmesh");

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

/// The CLI of one user of one deployment: its config directory, the URL
/// and the user's token (the flags every command takes).
pub(crate) struct CliAs {
    pub(crate) config: std::path::PathBuf,
    pub(crate) url: String,
    pub(crate) token: String,
}

impl CliAs {
    /// Runs `devmesh --url … --token … <args>`.
    pub(crate) async fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--url", &self.url, "--token", &self.token];
        all.extend_from_slice(args);
        cli(&self.config, &all).await
    }
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

/// `devmesh login` as the deployment's first user (`admin`,
/// `admin-password`), which creates it: the command's output.
pub(crate) async fn first_login(config: &Path, url: &str) -> String {
    ok(&cli(
        config,
        &[
            "login",
            url,
            "--username",
            "admin",
            "--email",
            "admin@example.com",
            "--password",
            "admin-password",
        ],
    )
    .await)
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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

/// Has `owner` create the edge `region` with the addresses it will
/// register with (those [`EdgeProcess::start`] gives it on a free port,
/// or the ones in `extra`), then starts it; returns it with its token.
pub(crate) async fn create_edge(
    owner: &devmesh_tests::Api,
    primary: &str,
    region: &str,
    extra: &[&str],
    log_dir: &Path,
) -> (EdgeProcess, String) {
    let port = free_port().unwrap();
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
    let edge = EdgeProcess::start(primary, &token, region, port, extra, log_dir).await;
    (edge, token)
}

/// Runs `command` (a shell line) at a terminal (`script` gives it one),
/// typing `input`; returns what the terminal showed and the exit status.
pub(crate) async fn at_terminal(
    command: &str,
    env: &[(&str, &str)],
    input: &[u8],
) -> (String, std::process::ExitStatus) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run script");
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(input).await.expect("type");
    // The terminal stays open until the command is done.
    let shown = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let mut text = String::new();
        let mut stdout = child.stdout.take().expect("piped");
        let _ = stdout.read_to_string(&mut text).await;
        text
    })
    .await
    .expect("the command finished at its terminal");
    drop(stdin);
    (shown, child.wait().await.expect("wait"))
}

/// A running `devmesh ssh …` whose remote command has printed `started`:
/// the process (its stderr piped) and the rest of its output.
pub(crate) struct StartedSession {
    pub(crate) child: tokio::process::Child,
    pub(crate) out: tokio::io::BufReader<tokio::process::ChildStdout>,
}

/// Runs `devmesh <args>` as `token` against `url` (with CLI state in
/// `config`), where `args` run a remote command that first prints
/// `started`; returns once it has, or fails with what the CLI said.
pub(crate) async fn started_session(
    args: &[&str],
    config: &Path,
    url: &str,
    token: &str,
) -> StartedSession {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut child = Command::new(BIN)
        .args(args)
        .env("DEVMESH_CONFIG_DIR", config)
        .env("DEVMESH_URL", url)
        .env("DEVMESH_SESSION_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run devmesh");
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).await.unwrap();
    if line.trim() != "started" {
        let mut why = String::new();
        let _ = child
            .stderr
            .as_mut()
            .unwrap()
            .read_to_string(&mut why)
            .await;
        panic!("the session did not start ({line:?}): {why}");
    }
    StartedSession { child, out }
}

impl StartedSession {
    /// Waits (at most `within`) for the session to end; its status and
    /// what it said on stderr. Its stdout stays open until then.
    pub(crate) async fn ended(
        mut self,
        within: std::time::Duration,
    ) -> (std::process::ExitStatus, String) {
        use tokio::io::AsyncReadExt;
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the session ended instead of hanging")
            .unwrap();
        let mut err = String::new();
        let _ = self
            .child
            .stderr
            .as_mut()
            .unwrap()
            .read_to_string(&mut err)
            .await;
        drop(self.out);
        (status, err)
    }
}

/// A QUIC client trusting only `ca_pem` (the mesh CA), speaking `alpn`,
/// with a client certificate when given.
pub(crate) fn quic_client(
    ca_pem: &str,
    alpn: &[u8],
    cert: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> quinn::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}
