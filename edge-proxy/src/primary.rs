//! The edge's typed client for the primary's edge API
//! (`/api/v2/edges/me/*`, authenticated by the edge token). Every call
//! answers with its typed result or a typed failure, so no caller maps HTTP
//! statuses back to meanings.

use std::time::Duration;

use devmesh_proxy::app::AppError;
use devmesh_shared::api::{
    EDGE_TOKEN_HEADER, EdgeAppAccess, EdgeAppAccessRequest, EdgeAppConnectRequest,
    EdgeDeregisterRequest, EdgeRegisterRequest, EdgeRegisterResponse, EdgeShellAccess,
    EdgeShellAccessRequest, EdgeShellEnded,
};
use reqwest::StatusCode;
use uuid::Uuid;

/// How long one call may take (the event stream excepted).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the primary failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No answer: the network, a timeout, the primary down.
    #[error("cannot reach the primary: {0}")]
    Unreachable(String),
    /// The edge token is wrong, regenerated, or the edge was deleted.
    #[error(
        "the primary refused this edge's token: it was revoked (regenerated) or the edge was \
         deleted; get a new token with `devmesh edges regenerate-token`"
    )]
    TokenRefused,
    /// The primary will not take this edge as it is (version, addresses).
    #[error("the primary refused this edge: {0}")]
    Refused(String),
    /// Any other answer.
    #[error("{0}")]
    Failed(String),
}

/// Why the primary gave no access decision.
#[derive(Debug)]
pub(crate) enum DecisionError {
    /// It could not be asked.
    Unreachable(String),
    /// It refused, for this reason.
    Denied(AppError),
}

/// Why the primary gave no shell.
#[derive(Debug)]
pub(crate) enum ShellRefusal {
    /// It could not be asked.
    Unreachable(String),
    /// It refused: its status and error.
    Refused(StatusCode, devmesh_shared::api::Error),
}

/// The edge API of one primary, called with the edge token. Cheap to
/// clone: clones share the HTTP connection pool.
#[derive(Debug, Clone)]
pub(crate) struct PrimaryClient {
    http: reqwest::Client,
    /// The primary's URL, without a trailing slash.
    base: String,
    token: String,
}

impl PrimaryClient {
    pub(crate) fn new(http: reqwest::Client, base: &str, token: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    /// The primary's URL.
    pub(crate) fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, endpoint: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}/api/v2/edges/me/{endpoint}", self.base))
            .header(EDGE_TOKEN_HEADER, &self.token)
    }

    async fn post(
        &self,
        endpoint: &str,
        body: &impl serde::Serialize,
    ) -> Result<reqwest::Response, CallError> {
        self.request(reqwest::Method::POST, endpoint)
            .json(body)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))
    }

    /// Registers (or heartbeats) a replica.
    pub(crate) async fn register(
        &self,
        req: &EdgeRegisterRequest,
    ) -> Result<EdgeRegisterResponse, CallError> {
        let resp = checked(self.post("register", req).await?).await?;
        resp.json()
            .await
            .map_err(|e| CallError::Failed(format!("unreadable answer: {e}")))
    }

    /// Takes a replica out of service.
    pub(crate) async fn deregister(&self, replica_id: Uuid) -> Result<(), CallError> {
        checked(
            self.post("deregister", &EdgeDeregisterRequest { replica_id })
                .await?,
        )
        .await
        .map(drop)
    }

    /// The decision for a key, a token to renew, or anyone, on an app host.
    pub(crate) async fn app_access(
        &self,
        req: &EdgeAppAccessRequest,
    ) -> Result<EdgeAppAccess, DecisionError> {
        self.decision("app-access", req).await
    }

    /// Redeems a sealed sign-in grant for an app host.
    pub(crate) async fn app_connect(
        &self,
        req: &EdgeAppConnectRequest,
    ) -> Result<EdgeAppAccess, DecisionError> {
        self.decision("app-connect", req).await
    }

    async fn decision(
        &self,
        endpoint: &str,
        req: &impl serde::Serialize,
    ) -> Result<EdgeAppAccess, DecisionError> {
        let resp = self
            .post(endpoint, req)
            .await
            .map_err(|e| DecisionError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(|e| {
                DecisionError::Denied(AppError::BadGateway(format!(
                    "unreadable answer from the primary: {e}"
                )))
            });
        }
        // The primary names its refusal; a status without one (a proxy in
        // between, an overloaded primary) means it could not decide.
        match resp.json::<devmesh_shared::api::Error>().await {
            Ok(devmesh_shared::api::Error {
                denial: Some(code),
                detail,
                ..
            }) => Err(DecisionError::Denied(AppError::from_code(&code, detail))),
            _ => Err(DecisionError::Unreachable(format!(
                "{endpoint} answered {status} without a decision"
            ))),
        }
    }

    /// May the holder of a key open a shell to an agent? A refusal comes
    /// back as the primary's status and error, for the client to read.
    pub(crate) async fn shell_access(
        &self,
        req: &EdgeShellAccessRequest,
    ) -> Result<EdgeShellAccess, ShellRefusal> {
        let resp = self
            .post("shell-access", req)
            .await
            .map_err(|e| ShellRefusal::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .json()
                .await
                .map_err(|e| ShellRefusal::Unreachable(format!("unreadable answer: {e}")));
        }
        match resp.json::<devmesh_shared::api::Error>().await {
            Ok(error) if status.is_client_error() => Err(ShellRefusal::Refused(status, error)),
            _ => Err(ShellRefusal::Unreachable(format!(
                "shell-access answered {status}"
            ))),
        }
    }

    /// Reports that a shell session this edge carried ended.
    pub(crate) async fn shell_ended(&self, req: &EdgeShellEnded) -> Result<(), CallError> {
        checked(self.post("shell-ended", req).await?)
            .await
            .map(drop)
    }

    /// Opens the event stream (`GET events`): the response whose body is
    /// newline-delimited events ([`devmesh_shared::events`]).
    pub(crate) async fn events(&self) -> Result<reqwest::Response, CallError> {
        let resp = self
            .request(reqwest::Method::GET, "events")
            // The stream is long-lived; only its silence is a timeout.
            .timeout(Duration::from_secs(365 * 86_400))
            .send()
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        checked(resp).await
    }
}

/// The response if it succeeded, else its failure.
async fn checked(resp: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    // The API's errors are JSON: say the message and its detail.
    let text = match serde_json::from_str::<devmesh_shared::api::Error>(&body) {
        Ok(e) if e.detail.is_empty() => e.message,
        Ok(e) => format!("{} ({})", e.message, e.detail),
        Err(_) => body,
    };
    Err(match status {
        StatusCode::UNAUTHORIZED => CallError::TokenRefused,
        StatusCode::CONFLICT => CallError::Refused(text),
        _ => CallError::Failed(format!("{status}: {text}")),
    })
}
