//! The primary's signing and sealing keys: the Ed25519 keys that sign
//! attach tickets, app tokens and stream grants, and the symmetric key that
//! seals one-time sign-in grants in redirects. Created on first start and
//! kept in PostgreSQL encrypted under the secrets key ([`crate::vault`]).

use std::sync::Arc;

use anyhow::Context;
use devmesh_shared::secret::random_alphanumeric;
use devmesh_shared::signing::{PublicKey, SigningKey, Verifier};
use sqlx::PgPool;

use crate::vault::{Stored, Vault};

/// Ed25519 keys for tickets and app tokens: the newest signs, all verify.
#[derive(Debug, Clone)]
pub struct Signer {
    active: Arc<SigningKey>,
    verifier: Arc<Verifier>,
    public: Vec<PublicKey>,
}

impl Signer {
    /// Loads the signing keys, creating the first on a new deployment.
    pub async fn load_or_create(db: &PgPool, vault: &Vault) -> anyhow::Result<Self> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT kid, pkcs8 FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC",
        )
        .fetch_all(db)
        .await?;
        if rows.is_empty() {
            let key = SigningKey::generate(random_alphanumeric(12));
            sqlx::query("INSERT INTO signing_keys (kid, pkcs8) VALUES ($1, $2)")
                .bind(key.kid())
                .bind(vault.wrap(&format!("signing_key:{}", key.kid()), key.pkcs8()))
                .execute(db)
                .await?;
            return Box::pin(Self::load_or_create(db, vault)).await;
        }
        let mut keys = Vec::with_capacity(rows.len());
        for (kid, stored) in &rows {
            let purpose = format!("signing_key:{kid}");
            // A PKCS#8 document is a DER sequence: it starts with 0x30.
            let pkcs8 = vault.unwrap(&purpose, stored, |b| b.first() == Some(&0x30))?;
            if let Stored::Plain(p) = &pkcs8 {
                sqlx::query("UPDATE signing_keys SET pkcs8 = $2 WHERE kid = $1")
                    .bind(kid)
                    .bind(vault.wrap(&purpose, p))
                    .execute(db)
                    .await?;
                tracing::info!(kid = %kid, "encrypted a signing key stored in plain text by an older version");
            }
            keys.push(
                SigningKey::from_pkcs8(kid.clone(), pkcs8.plain())
                    .map_err(|e| anyhow::anyhow!("signing key {kid}: {e}"))?,
            );
        }
        let public: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
        let verifier = Verifier::new(&public).map_err(|e| anyhow::anyhow!("signing keys: {e}"))?;
        let active = keys.into_iter().next().context("no signing key")?;
        Ok(Self {
            active: Arc::new(active),
            verifier: Arc::new(verifier),
            public,
        })
    }

    /// Signs claims with the active key.
    pub fn sign<C: devmesh_shared::signing::Claims>(&self, claims: &C) -> String {
        self.active.sign(claims)
    }

    /// Verifies a token against every current key.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The public keys relays verify with.
    pub fn public_keys(&self) -> &[PublicKey] {
        &self.public
    }
}

/// Seals short-lived secrets (AES-256-GCM) so they can travel through a
/// browser redirect without being readable or forgeable on the way.
#[derive(Clone)]
pub struct Sealer {
    kid: String,
    key: Arc<ring::aead::LessSafeKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    /// Loads the key, creating it on a new deployment.
    pub async fn load_or_create(db: &PgPool, vault: &Vault) -> anyhow::Result<Self> {
        let mut fresh = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let fresh_kid = random_alphanumeric(12);
        sqlx::query(
            "INSERT INTO app_encryption_keys (kid, key) SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM app_encryption_keys)",
        )
        .bind(&fresh_kid)
        .bind(vault.wrap(&format!("sealing_key:{fresh_kid}"), &fresh))
        .execute(db)
        .await?;
        let (kid, stored): (String, Vec<u8>) =
            sqlx::query_as("SELECT kid, key FROM app_encryption_keys ORDER BY created_at LIMIT 1")
                .fetch_one(db)
                .await?;
        let purpose = format!("sealing_key:{kid}");
        // A plain key is exactly 32 bytes; a wrapped one is longer.
        let key = vault.unwrap(&purpose, &stored, |b| b.len() == 32)?;
        if let Stored::Plain(p) = &key {
            sqlx::query("UPDATE app_encryption_keys SET key = $2 WHERE kid = $1")
                .bind(&kid)
                .bind(vault.wrap(&purpose, p))
                .execute(db)
                .await?;
            tracing::info!("encrypted the sealing key stored in plain text by an older version");
        }
        let key = key.plain().to_vec();
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key)
            .map_err(|_| anyhow::anyhow!("stored app encryption key is invalid"))?;
        Ok(Self {
            kid,
            key: Arc::new(ring::aead::LessSafeKey::new(unbound)),
        })
    }

    /// Encrypts `plain`: `base64url(kid) . base64url(nonce ‖ ciphertext)`.
    pub fn seal(&self, plain: &[u8]) -> String {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let mut nonce = [0u8; 12];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
        let mut buf = plain.to_vec();
        let _ = self.key.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(self.kid.as_bytes()),
            &mut buf,
        );
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{}.{}", B64.encode(&self.kid), B64.encode(out))
    }

    /// Decrypts what [`Sealer::seal`] produced; `None` if tampered or foreign.
    pub fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        if sealed.len() > 4096 {
            return None;
        }
        let (kid, body) = sealed.split_once('.')?;
        if B64.decode(kid).ok()? != self.kid.as_bytes() {
            return None;
        }
        let mut body = B64.decode(body).ok()?;
        if body.len() < 12 + 16 {
            return None;
        }
        let mut ciphertext = body.split_off(12);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&body).ok()?;
        let plain = self
            .key
            .open_in_place(
                nonce,
                ring::aead::Aad::from(self.kid.as_bytes()),
                &mut ciphertext,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}
