//! Network plumbing every component shares: UDP sockets sized for QUIC
//! throughput, and HTTP clients that trust an operator's private CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Once;
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
/// bundle at `ca_cert` (a private or self-signed CA).
pub fn http_client(
    user_agent: &str,
    timeout: Duration,
    ca_cert: Option<&Path>,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(user_agent)
        .timeout(timeout);
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
