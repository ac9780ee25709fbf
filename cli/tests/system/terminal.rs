//! Reconnecting terminals (`GET /api/v2/workspaceagents/{id}/pty`, a
//! WebSocket): a client that drops and comes back with its session id gets
//! the same shell and its recent output, through any region.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

use crate::provisioning::primary_with;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A terminal client: a WebSocket and everything it has shown.
pub(crate) struct Term {
    ws: Socket,
    pub(crate) seen: String,
}

/// What a refused terminal handshake answered.
#[derive(Debug)]
pub(crate) struct Refused(pub(crate) StatusCode);

impl Term {
    /// Opens terminal `session` of `agent` through the region at `base`
    /// with `headers` (a key, a cookie, an origin).
    pub(crate) async fn open_with(
        base: &str,
        agent: &str,
        session: Uuid,
        headers: &[(&str, &str)],
    ) -> Result<Self, Refused> {
        let url = format!(
            "{}/api/v2/workspaceagents/{agent}/pty?session={session}&cols=100&rows=30",
            base.replacen("http", "ws", 1)
        );
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().expect("a header value"),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Self {
                ws,
                seen: String::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Refused(
                StatusCode::from_u16(resp.status().as_u16()).unwrap(),
            )),
            Err(e) => panic!("terminal handshake failed: {e}"),
        }
    }

    /// [`Term::open_with`] the key in the session header.
    pub(crate) async fn open(base: &str, agent: &str, session: Uuid, key: &str) -> Self {
        Self::open_with(base, agent, session, &[("Devmesh-Session-Token", key)])
            .await
            .expect("the terminal opens")
    }

    /// Types `line` and Enter.
    pub(crate) async fn line(&mut self, line: &str) {
        let msg = json!({"data": format!("{line}\r")}).to_string();
        self.ws.send(Message::text(msg)).await.unwrap();
    }

    /// Sends a raw WebSocket message.
    pub(crate) async fn send(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// Reads until the terminal has shown `needle` (since it opened).
    pub(crate) async fn shows(&mut self, needle: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.seen.contains(needle) {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} in {:?}", self.seen));
            match msg {
                Some(Ok(Message::Binary(b))) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Some(Ok(_)) => {}
                other => panic!(
                    "the terminal ended ({other:?}) without {needle:?}: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Reads until the server closes; its close code.
    pub(crate) async fn closed(&mut self) -> Option<CloseCode> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("the terminal closes")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(Message::Binary(b))) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }
}

#[tokio::test]
async fn a_dropped_terminal_comes_back_with_the_same_shell_and_its_recent_output() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (_id, agent, agent_process) = crate::ssh::running_workspace_with(
        &server,
        &owner,
        dir.path(),
        "term",
        json!({"name": "main"}),
        &[("DEVMESH_TERMINAL_GRACE_SECS", "2")],
    )
    .await;
    let key = owner.token.clone().unwrap();
    let session = Uuid::new_v4();

    let mut term = Term::open(&server.url, &agent, session, &key).await;
    term.line("export MARK=41; echo \"value $((MARK + 1))\"")
        .await;
    term.shows("value 42").await;
    // The connection drops without a goodbye.
    drop(term);

    // Back with the same id: the output so far, then the same shell.
    let mut term = Term::open(&server.url, &agent, session, &key).await;
    term.shows("value 42").await;
    term.line("echo \"again $MARK\"").await;
    term.shows("again 41").await;
    // Resized as the client says.
    term.send(Message::text(json!({"cols": 133, "rows": 37}).to_string()))
        .await;
    term.line("stty size").await;
    term.shows("37 133").await;

    // Another id is another shell.
    let mut other = Term::open(&server.url, &agent, Uuid::new_v4(), &key).await;
    other.line("echo \"other ${MARK:-unset}\"").await;
    other.shows("other unset").await;

    // A malformed message ends that connection only: the shell waits.
    term.send(Message::text("not json")).await;
    assert_eq!(term.closed().await, Some(CloseCode::Invalid));
    let mut term = Term::open(&server.url, &agent, session, &key).await;
    term.line("echo \"still $MARK\"").await;
    term.shows("still 41").await;

    // A newer client takes the terminal over from an older one.
    let mut newer = Term::open(&server.url, &agent, session, &key).await;
    assert_eq!(term.closed().await, Some(CloseCode::Normal));
    newer.line("echo \"newer $MARK\"").await;
    newer.shows("newer 41").await;

    // When the shell exits, the terminal ends, and its id starts afresh.
    newer.line("exit").await;
    assert_eq!(newer.closed().await, Some(CloseCode::Normal));
    let mut fresh = Term::open(&server.url, &agent, session, &key).await;
    fresh.line("echo \"fresh ${MARK:-unset}\"").await;
    fresh.shows("fresh unset").await;
    fresh.line("export MARK=7").await;
    // Terminals of this id the agent has ended so far (its log says so).
    let id = session.to_string();
    let ends = || {
        agent_process
            .process
            .log_text()
            .lines()
            .filter(|l| l.contains("terminal ended") && l.contains(&id))
            .count()
    };
    let ended_before = ends();
    drop(fresh);
    // Nobody came back within the grace period (2 s here): it ended.
    crate::support::eventually(20, "the agent to end the abandoned terminal", || async {
        (ends() > ended_before).then_some(())
    })
    .await;
    let mut after = Term::open(&server.url, &agent, session, &key).await;
    after.line("echo \"after ${MARK:-gone}\"").await;
    after.shows("after gone").await;

    // Every terminal session is audited, start and end.
    let (_, log) = owner.get("/audit?action=terminal_end").await;
    assert!(log["entries"].as_array().unwrap().len() >= 5, "{log}");
}

#[tokio::test]
async fn another_sites_page_cannot_open_a_terminal_with_the_session_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (_id, agent, _agent) =
        crate::ssh::running_workspace(&server, &owner, dir.path(), "tc", json!({"name": "main"}))
            .await;
    let cookie = format!("devmesh_session_token={}", owner.token.clone().unwrap());
    let session = Uuid::new_v4();
    // From another site's page: refused before anything opens.
    let refused = Term::open_with(
        &server.url,
        &agent,
        session,
        &[("Cookie", &cookie), ("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(refused.err().map(|r| r.0), Some(StatusCode::FORBIDDEN));
    // Nor with some other Authorization a browser might add by itself
    // (cached credentials for a proxy in front): the cookie still decides.
    let refused = Term::open_with(
        &server.url,
        &agent,
        session,
        &[
            ("Cookie", &cookie),
            ("Origin", "http://evil.example"),
            ("Authorization", "Basic dXNlcjpwYXNz"),
        ],
    )
    .await;
    assert_eq!(refused.err().map(|r| r.0), Some(StatusCode::FORBIDDEN));
    // Without any origin (not a browser page) the cookie is not enough either.
    let refused = Term::open_with(&server.url, &agent, session, &[("Cookie", &cookie)]).await;
    assert_eq!(refused.err().map(|r| r.0), Some(StatusCode::FORBIDDEN));
    // No credentials, or a forged key: 401.
    let refused = Term::open_with(&server.url, &agent, session, &[]).await;
    assert_eq!(refused.err().map(|r| r.0), Some(StatusCode::UNAUTHORIZED));
    let refused = Term::open_with(
        &server.url,
        &agent,
        session,
        &[("Devmesh-Session-Token", "abcdefghij-forgedsecret")],
    )
    .await;
    assert_eq!(refused.err().map(|r| r.0), Some(StatusCode::UNAUTHORIZED));
    // The dashboard's own page may.
    let mut term = Term::open_with(
        &server.url,
        &agent,
        session,
        &[("Cookie", &cookie), ("Origin", &server.url)],
    )
    .await
    .expect("the dashboard's page opens a terminal");
    term.line("echo dash$((1 + 1))").await;
    term.shows("dash2").await;
}
