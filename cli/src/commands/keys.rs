//! `devmesh keys ...`: the caller's API keys.

use devmesh_shared::api::{CreateKeyRequest, CreateKeyResponse, KeyScope, KeysResponse};

use super::Global;
use crate::output::{Format, json, table};

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key; it is shown once.
    Create {
        /// A label to recognise it by.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in days (default 30, at most 365).
        #[arg(long)]
        days: Option<i64>,
        /// Restrict the key to opening workspace apps.
        #[arg(long)]
        application_connect: bool,
    },
    /// List your keys and sessions.
    List,
    /// Revoke a key by id (the part before the `-`).
    Delete {
        /// Key id.
        id: String,
    },
}

pub(crate) async fn run(g: &Global, cmd: KeysCommand) -> anyhow::Result<()> {
    let client = g.client()?;
    match cmd {
        KeysCommand::Create {
            name,
            days,
            application_connect,
        } => {
            let req = CreateKeyRequest {
                name,
                scope: Some(if application_connect {
                    KeyScope::ApplicationConnect
                } else {
                    KeyScope::All
                }),
                lifetime_seconds: days.map(|d| d.saturating_mul(86_400)),
            };
            let resp: CreateKeyResponse = client.post("/users/me/keys", &req).await?;
            if g.output == Format::Json {
                return json(&resp);
            }
            eprintln!(
                "Created key {} (expires {}). It is shown only this once:",
                resp.info.id,
                resp.info.expires_at.format("%Y-%m-%d")
            );
            println!("{}", resp.key);
        }
        KeysCommand::List => {
            let resp: KeysResponse = client.get("/users/me/keys").await?;
            if g.output == Format::Json {
                return json(&resp.keys);
            }
            table(
                &["ID", "NAME", "TYPE", "SCOPE", "EXPIRES", "LAST USED"],
                resp.keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.name.clone(),
                            k.login_type.clone(),
                            k.scope.as_str().to_owned(),
                            k.expires_at.format("%Y-%m-%d %H:%M").to_string(),
                            k.last_used_at.format("%Y-%m-%d %H:%M").to_string(),
                        ]
                    })
                    .collect(),
            );
        }
        KeysCommand::Delete { id } => {
            client.delete(&format!("/users/me/keys/{id}")).await?;
            println!("Revoked key {id}.");
        }
    }
    Ok(())
}
