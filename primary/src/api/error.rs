//! The one error type of the API. Every failure becomes JSON
//! `{message, detail, validations}` with the right status; database outages
//! are 503s, and nothing a user sends can produce a bare 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use devmesh_shared::api;

/// Marks a response that failed because the database was unavailable, for
/// the metrics middleware.
#[derive(Debug, Clone, Copy)]
pub struct DbUnavailable;

/// A failed API request: a status, the JSON body every error shares
/// (`{message, detail, validations}`) and, for 429 and 503, `Retry-After`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: api::Error,
    retry_after: Option<u64>,
    db_unavailable: bool,
}

/// What every handler returns: `?` on a `sqlx::Error` gives the right
/// status (503 when the database is down).
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: api::Error {
                message: message.into(),
                detail: String::new(),
                validations: Vec::new(),
                denial: None,
            },
            retry_after: None,
            db_unavailable: false,
        }
    }

    /// 400: the request cannot be served as sent; `message` says why.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 401: no credentials, or ones that are invalid, expired or suspended.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    /// 403: valid credentials without the right (role, scope, owner).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    /// 404: no such resource, or one the caller may not know exists.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    /// 409: the request clashes with the current state (a name taken, a
    /// template still in use).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    /// 429 with `Retry-After`.
    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts; try again later.",
        );
        e.body.detail = format!("retry after {retry_after_secs} seconds");
        e.retry_after = Some(retry_after_secs);
        e
    }
    /// 500 for a failure that is ours, not the user's; logged.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "An internal error occurred.",
        )
    }

    /// Sets `detail`: the specifics behind `message` (which value, which
    /// limit), for the client to show or log.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.body.detail = detail.into();
        self
    }

    /// A 400 for invalid fields.
    pub fn validation(validations: Vec<api::Validation>) -> Self {
        let mut e = Self::bad_request("Validation failed.");
        e.body.detail = validations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.detail))
            .collect::<Vec<_>>()
            .join("; ");
        e.body.validations = validations;
        e
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message for a person.
    pub fn message(&self) -> String {
        self.body.message.clone()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            let mut err = Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database is unavailable; try again shortly.",
            );
            err.db_unavailable = true;
            err.retry_after = Some(5);
            // Edges show their users why (never "workspace stopped").
            err.body.denial = Some("unavailable".into());
            return err;
        }
        // Text PostgreSQL cannot store (a NUL byte, say) is the caller's
        // mistake, not ours: say so, without the database's words.
        if let Some(db) = e.as_database_error()
            && matches!(db.code().as_deref(), Some("22021" | "22P05" | "54000"))
        {
            tracing::info!(error = %e, "refused a request the database cannot store");
            return Self::bad_request("The request contains characters that cannot be stored.")
                .detail("text fields may not contain NUL bytes or invalid UTF-8");
        }
        Self::internal(format!("database: {e}"))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.db_unavailable {
            resp.extensions_mut().insert(DbUnavailable);
        }
        resp
    }
}

/// Collects field problems while validating a request.
#[derive(Debug, Default)]
pub struct Validator(Vec<api::Validation>);

impl Validator {
    /// Records a problem with `field`.
    pub fn add(&mut self, field: impl Into<String>, detail: impl std::fmt::Display) {
        self.0.push(api::Validation {
            field: field.into(),
            detail: detail.to_string(),
        });
    }

    /// Records `result`'s error, if any, against `field`.
    pub fn check<E: std::fmt::Display>(&mut self, field: impl Into<String>, result: Result<(), E>) {
        if let Err(e) = result {
            self.add(field, e);
        }
    }

    /// `Err` with every problem recorded, or `Ok`.
    pub fn finish(self) -> ApiResult<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.0))
        }
    }
}
