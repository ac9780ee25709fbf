//! The agent's typed client for `/api/v2/workspaceagents/me/...` on the
//! primary, and the retry loop every caller shares.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use devmesh_shared::api::{
    self, AGENT_TOKEN_HEADER, AgentLogEntry, AgentLogsAccepted, AgentLogsRequest, AgentManifest,
    AppHealth, AppHealthRequest, AttachTicketRequest, AttachTicketResponse, LifecycleRequest,
    LifecycleState,
};
use devmesh_shared::secret::Secret;
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use devmesh_net::backoff::Backoff;

/// Timeout of every API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an API call failed.
#[derive(Debug, Error)]
pub(crate) enum ApiError {
    /// The primary refused the token: the workspace was stopped or deleted,
    /// or the token is wrong.
    #[error("the primary refused the agent token: {0}")]
    Unauthorized(String),
    /// Any other non-2xx answer.
    #[error("{status}: {message}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The API error's message (and detail), or the body.
        message: String,
    },
    /// The request did not get an answer (connect, TLS, timeout) or the body
    /// could not be read or decoded.
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
}

/// A client for one primary, authenticated by the agent token. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub(crate) struct ApiClient {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    http: reqwest::Client,
    /// `<base>/api/v2/workspaceagents/me/`, ready to join paths onto.
    me: Url,
    token: Secret,
    /// Relays of this region are preferred while they answer.
    region: Option<String>,
}

impl ApiClient {
    /// A client for the primary at `base`, trusting the system roots plus
    /// the PEM bundle at `extra_roots`.
    pub(crate) fn new(
        base: &str,
        token: Secret,
        extra_roots: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut base = Url::parse(base).with_context(|| format!("invalid primary URL {base:?}"))?;
        anyhow::ensure!(
            matches!(base.scheme(), "http" | "https"),
            "the primary URL must be http or https, not {:?}",
            base.scheme()
        );
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let me = base
            .join("api/v2/workspaceagents/me/")
            .context("cannot build the API URL")?;

        let http = devmesh_net::sockets::http_client(
            concat!("devmesh-agent/", env!("CARGO_PKG_VERSION")),
            REQUEST_TIMEOUT,
            extra_roots,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                me,
                token,
                region: None,
            }),
        })
    }

    /// The same client, preferring `region`'s relays whenever they answer.
    pub(crate) fn pinned_to(self, region: Option<String>) -> Self {
        let Inner {
            http, me, token, ..
        } = Arc::unwrap_or_clone(self.inner);
        Self {
            inner: Arc::new(Inner {
                http,
                me,
                token,
                region,
            }),
        }
    }

    /// The preferred region's name, if one was given.
    pub(crate) fn region(&self) -> Option<&str> {
        self.inner.region.as_deref()
    }

    /// `GET manifest`.
    pub(crate) async fn manifest(&self) -> Result<AgentManifest, ApiError> {
        self.call::<()>(Method::GET, "manifest", None)
            .await?
            .json()
            .await
            .map_err(Into::into)
    }

    /// `POST attach-ticket`: a fresh ticket for one attach to `relay` (its address).
    pub(crate) async fn attach_ticket(
        &self,
        relay: &str,
    ) -> Result<AttachTicketResponse, ApiError> {
        let req = AttachTicketRequest {
            relay: relay.to_owned(),
        };
        self.call(Method::POST, "attach-ticket", Some(&req))
            .await?
            .json()
            .await
            .map_err(Into::into)
    }

    /// `POST lifecycle`.
    pub(crate) async fn lifecycle(&self, state: LifecycleState) -> Result<(), ApiError> {
        self.call(Method::POST, "lifecycle", Some(&LifecycleRequest { state }))
            .await
            .map(drop)
    }

    /// `POST logs`: one batch.
    pub(crate) async fn logs(
        &self,
        logs: Vec<AgentLogEntry>,
    ) -> Result<AgentLogsAccepted, ApiError> {
        self.call(Method::POST, "logs", Some(&AgentLogsRequest { logs }))
            .await?
            .json()
            .await
            .map_err(Into::into)
    }

    /// `POST app-health`: the apps whose health changed.
    pub(crate) async fn app_health(
        &self,
        health: BTreeMap<String, AppHealth>,
    ) -> Result<(), ApiError> {
        self.call(
            Method::POST,
            "app-health",
            Some(&AppHealthRequest { health }),
        )
        .await
        .map(drop)
    }

    /// `POST metadata`: the values that changed.
    pub(crate) async fn metadata(
        &self,
        metadata: Vec<devmesh_shared::api::AgentMetadata>,
    ) -> Result<(), ApiError> {
        self.call(
            Method::POST,
            "metadata",
            Some(&devmesh_shared::api::AgentMetadataRequest { metadata }),
        )
        .await
        .map(drop)
    }

    async fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response, ApiError> {
        // The path is a literal of this module, so joining cannot fail; if
        // it ever did, the error would surface as a failed request.
        let url = self
            .inner
            .me
            .join(path)
            .unwrap_or_else(|_| self.inner.me.clone());
        let mut req = self
            .inner
            .http
            .request(method, url)
            .header(AGENT_TOKEN_HEADER, self.inner.token.expose());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<api::Error>(&text) {
            Ok(e) if e.detail.is_empty() => e.message,
            Ok(e) => format!("{} ({})", e.message, e.detail),
            Err(_) => text.trim().chars().take(200).collect(),
        };
        if status == StatusCode::UNAUTHORIZED {
            return Err(ApiError::Unauthorized(message));
        }
        Err(ApiError::Status { status, message })
    }
}

/// Logs a failed API call the way every retry loop does: a refused token is
/// an operator problem and says so; anything else is a warning.
pub(crate) fn log_api_error(what: &str, err: &ApiError) {
    match err {
        ApiError::Unauthorized(message) => tracing::error!(
            %message,
            "{what}: the primary rejected the agent token (401); the workspace may be \
             stopped or deleted, or the token is wrong; retrying"
        ),
        other => tracing::warn!(error = %other, "{what} failed; retrying"),
    }
}

/// Calls `op` until it succeeds, backing off between attempts. `None` if
/// `cancel` fires first.
pub(crate) async fn retry<T, F, Fut>(what: &str, cancel: &CancellationToken, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut backoff = Backoff::default();
    loop {
        let result = tokio::select! {
            r = op() => r,
            () = cancel.cancelled() => return None,
        };
        match result {
            Ok(v) => return Some(v),
            Err(e) => log_api_error(what, &e),
        }
        if !backoff.wait(cancel).await {
            return None;
        }
    }
}
