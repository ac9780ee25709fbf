//! The agent's side of `Probe` streams (`devmesh ping`, `speedtest`) and
//! `Udp` streams (`devmesh port-forward --udp`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use devmesh_shared::tunnel::udp::{self, Received};
use devmesh_shared::tunnel::{MAX_PROBE_BYTES, status};
use quinn::{RecvStream, SendStream};
use tokio::net::UdpSocket;

use crate::tunnel::{answer_and_finish, stream_code};

/// A UDP flow with no datagram either way for this long ends.
const UDP_IDLE: Duration = Duration::from_secs(120);

/// Discards what the client sends, answers with its length, then sends
/// `download` zero bytes.
pub(crate) async fn probe(download: u64, mut send: SendStream, mut recv: RecvStream) {
    if download > MAX_PROBE_BYTES {
        return answer_and_finish(send, recv, status::REFUSED).await;
    }
    if send.write_all(&[status::OK]).await.is_err() {
        return;
    }
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => received += n as u64,
            Ok(None) => break,
            Err(_) => return,
        }
    }
    if send.write_all(&received.to_be_bytes()).await.is_err() {
        return;
    }
    buf.fill(0);
    let mut left = download;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if send.write_all(&buf[..n]).await.is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = send.finish();
}

/// Carries one UDP flow between the stream and `127.0.0.1:port`.
pub(crate) async fn udp(port: u16, mut send: SendStream, mut recv: RecvStream) {
    let socket = match UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, "cannot open a UDP socket");
            return answer_and_finish(send, recv, status::REFUSED).await;
        }
    };
    if let Err(e) = socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
    {
        tracing::info!(error = %e, "cannot address the UDP port");
        return answer_and_finish(send, recv, status::REFUSED).await;
    }
    if send.write_all(&[status::OK]).await.is_err() {
        return;
    }
    // Cancel-safe: a datagram arriving from the port while a frame from
    // the client is half read loses nothing.
    let mut up = udp::Reader::default();
    let mut down = vec![0u8; udp::MAX_DATAGRAM];
    let mut out = Vec::with_capacity(udp::MAX_DATAGRAM + 2);
    loop {
        tokio::select! {
            r = up.next(&mut recv) => match r {
                Ok(Received::Datagram(n)) => match socket.send(up.datagram(n)).await {
                    Err(e) if refused(&e) => break tell_refused(&mut send).await,
                    // UDP may drop; the flow goes on.
                    _ => {}
                },
                Ok(Received::End) => { let _ = send.finish(); break; }
                Ok(Received::Refused) | Err(_) => {
                    tracing::info!(port, "a malformed UDP frame; ending the flow");
                    let _ = recv.stop(stream_code::BAD_HEADER);
                    let _ = send.reset(stream_code::BAD_HEADER);
                    break;
                }
            },
            r = socket.recv(&mut down) => match r {
                Ok(n) => {
                    out.clear();
                    udp::frame(&down[..n], &mut out);
                    if send.write_all(&out).await.is_err() { break; }
                }
                Err(e) if refused(&e) => break tell_refused(&mut send).await,
                Err(_) => break,
            },
            () = tokio::time::sleep(UDP_IDLE) => {
                let _ = send.finish();
                break;
            }
        }
    }
}

fn refused(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::ConnectionRefused
}

async fn tell_refused(send: &mut SendStream) {
    let _ = send.write_all(&udp::REFUSED.to_be_bytes()).await;
    let _ = send.finish();
}
