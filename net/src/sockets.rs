//! Network plumbing every component shares: UDP sockets sized for QUIC
//! throughput, HTTP clients that trust an operator's private CA, and name
//! resolution with hickory (DNS answers cached for their TTL and asked
//! again when it runs out, so a DNS failover of the primary or of a relay
//! is followed without a restart).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

/// UDP socket buffers requested for QUIC.
pub const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// A bound, non-blocking UDP socket with send and receive buffers raised
/// towards [`UDP_BUFFER`]. When the OS grants less, it says so once per
/// process, with the sysctls to raise.
pub fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let send = socket.send_buffer_size().unwrap_or(0);
    let recv = socket.recv_buffer_size().unwrap_or(0);
    if send < UDP_BUFFER || recv < UDP_BUFFER {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            tracing::info!(
                wanted = UDP_BUFFER,
                send,
                recv,
                "the OS granted smaller UDP buffers than asked for; raise \
                 net.core.wmem_max and net.core.rmem_max for faster tunnels"
            );
        });
    }
    socket.bind(&bind.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// An HTTP client that trusts the system roots plus, optionally, the PEM
/// bundle at `ca_cert` (a private or self-signed CA). It never follows a
/// redirect: every devmesh client sends credentials in `Devmesh-*`
/// headers, and a redirect (a hostile or misconfigured proxy, a moved
/// primary) must not carry them to another host.
pub fn http_client(
    user_agent: &str,
    timeout: Duration,
    ca_cert: Option<&Path>,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(user_agent)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        // Each new connection resolves again (from hickory's TTL cache), so
        // clients follow the primary when DNS moves it.
        .hickory_dns(true);
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read the CA bundle {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("invalid PEM in the CA bundle {}", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "the CA bundle {} holds no certificates",
            path.display()
        );
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().context("cannot build the HTTP client")
}

/// The process's resolver: the system's configuration (`/etc/resolv.conf`,
/// `/etc/hosts`), with answers cached for their TTL. `None` when the system
/// configuration cannot be read; the OS resolver is used then.
fn resolver() -> Option<&'static hickory_resolver::TokioResolver> {
    static RESOLVER: OnceLock<Option<hickory_resolver::TokioResolver>> = OnceLock::new();
    RESOLVER
        .get_or_init(|| match hickory_resolver::TokioResolver::builder_tokio() {
            Ok(builder) => Some(builder.build()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the system's DNS configuration; using the OS resolver");
                None
            }
        })
        .as_ref()
}

/// Resolves `host:port` (`[v6]:port` too) to socket addresses; IP literals
/// need no lookup. Called on every (re)connection, so a relay or primary
/// that moves in DNS is found at its new address once the old answer's TTL
/// runs out.
pub async fn resolve(address: &str) -> std::io::Result<Vec<SocketAddr>> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let invalid = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{address:?} is not host:port"),
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Some(resolver) = resolver() else {
        return Ok(tokio::net::lookup_host((host, port)).await?.collect());
    };
    let ips = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()))?;
    Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_names_and_garbage() {
        assert_eq!(
            resolve("127.0.0.1:4001").await.unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 4001))]
        );
        assert_eq!(
            resolve("[::1]:4001").await.unwrap(),
            vec!["[::1]:4001".parse().unwrap()]
        );
        // /etc/hosts is honoured: no DNS server is needed for localhost.
        let local = resolve("localhost:4001").await.unwrap();
        assert!(!local.is_empty());
        assert!(
            local
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 4001)
        );
        for bad in ["no-port", "host:notaport", "host:99999"] {
            assert_eq!(
                resolve(bad).await.unwrap_err().kind(),
                std::io::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
    }
}
