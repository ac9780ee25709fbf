//! The primary's relay: the shared relay ([`devmesh_proxy::relay`]) with a
//! certificate from the mesh CA, whose attachments are written to the
//! database and published to every relay as agent locations.

use std::net::SocketAddr;
use std::sync::Arc;

use devmesh_proxy::relay::{AttachEvent, Keys, Locations, MeshPeers, Relay, RelayConfig};
use devmesh_shared::api::RelayInfo;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::events::Bus;
use crate::keys::Signer;
use crate::mesh::{MeshCa, PRIMARY_RELAY_NAME};

/// The region name of the primary's relay.
pub const PRIMARY_REGION: &str = "primary";

/// Starts the primary's relay on `bind`, advertised to agents and other
/// relays as `advertised_address`.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    bind: SocketAddr,
    access_url: &str,
    db: &PgPool,
    signer: &Signer,
    ca: &MeshCa,
    bus: &Bus,
    max_connections_per_ip: usize,
    revocations: Arc<devmesh_proxy::revocations::Revocations>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<(Relay, Locations, MeshPeers)> {
    let (chain, key) = ca.issue(&[PRIMARY_RELAY_NAME])?;
    let peers = MeshPeers::default();
    peers.set(mesh_peers(db).await?);
    let (events, attach_events) = mpsc::unbounded_channel();
    let locations = Locations::default();
    locations.replace(crate::events::agent_locations(db).await?);
    let keys = Keys::new(signer.public_keys()).map_err(|e| anyhow::anyhow!("signing keys: {e}"))?;
    // The port is known once bound: bind first, then advertise.
    let socket = devmesh_net::sockets::udp_socket(bind)?;
    let bound = socket.local_addr()?;
    let advertised = RelayInfo {
        region: PRIMARY_REGION.into(),
        address: advertised_relay_address(bound, access_url),
        server_name: PRIMARY_RELAY_NAME.into(),
    };
    let relay = Relay::start(
        RelayConfig {
            socket,
            advertised: advertised.clone(),
            cert_chain: chain,
            key,
            mesh_ca_pem: ca.cert_pem().to_owned(),
            keys,
            events,
            locations: locations.clone(),
            grant_signer: Some({
                let signer = signer.clone();
                Arc::new(move |g: &devmesh_shared::signing::StreamGrant| signer.sign(g))
            }),
            peers: peers.clone(),
            max_connections_per_ip,
            revocations,
        },
        shutdown,
        tracker,
    )?;
    tracker.spawn(record_attachments(
        attach_events,
        db.clone(),
        bus.clone(),
        Arc::new(advertised),
    ));
    Ok((relay, locations, peers))
}

/// The relays that may exchange mesh traffic: the primary's and every
/// edge's, each edge's certificates from its last token regeneration on.
pub async fn mesh_peers(db: &PgPool) -> sqlx::Result<Vec<devmesh_shared::api::MeshPeer>> {
    let edges: Vec<(String, i64)> = sqlx::query_as("SELECT name, certs_valid_from FROM edges")
        .fetch_all(db)
        .await?;
    let mut peers = vec![devmesh_shared::api::MeshPeer {
        server_name: PRIMARY_RELAY_NAME.into(),
        certs_valid_from: 0,
    }];
    peers.extend(
        edges
            .into_iter()
            .map(|(name, from)| devmesh_shared::api::MeshPeer {
                server_name: crate::mesh::relay_name(&name),
                certs_valid_from: from,
            }),
    );
    Ok(peers)
}

/// Writes the relay's attachments to the database, in order, and publishes
/// each agent's new location.
async fn record_attachments(
    mut rx: mpsc::UnboundedReceiver<AttachEvent>,
    db: PgPool,
    bus: Bus,
    me: Arc<RelayInfo>,
) {
    while let Some(event) = rx.recv().await {
        match event {
            AttachEvent::Attached {
                agent,
                issued_at_ms,
                ..
            } => match record_connected(&db, agent, &me, issued_at_ms).await {
                Ok(true) => bus.agent_moved(agent, Some((*me).clone())).await,
                Ok(false) => {
                    tracing::info!(agent.id = %agent, "the agent has attached elsewhere since; not recorded here")
                }
                Err(e) => {
                    tracing::warn!(agent.id = %agent, error = %e, "could not record the agent's connection")
                }
            },
            AttachEvent::Alive { agent } => {
                let _ = sqlx::query(
                    "UPDATE workspace_agents SET last_connected_at = now() WHERE id = $1",
                )
                .bind(agent)
                .execute(&db)
                .await;
            }
            AttachEvent::Detached { agent } => match record_disconnected(&db, agent, &me).await {
                Ok(true) => bus.agent_moved(agent, None).await,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(agent.id = %agent, error = %e, "could not record the agent's disconnection")
                }
            },
        }
    }
}

/// Records that `agent` is attached to `relay` with a ticket issued at
/// `issued_at_ms`, unless it has since attached with a newer ticket (or
/// does not exist); returns whether it was recorded.
pub async fn record_connected(
    db: &PgPool,
    agent: Uuid,
    relay: &RelayInfo,
    issued_at_ms: i64,
) -> sqlx::Result<bool> {
    let mut tx = db.begin().await?;
    let current = sqlx::query(
        "UPDATE workspace_agents SET first_connected_at = coalesce(first_connected_at, now()),
             last_connected_at = now(), disconnected_at = NULL, attach_issued_at_ms = $2
         WHERE id = $1 AND attach_issued_at_ms <= $2",
    )
    .bind(agent)
    .bind(issued_at_ms)
    .execute(&mut *tx)
    .await?;
    if current.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO agent_attachments (agent_id, relay, relay_address, relay_server_name) VALUES ($1, $2, $3, $4)
         ON CONFLICT (agent_id) DO UPDATE SET relay = $2, relay_address = $3, relay_server_name = $4,
             attached_at = clock_timestamp()",
    )
    .bind(agent)
    .bind(&relay.region)
    .bind(&relay.address)
    .bind(&relay.server_name)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Marks `agent` disconnected unless it has attached to another relay
/// since; returns whether it did.
pub async fn record_disconnected(
    db: &PgPool,
    agent: Uuid,
    relay: &RelayInfo,
) -> sqlx::Result<bool> {
    let gone = sqlx::query(
        "WITH gone AS (DELETE FROM agent_attachments WHERE agent_id = $1 AND relay_address = $2 RETURNING agent_id)
         UPDATE workspace_agents SET disconnected_at = now() WHERE id IN (SELECT agent_id FROM gone)",
    )
    .bind(agent)
    .bind(&relay.address)
    .execute(db)
    .await?;
    Ok(gone.rows_affected() > 0)
}

/// The relay address agents should dial: the bound address, or, when bound
/// to all interfaces, the access URL's host with the bound port.
fn advertised_relay_address(bound: SocketAddr, access_url: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = url::Url::parse(access_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned));
    match host {
        Some(h) if h.contains(':') => format!("[{h}]:{}", bound.port()),
        Some(h) => format!("{h}:{}", bound.port()),
        None => bound.to_string(),
    }
}
