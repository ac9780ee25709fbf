//! A small typed client for `/api/v2`; API errors become readable messages.

use anyhow::Context;
use devmesh_shared::api;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A client for one deployment, optionally signed in.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// The header the token goes in.
    token_header: &'static str,
}

/// An error answer from the API, readable, with its status.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    pub(crate) status: StatusCode,
    message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiFailure {}

impl Client {
    pub(crate) fn new(
        base: &str,
        token: Option<String>,
        ca_cert: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        Self::with_timeout(base, token, ca_cert, std::time::Duration::from_secs(60))
    }

    /// A client whose requests may last as long as a session does (an SSH
    /// connection carried by one request).
    pub(crate) fn long_lived(
        base: &str,
        token: Option<String>,
        ca_cert: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        Self::with_timeout(
            base,
            token,
            ca_cert,
            std::time::Duration::from_secs(365 * 24 * 3600),
        )
    }

    fn with_timeout(
        base: &str,
        token: Option<String>,
        ca_cert: Option<&std::path::Path>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Self> {
        // One HTTP client per (CA, timeout) for the whole process: building
        // one loads the system's roots (milliseconds), and sharing it keeps
        // connections alive between calls (`devmesh ping` times requests,
        // not TLS set-ups).
        type Key = (Option<std::path::PathBuf>, std::time::Duration);
        static CLIENTS: std::sync::OnceLock<
            parking_lot::Mutex<std::collections::HashMap<Key, reqwest::Client>>,
        > = std::sync::OnceLock::new();
        let key = (ca_cert.map(std::path::Path::to_path_buf), timeout);
        let mut clients = CLIENTS.get_or_init(Default::default).lock();
        let http = match clients.get(&key) {
            Some(c) => c.clone(),
            None => {
                // Trusts a private CA on top of the system roots (--ca-cert / DEVMESH_CA_CERT).
                let c = devmesh_net::sockets::http_client(
                    concat!("devmesh-cli/", env!("CARGO_PKG_VERSION")),
                    timeout,
                    ca_cert,
                )?;
                clients.insert(key, c.clone());
                c
            }
        };
        drop(clients);
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
            token_header: "Devmesh-Session-Token",
        })
    }

    /// A client for a provisioner daemon: its key instead of a session.
    pub(crate) fn provisioner(
        base: &str,
        key: String,
        ca_cert: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut c = Self::new(base, Some(key), ca_cert)?;
        c.token_header = devmesh_shared::provisionerd::PROVISIONER_KEY_HEADER;
        Ok(c)
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}/api/v2{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.exchange(req).await
    }

    /// Sends `req` with the token; error answers become [`ApiFailure`]s.
    async fn exchange(
        &self,
        mut req: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        if let Some(t) = &self.token {
            req = req.header(self.token_header, t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<api::Error>(&text) {
            Ok(e) => {
                let mut msg = e.message;
                if !e.validations.is_empty() {
                    for v in e.validations {
                        msg.push_str(&format!("\n  {}: {}", v.field, v.detail));
                    }
                } else if !e.detail.is_empty() {
                    msg.push_str(&format!(" ({})", e.detail));
                }
                if status == StatusCode::UNAUTHORIZED
                    && self.token.is_some()
                    && self.token_header == "Devmesh-Session-Token"
                {
                    msg.push_str("\nRun `devmesh login` to sign in again.");
                }
                msg
            }
            Err(_) => format!("{status} from {}: {}", self.base, text.trim()),
        };
        Err(ApiFailure { status, message }.into())
    }

    /// POST a JSON body; `None` for a 204 answer.
    pub(crate) async fn post_maybe<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<Option<T>> {
        let resp = self.send(Method::POST, path, Some(body)).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(resp.json().await?))
    }

    /// POST a JSON body, ignoring the answer's body.
    pub(crate) async fn post_unit<B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<()> {
        self.send(Method::POST, path, Some(body)).await?;
        Ok(())
    }

    /// POST a streamed body; the answer's body streams back.
    pub(crate) async fn post_stream(
        &self,
        path: &str,
        body: reqwest::Body,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}/api/v2{path}", self.base);
        self.exchange(self.http.post(&url).body(body)).await
    }

    /// GET a raw body.
    pub(crate) async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self
            .send::<()>(Method::GET, path, None)
            .await?
            .bytes()
            .await?
            .to_vec())
    }

    /// PUT raw bytes.
    pub(crate) async fn put_bytes(&self, path: &str, body: Vec<u8>) -> anyhow::Result<()> {
        let url = format!("{}/api/v2{path}", self.base);
        self.exchange(self.http.put(&url).body(body)).await?;
        Ok(())
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .send::<()>(Method::GET, path, None)
            .await?
            .json()
            .await?)
    }

    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        Ok(self
            .send(Method::POST, path, Some(body))
            .await?
            .json()
            .await?)
    }

    pub(crate) async fn put<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .send::<()>(Method::PUT, path, None)
            .await?
            .json()
            .await?)
    }

    pub(crate) async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        Ok(self
            .send(Method::PATCH, path, Some(body))
            .await?
            .json()
            .await?)
    }

    pub(crate) async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send::<()>(Method::DELETE, path, None).await?;
        Ok(())
    }

    /// POST with an empty body, ignoring the response body.
    pub(crate) async fn post_empty(&self, path: &str) -> anyhow::Result<()> {
        self.send(Method::POST, path, Some(&serde_json::json!({})))
            .await?;
        Ok(())
    }
}
