//! Events that invalidate caches, across primary replicas and out to edges.
//!
//! A change (a key revoked, a workspace stopped, an agent attached) is
//! published with `pg_notify` on [`CHANNEL`]; every primary replica LISTENs,
//! applies it to its own caches and fans it out to the edges connected to
//! it (`GET /api/v2/edges/me/events`). Revocations are also written to the
//! `revocations` table, so an edge that (re)connects gets every revocation
//! young enough to matter in its snapshot. When a replica's listener loses
//! its connection, every edge stream it serves is ended: the edges
//! reconnect and resync rather than trust a gap.

use std::time::Duration;

use devmesh_net::backoff::Backoff;
use devmesh_shared::api::{AgentLocation, EdgeEvent, RelayInfo, Revocation, RevokedSubject};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The `LISTEN`/`NOTIFY` channel.
pub const CHANNEL: &str = "devmesh_events";
/// The channel database triggers notify with a workspace's id whenever it,
/// its builds, its agents or their attachments change (migration 0018):
/// what the dashboard's live view follows.
pub const WORKSPACES_CHANNEL: &str = "devmesh_workspaces";

/// What the dashboard's live views receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspaceNote {
    /// This workspace changed.
    Changed(Uuid),
    /// Changes may have been missed; reload.
    Gap,
}
/// How long revocations are kept: longer than any app token lives.
pub const REVOCATION_HORIZON: Duration = Duration::from_secs(31 * 60);

/// What a replica's subscribers receive.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// An event, from this replica or another.
    Event(EdgeEvent),
    /// Events may have been missed (the listener reconnected); resync.
    Gap,
}

/// The event bus of one primary replica.
#[derive(Debug, Clone)]
pub struct Bus {
    db: PgPool,
    tx: broadcast::Sender<BusMessage>,
    workspaces: broadcast::Sender<WorkspaceNote>,
}

impl Bus {
    /// A bus over `db`; call [`Bus::listen`] to start hearing events.
    pub fn new(db: PgPool) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let (workspaces, _) = broadcast::channel(4096);
        Self { db, tx, workspaces }
    }

    /// Hears which workspaces change from now on.
    pub fn watch_workspaces(&self) -> broadcast::Receiver<WorkspaceNote> {
        self.workspaces.subscribe()
    }

    /// Receives every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BusMessage> {
        self.tx.subscribe()
    }

    /// Publishes to every replica (this one included, through LISTEN).
    pub async fn publish(&self, event: &EdgeEvent) {
        let Ok(payload) = serde_json::to_string(event) else {
            return;
        };
        let result = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&payload)
            .execute(&self.db)
            .await;
        if let Err(e) = result {
            // Deliver here at least; other replicas' caches expire on their own.
            tracing::warn!(error = %e, "could not publish an event to other replicas");
            let _ = self.tx.send(BusMessage::Event(event.clone()));
        }
    }

    /// Records and publishes a revocation of `subject`, effective now.
    pub async fn revoke(&self, subject: RevokedSubject) {
        let at_ms = chrono::Utc::now().timestamp_millis();
        let Ok(json) = serde_json::to_value(&subject) else {
            return;
        };
        if let Err(e) = sqlx::query(
            "INSERT INTO revocations (subject, at) VALUES ($1, to_timestamp($2::float8 / 1000))",
        )
        .bind(json)
        .bind(at_ms as f64)
        .execute(&self.db)
        .await
        {
            tracing::warn!(error = %e, "could not record a revocation");
        }
        self.publish(&EdgeEvent::Revoked(Revocation { subject, at_ms }))
            .await;
    }

    /// Publishes where an agent is now.
    pub async fn agent_moved(&self, agent_id: Uuid, relay: Option<RelayInfo>) {
        self.publish(&EdgeEvent::AgentMoved(AgentLocation { agent_id, relay }))
            .await;
    }

    /// Hears events from every replica until `shutdown`, reconnecting (and
    /// announcing a gap) whenever the listening connection drops.
    pub async fn listen(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut first = true;
        loop {
            let listener = async {
                let mut l = PgListener::connect_with(&self.db).await?;
                l.listen_all([CHANNEL, WORKSPACES_CHANNEL]).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                _ = shutdown.cancelled() => return,
                l = listener => match l {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for events; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next_delay()) => continue,
                        }
                    }
                },
            };
            backoff.reset();
            if !first {
                self.gap();
            }
            first = false;
            loop {
                let n = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match n {
                    Ok(Some(n)) if n.channel() == WORKSPACES_CHANNEL => {
                        if let Ok(id) = Uuid::parse_str(n.payload()) {
                            let _ = self.workspaces.send(WorkspaceNote::Changed(id));
                        }
                    }
                    Ok(Some(n)) => match serde_json::from_str::<EdgeEvent>(n.payload()) {
                        Ok(event) => {
                            let _ = self.tx.send(BusMessage::Event(event));
                        }
                        Err(e) => tracing::warn!(error = %e, "ignoring an unreadable event"),
                    },
                    // The connection dropped; PgListener reconnects, events meanwhile are lost.
                    Ok(None) => self.gap(),
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener failed; reconnecting");
                        self.gap();
                        break;
                    }
                }
            }
        }
    }

    /// Tells every subscriber that events may have been missed.
    fn gap(&self) {
        let _ = self.tx.send(BusMessage::Gap);
        let _ = self.workspaces.send(WorkspaceNote::Gap);
    }

    /// Revocations young enough to matter.
    pub async fn recent_revocations(&self) -> Result<Vec<Revocation>, sqlx::Error> {
        let rows: Vec<(serde_json::Value, i64)> = sqlx::query_as(
            "SELECT subject, (extract(epoch FROM at) * 1000)::bigint FROM revocations
             WHERE at > now() - make_interval(secs => $1) ORDER BY id",
        )
        .bind(REVOCATION_HORIZON.as_secs_f64())
        .fetch_all(&self.db)
        .await?;
        // Old rows are useless: prune them while here.
        let _ = sqlx::query("DELETE FROM revocations WHERE at < now() - make_interval(secs => $1)")
            .bind(REVOCATION_HORIZON.as_secs_f64())
            .execute(&self.db)
            .await;
        Ok(rows
            .into_iter()
            .filter_map(|(subject, at_ms)| {
                Some(Revocation {
                    subject: serde_json::from_value(subject).ok()?,
                    at_ms,
                })
            })
            .collect())
    }
}

type LocationRow = (Uuid, String, String, String);

fn location((agent_id, region, address, server_name): LocationRow) -> AgentLocation {
    AgentLocation {
        agent_id,
        relay: Some(RelayInfo {
            region,
            address,
            server_name,
        }),
    }
}

const LOCATION_SELECT: &str = "SELECT agent_id, relay, relay_address, relay_server_name
     FROM agent_attachments WHERE relay_address <> ''";

/// Where every attached agent is.
pub async fn agent_locations(db: &PgPool) -> Result<Vec<AgentLocation>, sqlx::Error> {
    let rows: Vec<LocationRow> = sqlx::query_as(LOCATION_SELECT).fetch_all(db).await?;
    Ok(rows.into_iter().map(location).collect())
}

/// Where one agent is attached, if anywhere.
pub async fn agent_location(db: &PgPool, agent: Uuid) -> Result<Option<RelayInfo>, sqlx::Error> {
    let row: Option<LocationRow> = sqlx::query_as(&format!("{LOCATION_SELECT} AND agent_id = $1"))
        .bind(agent)
        .fetch_optional(db)
        .await?;
    Ok(row.and_then(|r| location(r).relay))
}
