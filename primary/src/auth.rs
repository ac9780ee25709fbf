//! Passwords and API keys.
//!
//! Passwords are hashed with argon2id on the blocking pool, never on the
//! async runtime. API keys are `id-secret`; only `sha256(secret)` is stored,
//! compared in constant time. Validated keys are cached (moka) for a short
//! while; revoking a key, or suspending or deleting a user, invalidates the
//! cache at once on this replica.

use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use devmesh_shared::api::{KeyScope, Role, UserStatus};
use devmesh_shared::secret::{constant_time_eq, sha256};
use devmesh_shared::token::parse_api_key;
use moka::future::Cache;
use sqlx::PgPool;
use uuid::Uuid;

use crate::metrics::Metrics;

/// How long a validated key is trusted without asking the database.
const CACHE_TTL: Duration = Duration::from_secs(30);

/// Password hashes computing at once: argon2 takes tens of milliseconds
/// of a core and 19 MiB each, so a burst of logins queues here instead of
/// filling the blocking pool and memory.
fn hashing() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores.max(2))
    })
}

/// Hashes a password with argon2id (PHC string).
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    let _permit = hashing().acquire().await?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
    })
    .await?
}

/// Checks a password against a stored hash. With no hash (unknown user) it
/// still does the work of a check, so timing does not reveal which users exist.
pub async fn verify_password(password: String, hash: Option<String>) -> bool {
    let Ok(_permit) = hashing().acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let dummy = DUMMY.get_or_init(|| {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(b"not a real password", &salt)
                .map(|h| h.to_string())
                .unwrap_or_default()
        });
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| dummy.clone());
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return false;
        };
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
            && known
    })
    .await
    .unwrap_or(false)
}

/// The identity behind a valid key.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's public id (the 10 characters before `-`): what app
    /// tokens name and what deleting the key revokes.
    pub key_id: String,
    /// What the key may do.
    pub scope: KeyScope,
    /// The user's id.
    pub user_id: Uuid,
    /// Their username.
    pub username: String,
    /// Their roles, as of when the key was validated (cached up to 30 s;
    /// forgotten at once when the user is suspended or deleted).
    pub roles: Vec<Role>,
}

impl Principal {
    /// Whether the user is an owner.
    pub fn is_owner(&self) -> bool {
        self.roles.contains(&Role::Owner)
    }
}

/// Why a key was refused. Every variant becomes a 401 whose message names
/// the reason; none reveals whether the key id exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `id-secret` or no such key or wrong secret.
    #[error("the API key is invalid")]
    Invalid,
    /// Past its expiry.
    #[error("the API key has expired")]
    Expired,
    /// Its user is suspended.
    #[error("the account is suspended")]
    Suspended,
}

#[derive(Debug, Clone)]
struct CachedKey {
    hashed_secret: Vec<u8>,
    expires_at: DateTime<Utc>,
    status: UserStatus,
    principal: Principal,
}

impl CachedKey {
    /// The key's principal, unless it expired or its user is suspended.
    fn usable(&self) -> Result<Principal, KeyError> {
        if self.expires_at <= Utc::now() {
            return Err(KeyError::Expired);
        }
        if self.status == UserStatus::Suspended {
            return Err(KeyError::Suspended);
        }
        Ok(self.principal.clone())
    }
}

/// Validates keys, caching the database rows behind them.
#[derive(Clone)]
pub struct KeyValidator {
    db: PgPool,
    cache: Cache<String, Arc<CachedKey>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for KeyValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyValidator")
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    hashed_secret: Vec<u8>,
    scope: String,
    expires_at: DateTime<Utc>,
    user_id: Uuid,
    username: String,
    roles: Vec<String>,
    status: String,
}

impl KeyValidator {
    /// A validator over `db`.
    pub fn new(db: PgPool, metrics: Arc<Metrics>) -> Self {
        let cache = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(CACHE_TTL)
            .build();
        Self { db, cache, metrics }
    }

    /// Validates `token`. Database failures are returned as `Err(..)`.
    pub async fn validate(&self, token: &str) -> Result<Result<Principal, KeyError>, sqlx::Error> {
        let Some((id, secret)) = parse_api_key(token) else {
            Metrics::count(&self.metrics.key_checks, "invalid");
            return Ok(Err(KeyError::Invalid));
        };
        let Some(cached) = self.lookup(id).await? else {
            // Hash anyway so a missing id costs the same as a wrong secret.
            let _ = constant_time_eq(&sha256(secret.as_bytes()), &[0u8; 32]);
            return Ok(Err(KeyError::Invalid));
        };
        if !constant_time_eq(&sha256(secret.as_bytes()), &cached.hashed_secret) {
            return Ok(Err(KeyError::Invalid));
        }
        Ok(cached.usable())
    }

    /// Whether the key `id` is still valid, without its secret: for
    /// credentials the primary minted itself from that key (a sealed app
    /// grant, an app token being renewed), which die with the key.
    pub async fn validate_id(&self, id: &str) -> Result<Result<Principal, KeyError>, sqlx::Error> {
        Ok(match self.lookup(id).await? {
            Some(cached) => cached.usable(),
            None => Err(KeyError::Invalid),
        })
    }

    /// The key `id`, from the cache or the database.
    async fn lookup(&self, id: &str) -> Result<Option<Arc<CachedKey>>, sqlx::Error> {
        if let Some(c) = self.cache.get(id).await {
            Metrics::count(&self.metrics.key_checks, "cache_hit");
            return Ok(Some(c));
        }
        Metrics::count(&self.metrics.key_checks, "cache_miss");
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT k.hashed_secret, k.scope, k.expires_at, u.id AS user_id, u.username, u.roles, u.status
             FROM api_keys k JOIN users u ON u.id = k.user_id
             WHERE k.id = $1 AND NOT u.deleted",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let c = Arc::new(CachedKey {
            hashed_secret: row.hashed_secret,
            expires_at: row.expires_at,
            status: if row.status == "suspended" {
                UserStatus::Suspended
            } else {
                UserStatus::Active
            },
            principal: Principal {
                key_id: id.to_owned(),
                scope: if row.scope == "application_connect" {
                    KeyScope::ApplicationConnect
                } else {
                    KeyScope::All
                },
                user_id: row.user_id,
                username: row.username,
                roles: parse_roles(&row.roles),
            },
        });
        self.cache.insert(id.to_owned(), c.clone()).await;
        // Keys are re-read at most once per cache lifetime, which bounds
        // how often last_used_at is written; the request does not wait.
        let db = self.db.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let _ = sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
                .bind(id)
                .execute(&db)
                .await;
        });
        Ok(Some(c))
    }

    /// Forgets one key (it was revoked).
    pub async fn forget_key(&self, id: &str) {
        self.cache.invalidate(id).await;
    }

    /// Forgets every key (a user was suspended, deleted or changed role).
    pub fn forget_all(&self) {
        self.cache.invalidate_all();
    }
}

/// Creates a key for `user` and stores only its hash; the returned value
/// holds the `id-secret` token to hand out once.
pub async fn issue_key(
    db: &PgPool,
    user: Uuid,
    name: &str,
    login_type: &str,
    scope: KeyScope,
    expires_at: DateTime<Utc>,
) -> Result<devmesh_shared::token::NewApiKey, sqlx::Error> {
    let key = devmesh_shared::token::new_api_key();
    sqlx::query(
        "INSERT INTO api_keys (id, hashed_secret, user_id, name, login_type, scope, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key.id)
    .bind(key.hashed_secret.as_slice())
    .bind(user)
    .bind(name)
    .bind(login_type)
    .bind(scope.as_str())
    .bind(expires_at)
    .execute(db)
    .await?;
    Ok(key)
}

/// Roles as stored (`text[]`), always including `member`.
pub fn parse_roles(stored: &[String]) -> Vec<Role> {
    let mut roles = vec![Role::Member];
    if stored.iter().any(|r| r == "owner") {
        roles.insert(0, Role::Owner);
    }
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_verify_only_against_their_hash() {
        let h = hash_password("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), Some(h.clone())).await);
        assert!(!verify_password("wrong horse".into(), Some(h)).await);
        assert!(!verify_password("correct horse".into(), None).await);
    }

    #[test]
    fn roles_always_include_member() {
        assert_eq!(parse_roles(&[]), vec![Role::Member]);
        assert_eq!(
            parse_roles(&["owner".into()]),
            vec![Role::Owner, Role::Member]
        );
    }
}
