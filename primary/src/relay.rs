//! The primary's relay: a QUIC endpoint (ALPN `devmesh-tunnel/1`) that
//! agents attach to, with a certificate from the mesh CA.
//!
//! An agent opens one control stream and presents an attach ticket signed by
//! the primary; the relay verifies it locally (no database round trip),
//! records the attachment, and answers pings. For each user connection the
//! relay opens a bidirectional stream to the agent, writes a
//! [`StreamHeader`], reads the agent's one-byte status, and hands the stream
//! to the caller as plain bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use devmesh_shared::signing::AttachTicket;
use devmesh_shared::tunnel::{self, Control, StreamHeader, io as tio};
use parking_lot::Mutex;
use quinn::{Connection, RecvStream, SendStream};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::mesh::{MeshCa, PRIMARY_RELAY_NAME, Signer};

/// How long an agent has to present its ticket.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an attached agent's heartbeat is written to the database.
const TOUCH_EVERY: Duration = Duration::from_secs(30);

/// Why a stream to an agent could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The agent has no tunnel to this relay.
    #[error("the workspace agent is not connected")]
    NotConnected,
    /// The tunnel broke while opening the stream.
    #[error("the connection to the workspace agent was lost")]
    Lost,
    /// Nothing listens on the port in the workspace.
    #[error("the app refused the connection")]
    Refused,
    /// The agent does not serve this kind of stream.
    #[error("the workspace agent does not support this kind of connection")]
    Unsupported,
}

/// Agents attached to this relay.
#[derive(Debug, Default)]
struct Registry {
    agents: Mutex<HashMap<Uuid, Connection>>,
}

/// A running relay.
#[derive(Debug, Clone)]
pub struct Relay {
    registry: Arc<Registry>,
    /// The bound UDP address.
    pub local_addr: SocketAddr,
}

/// Everything the relay needs to verify and record agents.
pub struct RelayDeps {
    /// Database, for connection timestamps.
    pub db: PgPool,
    /// Verifies attach tickets.
    pub signer: Signer,
    /// Issues the relay's certificate.
    pub ca: Arc<MeshCa>,
}

impl Relay {
    /// Binds the relay and starts accepting agents until `shutdown`.
    pub fn start(
        bind: SocketAddr,
        deps: RelayDeps,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let (chain, key) = deps.ca.issue(&[PRIMARY_RELAY_NAME])?;
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport_config()));
        let socket = devmesh_shared::net::udp_socket(bind)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let relay = Self {
            registry: Arc::default(),
            local_addr,
        };
        let deps = Arc::new(deps);
        let this = relay.clone();
        let tasks = tracker.clone();
        tracker.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    i = endpoint.accept() => match i { Some(i) => i, None => break },
                };
                let (this, deps) = (this.clone(), deps.clone());
                tasks.spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = this.serve_agent(incoming, &deps).await {
                        tracing::debug!(client.addr = %remote, error = %e, "agent connection ended");
                    }
                });
            }
            endpoint.close(0u32.into(), b"shutdown");
            endpoint.wait_idle().await;
        });
        tracing::info!(relay.address = %local_addr, "relay listening (QUIC)");
        Ok(relay)
    }

    /// Whether `agent` is attached here.
    pub fn is_attached(&self, agent: Uuid) -> bool {
        self.registry.agents.lock().contains_key(&agent)
    }

    /// Opens a TCP stream to `port` inside the agent's workspace.
    pub async fn open_tcp(
        &self,
        agent: Uuid,
        port: u16,
    ) -> Result<(SendStream, RecvStream), OpenError> {
        let conn = self
            .registry
            .agents
            .lock()
            .get(&agent)
            .cloned()
            .ok_or(OpenError::NotConnected)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|_| OpenError::Lost)?;
        tio::write_header(&mut send, &StreamHeader::Tcp { port })
            .await
            .map_err(|_| OpenError::Lost)?;
        let mut status = [0u8; 1];
        recv.read_exact(&mut status)
            .await
            .map_err(|_| OpenError::Lost)?;
        match status[0] {
            tunnel::status::OK => Ok((send, recv)),
            tunnel::status::REFUSED => Err(OpenError::Refused),
            _ => Err(OpenError::Unsupported),
        }
    }

    async fn serve_agent(&self, incoming: quinn::Incoming, deps: &RelayDeps) -> anyhow::Result<()> {
        let conn = tokio::time::timeout(ATTACH_TIMEOUT, incoming).await??;
        let (mut send, mut recv) = tokio::time::timeout(ATTACH_TIMEOUT, conn.accept_bi()).await??;
        let first = tokio::time::timeout(ATTACH_TIMEOUT, tio::read_control(&mut recv)).await??;
        let Some(Control::Attach { ticket }) = first else {
            conn.close(1u32.into(), b"expected attach");
            anyhow::bail!("first control message was not Attach");
        };
        let ticket: AttachTicket = match deps
            .signer
            .verifier()
            .verify(&ticket, Utc::now().timestamp())
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(client.addr = %conn.remote_address(), error = %e, "refused an agent's attach ticket");
                let _ = tio::write_control(
                    &mut send,
                    &Control::Refused {
                        reason: format!("attach ticket: {e}"),
                    },
                )
                .await;
                let _ = send.finish();
                let _ = tokio::time::timeout(ATTACH_TIMEOUT, conn.closed()).await;
                conn.close(3u32.into(), b"refused");
                return Ok(());
            }
        };
        let agent = ticket.agent_id;
        // Answer first: an agent that cannot hear it never enters the registry.
        tio::write_control(
            &mut send,
            &Control::Attached {
                relay: "primary".into(),
            },
        )
        .await?;
        if let Some(old) = self.registry.agents.lock().insert(agent, conn.clone()) {
            old.close(2u32.into(), b"replaced by a newer connection");
        }
        let stamp = record_connected(&deps.db, agent).await;
        tracing::info!(agent.id = %agent, workspace.id = %ticket.workspace_id, client.addr = %conn.remote_address(), "agent attached");

        let mut last_touch = tokio::time::Instant::now();
        let result = async {
            loop {
                tokio::select! {
                    msg = tio::read_control(&mut recv) => match msg? {
                        Some(Control::Ping { nonce }) => {
                            tio::write_control(&mut send, &Control::Pong { nonce }).await?;
                            // Heartbeats feed the connection status; a write every
                            // 30 s per agent is plenty for a 60 s timeout.
                            if last_touch.elapsed() >= TOUCH_EVERY {
                                touch(&deps.db, agent).await;
                                last_touch = tokio::time::Instant::now();
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                    _ = conn.closed() => break,
                }
            }
            anyhow::Ok(())
        }
        .await;

        let removed = {
            let mut agents = self.registry.agents.lock();
            match agents.get(&agent) {
                Some(c) if c.stable_id() == conn.stable_id() => agents.remove(&agent).is_some(),
                _ => false,
            }
        };
        if removed {
            record_disconnected(&deps.db, agent, stamp).await;
            tracing::info!(agent.id = %agent, "agent detached");
        }
        result
    }
}

fn transport_config() -> quinn::TransportConfig {
    let mut tc = quinn::TransportConfig::default();
    // Agents open only their control stream; the relay opens the rest.
    tc.max_concurrent_bidi_streams(16u32.into());
    tc.max_concurrent_uni_streams(0u32.into());
    tc.stream_receive_window((8u32 * 1024 * 1024).into());
    tc.receive_window((32u32 * 1024 * 1024).into());
    tc.send_window(32 * 1024 * 1024);
    tc.keep_alive_interval(Some(Duration::from_secs(3)));
    // An agent that vanishes (killed, unplugged) is declared gone after this;
    // the smaller of the two peers' values applies.
    tc.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        15_000,
    ))));
    tc
}

/// Records an attachment; returns its stamp, so that only this attachment's
/// end can later mark the agent disconnected.
async fn record_connected(db: &PgPool, agent: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    let r = sqlx::query(
        "UPDATE workspace_agents SET first_connected_at = coalesce(first_connected_at, now()),
             last_connected_at = now(), disconnected_at = NULL WHERE id = $1",
    )
    .bind(agent)
    .execute(db)
    .await;
    let stamp = sqlx::query_scalar(
        "INSERT INTO agent_attachments (agent_id, relay) VALUES ($1, 'primary')
         ON CONFLICT (agent_id) DO UPDATE SET relay = 'primary', attached_at = clock_timestamp()
         RETURNING attached_at",
    )
    .bind(agent)
    .fetch_one(db)
    .await;
    match (r, stamp) {
        (Ok(_), Ok(stamp)) => Some(stamp),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(agent.id = %agent, error = %e, "could not record the agent's connection");
            None
        }
    }
}

async fn touch(db: &PgPool, agent: Uuid) {
    let _ = sqlx::query("UPDATE workspace_agents SET last_connected_at = now() WHERE id = $1")
        .bind(agent)
        .execute(db)
        .await;
}

/// Marks the agent disconnected, unless a newer attachment (a reconnect
/// that raced this one's end) has replaced `stamp`.
async fn record_disconnected(
    db: &PgPool,
    agent: Uuid,
    stamp: Option<chrono::DateTime<chrono::Utc>>,
) {
    let result = sqlx::query(
        "WITH gone AS (DELETE FROM agent_attachments WHERE agent_id = $1 AND relay = 'primary'
                       AND ($2::timestamptz IS NULL OR attached_at = $2) RETURNING agent_id)
         UPDATE workspace_agents SET disconnected_at = now() WHERE id IN (SELECT agent_id FROM gone)",
    )
    .bind(agent)
    .bind(stamp)
    .execute(db)
    .await;
    if let Err(e) = result {
        tracing::warn!(agent.id = %agent, error = %e, "could not record the agent's disconnection");
    }
}
