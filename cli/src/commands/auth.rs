//! `devmesh login`, `logout`, `whoami`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, bail};
use devmesh_shared::api::{
    BuildInfo, CreateFirstUserRequest, FirstUserStatus, LoginRequest, LoginResponse, Role, User,
};

use super::Global;
use crate::client::Client;
use crate::session::{self, Session};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LoginArgs {
    /// The deployment's URL, e.g. http://127.0.0.1:3000.
    url: Option<String>,
    /// Email or username to sign in with (on a new deployment: the first user's email).
    #[arg(long, env = "DEVMESH_EMAIL")]
    email: Option<String>,
    /// Username of the first user (new deployments only).
    #[arg(long, env = "DEVMESH_USERNAME")]
    username: Option<String>,
    /// Password; prompted for when omitted.
    #[arg(long, env = "DEVMESH_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

fn prompt(label: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("{label} is required: pass it as a flag when not running interactively");
    }
    eprint!("{label}: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

fn prompt_password(label: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "a password is required: pass --password or set DEVMESH_PASSWORD when not running interactively"
        );
    }
    Ok(rpassword::prompt_password(format!("{label}: "))?)
}

pub(crate) async fn login(g: &Global, args: LoginArgs) -> anyhow::Result<()> {
    let url = match args.url.or_else(|| g.url.clone()) {
        Some(u) => u,
        None => session::load()?
            .map(|s| s.url)
            .context("give the deployment URL: devmesh login <url>")?,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{url:?} is not a URL: it must start with http:// or https://");
    }
    let anon = Client::new(&url, None, g.ca_cert.as_deref())?;
    let info: BuildInfo = anon
        .get("/buildinfo")
        .await
        .with_context(|| format!("{url} is not a devmesh deployment"))?;

    // An existing token (`--token` or DEVMESH_SESSION_TOKEN) is checked and stored as is.
    if let Some(token) = &g.token {
        let me: User = Client::new(&url, Some(token.clone()), g.ca_cert.as_deref())?
            .get("/users/me")
            .await?;
        session::save(&Session {
            url: anon.base().to_owned(),
            token: token.clone(),
        })?;
        println!("Signed in to {} as {}.", anon.base(), me.username);
        return Ok(());
    }

    let first: FirstUserStatus = anon.get("/users/first").await?;
    let (email, password) = if !first.has_first_user {
        eprintln!(
            "{url} (devmesh {}) has no users yet: creating the first one, who will be an owner.",
            info.version
        );
        let username = match args.username {
            Some(u) => u,
            None => prompt("Username")?,
        };
        let email = match args.email {
            Some(e) => e,
            None => prompt("Email")?,
        };
        let password = match args.password {
            Some(p) => p,
            None => {
                let p = prompt_password("Password")?;
                if prompt_password("Confirm password")? != p {
                    bail!("the passwords do not match");
                }
                p
            }
        };
        let user: User = anon
            .post(
                "/users/first",
                &CreateFirstUserRequest {
                    email: email.clone(),
                    username,
                    password: password.clone(),
                },
            )
            .await?;
        eprintln!(
            "Created the first user {} ({}).",
            user.username,
            if user.roles.contains(&Role::Owner) {
                "owner"
            } else {
                "member"
            }
        );
        (email, password)
    } else {
        let email = match args.email {
            Some(e) => e,
            None => prompt("Email or username")?,
        };
        let password = match args.password {
            Some(p) => p,
            None => prompt_password("Password")?,
        };
        (email, password)
    };
    let resp: LoginResponse = anon
        .post("/users/login", &LoginRequest { email, password })
        .await?;
    let client = Client::new(&url, Some(resp.session_token.clone()), g.ca_cert.as_deref())?;
    let me: User = client.get("/users/me").await?;
    session::save(&Session {
        url: client.base().to_owned(),
        token: resp.session_token,
    })?;
    println!("Signed in to {} as {}.", client.base(), me.username);
    Ok(())
}

pub(crate) async fn logout(g: &Global) -> anyhow::Result<()> {
    if let Ok(client) = g.client() {
        // The session is forgotten locally even if the server cannot be told.
        if let Err(e) = client.post_empty("/users/logout").await {
            eprintln!("warning: the server did not confirm the sign-out: {e:#}");
        }
    }
    session::clear()?;
    println!("Signed out.");
    Ok(())
}

pub(crate) async fn whoami(g: &Global) -> anyhow::Result<()> {
    let client = g.client()?;
    let me: User = client.get("/users/me").await?;
    if g.output == crate::output::Format::Json {
        return crate::output::json(&me);
    }
    let roles: Vec<&str> = me.roles.iter().map(|r| r.as_str()).collect();
    println!(
        "{} <{}> on {} (roles: {})",
        me.username,
        me.email,
        client.base(),
        roles.join(", ")
    );
    Ok(())
}
