//! `devmesh users ...` (owners).

use devmesh_shared::api::{CreateUserRequest, Role, User, UsersResponse};

use super::Global;
use crate::output::{Format, json, table};

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum UsersCommand {
    /// List users.
    List,
    /// Create a user.
    Create {
        /// Username (lowercase letters, digits, single hyphens).
        #[arg(long)]
        username: String,
        /// Email address.
        #[arg(long)]
        email: String,
        /// Initial password.
        #[arg(long, env = "DEVMESH_NEW_USER_PASSWORD", hide_env_values = true)]
        password: String,
        /// Make the user an owner.
        #[arg(long)]
        owner: bool,
    },
    /// Suspend a user: every key they hold stops working at once.
    Suspend {
        /// Username or id.
        user: String,
    },
    /// Re-activate a suspended user.
    Activate {
        /// Username or id.
        user: String,
    },
    /// Delete a user (they must own no workspaces).
    Delete {
        /// Username or id.
        user: String,
    },
}

fn status(u: &User) -> String {
    serde_json::to_value(u.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(crate) async fn run(g: &Global, cmd: UsersCommand) -> anyhow::Result<()> {
    let client = g.client()?;
    match cmd {
        UsersCommand::List => {
            let resp: UsersResponse = client.get("/users").await?;
            if g.output == Format::Json {
                return json(&resp.users);
            }
            table(
                &["USERNAME", "EMAIL", "ROLES", "STATUS", "CREATED"],
                resp.users
                    .iter()
                    .map(|u| {
                        let roles: Vec<&str> = u.roles.iter().map(|r| r.as_str()).collect();
                        vec![
                            u.username.clone(),
                            u.email.clone(),
                            roles.join(","),
                            status(u),
                            u.created_at.format("%Y-%m-%d").to_string(),
                        ]
                    })
                    .collect(),
            );
        }
        UsersCommand::Create {
            username,
            email,
            password,
            owner,
        } => {
            let roles = if owner { vec![Role::Owner] } else { vec![] };
            let u: User = client
                .post(
                    "/users",
                    &CreateUserRequest {
                        email,
                        username,
                        password,
                        roles,
                    },
                )
                .await?;
            println!("Created user {} ({}).", u.username, u.id);
        }
        UsersCommand::Suspend { user } => {
            let u: User = client.put(&format!("/users/{user}/status/suspend")).await?;
            println!("Suspended {}.", u.username);
        }
        UsersCommand::Activate { user } => {
            let u: User = client
                .put(&format!("/users/{user}/status/activate"))
                .await?;
            println!("Activated {}.", u.username);
        }
        UsersCommand::Delete { user } => {
            client.delete(&format!("/users/{user}")).await?;
            println!("Deleted {user}.");
        }
    }
    Ok(())
}
