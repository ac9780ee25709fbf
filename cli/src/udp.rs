//! `devmesh port-forward --udp`: datagrams to a local port carried to a
//! port in the workspace. Each client address is a flow: one `Udp` stream
//! (`POST /api/v2/workspaceagents/{id}/udp?port=P`) through the nearest
//! region, datagrams framed each way, answers sent back to that address.
//! A flow with nothing either way for two minutes ends (the agent ends
//! it); the next datagram from that address starts another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use devmesh_shared::tunnel::udp::{self, Received};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::client::Client;
use crate::commands::Global;
use crate::commands::ssh::{after, through_region};

/// Datagrams queued for a flow before more are dropped (UDP may drop).
const QUEUED: usize = 256;
/// Flows (client addresses) at once; datagrams from more are dropped, so
/// a flood of spoofed sources cannot open unbounded streams.
const MAX_FLOWS: usize = 256;

/// Forwards datagrams arriving on `socket` to `port` on the agent's
/// machine, until the socket fails or a flow finds the port refusing.
pub(crate) async fn forward(
    g: &Global,
    short: &Client,
    agent: Uuid,
    socket: UdpSocket,
    port: u16,
) -> anyhow::Result<()> {
    let socket = Arc::new(socket);
    let flows: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<bytes::Bytes>>>> = Arc::default();
    let (refused_tx, mut refused) = mpsc::channel::<()>(1);
    let mut buf = vec![0u8; udp::MAX_DATAGRAM];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => r?,
            _ = refused.recv() => anyhow::bail!(
                "port {port} in the workspace refused UDP: nothing listens there"
            ),
        };
        let mut framed = Vec::with_capacity(n + 2);
        udp::frame(&buf[..n], &mut framed);
        let framed = bytes::Bytes::from(framed);
        let existing = flows.lock().get(&peer).cloned();
        let tx = match existing {
            Some(tx) if !tx.is_closed() => tx,
            _ => {
                if flows.lock().len() >= MAX_FLOWS {
                    continue;
                }
                let (tx, rx) = mpsc::channel(QUEUED);
                flows.lock().insert(peer, tx.clone());
                let (g, short, socket, flows, refused) = (
                    g.clone(),
                    short.clone(),
                    socket.clone(),
                    flows.clone(),
                    refused_tx.clone(),
                );
                let mine = tx.clone();
                tokio::spawn(async move {
                    match flow(&g, &short, agent, port, rx, &socket, peer).await {
                        Ok(true) => {
                            let _ = refused.send(()).await;
                        }
                        Ok(false) => {}
                        Err(e) => eprintln!("devmesh: a UDP flow from {peer} ended: {e:#}"),
                    }
                    // Only this flow's entry: a newer one may have taken
                    // the address meanwhile.
                    let mut all = flows.lock();
                    if all.get(&peer).is_some_and(|t| t.same_channel(&mine)) {
                        all.remove(&peer);
                    }
                });
                tx
            }
        };
        // A full queue drops the datagram, as a busy network would.
        let _ = tx.try_send(framed);
    }
}

/// One client address's flow; `Ok(true)` when the port refused.
async fn flow(
    g: &Global,
    short: &Client,
    agent: Uuid,
    port: u16,
    rx: mpsc::Receiver<bytes::Bytes>,
    socket: &UdpSocket,
    peer: SocketAddr,
) -> anyhow::Result<bool> {
    let path = format!("/workspaceagents/{agent}/udp?port={port}");
    let mut rx = Some(rx);
    let opened = through_region(g, short, &path, |accepted| {
        let datagrams = rx
            .take()
            .map(|rx| tokio_stream_of(rx).map(Ok::<_, std::io::Error>));
        match datagrams {
            Some(d) => after(accepted, d),
            None => reqwest::Body::from(Vec::new()),
        }
    })
    .await?;
    let body = opened
        .resp
        .bytes_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let mut reader = tokio_util::io::StreamReader::new(body);
    let mut buf = vec![0u8; udp::MAX_DATAGRAM];
    loop {
        match udp::read(&mut reader, &mut buf).await? {
            Received::Datagram(n) => {
                socket.send_to(&buf[..n], peer).await?;
            }
            Received::Refused => return Ok(true),
            Received::End => return Ok(false),
        }
    }
}

/// The receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Sync {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}
