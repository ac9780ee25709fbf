//! Scenario 10: faults under load. While clients load an app through the
//! client's edge and through the primary, and writers keep creating and
//! deleting API keys, workspaces and port shares, a fault strikes; the report says what clients saw
//! (errors, the longest gap between two answers per path), how long the
//! API took to answer again, and whether any write was lost or half-done:
//! every write the API acknowledged must be there afterwards (or gone, for
//! a deletion), and no write it refused may be visible.
//!
//! Faults: `postgres` (SIGKILL the embedded PostgreSQL's postmaster),
//! `freeze` (SIGSTOP the primary for `freeze_s`, then SIGCONT), `primary`
//! (SIGKILL the primary and start it again), `agent` (SIGKILL the agent
//! of the edge path's workspace and start it again) and `edge` (SIGKILL
//! another region's edge while the primary path loads that region's
//! workspace, whose agent must re-attach elsewhere; the edge is started
//! again afterwards, for the scenarios that follow).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::Instant;

use crate::load;
use crate::report::ScenarioReport;
use crate::run::Ctx;
use crate::scenario::{self, Protocol};
use crate::stats::{Samples, round};

/// Clients per loaded path.
const CLIENTS_PER_PATH: usize = 4;
/// Longest the API may take to answer again for the expectation to hold.
const API_BACK_WITHIN: Duration = Duration::from_secs(15);

/// Runs scenario 10: each fault of the scenario file in turn.
pub async fn run(
    ctx: &mut Ctx,
    cfg: &scenario::Chaos,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let mut unmet = Vec::new();
    for (round, fault) in cfg.faults.iter().enumerate() {
        let fault = match fault.as_str() {
            "postgres" => Fault::Postgres,
            "freeze" => Fault::Freeze,
            "primary" => Fault::Primary,
            "agent" => Fault::Agent,
            "edge" => Fault::Edge,
            other => {
                sr.notes.push(format!("unknown fault {other:?}: skipped"));
                continue;
            }
        };
        if !under_load(ctx, cfg, sr, (round, fault)).await? {
            unmet.push(fault.label(cfg));
        }
    }
    anyhow::ensure!(
        unmet.is_empty(),
        "expectation not met: {}",
        unmet.join(", ")
    );
    Ok(())
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL the embedded PostgreSQL's postmaster.
    Postgres,
    /// SIGSTOP the primary, SIGCONT after `freeze_s`.
    Freeze,
    /// SIGKILL the primary and start it again.
    Primary,
    /// SIGKILL the workspace agent behind the edge path and start it again.
    Agent,
    /// SIGKILL an edge other than the client's (its agent re-attaches
    /// elsewhere; the primary path loads that agent); started again after.
    Edge,
}

impl Fault {
    fn label(self, cfg: &scenario::Chaos) -> String {
        match self {
            Self::Postgres => "postgres killed".into(),
            Self::Freeze => format!("primary frozen {} s", cfg.freeze_s),
            Self::Primary => "primary killed and restarted".into(),
            Self::Agent => "edge's workspace agent killed and restarted".into(),
            Self::Edge => "another region's edge killed".into(),
        }
    }

    /// Whether the edge path must answer throughout (its own workspace
    /// does not depend on the primary); else it must be back within
    /// [`API_BACK_WITHIN`].
    fn edge_unaffected(self) -> bool {
        !matches!(self, Self::Agent)
    }
}

/// What happened to one write.
#[derive(Debug, Default)]
struct Writes {
    /// Things whose creation the API acknowledged: (id, name).
    created: Vec<(String, String)>,
    /// Ids whose deletion the API acknowledged.
    deleted: HashSet<String>,
    /// Names whose creation the API refused with an error status.
    refused_creates: Vec<String>,
    /// Ids whose deletion the API refused with an error status.
    refused_deletes: HashSet<String>,
    /// Writes whose answer never arrived (the connection failed): either
    /// outcome is allowed.
    unknown: usize,
    unknown_names: HashSet<String>,
    unknown_deletes: HashSet<String>,
}

/// The kinds of thing the writers create and delete under fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// API keys of the run's user.
    Key,
    /// Workspaces of the run's template (bring-your-own: a create and a
    /// delete are each one transaction).
    Workspace,
    /// Port shares of one workspace made for the purpose (a share revokes
    /// its workspace's app tokens, so never the loaded workspaces').
    PortShare,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Key, Kind::Workspace, Kind::PortShare];

    fn label(self) -> &'static str {
        match self {
            Kind::Key => "keys",
            Kind::Workspace => "workspaces",
            Kind::PortShare => "port shares",
        }
    }
}

/// How one write went.
enum Answer {
    /// Acknowledged, with the id of what was created (when it said).
    Done(Option<String>),
    /// Refused with an error status.
    Refused,
    /// No answer (the connection failed): either outcome is allowed.
    Lost,
}

/// The API the writers use.
struct WriteApi {
    url: String,
    token: String,
    http: reqwest::Client,
    /// The run's template, for workspaces.
    template: String,
    /// The workspace whose ports are shared.
    shares_of: String,
}

impl WriteApi {
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<serde_json::Value, Answer> {
        match req
            .header("Devmesh-Session-Token", &self.token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(r.json().await.unwrap_or_default()),
            Ok(_) => Err(Answer::Refused),
            Err(_) => Err(Answer::Lost),
        }
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/v2{path}", self.url)
    }

    /// The `n`th thing of `kind`, named `name`; its id.
    async fn create(&self, kind: Kind, name: &str, n: u64) -> Answer {
        let (path, body, id_at): (String, serde_json::Value, &[&str]) = match kind {
            Kind::Key => (
                "/users/me/keys".into(),
                json!({ "name": name, "lifetime_seconds": 3600 }),
                &["id"],
            ),
            Kind::Workspace => (
                "/workspaces".into(),
                json!({ "name": name, "template": self.template }),
                &["workspace", "id"],
            ),
            Kind::PortShare => (
                format!("/workspaces/{}/port-shares", self.shares_of),
                json!({ "agent_name": "main", "port": share_port(n), "sharing_level": "authenticated" }),
                &["port"],
            ),
        };
        match self.send(self.http.post(self.api(&path)).json(&body)).await {
            Ok(v) => {
                let id = id_at.iter().fold(&v, |v, k| &v[*k]);
                Answer::Done(
                    id.as_str()
                        .map(str::to_owned)
                        .or_else(|| id.as_u64().map(|p| p.to_string())),
                )
            }
            Err(a) => a,
        }
    }

    /// Deletes what `id` names.
    async fn delete(&self, kind: Kind, id: &str) -> Answer {
        let req = match kind {
            Kind::Key => self.http.delete(self.api(&format!("/users/me/keys/{id}"))),
            Kind::Workspace => self
                .http
                .post(self.api(&format!("/workspaces/{id}/builds")))
                .json(&json!({ "transition": "delete" })),
            Kind::PortShare => self
                .http
                .post(self.api(&format!("/workspaces/{}/port-shares", self.shares_of)))
                .json(&json!({ "agent_name": "main", "port": id.parse::<u16>().unwrap_or(0), "sharing_level": "owner" })),
        };
        match self.send(req).await {
            Ok(_) => Answer::Done(None),
            Err(a) => a,
        }
    }

    /// What exists of `kind` now: (id, name).
    async fn list(&self, kind: Kind) -> anyhow::Result<HashSet<(String, String)>> {
        let (path, field) = match kind {
            Kind::Key => ("/users/me/keys".to_owned(), "keys"),
            Kind::Workspace => ("/workspaces".to_owned(), "workspaces"),
            Kind::PortShare => (
                format!("/workspaces/{}/port-shares", self.shares_of),
                "shares",
            ),
        };
        let v = match self.send(self.http.get(self.api(&path))).await {
            Ok(v) => v,
            Err(_) => anyhow::bail!("listing {} failed", kind.label()),
        };
        Ok(v[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| match kind {
                Kind::PortShare => {
                    let port = x["port"].as_u64()?.to_string();
                    Some((port.clone(), port))
                }
                _ => Some((x["id"].as_str()?.to_owned(), x["name"].as_str()?.to_owned())),
            })
            .collect())
    }
}

/// The port of the `n`th share.
fn share_port(n: u64) -> u64 {
    20_000 + n % 40_000
}

/// Creates things of `kind` and deletes every other one until `stop`.
/// Names carry the fault's `round`, so nothing a round leaves behind can
/// be mistaken for (or conflict with) the next round's writes.
async fn write(api: Arc<WriteApi>, kind: Kind, round: usize, stop: Arc<AtomicBool>) -> Writes {
    let mut w = Writes::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let name = match kind {
            Kind::Key => format!("chaos-{round}-{n}"),
            Kind::Workspace => format!("chaos-w{round}-{n}"),
            Kind::PortShare => share_port(n).to_string(),
        };
        let id = match api.create(kind, &name, n).await {
            Answer::Done(Some(id)) => id,
            Answer::Refused => {
                w.refused_creates.push(name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Answer::Done(None) | Answer::Lost => {
                w.unknown += 1;
                w.unknown_names.insert(name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        w.created.push((id.clone(), name));
        if n.is_multiple_of(2) {
            match api.delete(kind, &id).await {
                Answer::Done(_) => {
                    w.deleted.insert(id);
                }
                Answer::Refused => {
                    w.refused_deletes.insert(id);
                }
                Answer::Lost => {
                    w.unknown += 1;
                    w.unknown_deletes.insert(id);
                }
            }
        }
    }
    w
}

/// Checks what exists against what the writer was told: the ids of
/// acknowledged writes lost (created and gone, or deleted and back), and
/// the names or ids of refused writes visible.
fn check(writes: &Writes, present: &HashSet<(String, String)>) -> (Vec<String>, Vec<String>) {
    let ids: HashSet<&str> = present.iter().map(|(id, _)| id.as_str()).collect();
    let names: HashSet<&str> = present.iter().map(|(_, n)| n.as_str()).collect();
    let lost = writes
        .created
        .iter()
        .filter(|(id, _)| !writes.deleted.contains(id) && !writes.unknown_deletes.contains(id))
        .filter(|(id, _)| !ids.contains(id.as_str()))
        .map(|(id, _)| id.clone());
    let resurrected = writes
        .deleted
        .iter()
        .filter(|id| ids.contains(id.as_str()))
        .cloned();
    let refused_created = writes
        .refused_creates
        .iter()
        .filter(|n| names.contains(n.as_str()))
        .cloned();
    let refused_deleted = writes
        .refused_deletes
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .cloned();
    (
        lost.chain(resurrected).collect(),
        refused_created.chain(refused_deleted).collect(),
    )
}

/// Answers per path: (seconds since start, answered).
type Timeline = Arc<parking_lot::Mutex<Vec<(usize, f64, bool)>>>;

/// The longest time between two answers on one path that spans `from`,
/// in seconds, and the errors after `from`.
fn longest_gap(timeline: &[(usize, f64, bool)], path: usize, from: f64, end: f64) -> (f64, usize) {
    let mut last_ok = from;
    let mut gap: f64 = 0.0;
    let mut errors = 0;
    let mut points: Vec<_> = timeline.iter().filter(|(p, _, _)| *p == path).collect();
    points.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (_, at, ok) in points {
        if *at < from {
            continue;
        }
        if *ok {
            gap = gap.max(at - last_ok);
            last_ok = *at;
        } else {
            errors += 1;
        }
    }
    (gap.max(end - last_ok), errors)
}

/// One fault under load; whether its expectation held.
async fn under_load(
    ctx: &mut Ctx,
    cfg: &scenario::Chaos,
    sr: &mut ScenarioReport,
    (pass, fault): (usize, Fault),
) -> anyhow::Result<bool> {
    let label = fault.label(cfg);
    let pid_file = ctx.dep.dir.path().join("data/postgres/postmaster.pid");
    if ctx.dep.primary.is_none() || !pid_file.exists() {
        sr.notes.push(format!(
            "{label}: this run did not start the primary (and its embedded PostgreSQL); skipped"
        ));
        return Ok(true);
    }
    // The client's edge to a workspace attached to it (a fault of the
    // primary must not reach it), and the primary to its own workspace.
    let region = ctx.dep.client_region.clone();
    let local_agent = ctx.dep.agents.iter().position(|a| a.region == region);
    let edge_path = ctx
        .dep
        .edges
        .iter()
        .position(|e| e.region == region)
        .zip(local_agent)
        .and_then(|(e, a)| ctx.dep.via_edge(e, a, false));
    let mut paths = Vec::new();
    match edge_path {
        Some(mut p) => {
            p.name = format!("devmesh (edge {region}, its own workspace)");
            paths.push(p);
        }
        None => sr.notes.push(format!(
            "{label}: no edge with a workspace of its own in {region}: only the primary path is loaded"
        )),
    }
    // `edge`: the victim is another region's edge with a workspace of its
    // own; the primary path loads that workspace, whose agent must
    // re-attach elsewhere.
    let victim = if fault == Fault::Edge {
        let found = ctx.dep.edges.iter().enumerate().find_map(|(k, e)| {
            let agent = ctx.dep.agents.iter().position(|a| a.region == e.region)?;
            (e.region != region && e.proc.is_some()).then_some((k, agent))
        });
        if found.is_none() {
            sr.notes.push(format!(
                "{label}: no edge outside {region} with a workspace of its own; skipped"
            ));
            return Ok(true);
        }
        found
    } else {
        None
    };
    let mut p = ctx.dep.via_primary(victim.map_or(0, |(_, a)| a), false);
    p.name = match victim {
        Some((k, _)) => format!(
            "devmesh (primary, the workspace of the {} edge)",
            ctx.dep.edges[k].region
        ),
        None => "devmesh (primary)".into(),
    };
    paths.push(p);
    let edge_loaded = paths.len() == 2;
    let client = ctx.client(Protocol::Http1)?;
    let stop = Arc::new(AtomicBool::new(false));
    let timeline: Timeline = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, ep) in paths.iter().enumerate() {
        for _ in 0..CLIENTS_PER_PATH {
            let (client, ep, stop, timeline) =
                (client.clone(), ep.clone(), stop.clone(), timeline.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let ok = tokio::time::timeout(
                        Duration::from_secs(5),
                        load::small_once(&client, &ep, 1024),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok());
                    timeline.lock().push((i, start.elapsed().as_secs_f64(), ok));
                    if !ok {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
    }
    // A workspace of its own for the port shares (a share revokes its
    // workspace's app tokens; the loaded workspaces must keep theirs).
    let shares_name = format!("chaos-s{pass}");
    let shares_of = ctx
        .dep
        .api_post(
            "/workspaces",
            json!({ "name": shares_name, "template": ctx.dep.run_id }),
        )
        .await?["workspace"]["id"]
        .as_str()
        .context("the port shares' workspace")?
        .to_owned();
    let write_api = Arc::new(WriteApi {
        url: ctx.dep.url.clone(),
        token: ctx.dep.token.clone(),
        http: ctx.dep.http.clone(),
        template: ctx.dep.run_id.clone(),
        shares_of,
    });
    let writers: Vec<_> = Kind::ALL
        .into_iter()
        .map(|kind| tokio::spawn(write(write_api.clone(), kind, pass, stop.clone())))
        .collect();
    ctx.progress
        .set_message(format!("chaos: load for {} s, then {label}", cfg.before_s));
    tokio::time::sleep(Duration::from_secs_f64(cfg.before_s)).await;
    let killed_at = start.elapsed().as_secs_f64();
    match fault {
        Fault::Postgres => {
            let pid: i32 = std::fs::read_to_string(&pid_file)?
                .lines()
                .next()
                .context("postmaster.pid is empty")?
                .trim()
                .parse()?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .context("SIGKILL the postmaster")?;
        }
        Fault::Freeze => {
            let primary = ctx.dep.primary.as_ref().context("no primary")?;
            primary.signal(nix::sys::signal::Signal::SIGSTOP);
            tokio::time::sleep(Duration::from_secs_f64(cfg.freeze_s)).await;
            primary.signal(nix::sys::signal::Signal::SIGCONT);
        }
        Fault::Primary => ctx.dep.restart_primary().await?,
        Fault::Agent => {
            let agent = local_agent.context("no workspace agent in the client's region")?;
            ctx.dep.restart_agent(agent).await?;
        }
        Fault::Edge => {
            let (k, _) = victim.context("no victim edge")?;
            ctx.dep.kill_edge(k).await;
        }
    }
    // The API's view: an authenticated read that queries the database,
    // every 100 ms, until it answers after its last failure.
    ctx.progress
        .set_message("chaos: waiting for the API to answer again");
    // Counted from the fault's end: the kill, the SIGCONT, the restart.
    let t = match fault {
        Fault::Freeze => Instant::now(),
        _ => start + Duration::from_secs_f64(killed_at),
    };
    let mut answered_since = None;
    while t.elapsed() < Duration::from_secs_f64(cfg.recover_timeout_s) {
        let answered = ctx
            .dep
            .http
            .get(format!("{}/api/v2/users/me/keys", ctx.dep.url))
            .header("Devmesh-Session-Token", &ctx.dep.token)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if answered {
            answered_since.get_or_insert(t.elapsed());
            // Answering for a second in a row: back for good.
            if answered_since.is_some_and(|s| t.elapsed() - s > Duration::from_secs(1)) {
                break;
            }
        } else {
            answered_since = None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back for good: the first answer after the last failure, counted from
    // the fault's end (a restart's own time included).
    let back = answered_since;
    tokio::time::sleep(Duration::from_secs_f64(cfg.after_s)).await;
    stop.store(true, Ordering::Relaxed);
    let end = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let mut joined = Vec::new();
    for w in writers {
        joined.push(w.await);
    }
    // The killed edge comes back for the scenarios after this one (its
    // region's agent stays where it went until its re-checks move it
    // back, minutes later).
    if let Some((k, _)) = victim {
        ctx.dep.restart_edge(k).await?;
        sr.notes.push(format!(
            "{label}: the {} edge was started again; its region's agent stays on the relay it moved to until its re-checks move it back",
            ctx.dep.edges[k].region
        ));
    }
    let writes = joined.into_iter().collect::<Result<Vec<_>, _>>()?;

    // What clients saw, per path.
    let all = std::mem::take(&mut *timeline.lock());
    // The first path is the client's edge: it must keep answering.
    let (mut edge_errors, mut edge_gap, mut primary_gap) = (0, 0.0, 0.0);
    for (i, ep) in paths.iter().enumerate() {
        let mut s = Samples::default();
        for (_, _, ok) in all.iter().filter(|(p, at, _)| *p == i && *at >= killed_at) {
            if *ok {
                s.ok(Duration::ZERO);
            } else {
                s.errors += 1;
            }
        }
        let (gap, errors) = longest_gap(&all, i, killed_at, end);
        if i == 0 && edge_loaded {
            edge_errors = errors;
            edge_gap = gap;
        } else {
            primary_gap = gap;
        }
        sr.add(
            format!("{label}: app requests after the fault"),
            &ep.name,
            s,
            Duration::from_secs_f64(end - killed_at),
        );
        sr.extra.insert(
            format!("{label}: longest gap between answers, {} (s)", ep.name),
            json!(round(gap)),
        );
        sr.extra.insert(
            format!("{label}: failed app requests, {}", ep.name),
            json!(errors),
        );
    }

    // What the database kept, per kind.
    let (mut lost, mut refused_visible) = (0, 0);
    let mut per_kind = Vec::new();
    for (kind, w) in Kind::ALL.into_iter().zip(&writes) {
        let present = write_api.list(kind).await?;
        let (l, r) = check(w, &present);
        lost += l.len();
        refused_visible += r.len();
        if !l.is_empty() || !r.is_empty() {
            sr.notes.push(format!(
                "{label}: {}: acknowledged but lost {l:?}; refused but visible {r:?}",
                kind.label()
            ));
        }
        per_kind.push(format!(
            "{} {}",
            w.created.len() + w.deleted.len(),
            kind.label()
        ));
    }
    let api_back = back.map(|d| d.as_secs_f64());
    let met = lost == 0
        && refused_visible == 0
        && back.is_some_and(|d| d <= API_BACK_WITHIN)
        && if fault.edge_unaffected() {
            edge_errors == 0
        } else {
            edge_gap <= API_BACK_WITHIN.as_secs_f64()
        }
        && (fault != Fault::Edge || primary_gap <= API_BACK_WITHIN.as_secs_f64());
    for (k, v) in [
        (
            "API answering again after (s)",
            api_back.map_or(json!("never"), |s| json!(round(s))),
        ),
        (
            "writes acknowledged",
            json!(
                writes
                    .iter()
                    .map(|w| w.created.len() + w.deleted.len())
                    .sum::<usize>()
            ),
        ),
        ("writes acknowledged by kind", json!(per_kind.join(", "))),
        (
            "writes refused",
            json!(
                writes
                    .iter()
                    .map(|w| w.refused_creates.len() + w.refused_deletes.len())
                    .sum::<usize>()
            ),
        ),
        (
            "writes with no answer (either outcome allowed)",
            json!(writes.iter().map(|w| w.unknown).sum::<usize>()),
        ),
        ("acknowledged writes lost", json!(lost)),
        ("refused writes visible", json!(refused_visible)),
        (
            "expectation",
            json!(format!(
                "{}, the API again within {} s, no acknowledged write lost, no refused write visible: {}",
                if fault == Fault::Edge {
                    format!(
                        "the client's edge answered throughout, the killed edge's workspace again through the primary within {} s",
                        API_BACK_WITHIN.as_secs()
                    )
                } else if fault.edge_unaffected() {
                    "the edge answered throughout".to_owned()
                } else {
                    format!(
                        "the edge answered again within {} s",
                        API_BACK_WITHIN.as_secs()
                    )
                },
                API_BACK_WITHIN.as_secs(),
                if met { "met" } else { "NOT met" }
            )),
        ),
    ] {
        sr.extra.insert(format!("{label}: {k}"), v);
    }
    // Leave nothing of the writers' behind for later scenarios: chaos keys,
    // chaos workspaces (the port shares' one among them).
    for kind in [Kind::Key, Kind::Workspace] {
        for (id, name) in write_api.list(kind).await.unwrap_or_default() {
            if name.starts_with("chaos-") {
                let _ = write_api.delete(kind, &id).await;
            }
        }
    }
    Ok(met)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn present(ids: &[&str]) -> HashSet<(String, String)> {
        ids.iter()
            .map(|id| (id.to_string(), format!("name-{id}")))
            .collect()
    }

    fn counts(w: &Writes, ids: &[&str]) -> (usize, usize) {
        let (lost, visible) = check(w, &present(ids));
        (lost.len(), visible.len())
    }

    #[test]
    fn what_the_api_acknowledged_must_be_there_and_what_it_refused_must_not() {
        let mut w = Writes::default();
        for id in ["a", "b", "c"] {
            w.created.push((id.into(), format!("name-{id}")));
        }
        w.deleted.insert("b".into());
        w.refused_creates.push("name-x".into());
        // a and c kept, b gone, x never made: all as told.
        assert_eq!(counts(&w, &["a", "c"]), (0, 0));
        // c lost, b back from the dead.
        assert_eq!(counts(&w, &["a", "b"]), (2, 0));
        // A refused create visible.
        assert_eq!(counts(&w, &["a", "c", "x"]), (0, 1));
        // A deletion with no answer may have happened or not.
        w.unknown_deletes.insert("c".into());
        assert_eq!(counts(&w, &["a"]), (0, 0));
        // A refused deletion must leave the thing there.
        w.refused_deletes.insert("a".into());
        assert_eq!(counts(&w, &["c"]), (1, 1));
    }
}
