//! Baselines started beside devmesh in the same run: nginx terminating TLS
//! in front of the app, nginx in front of a rathole tunnel to the app, and
//! the transport ceiling (raw quinn and raw rustls bulk transfer between two
//! tasks of this process). A baseline whose program is not installed is
//! reported as missing (`loadtest/install-baselines.sh` installs them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::Instant;

use devmesh_tests::process::{Process, free_port};

/// Finds a program on `PATH` or in the usual sbin folders.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

async fn wait_port(port: u16, what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!(
                "{what} did not listen on {port}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A running nginx: HTTPS on `port`, proxying to `127.0.0.1:upstream`.
#[derive(Debug)]
pub struct Nginx {
    /// Its HTTPS port.
    pub port: u16,
    _proc: Process,
}

impl Nginx {
    /// Starts nginx with its own config under `dir`.
    pub async fn start(
        dir: &Path,
        name: &str,
        upstream: u16,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Self> {
        let bin = which("nginx")
            .context("missing: nginx is not installed (run loadtest/install-baselines.sh)")?;
        let dir = dir.join(name);
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = free_port()?;
        let user = if nix::unistd::Uid::effective().is_root() {
            "user root;"
        } else {
            ""
        };
        // Two workers for two cores, keep-alive to the app, no buffering of
        // bodies (devmesh streams too), WebSocket upgrades passed through.
        let conf = format!(
            r#"{user}
worker_processes 2;
worker_rlimit_nofile 65536;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 32768; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  upstream app {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    client_max_body_size 0;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"#,
            d = dir.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let log = dir.join("stderr.log");
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf_path).arg("-p").arg(&dir);
        let proc = Process::spawn_group(cmd, log.clone())?;
        wait_port(port, "nginx", &log).await?;
        Ok(Self { port, _proc: proc })
    }
}

/// A rathole server and client: the app reachable on `port` through the tunnel.
#[derive(Debug)]
pub struct Rathole {
    /// Where the tunnelled app is exposed (plain TCP).
    pub port: u16,
    _server: Process,
    _client: Process,
}

/// rathole's transport between its server and client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatholeTransport {
    /// Plain TCP: rathole's default, unencrypted.
    Tcp,
    /// The Noise protocol (`Noise_NK_25519_ChaChaPoly_BLAKE2s`, rathole's
    /// encrypted transport that needs no certificate): the like-for-like
    /// baseline for devmesh's encrypted tunnel.
    Noise,
}

impl RatholeTransport {
    /// The folder and log name of this variant.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Tcp => "rathole",
            Self::Noise => "rathole-noise",
        }
    }
}

/// A fresh Noise key pair from `rathole --genkey`: (private, public), base64.
fn rathole_keys(bin: &Path) -> anyhow::Result<(String, String)> {
    let out = std::process::Command::new(bin).arg("--genkey").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut key_after = |label: &str| -> anyhow::Result<String> {
        lines
            .by_ref()
            .skip_while(|l| !l.starts_with(label))
            .nth(1)
            .map(str::to_owned)
            .with_context(|| format!("rathole --genkey printed no {label}: {text}"))
    };
    let private = key_after("Private Key")?;
    let public = key_after("Public Key")?;
    Ok((private, public))
}

impl Rathole {
    /// Starts both ends under `dir`, over `transport`.
    pub async fn start(
        dir: &Path,
        upstream: u16,
        transport: RatholeTransport,
    ) -> anyhow::Result<Self> {
        let bin = which("rathole").context("missing: rathole is not installed (cargo install rathole, or loadtest/install-baselines.sh)")?;
        let dir = dir.join(transport.dir());
        std::fs::create_dir_all(&dir)?;
        let (control, port) = (free_port()?, free_port()?);
        let (server_transport, client_transport) = match transport {
            RatholeTransport::Tcp => (String::new(), String::new()),
            RatholeTransport::Noise => {
                let (private, public) = rathole_keys(&bin)?;
                (
                    format!(
                        "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"
                    ),
                    format!(
                        "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"
                    ),
                )
            }
        };
        std::fs::write(
            dir.join("server.toml"),
            format!(
                "[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_transport}[server.services.app]\ntoken = \"loadtest\"\nbind_addr = \"127.0.0.1:{port}\"\n"
            ),
        )?;
        std::fs::write(
            dir.join("client.toml"),
            format!(
                "[client]\nremote_addr = \"127.0.0.1:{control}\"\n{client_transport}[client.services.app]\ntoken = \"loadtest\"\nlocal_addr = \"127.0.0.1:{upstream}\"\n"
            ),
        )?;
        let spawn = |side: &str| -> anyhow::Result<Process> {
            let mut cmd = Command::new(&bin);
            cmd.arg(dir.join(format!("{side}.toml")))
                .env("RUST_LOG", "warn");
            Process::spawn_group(cmd, dir.join(format!("{side}.log")))
        };
        let server = spawn("server")?;
        wait_port(control, "rathole server", &server.log).await?;
        let client = spawn("client")?;
        wait_port(port, "rathole", &client.log).await?;
        // The service port listens before the client's tunnel is up: wait
        // until a request really reaches the app.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = async {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await?;
                let mut b = Vec::new();
                tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut b)).await??;
                anyhow::Ok(b.starts_with(b"HTTP/1.1 200"))
            }
            .await
            .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the rathole tunnel did not come up: {}",
                    std::fs::read_to_string(&client.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            port,
            _server: server,
            _client: client,
        })
    }
}

// === Transport ceiling ===

fn self_signed() -> anyhow::Result<(
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    Ok((
        cert.der().clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    ))
}

fn client_tls(
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[u8],
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone())?;
    let mut c = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![alpn.to_vec()];
    Ok(c)
}

async fn drain<R: tokio::io::AsyncRead + Unpin>(mut r: R, size: u64) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < size {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    anyhow::ensure!(got == size, "got {got} of {size} bytes");
    Ok(got)
}

async fn fill<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, size: u64) -> anyhow::Result<()> {
    let buf = vec![0xA5u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < size {
        let n = (size - sent).min(buf.len() as u64) as usize;
        w.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    w.flush().await?;
    Ok(())
}

/// Raw rustls over loopback TCP: one server task writes `size` bytes, this
/// task reads them. Returns the elapsed time.
pub async fn rustls_bulk(size: u64) -> anyhow::Result<Duration> {
    let (cert, key) = self_signed()?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    server.alpn_protocols = vec![b"bulk".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut tls = acceptor.accept(tcp).await?;
        fill(&mut tls, size).await?;
        tls.shutdown().await?;
        anyhow::Ok(())
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&cert, b"bulk")?));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let start = Instant::now();
    let tls = connector
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    drain(tls, size).await?;
    let d = start.elapsed();
    srv.await??;
    Ok(d)
}

/// Raw quinn over loopback UDP with the tunnel's transport settings: one task
/// sends `size` bytes on one stream, this task reads them.
pub async fn quinn_bulk(size: u64) -> anyhow::Result<Duration> {
    let (cert, key) = self_signed()?;
    let transport = Arc::new(devmesh_net::quic::transport(
        1,
        devmesh_net::quic::CONNECTION_WINDOW,
    ));
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    tls.alpn_protocols = vec![b"bulk".to_vec()];
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    server_config.transport_config(transport.clone());
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        devmesh_net::sockets::udp_socket("127.0.0.1:0".parse()?)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = server.local_addr()?;
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        // A bidirectional stream, as the tunnel carries each connection on.
        let (mut send, _recv) = conn.open_bi().await?;
        fill(&mut send, size).await?;
        send.finish()?;
        let _ = send.stopped().await;
        conn.closed().await;
        anyhow::Ok(())
    });
    let mut client_tls = client_tls(&cert, b"bulk")?;
    client_tls.enable_early_data = false;
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    client_config.transport_config(transport);
    let client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        devmesh_net::sockets::udp_socket("127.0.0.1:0".parse()?)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let start = Instant::now();
    let conn = client
        .connect_with(client_config, addr, "localhost")?
        .await?;
    let (_send, recv) = conn.accept_bi().await?;
    drain(recv, size).await?;
    let d = start.elapsed();
    conn.close(devmesh_shared::tunnel::close::SHUTDOWN.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(5), srv).await;
    Ok(d)
}
