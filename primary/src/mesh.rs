//! The mesh CA that every relay certificate chains to, and the names and
//! lifetimes of mesh certificates. The CA is created on first start and
//! kept in PostgreSQL, its key encrypted under the secrets key
//! ([`crate::vault`]), so every primary replica and every restart uses the
//! same one.

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sqlx::PgPool;

use crate::vault::Vault;

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
