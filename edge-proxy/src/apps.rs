//! Apps and dev URLs on the edge's app domains: the app proxy pipeline
//! ([`devmesh_proxy::pipeline`]) with the edge's source of decisions:
//! 1. a browser back from signing in brings a sealed one-time grant for
//!    this host, which the primary redeems (`app-connect`) for an app token
//!    that becomes a cookie on this host alone;
//! 2. an app-token cookie for this host is verified locally with the
//!    primary's public keys and checked against pushed revocations: no
//!    call to anyone (a token near its expiry is renewed once, and the
//!    renewal cached);
//! 3. otherwise a key in a header selects a cached decision; a miss asks
//!    the primary once (`app-access`), and decisions are refreshed in the
//!    background before their token expires, so in steady state no request
//!    waits on the primary;
//! 4. the request goes down the agent's tunnel, or over the mesh to the
//!    agent's home relay.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use devmesh_proxy::app::{APP_TOKEN_RENEW_SECS, AppError, protect_page, wants_html};
use devmesh_proxy::pipeline::{self, Ask, Decided, Decider, Plumbing};
use devmesh_shared::signing::AppToken;

use crate::metrics::CacheLabels;
use crate::{Decision, Edge};

/// A cached decision is refreshed in the background once its token has
/// less than this long to live.
const REFRESH_BEFORE_SECS: i64 = 10 * 60;

/// Middleware: requests for the edge's app domains go through the app
/// proxy pipeline; the rest reach the edge's own endpoints.
pub(crate) async fn route_apps(
    State(edge): State<Arc<Edge>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(relay) = edge.relay.get() else {
        // Not registered yet: nothing to decide with or send through.
        let html = wants_html(req.headers());
        return match pipeline::app_host(&req, &edge.wildcards) {
            Ok(None) => {
                let mut resp = next.run(req).await;
                protect_page(&mut resp, edge.scheme == "https");
                resp
            }
            Ok(Some(_)) => AppError::PrimaryUnavailable.respond(html),
            Err(e) => e.respond(html),
        };
    };
    let plumbing = Plumbing {
        relay,
        upstreams: &edge.upstreams,
        scheme: edge.scheme,
    };
    pipeline::route(
        &EdgeDecider(&edge),
        plumbing,
        &edge.metrics.proxy,
        &edge.wildcards,
        req,
        next,
    )
    .await
}

/// The edge's decisions: app tokens verified locally, the rest asked of
/// the primary and cached.
struct EdgeDecider<'a>(&'a Arc<Edge>);

impl Decider for EdgeDecider<'_> {
    fn sign_in_url(&self) -> &str {
        self.0.primary.url()
    }

    fn verify_token(&self, signed: &str) -> Option<AppToken> {
        let now = chrono::Utc::now().timestamp();
        self.0.keys.verify::<AppToken>(signed, now).ok()
    }

    fn revoked(&self, token: &AppToken) -> bool {
        self.0.revoked(token)
    }

    async fn redeem(
        &self,
        ask: Ask<'_>,
        sealed: &str,
        state: Option<&str>,
    ) -> Result<String, AppError> {
        let d = self
            .0
            .app_connect(sealed, state.unwrap_or_default(), ask.host)
            .await?;
        Ok(d.token)
    }

    async fn with_token(
        &self,
        ask: Ask<'_>,
        token: &AppToken,
        signed: &str,
    ) -> Result<Decided, AppError> {
        count(self.0, "token");
        // An aging token is renewed once through the primary (cached, so
        // only one request of a page pays for it); if that fails the old
        // one serves until it expires.
        let renewed = if token.exp - chrono::Utc::now().timestamp() < APP_TOKEN_RENEW_SECS {
            decision(self.0, ask.host, Credential::Token(signed), ask.client)
                .await
                .ok()
                .map(|d| d.token.clone())
        } else {
            None
        };
        // The app token is what the agent's home relay checks when the
        // stream crosses the mesh.
        let grant = renewed.clone().unwrap_or_else(|| signed.to_owned());
        Ok(Decided {
            target: pipeline::target_of(token, Some(grant)),
            set_token: renewed,
        })
    }

    async fn with_key(
        &self,
        ask: Ask<'_>,
        key: Option<&str>,
        _credentialed: bool,
    ) -> Result<Decided, AppError> {
        let credential = key.map_or(Credential::None, Credential::Key);
        let d = decision(self.0, ask.host, credential, ask.client).await?;
        Ok(Decided {
            target: pipeline::target_of(&d.claims, Some(d.token.clone())),
            set_token: Some(d.token.clone()),
        })
    }
}

/// What an app request presents to be decided on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Credential<'a> {
    /// Nothing: public apps only.
    None,
    /// A devmesh key from a header.
    Key(&'a str),
    /// An app token for this host, to renew.
    Token(&'a str),
}

impl Credential<'_> {
    fn secret(&self) -> &[u8] {
        match self {
            Credential::None => b"",
            Credential::Key(s) | Credential::Token(s) => s.as_bytes(),
        }
    }
}

fn count(edge: &Edge, result: &'static str) {
    edge.metrics
        .decisions
        .get_or_create(&CacheLabels { result })
        .inc();
}

/// The decision for `key` (or anyone) on `host`: cached while its token is
/// valid and unrevoked, refreshed in the background before it expires.
async fn decision(
    edge: &Arc<Edge>,
    host: &str,
    credential: Credential<'_>,
    client: &str,
) -> Result<Arc<Decision>, AppError> {
    let cache_key = (
        host.to_owned(),
        match credential {
            Credential::None => [0u8; 32],
            c => devmesh_shared::secret::sha256(c.secret()),
        },
    );
    let now = chrono::Utc::now().timestamp();
    if let Some(d) = edge.decisions.get(&cache_key).await
        && d.claims.exp > now
        && !edge.revoked(&d.claims)
    {
        count(edge, "hit");
        if d.claims.exp - now < REFRESH_BEFORE_SECS && !d.refreshing.swap(true, Ordering::AcqRel) {
            let (edge, owned, stale) = (edge.clone(), OwnedCredential::from(credential), d.clone());
            tokio::spawn(async move {
                count(&edge, "refresh");
                match edge.ask_primary(&cache_key.0, owned.borrow()).await {
                    Ok(fresh) => edge.decisions.insert(cache_key, Arc::new(fresh)).await,
                    // Unreachable: keep serving until the token expires.
                    Err(AppError::PrimaryUnavailable) => {
                        stale.refreshing.store(false, Ordering::Release);
                    }
                    Err(_) => edge.decisions.invalidate(&cache_key).await,
                }
            });
        }
        return Ok(d);
    }
    // Refusals are remembered briefly, so clients without access (or
    // anonymous crawlers) do not turn every request into a primary call.
    if let Some(refused) = edge.refusals.get(&cache_key).await {
        count(edge, "refused");
        return Err(refused);
    }
    // Made-up hosts and random well-formed keys each miss every cache: a
    // client gets only so many primary calls a minute.
    if let Err(wait) = edge.primary_calls.check(client) {
        count(edge, "rate_limited");
        tracing::debug!(client.ip = %client, ?wait, "too many access checks from one client");
        return Err(AppError::TooManyRequests);
    }
    count(edge, "miss");
    match edge.ask_primary(host, credential).await {
        Ok(fresh) => {
            let fresh = Arc::new(fresh);
            edge.decisions.insert(cache_key, fresh.clone()).await;
            Ok(fresh)
        }
        Err(e) => {
            if matches!(
                e,
                AppError::Unauthenticated | AppError::Forbidden | AppError::NotFound(_)
            ) {
                edge.refusals.insert(cache_key, e.clone()).await;
            }
            Err(e)
        }
    }
}

/// A [`Credential`] that outlives its request, for background refreshes.
enum OwnedCredential {
    None,
    Key(String),
    Token(String),
}

impl From<Credential<'_>> for OwnedCredential {
    fn from(c: Credential<'_>) -> Self {
        match c {
            Credential::None => Self::None,
            Credential::Key(k) => Self::Key(k.to_owned()),
            Credential::Token(t) => Self::Token(t.to_owned()),
        }
    }
}

impl OwnedCredential {
    fn borrow(&self) -> Credential<'_> {
        match self {
            Self::None => Credential::None,
            Self::Key(k) => Credential::Key(k),
            Self::Token(t) => Credential::Token(t),
        }
    }
}
