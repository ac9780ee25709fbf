//! The primary's keys: the mesh CA that every relay certificate chains to,
//! the Ed25519 signing keys for attach tickets and app tokens, and the
//! symmetric key that seals one-time app keys in redirects. All are created
//! on first start and kept in PostgreSQL, encrypted under the secrets key
//! ([`crate::vault`]), so every primary replica and every restart uses the
//! same ones.

use std::sync::Arc;

use anyhow::Context;
use devmesh_shared::secret::random_alphanumeric;
use devmesh_shared::signing::{PublicKey, SigningKey, Verifier};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sqlx::PgPool;

use crate::vault::{Stored, Vault};

/// The distinguished name of the mesh CA. Leaf certificates are signed by a
/// CA certificate rebuilt from these parameters and the stored key; the
/// stored certificate (same subject, same key) is what relays and agents trust.
const CA_COMMON_NAME: &str = "devmesh mesh CA";

/// The TLS server name of the primary's relay.
pub const PRIMARY_RELAY_NAME: &str = "primary.relay.devmesh.internal";

/// The mesh certificate authority.
pub struct MeshCa {
    cert_pem: String,
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshCa")
    }
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "devmesh");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(params)
}

impl MeshCa {
    /// Loads the CA, creating it if this is the deployment's first start.
    pub async fn load_or_create(db: &PgPool, vault: &Vault) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        // Concurrent first starts: one insert wins, everyone reads the winner.
        sqlx::query(
            "INSERT INTO mesh_ca (cert_pem, key_pem) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(cert.pem())
        .bind(vault.wrap_text("mesh_ca", &key.serialize_pem()))
        .execute(db)
        .await?;
        let (cert_pem, stored): (String, String) =
            sqlx::query_as("SELECT cert_pem, key_pem FROM mesh_ca")
                .fetch_one(db)
                .await?;
        let (key_pem, plain) = vault.unwrap_text("mesh_ca", &stored)?;
        if plain {
            sqlx::query("UPDATE mesh_ca SET key_pem = $1 WHERE key_pem = $2")
                .bind(vault.wrap_text("mesh_ca", &key_pem))
                .bind(&stored)
                .execute(db)
                .await?;
            tracing::info!("encrypted the mesh CA key stored in plain text by an older version");
        }
        let key = KeyPair::from_pem(&key_pem).context("stored mesh CA key")?;
        let issuer = ca_params()?.self_signed(&key)?;
        Ok(Self {
            cert_pem,
            issuer,
            key,
        })
    }

    /// The CA certificate relays and agents trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a server (and client) certificate for `names`, with a fresh key.
    pub fn issue(
        &self,
        names: &[&str],
    ) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("relay"),
        );
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time_now();
        params.not_before = now;
        params.not_after = now + std::time::Duration::from_secs(365 * 86_400);
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key))
    }
}

impl MeshCa {
    /// Signs an edge replica's CSR. Only the key comes from the request: the
    /// certificate names the edge's relay (`<edge>.relay.devmesh.internal`)
    /// whatever the CSR asked for.
    pub fn sign_csr(&self, csr_pem: &str, edge_name: &str) -> anyhow::Result<String> {
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).context("not a PEM CSR")?;
        let name = relay_name(edge_name);
        csr.params.subject_alt_names = vec![rcgen::SanType::DnsName(name.clone().try_into()?)];
        csr.params.distinguished_name = rcgen::DistinguishedName::new();
        csr.params.distinguished_name.push(DnType::CommonName, name);
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time_now();
        csr.params.not_before = now - std::time::Duration::from_secs(CERT_BACKDATE_SECS as u64);
        csr.params.not_after = now + MESH_CERT_LIFETIME;
        Ok(csr.signed_by(&self.issuer, &self.key)?.pem())
    }
}

/// How long an edge's mesh certificate lasts. Edges take a fresh one every
/// 10 minutes (each registration brings one), so a certificate that leaks
/// or outlives its edge is useless within the hour, and relays refuse it
/// within seconds once the edge is deleted or its token regenerated.
pub const MESH_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);

/// How far back a mesh certificate's validity starts, for clock skew.
pub const CERT_BACKDATE_SECS: i64 = 300;

/// The TLS name of a region's relay on its mesh certificate.
pub fn relay_name(region: &str) -> String {
    devmesh_shared::names::relay_server_name(region)
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

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
