//! The devmesh Terraform provider, served by the devmesh binary itself over
//! Terraform's plugin protocol 6.
//!
//! Terraform starts the provider as a child process with
//! `TF_PLUGIN_MAGIC_COOKIE` and `PLUGIN_CLIENT_CERT` set; the provider
//! listens on a Unix socket in a directory only its user may enter, prints
//! go-plugin's handshake line (`1|6|unix|<socket>|grpc|<its certificate>`)
//! and answers gRPC calls over TLS on that socket until Terraform calls
//! `plugin.GRPCController/Shutdown`.
//!
//! go-plugin's client certificate is ECDSA P-521, which the TLS stack here
//! cannot verify; the provider does not ask for it. The socket's directory
//! (mode 0700) is what keeps other users out, as it is for any Unix socket
//! a process serves its own children on; Terraform still verifies the
//! provider's certificate, pinned from the handshake line.

mod cty;
mod grpc;
mod resources;
mod wire;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine as _;
use bytes::Bytes;
use prost::Message;
use tokio_util::sync::CancellationToken;

use self::grpc::{Status, code};
use self::resources::{BuildEnv, DATA_SOURCES, Kind, RESOURCES};
use self::wire::*;

/// The cookie Terraform sets so a provider knows it was started by
/// Terraform (go-plugin's handshake config for Terraform providers).
const MAGIC_COOKIE: (&str, &str) = (
    "TF_PLUGIN_MAGIC_COOKIE",
    "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2",
);
/// The plugin protocol devmesh speaks.
const PROTOCOL: &str = "6";

/// The name of the provider executable in a filesystem mirror; the devmesh
/// binary serves the provider when it runs under a name starting with it.
pub const EXECUTABLE_PREFIX: &str = "terraform-provider-devmesh";

/// Serves the provider until Terraform shuts it down.
pub async fn serve() -> anyhow::Result<()> {
    if std::env::var(MAGIC_COOKIE.0).as_deref() != Ok(MAGIC_COOKIE.1) {
        bail!(
            "this is the devmesh Terraform provider: Terraform starts it, it is not run by hand \
             (templates declare source = \"devmesh/devmesh\")"
        );
    }
    let versions = std::env::var("PLUGIN_PROTOCOL_VERSIONS").unwrap_or_default();
    if !versions.split(',').any(|v| v.trim() == PROTOCOL) {
        bail!(
            "this Terraform does not speak plugin protocol {PROTOCOL} (it offers {versions:?}); use Terraform 1.0 or later"
        );
    }
    let (tls, cert_der) = tls_config()?;
    let dir = tempfile::Builder::new()
        .prefix("devmesh-provider-")
        .tempdir()
        .context("cannot create the provider's socket directory")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    let socket = dir.path().join("provider.sock");
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;

    let shutdown = CancellationToken::new();
    let provider = Arc::new(Provider {
        env: BuildEnv::from_env(),
        shutdown: shutdown.clone(),
    });
    let handler: grpc::Handler = Arc::new(move |method: &str, body: Bytes| {
        let provider = provider.clone();
        let method = method.to_owned();
        Box::pin(async move { provider.call(&method, body) })
    });
    let cert = base64::engine::general_purpose::STANDARD_NO_PAD.encode(cert_der);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "1|{PROTOCOL}|unix|{}|grpc|{cert}", socket.display())?;
        out.flush()?;
    }
    grpc::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        handler,
        shutdown,
    )
    .await;
    Ok(())
}

/// A TLS config for `localhost` with a fresh self-signed certificate, and
/// that certificate (DER) for the handshake line.
fn tls_config() -> anyhow::Result<(Arc<rustls::ServerConfig>, Vec<u8>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    // Terraform trusts exactly this certificate, as its own root.
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key)?;
    let der = cert.der().to_vec();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), der))
}

struct Provider {
    env: BuildEnv,
    shutdown: CancellationToken,
}

fn decode<M: Message + Default>(body: Bytes) -> Result<M, Status> {
    M::decode(body).map_err(|e| Status::new(code::INVALID_ARGUMENT, e.to_string()))
}

fn error(summary: impl Into<String>, attribute: Option<&str>) -> Diagnostic {
    Diagnostic {
        severity: ERROR,
        summary: summary.into(),
        detail: String::new(),
        attribute: attribute.map(|a| AttributePath {
            steps: vec![Step {
                selector: Some(Selector::AttributeName(a.to_owned())),
            }],
        }),
    }
}

fn kind(kinds: &[&'static Kind], name: &str) -> Result<&'static Kind, Diagnostic> {
    kinds
        .iter()
        .copied()
        .find(|k| k.name == name)
        .ok_or_else(|| error(format!("the devmesh provider has no {name:?}"), None))
}

fn value(dv: Option<&DynamicValue>) -> Result<rmpv::Value, Status> {
    cty::decode(dv).map_err(|e| Status::new(code::INVALID_ARGUMENT, e.to_string()))
}

impl Provider {
    fn call(&self, method: &str, body: Bytes) -> Result<Vec<u8>, Status> {
        let (service, name) = method
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        Ok(match (service, name) {
            ("tfplugin6.Provider", "GetProviderSchema") => GetProviderSchemaResponse {
                provider: Some(Schema {
                    version: 0,
                    block: Some(Block::default()),
                }),
                resource_schemas: RESOURCES
                    .iter()
                    .map(|k| (k.name.to_owned(), k.schema()))
                    .collect(),
                data_source_schemas: DATA_SOURCES
                    .iter()
                    .map(|k| (k.name.to_owned(), k.schema()))
                    .collect(),
                diagnostics: Vec::new(),
            }
            .encode_to_vec(),
            ("tfplugin6.Provider", "ValidateProviderConfig") => {
                ValidateProviderConfigResponse::default().encode_to_vec()
            }
            ("tfplugin6.Provider", "ConfigureProvider") => Diagnostics::default().encode_to_vec(),
            ("tfplugin6.Provider", "ValidateResourceConfig") => {
                self.validate(RESOURCES, decode(body)?)?.encode_to_vec()
            }
            ("tfplugin6.Provider", "ValidateDataResourceConfig") => {
                self.validate(DATA_SOURCES, decode(body)?)?.encode_to_vec()
            }
            ("tfplugin6.Provider", "UpgradeResourceState") => {
                self.upgrade(decode(body)?)?.encode_to_vec()
            }
            ("tfplugin6.Provider", "ReadResource") => {
                let req: ReadResourceRequest = decode(body)?;
                ReadResourceResponse {
                    new_state: req.current_state,
                    diagnostics: Vec::new(),
                    private: req.private,
                }
                .encode_to_vec()
            }
            ("tfplugin6.Provider", "PlanResourceChange") => {
                self.plan(decode(body)?)?.encode_to_vec()
            }
            ("tfplugin6.Provider", "ApplyResourceChange") => {
                self.apply(decode(body)?)?.encode_to_vec()
            }
            ("tfplugin6.Provider", "ReadDataSource") => {
                self.read_data(decode(body)?)?.encode_to_vec()
            }
            ("tfplugin6.Provider", "StopProvider") => {
                StopProviderResponse::default().encode_to_vec()
            }
            ("plugin.GRPCController", "Shutdown") => {
                self.shutdown.cancel();
                Empty::default().encode_to_vec()
            }
            ("grpc.health.v1.Health", "Check") => HealthCheckResponse { status: 1 }.encode_to_vec(),
            _ => return Err(Status::new(code::UNIMPLEMENTED, method)),
        })
    }

    fn validate(
        &self,
        kinds: &[&'static Kind],
        req: ValidateRequest,
    ) -> Result<Diagnostics, Status> {
        let kind = match kind(kinds, &req.type_name) {
            Ok(k) => k,
            Err(d) => {
                return Ok(Diagnostics {
                    diagnostics: vec![d],
                });
            }
        };
        let config = value(req.config.as_ref())?;
        Ok(Diagnostics {
            diagnostics: resources::validate(kind, &config)
                .into_iter()
                .map(|p| error(p.summary, p.attribute))
                .collect(),
        })
    }

    fn upgrade(
        &self,
        req: UpgradeResourceStateRequest,
    ) -> Result<UpgradeResourceStateResponse, Status> {
        let kind = match kind(RESOURCES, &req.type_name) {
            Ok(k) => k,
            Err(d) => {
                return Ok(UpgradeResourceStateResponse {
                    upgraded_state: None,
                    diagnostics: vec![d],
                });
            }
        };
        let json = req.raw_state.map(|r| r.json).unwrap_or_default();
        let stored: serde_json::Value = serde_json::from_slice(&json)
            .map_err(|e| Status::new(code::INVALID_ARGUMENT, format!("stored state: {e}")))?;
        let names: Vec<&str> = kind.attrs.iter().map(|a| a.name).collect();
        let state = cty::shaped(&cty::from_json(&stored), &names);
        Ok(UpgradeResourceStateResponse {
            upgraded_state: Some(cty::encode(&state)),
            diagnostics: Vec::new(),
        })
    }

    fn plan(&self, req: PlanResourceChangeRequest) -> Result<PlanResourceChangeResponse, Status> {
        let kind = match kind(RESOURCES, &req.type_name) {
            Ok(k) => k,
            Err(d) => {
                return Ok(PlanResourceChangeResponse {
                    diagnostics: vec![d],
                    ..Default::default()
                });
            }
        };
        let prior = value(req.prior_state.as_ref())?;
        let proposed = value(req.proposed_new_state.as_ref())?;
        let prior_build = String::from_utf8_lossy(&req.prior_private);
        let (planned, replace) =
            resources::plan(kind, &prior, &proposed, &self.env.build_id, &prior_build);
        Ok(PlanResourceChangeResponse {
            planned_state: Some(cty::encode(&planned)),
            requires_replace: replace
                .into_iter()
                .map(|a| AttributePath {
                    steps: vec![Step {
                        selector: Some(Selector::AttributeName(a.to_owned())),
                    }],
                })
                .collect(),
            // Which build made the current token (see resources::plan).
            planned_private: if self.env.build_id.is_empty() {
                req.prior_private
            } else {
                self.env.build_id.clone().into_bytes()
            },
            diagnostics: Vec::new(),
        })
    }

    fn apply(
        &self,
        req: ApplyResourceChangeRequest,
    ) -> Result<ApplyResourceChangeResponse, Status> {
        let kind = match kind(RESOURCES, &req.type_name) {
            Ok(k) => k,
            Err(d) => {
                return Ok(ApplyResourceChangeResponse {
                    diagnostics: vec![d],
                    ..Default::default()
                });
            }
        };
        let planned = value(req.planned_state.as_ref())?;
        Ok(ApplyResourceChangeResponse {
            new_state: Some(cty::encode(&resources::apply(kind, &planned, &self.env))),
            private: req.planned_private,
            diagnostics: Vec::new(),
        })
    }

    fn read_data(&self, req: ReadDataSourceRequest) -> Result<ReadDataSourceResponse, Status> {
        let kind = match kind(DATA_SOURCES, &req.type_name) {
            Ok(k) => k,
            Err(d) => {
                return Ok(ReadDataSourceResponse {
                    state: None,
                    diagnostics: vec![d],
                });
            }
        };
        let config = value(req.config.as_ref())?;
        Ok(ReadDataSourceResponse {
            state: Some(cty::encode(&resources::read(kind, &config, &self.env))),
            diagnostics: Vec::new(),
        })
    }
}
