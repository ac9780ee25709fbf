//! Token formats.
//!
//! * API and session keys: `<id>-<secret>`, a 10-character id (the database
//!   key) and a 22-character secret, both `[A-Za-z0-9]`. Only
//!   `sha256(secret)` is stored.
//! * Edge tokens: `<edge-uuid>:<secret>`, secret 32 characters.

use uuid::Uuid;

use crate::secret::{Secret, random_alphanumeric, sha256};

/// Length of an API key's id.
pub const KEY_ID_LEN: usize = 10;
/// Length of an API key's secret.
pub const KEY_SECRET_LEN: usize = 22;
/// Length of an edge token's secret.
pub const EDGE_SECRET_LEN: usize = 32;

/// A freshly generated API key: what the user sees once, and what is stored.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// The public id (primary key in `api_keys`).
    pub id: String,
    /// The whole `id-secret` string handed to the user.
    pub token: Secret,
    /// `sha256(secret)`, the only form stored.
    pub hashed_secret: [u8; 32],
}

/// A random `<10-char id>-<22-char secret>` key (alphanumeric, from an
/// Length of an agent token.
const AGENT_TOKEN_LEN: usize = 32;

/// A new agent token: random, alphanumeric. The primary stores only its
/// hash; the agent presents it in `Devmesh-Agent-Token`.
pub fn new_agent_token() -> String {
    random_alphanumeric(AGENT_TOKEN_LEN)
}

/// Whether `s` has the shape of an agent token (not whether it is valid).
pub fn looks_like_agent_token(s: &str) -> bool {
    s.len() == AGENT_TOKEN_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// OS-seeded CSPRNG), with the hash to store; the token is shown once.
pub fn new_api_key() -> NewApiKey {
    let id = random_alphanumeric(KEY_ID_LEN);
    let secret = random_alphanumeric(KEY_SECRET_LEN);
    NewApiKey {
        hashed_secret: sha256(secret.as_bytes()),
        token: Secret::new(format!("{id}-{secret}")),
        id,
    }
}

/// Splits an `id-secret` key. Returns `None` unless both parts have the
/// exact length and alphabet, so garbage never reaches the database.
pub fn parse_api_key(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('-')?;
    let ok = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (ok(id, KEY_ID_LEN) && ok(secret, KEY_SECRET_LEN)).then_some((id, secret))
}

/// A freshly generated `<id>:<secret>` token (an edge's token, a
/// provisioner key) with its stored hash.
#[derive(Debug, Clone)]
pub struct NewIdToken {
    /// The whole `<id>:<secret>` token handed to the operator.
    pub token: Secret,
    /// `sha256(secret)`.
    pub hashed_secret: [u8; 32],
}

/// Generates a new secret for the edge or provisioner key `id`.
pub fn new_id_token(id: Uuid) -> NewIdToken {
    let secret = random_alphanumeric(EDGE_SECRET_LEN);
    NewIdToken {
        hashed_secret: sha256(secret.as_bytes()),
        token: Secret::new(format!("{id}:{secret}")),
    }
}

/// Splits an `<id>:<secret>` token into its id and secret.
pub fn parse_id_token(token: &str) -> Option<(Uuid, &str)> {
    let (id, secret) = token.split_once(':')?;
    let id = Uuid::parse_str(id).ok()?;
    (secret.len() == EDGE_SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_round_trip() {
        let k = new_api_key();
        let (id, secret) = parse_api_key(k.token.expose()).unwrap();
        assert_eq!(id, k.id);
        assert_eq!(sha256(secret.as_bytes()), k.hashed_secret);
    }

    #[test]
    fn malformed_api_keys_are_refused() {
        for bad in [
            "",
            "-",
            "abc-def",
            "aaaaaaaaaa-",
            "aaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbb!",
            "aaaaaaaaaabbbbbbbbbbbbbbbbbbbbbbb",
        ] {
            assert_eq!(parse_api_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn id_tokens_round_trip() {
        let id = Uuid::new_v4();
        let t = new_id_token(id);
        let (pid, secret) = parse_id_token(t.token.expose()).unwrap();
        assert_eq!(pid, id);
        assert_eq!(sha256(secret.as_bytes()), t.hashed_secret);
        assert_eq!(parse_id_token("nope:x"), None);
    }
}
