//! Edges (regional proxies) and the region list. Owners create edges and
//! receive each edge's token once; only its hash is stored.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use devmesh_shared::api::{
    CreateEdgeRequest, CreateEdgeResponse, Edge, EdgeStatus, EdgesResponse, Region,
    RegionsResponse, RelayInfo, UpdateEdgeRequest,
};
use devmesh_shared::names::validate_region_name;
use devmesh_shared::token::new_id_token;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, Validator};
use super::extract::{ApiJson, ApiPath, Authed, ClientIp};
use super::{AppState, Audit, parse_uuid};

/// An edge that has not heartbeated for this long is `unreachable`.
const HEARTBEAT_TIMEOUT_SECS: i64 = 30;

#[derive(sqlx::FromRow)]
struct EdgeRow {
    id: Uuid,
    name: String,
    display_name: String,
    access_url: Option<String>,
    wildcard_hostname: Option<String>,
    global_wildcard_hostname: Option<String>,
    relay_hosts: Vec<String>,
    relay_address: Option<String>,
    last_heartbeat_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const EDGE_COLUMNS: &str = "id, name, display_name, access_url, wildcard_hostname, global_wildcard_hostname, relay_hosts, relay_address, last_heartbeat_at, created_at, updated_at";

/// Live replicas one edge may run at once.
const MAX_REPLICAS: i64 = 32;

impl EdgeRow {
    /// From heartbeats, and from the primary's last call to the edge's
    /// `/healthz-report` (`probe_failed`): a heartbeating edge the primary
    /// cannot reach at its access URL is `unhealthy`.
    fn status(&self, probe_failed: bool) -> EdgeStatus {
        match self.last_heartbeat_at {
            None => EdgeStatus::Unregistered,
            Some(t) if (Utc::now() - t).num_seconds() > HEARTBEAT_TIMEOUT_SECS => {
                EdgeStatus::Unreachable
            }
            Some(_) if probe_failed => EdgeStatus::Unhealthy,
            Some(_) => EdgeStatus::Ok,
        }
    }
}

/// Calls every heartbeating edge's `/healthz-report` at its access URL
/// every 10 s and remembers which could not be reached (or said they
/// cannot reach the primary), until shutdown.
pub(crate) async fn probe_edges(state: AppState) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rows: Vec<(Uuid, String, String)> = match sqlx::query_as(
            "SELECT DISTINCT ON (r.edge_id) r.edge_id, e.name, r.access_url FROM relay_replicas r
             JOIN edges e ON e.id = r.edge_id
             WHERE r.last_heartbeat_at > now() - make_interval(secs => $1)
             ORDER BY r.edge_id, r.last_heartbeat_at DESC",
        )
        .bind(HEARTBEAT_TIMEOUT_SECS as f64)
        .fetch_all(&state.db)
        .await
        {
            Ok(rows) => rows,
            Err(_) => continue,
        };
        // Edges serving a self-signed demo certificate use the CA in our
        // data directory (`devmesh edge --tls-self-signed`), which may
        // appear after we start: trust it too, looking again each round.
        let local_ca = state.config.data_dir.join("tls").join("ca.pem");
        let Ok(http) = devmesh_net::sockets::http_client(
            concat!("devmesh-primary/", env!("CARGO_PKG_VERSION")),
            std::time::Duration::from_secs(5),
            local_ca.exists().then_some(local_ca.as_path()),
        ) else {
            continue;
        };
        for (id, name, access_url) in rows {
            let report = http
                .get(format!(
                    "{}/healthz-report",
                    access_url.trim_end_matches('/')
                ))
                .send()
                .await;
            let failure = match report {
                Ok(r) if r.status().is_success() => {
                    match r.json::<devmesh_shared::api::EdgeHealthReport>().await {
                        Ok(rep) if rep.primary_reachable => None,
                        Ok(_) => Some("the edge cannot reach the primary".to_owned()),
                        Err(e) => Some(format!("unreadable health report: {e}")),
                    }
                }
                Ok(r) => Some(format!("/healthz-report answered {}", r.status())),
                Err(e) => Some(format!("cannot reach {access_url}: {e}")),
            };
            let previous = state.edge_probes.write().insert(id, failure.clone());
            if previous.flatten() != failure
                && let Some(why) = &failure
            {
                tracing::warn!(edge = %name, reason = %why, "edge unhealthy");
            }
        }
    }
}

impl AppState {
    fn probe_failed(&self, edge: Uuid) -> bool {
        self.edge_probes
            .read()
            .get(&edge)
            .is_some_and(Option::is_some)
    }
}

impl EdgeRow {
    fn into_edge(self, probe_failed: bool) -> Edge {
        let r = self;
        let status = r.status(probe_failed);
        Edge {
            id: r.id,
            name: r.name,
            display_name: r.display_name,
            status,
            healthy: status == EdgeStatus::Ok,
            access_url: r.access_url,
            wildcard_hostname: r.wildcard_hostname,
            global_wildcard_hostname: r.global_wildcard_hostname,
            relay_hosts: r.relay_hosts,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

fn validate_display_name(v: &mut Validator, d: &str) {
    if d.trim().is_empty() || d.chars().count() > 64 {
        v.add("display_name", "must be 1-64 characters");
    }
}

/// An owner's edge addresses, checked and normalised (no trailing slash on
/// the access URL, lowercase names); `None` leaves a field unset.
#[derive(Debug, Default)]
struct Addresses {
    access_url: Option<String>,
    wildcard_hostname: Option<String>,
    global_wildcard_hostname: Option<String>,
    relay_hosts: Vec<String>,
}

impl Addresses {
    fn check(
        v: &mut Validator,
        state: &AppState,
        access_url: Option<&str>,
        wildcards: [Option<&str>; 2],
        relay_hosts: &[String],
    ) -> Self {
        let access_url = access_url.filter(|u| !u.is_empty()).map(|u| {
            let ok = url::Url::parse(u).is_ok_and(|p| {
                matches!(p.scheme(), "http" | "https")
                    && p.host_str().is_some()
                    && p.path() == "/"
                    && p.query().is_none()
                    && p.username().is_empty()
            });
            if !ok {
                v.add(
                    "access_url",
                    "must be an http:// or https:// URL with a host and no path",
                );
            }
            u.trim_end_matches('/').to_owned()
        });
        let [regional, global] = [
            ("wildcard_hostname", wildcards[0]),
            ("global_wildcard_hostname", wildcards[1]),
        ]
        .map(|(field, w)| {
            let w = w.filter(|w| !w.is_empty())?.to_ascii_lowercase();
            // An optional port: `*.eu.apps.localhost:4443`.
            let host_ok = w.strip_prefix("*.").is_some_and(|rest| {
                let (name, port) = rest.rsplit_once(':').unwrap_or((rest, "443"));
                name.split('.').all(valid_dns_label) && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !host_ok {
                v.add(field, "must look like *.apps.example.com");
            } else if state.config.wildcard_access_url.as_deref() == Some(w.as_str()) {
                v.add(field, "is the primary's app wildcard");
            }
            Some(w)
        });
        for h in relay_hosts {
            let ok = h.parse::<std::net::IpAddr>().is_ok()
                || (!h.is_empty() && h.len() <= 253 && h.split('.').all(valid_dns_label));
            if !ok {
                v.add(
                    "relay_hosts",
                    format!("{h:?} is not a host name or IP address"),
                );
            }
        }
        let mut relay_hosts: Vec<String> =
            relay_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        relay_hosts.sort();
        relay_hosts.dedup();
        Self {
            access_url,
            wildcard_hostname: regional,
            global_wildcard_hostname: global,
            relay_hosts,
        }
    }
}

fn valid_dns_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// Another edge already owns `wildcard` as its regional wildcard.
async fn wildcard_taken(state: &AppState, wildcard: &str, except: Uuid) -> ApiResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM edges WHERE wildcard_hostname = $1 AND id <> $2)",
    )
    .bind(wildcard)
    .bind(except)
    .fetch_one(&state.db)
    .await?)
}

async fn find(state: &AppState, edge: &str) -> ApiResult<EdgeRow> {
    let row: Option<EdgeRow> = sqlx::query_as(&format!(
        "SELECT {EDGE_COLUMNS} FROM edges WHERE id = $1 OR name = $2"
    ))
    .bind(parse_uuid(edge).unwrap_or_default())
    .bind(edge)
    .fetch_optional(&state.db)
    .await?;
    row.ok_or_else(|| ApiError::not_found(format!("No edge {edge:?}.")))
}

/// Tells every relay (this primary's, other replicas', every edge's) which
/// mesh peers to accept now: after an edge is created, renamed, deleted or
/// has its token regenerated.
async fn publish_mesh_peers(state: &AppState) -> ApiResult<()> {
    let peers = crate::relay::mesh_peers(&state.db).await?;
    state.mesh_peers.set(peers.clone());
    state
        .bus
        .publish(&devmesh_shared::api::EdgeEvent::MeshPeers { peers })
        .await;
    Ok(())
}

fn name_conflict(e: sqlx::Error, name: &str) -> ApiError {
    if crate::db::is_unique_violation(&e) {
        ApiError::conflict(format!("An edge named {name:?} already exists."))
    } else {
        e.into()
    }
}

pub(super) async fn create(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateEdgeRequest>,
) -> ApiResult<(StatusCode, Json<CreateEdgeResponse>)> {
    auth.require_owner()?;
    let display_name = req.display_name.clone().unwrap_or_else(|| req.name.clone());
    let mut v = Validator::default();
    v.check("name", validate_region_name(&req.name));
    validate_display_name(&mut v, &display_name);
    let addresses = Addresses::check(
        &mut v,
        &state,
        req.access_url.as_deref(),
        [
            req.wildcard_hostname.as_deref(),
            req.global_wildcard_hostname.as_deref(),
        ],
        &req.relay_hosts,
    );
    v.finish()?;
    let id = Uuid::new_v4();
    if let Some(w) = &addresses.wildcard_hostname
        && wildcard_taken(&state, w, id).await?
    {
        return Err(ApiError::conflict(format!("Another edge serves {w}.")));
    }
    let token = new_id_token(id);
    let row: EdgeRow = sqlx::query_as(&format!(
        "INSERT INTO edges (id, name, display_name, token_hash, access_url, wildcard_hostname, global_wildcard_hostname, relay_hosts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {EDGE_COLUMNS}"
    ))
    .bind(id)
    .bind(&req.name)
    .bind(&display_name)
    .bind(token.hashed_secret.as_slice())
    .bind(&addresses.access_url)
    .bind(&addresses.wildcard_hostname)
    .bind(&addresses.global_wildcard_hostname)
    .bind(&addresses.relay_hosts)
    .fetch_one(&state.db)
    .await
    .map_err(|e| name_conflict(e, &req.name))?;
    publish_mesh_peers(&state).await?;
    Audit::new("create", "edge")
        .resource(id, &req.name)
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreateEdgeResponse {
            edge: row.into_edge(false),
            edge_token: token.token.expose().to_owned(),
        }),
    ))
}

pub(super) async fn list(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<EdgesResponse>> {
    auth.require_owner()?;
    let rows: Vec<EdgeRow> =
        sqlx::query_as(&format!("SELECT {EDGE_COLUMNS} FROM edges ORDER BY name"))
            .fetch_all(&state.db)
            .await?;
    Ok(Json(EdgesResponse {
        edges: rows
            .into_iter()
            .map(|r| {
                let failed = state.probe_failed(r.id);
                r.into_edge(failed)
            })
            .collect(),
    }))
}

pub(super) async fn get(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(edge): ApiPath<String>,
) -> ApiResult<Json<Edge>> {
    auth.require_owner()?;
    let row = find(&state, &edge).await?;
    let failed = state.probe_failed(row.id);
    Ok(Json(row.into_edge(failed)))
}

pub(super) async fn update(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(edge): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateEdgeRequest>,
) -> ApiResult<Json<Edge>> {
    auth.require_owner()?;
    let mut v = Validator::default();
    if let Some(name) = &req.name {
        v.check("name", validate_region_name(name));
    }
    if let Some(d) = &req.display_name {
        validate_display_name(&mut v, d);
    }
    let current = find(&state, &edge).await?;
    let addresses = Addresses::check(
        &mut v,
        &state,
        req.access_url.as_deref().or(current.access_url.as_deref()),
        [
            req.wildcard_hostname
                .as_deref()
                .or(current.wildcard_hostname.as_deref()),
            req.global_wildcard_hostname
                .as_deref()
                .or(current.global_wildcard_hostname.as_deref()),
        ],
        req.relay_hosts.as_deref().unwrap_or(&current.relay_hosts),
    );
    v.finish()?;
    if let Some(w) = &addresses.wildcard_hostname
        && wildcard_taken(&state, w, current.id).await?
    {
        return Err(ApiError::conflict(format!("Another edge serves {w}.")));
    }
    let name = req.name.clone().unwrap_or(current.name.clone());
    let row: EdgeRow = sqlx::query_as(&format!(
        "UPDATE edges SET name = $2, display_name = $3, access_url = $4, wildcard_hostname = $5,
             global_wildcard_hostname = $6, relay_hosts = $7, updated_at = now()
         WHERE id = $1 RETURNING {EDGE_COLUMNS}"
    ))
    .bind(current.id)
    .bind(&name)
    .bind(req.display_name.unwrap_or(current.display_name.clone()))
    .bind(&addresses.access_url)
    .bind(&addresses.wildcard_hostname)
    .bind(&addresses.global_wildcard_hostname)
    .bind(&addresses.relay_hosts)
    .fetch_one(&state.db)
    .await
    .map_err(|e| name_conflict(e, &name))?;
    if row.name != current.name {
        publish_mesh_peers(&state).await?;
    }
    Audit::new("update", "edge")
        .resource(row.id, &row.name)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"old_name": current.name}))
        .write(&state.db)
        .await;
    let failed = state.probe_failed(row.id);
    Ok(Json(row.into_edge(failed)))
}

pub(super) async fn delete(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(edge): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require_owner()?;
    let row = find(&state, &edge).await?;
    sqlx::query("DELETE FROM edges WHERE id = $1")
        .bind(row.id)
        .execute(&state.db)
        .await?;
    publish_mesh_peers(&state).await?;
    Audit::new("delete", "edge")
        .resource(row.id, &row.name)
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn regenerate_token(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(edge): ApiPath<String>,
) -> ApiResult<Json<CreateEdgeResponse>> {
    auth.require_owner()?;
    let row = find(&state, &edge).await?;
    let token = new_id_token(row.id);
    let row: EdgeRow = sqlx::query_as(&format!(
        "UPDATE edges SET token_hash = $2, certs_valid_from = $3, updated_at = now() WHERE id = $1 RETURNING {EDGE_COLUMNS}"
    ))
    .bind(row.id)
    .bind(token.hashed_secret.as_slice())
    // Certificates are backdated by the same margin as they are issued with.
    .bind(chrono::Utc::now().timestamp() - crate::mesh::CERT_BACKDATE_SECS)
    .fetch_one(&state.db)
    .await?;
    publish_mesh_peers(&state).await?;
    Audit::new("regenerate_token", "edge")
        .resource(row.id, &row.name)
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    Ok(Json(CreateEdgeResponse {
        edge: row.into_edge(false),
        edge_token: token.token.expose().to_owned(),
    }))
}

pub(super) async fn regions(
    State(state): State<AppState>,
    _auth: Authed,
) -> ApiResult<Json<RegionsResponse>> {
    let rows: Vec<EdgeRow> =
        sqlx::query_as(&format!("SELECT {EDGE_COLUMNS} FROM edges ORDER BY name"))
            .fetch_all(&state.db)
            .await?;
    let mut regions = vec![Region {
        id: Uuid::nil(),
        name: "primary".into(),
        display_name: "Primary".into(),
        healthy: true,
        status: EdgeStatus::Ok,
        access_url: Some(state.config.access_url.clone()),
        wildcard_hostname: state.config.wildcard_access_url.clone(),
        relay_address: Some(state.relay_address.clone()),
    }];
    regions.extend(rows.into_iter().map(|r| {
        let status = r.status(state.probe_failed(r.id));
        Region {
            id: r.id,
            name: r.name,
            display_name: r.display_name,
            healthy: status == EdgeStatus::Ok,
            status,
            access_url: r.access_url,
            wildcard_hostname: r.wildcard_hostname,
            relay_address: r.relay_address,
        }
    }));
    Ok(Json(RegionsResponse {
        regions,
        mesh_ca_pem: state.ca.cert_pem().to_owned(),
    }))
}

// === Edge-facing: registration and heartbeats ===

/// How often replicas register again.
const HEARTBEAT_INTERVAL_SECS: u64 = 10;

/// An authenticated edge (its token's secret matches, compared in constant time).
#[derive(Debug, Clone)]
pub(super) struct EdgeAuth {
    pub(super) id: Uuid,
    pub(super) name: String,
}

impl axum::extract::FromRequestParts<AppState> for EdgeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        use devmesh_shared::secret::{constant_time_eq, sha256};
        let refused = || {
            ApiError::unauthorized("The edge token is not valid.")
                .detail("it may have been regenerated or the edge deleted")
        };
        let token = parts
            .headers
            .get(devmesh_shared::api::EDGE_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(refused)?;
        let (id, secret) =
            devmesh_shared::token::parse_id_token(token.trim()).ok_or_else(refused)?;
        let row: Option<(String, Vec<u8>)> =
            sqlx::query_as("SELECT name, token_hash FROM edges WHERE id = $1")
                .bind(id)
                .fetch_optional(&state.db)
                .await?;
        match row {
            Some((name, hash)) if constant_time_eq(&sha256(secret.as_bytes()), &hash) => {
                Ok(Self { id, name })
            }
            _ => Err(refused()),
        }
    }
}

/// Whether an edge of `version` may join a primary of ours: same major and
/// minor version (patch releases mix freely).
fn compatible(version: &str) -> bool {
    let mm = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    mm(version) == mm(devmesh_shared::VERSION)
}

pub(super) async fn register(
    State(state): State<AppState>,
    edge: EdgeAuth,
    ApiJson(req): ApiJson<devmesh_shared::api::EdgeRegisterRequest>,
) -> ApiResult<Json<devmesh_shared::api::EdgeRegisterResponse>> {
    if !compatible(&req.version) {
        return Err(ApiError::conflict(format!(
            "Edge version {} cannot join primary version {}.",
            req.version,
            devmesh_shared::VERSION
        ))
        .detail("run the same major.minor version on the primary and its edges"));
    }
    if let Err(why) = check_registration(&state, &edge, &req).await? {
        crate::metrics::Metrics::count(&state.metrics.edge_refusals, "registration");
        tracing::warn!(edge = %edge.name, replica = %req.replica_id, reason = %why, "refused an edge registration");
        return Err(ApiError::conflict(format!("Registration refused: {why}."))
            .detail("an owner sets the edge's addresses with `devmesh edges update`"));
    }
    let mesh_cert_pem = state.ca.sign_csr(&req.csr_pem, &edge.name).map_err(|e| {
        ApiError::bad_request("The certificate signing request is not valid.")
            .detail(format!("{e:#}"))
    })?;
    let mut tx = state.db.begin().await?;
    let first: bool = sqlx::query_scalar(
        "INSERT INTO relay_replicas (edge_id, replica_id, version, access_url, wildcard_hostname, global_wildcard_hostname, relay_address)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (edge_id, replica_id) DO UPDATE SET version = EXCLUDED.version, access_url = EXCLUDED.access_url,
             wildcard_hostname = EXCLUDED.wildcard_hostname, global_wildcard_hostname = EXCLUDED.global_wildcard_hostname,
             relay_address = EXCLUDED.relay_address, last_heartbeat_at = now()
         RETURNING (xmax = 0)",
    )
    .bind(edge.id)
    .bind(req.replica_id)
    .bind(&req.version)
    .bind(&req.access_url)
    .bind(&req.wildcard_hostname)
    .bind(&req.global_wildcard_hostname)
    .bind(&req.relay_address)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE edges SET relay_address = $2, last_heartbeat_at = now() WHERE id = $1")
        .bind(edge.id)
        .bind(&req.relay_address)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let me = devmesh_shared::api::RelayInfo {
        region: edge.name.clone(),
        address: req.relay_address.clone(),
        server_name: crate::mesh::relay_name(&edge.name),
    };
    sync_attachments(&state, &me, &req.attachments).await?;
    if first {
        tracing::info!(edge = %edge.name, replica = %req.replica_id, access_url = %req.access_url, "edge replica registered");
        Audit::new("register", "edge")
            .resource(edge.id, &edge.name)
            .details(serde_json::json!({"replica_id": req.replica_id, "version": req.version}))
            .write(&state.db)
            .await;
    }
    Ok(Json(devmesh_shared::api::EdgeRegisterResponse {
        edge_id: edge.id,
        edge_name: edge.name,
        mesh_cert_pem,
        mesh_ca_pem: state.ca.cert_pem().to_owned(),
        app_token_keys: state.signer.public_keys().to_vec(),
        mesh_peers: crate::relay::mesh_peers(&state.db).await?,
        heartbeat_interval_seconds: HEARTBEAT_INTERVAL_SECS,
    }))
}

/// Whether a replica's registration matches what the owner set for its
/// edge, and fits: `Err` says why not, for the edge's log.
async fn check_registration(
    state: &AppState,
    edge: &EdgeAuth,
    req: &devmesh_shared::api::EdgeRegisterRequest,
) -> ApiResult<Result<(), String>> {
    let set: Option<EdgeRow> =
        sqlx::query_as(&format!("SELECT {EDGE_COLUMNS} FROM edges WHERE id = $1"))
            .bind(edge.id)
            .fetch_optional(&state.db)
            .await?;
    let Some(set) = set else {
        return Ok(Err("the edge was deleted".into()));
    };
    let Some(access_url) = &set.access_url else {
        return Ok(Err("no access URL is set for this edge".into()));
    };
    let given = req.access_url.trim_end_matches('/');
    if given != access_url {
        return Ok(Err(format!(
            "the access URL {given:?} is not the edge's {access_url:?}"
        )));
    }
    let lower = |w: &Option<String>| w.as_ref().map(|w| w.to_ascii_lowercase());
    for (what, given, owned) in [
        (
            "app wildcard",
            lower(&req.wildcard_hostname),
            &set.wildcard_hostname,
        ),
        (
            "global app wildcard",
            lower(&req.global_wildcard_hostname),
            &set.global_wildcard_hostname,
        ),
    ] {
        if &given != owned {
            return Ok(Err(format!(
                "the {what} {given:?} is not the edge's {owned:?}"
            )));
        }
    }
    let Some((host, port)) = req.relay_address.rsplit_once(':') else {
        return Ok(Err("the relay address is not host:port".into()));
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let default_host = url::Url::parse(access_url).ok().and_then(|u| {
        u.host_str().map(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        })
    });
    let allowed = if set.relay_hosts.is_empty() {
        default_host.as_deref() == Some(host.as_str())
    } else {
        set.relay_hosts.contains(&host)
    };
    if !allowed || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Ok(Err(format!(
            "the relay address {:?} is not on one of the edge's relay hosts",
            req.relay_address
        )));
    }
    if req.relay_address == state.relay.advertised().address {
        return Ok(Err("the relay address is the primary's".into()));
    }
    let (taken, live): (bool, i64) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM relay_replicas WHERE relay_address = $1 AND edge_id <> $2
                          AND last_heartbeat_at > now() - make_interval(secs => $4)),
                (SELECT count(*) FROM relay_replicas WHERE edge_id = $2 AND replica_id <> $3
                          AND last_heartbeat_at > now() - make_interval(secs => $4))",
    )
    .bind(&req.relay_address)
    .bind(edge.id)
    .bind(req.replica_id)
    .bind(HEARTBEAT_TIMEOUT_SECS as f64)
    .fetch_one(&state.db)
    .await?;
    if taken {
        return Ok(Err(format!(
            "another edge's relay is at {:?}",
            req.relay_address
        )));
    }
    if live >= MAX_REPLICAS {
        return Ok(Err(format!(
            "the edge already runs {MAX_REPLICAS} replicas"
        )));
    }
    Ok(Ok(()))
}

/// Every relay an agent can reach right now: the primary's first, then
/// each edge replica that heartbeated within [`HEARTBEAT_TIMEOUT_SECS`], by
/// edge name. Agents get this list in their manifest and pick the nearest.
pub(super) async fn healthy_relays<'c>(
    db: impl sqlx::PgExecutor<'c>,
    state: &AppState,
) -> sqlx::Result<Vec<RelayInfo>> {
    let replicas: Vec<(String, String)> = sqlx::query_as(
        "SELECT e.name, r.relay_address FROM relay_replicas r JOIN edges e ON e.id = r.edge_id
         WHERE r.last_heartbeat_at > now() - make_interval(secs => $1)
         ORDER BY e.name, r.replica_id",
    )
    .bind(HEARTBEAT_TIMEOUT_SECS as f64)
    .fetch_all(db)
    .await?;
    let mut relays = vec![state.relay.advertised().clone()];
    relays.extend(replicas.into_iter().map(|(name, address)| RelayInfo {
        server_name: crate::mesh::relay_name(&name),
        region: name,
        address,
    }));
    Ok(relays)
}

pub(super) async fn deregister(
    State(state): State<AppState>,
    edge: EdgeAuth,
    ApiJson(req): ApiJson<devmesh_shared::api::EdgeDeregisterRequest>,
) -> ApiResult<StatusCode> {
    let mut tx = state.db.begin().await?;
    sqlx::query("DELETE FROM relay_replicas WHERE edge_id = $1 AND replica_id = $2")
        .bind(edge.id)
        .bind(req.replica_id)
        .execute(&mut *tx)
        .await?;
    // The edge's health follows its freshest remaining replica.
    sqlx::query(
        "UPDATE edges SET last_heartbeat_at = (SELECT max(last_heartbeat_at) FROM relay_replicas WHERE edge_id = $1) WHERE id = $1",
    )
    .bind(edge.id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // Its agents are gone from it; they re-attach elsewhere and are reported there.
    let address: Option<String> =
        sqlx::query_scalar("SELECT relay_address FROM edges WHERE id = $1")
            .bind(edge.id)
            .fetch_optional(&state.db)
            .await?
            .flatten();
    if let Some(address) = address {
        let me = devmesh_shared::api::RelayInfo {
            region: edge.name.clone(),
            address,
            server_name: crate::mesh::relay_name(&edge.name),
        };
        sync_attachments(&state, &me, &[]).await?;
    }
    tracing::info!(edge = %edge.name, replica = %req.replica_id, "edge replica deregistered");
    Ok(StatusCode::NO_CONTENT)
}

/// The agents a relay's attachment proofs (attach tickets) show attached
/// there, with when each ticket was issued. A proof counts only if the
/// primary signed it, for that relay's address; expired ones count (the
/// agent attached while it was valid), and [`crate::relay::record_connected`]
/// refuses any older than the agent's latest attachment.
fn proven_attachments(state: &AppState, relay: &RelayInfo, proofs: &[String]) -> Vec<(Uuid, i64)> {
    let mut out = Vec::with_capacity(proofs.len());
    for proof in proofs {
        match state
            .signer
            .verifier()
            .verify_ignoring_expiry::<devmesh_shared::signing::AttachTicket>(proof)
        {
            Ok(t) if t.relay == relay.address => out.push((t.agent_id, t.issued_at_ms)),
            Ok(t) => {
                crate::metrics::Metrics::count(&state.metrics.edge_refusals, "attachment_proof");
                tracing::warn!(relay.region = %relay.region, agent.id = %t.agent_id, ticket.relay = %t.relay, "an edge reported an attachment whose ticket names another relay; ignored");
            }
            Err(e) => {
                crate::metrics::Metrics::count(&state.metrics.edge_refusals, "attachment_proof");
                tracing::warn!(relay.region = %relay.region, error = %e, "an edge reported an attachment without a valid ticket; ignored");
            }
        }
    }
    out
}

/// Makes the database say that exactly the agents `proofs` show are
/// attached to `relay`, and publishes every agent that arrived or left.
async fn sync_attachments(
    state: &AppState,
    relay: &devmesh_shared::api::RelayInfo,
    proofs: &[String],
) -> ApiResult<()> {
    let proven = proven_attachments(state, relay, proofs);
    let attached: Vec<Uuid> = proven.iter().map(|(a, _)| *a).collect();
    let left: Vec<Uuid> = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM agent_attachments WHERE relay_address = $1 AND NOT (agent_id = ANY($2))
                       RETURNING agent_id)
         UPDATE workspace_agents SET disconnected_at = now() WHERE id IN (SELECT agent_id FROM gone) RETURNING id",
    )
    .bind(&relay.address)
    .bind(&attached)
    .fetch_all(&state.db)
    .await?;
    // The heartbeat of every agent still attached (the primary's own relay
    // does this from pings).
    sqlx::query(
        "UPDATE workspace_agents SET last_connected_at = now() WHERE id IN
         (SELECT agent_id FROM agent_attachments WHERE relay_address = $1 AND agent_id = ANY($2))",
    )
    .bind(&relay.address)
    .bind(&attached)
    .execute(&state.db)
    .await?;
    let known: Vec<Uuid> = sqlx::query_scalar(
        "SELECT agent_id FROM agent_attachments WHERE relay_address = $1 AND agent_id = ANY($2)",
    )
    .bind(&relay.address)
    .bind(&attached)
    .fetch_all(&state.db)
    .await?;
    for (agent, issued_at_ms) in proven.into_iter().filter(|(a, _)| !known.contains(a)) {
        // Agents of deleted workspaces may still be attached for a moment,
        // and an agent may have moved on since: then nothing is recorded.
        if crate::relay::record_connected(&state.db, agent, relay, issued_at_ms).await? {
            state.bus.agent_moved(agent, Some(relay.clone())).await;
        }
    }
    for agent in left {
        state.bus.agent_moved(agent, None).await;
    }
    Ok(())
}

/// The app wildcards the owner set for an edge (regional and global).
pub(super) async fn edge_wildcards(state: &AppState, edge: Uuid) -> ApiResult<Vec<String>> {
    let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT wildcard_hostname, global_wildcard_hostname FROM edges WHERE id = $1",
    )
    .bind(edge)
    .fetch_optional(&state.db)
    .await?;
    Ok(row
        .map(|(a, b)| [a, b].into_iter().flatten().collect())
        .unwrap_or_default())
}

/// `GET /api/v2/edges/me/events`: newline-delimited JSON events, starting
/// with a snapshot; pings every 10 s. The stream ends when this replica may
/// have missed events (the edge then reconnects and resyncs) or shuts down.
pub(super) async fn events(
    State(state): State<AppState>,
    edge: EdgeAuth,
) -> ApiResult<axum::response::Response> {
    use devmesh_shared::api::EdgeEvent;
    use tokio::sync::broadcast::error::RecvError;
    // Subscribe before reading the snapshot, so nothing falls between.
    let rx = state.bus.subscribe();
    let snapshot = EdgeEvent::Snapshot {
        agents: crate::events::agent_locations(&state.db).await?,
        revocations: state.bus.recent_revocations().await?,
        app_token_keys: state.signer.public_keys().to_vec(),
        mesh_peers: crate::relay::mesh_peers(&state.db).await?,
    };
    tracing::info!(edge = %edge.name, "edge subscribed to events");
    let line = devmesh_shared::events::encode;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.reset();
    let first = Some(line(&snapshot));
    let shutdown = state.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (first, rx, tick, shutdown),
        move |(first, mut rx, mut tick, shutdown)| async move {
            if let Some(l) = first {
                return Some((
                    Ok::<_, std::convert::Infallible>(l),
                    (None, rx, tick, shutdown),
                ));
            }
            let next = tokio::select! {
                _ = shutdown.cancelled() => None,
                _ = tick.tick() => Some(line(&EdgeEvent::Ping)),
                m = rx.recv() => match m {
                    Ok(crate::events::BusMessage::Event(e)) => Some(line(&e)),
                    Ok(crate::events::BusMessage::Gap) | Err(RecvError::Lagged(_) | RecvError::Closed) => None,
                },
            };
            next.map(|l| (Ok(l), (None, rx, tick, shutdown)))
        },
    );
    let mut resp = axum::response::Response::new(axum::body::Body::from_stream(stream));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-ndjson"),
    );
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}
