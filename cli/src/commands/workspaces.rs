//! `devmesh templates create`, `create`, `list`, `start`, `stop`, `delete`,
//! `logs`: the bring-your-own workspace workflow.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use devmesh_shared::api::{
    AgentLogsResponse, AgentStatus, CreateBuildRequest, CreateTemplateRequest, ExternalDefinition,
    LifecycleState, Template, TemplateKind, TemplatesResponse, Transition, Workspace,
    WorkspaceBuildResponse, WorkspacesResponse,
};

use super::Global;
use crate::output::{Format, json, printable, table};

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum TemplatesCommand {
    /// Create a template from a JSON (or TOML) file declaring agents, apps and scripts.
    Create {
        /// Template name.
        name: String,
        /// The declaration: `{"agents": [{"name": ..., "apps": [...], "scripts": [...]}]}`.
        #[arg(long, short)]
        file: PathBuf,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Push a Terraform template: the directory DIR becomes a new template,
    /// or the template's new active version.
    Push {
        /// Template name.
        name: String,
        /// The template directory (its `.tf` files and whatever they use).
        #[arg(long, short = 'd', default_value = ".")]
        directory: PathBuf,
        /// What changed (for a new version).
        #[arg(long, short, default_value = "")]
        message: String,
        /// A tag a provisioner daemon needs to build this version, as
        /// KEY=VALUE (repeatable; none: any daemon without tags).
        #[arg(long = "provisioner-tag", value_name = "KEY=VALUE", value_parser = devmesh_shared::provisionerd::parse_tag)]
        provisioner_tags: Vec<(String, String)>,
    },
    /// List templates.
    List,
    /// A template's versions: list, promote, archive.
    #[command(subcommand)]
    Versions(VersionsCommand),
    /// Download a version's directory (owners).
    Pull {
        /// Template name.
        name: String,
        /// The version (defaults to the active one).
        #[arg(long)]
        version: Option<i32>,
        /// Where to write it (must not exist, or be empty).
        #[arg(long, short = 'd')]
        directory: PathBuf,
    },
    /// Start a template from a starter: local-process, docker, kubernetes.
    Init {
        /// Where to write it (must not exist, or be empty).
        directory: PathBuf,
        /// The starter.
        #[arg(long, default_value = "local-process", value_parser = clap::builder::PossibleValuesParser::new(STARTERS.iter().map(|(n, _)| *n)))]
        starter: String,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum VersionsCommand {
    /// List a template's versions: number, kind, state, parameters.
    List {
        /// Template name.
        name: String,
    },
    /// Make a version the active one (new workspaces and `update` use it).
    Promote {
        /// Template name.
        name: String,
        /// The version's number.
        version: i32,
    },
    /// Archive a version: it can no longer be promoted or updated to.
    Archive {
        /// Template name.
        name: String,
        /// The version's number.
        version: i32,
    },
    /// Undo `archive`.
    Unarchive {
        /// Template name.
        name: String,
        /// The version's number.
        version: i32,
    },
}

/// The starter templates, built into the binary: name and `main.tf`.
const STARTERS: &[(&str, &str)] = &[
    (
        "local-process",
        include_str!("../../../examples/templates/local-process/main.tf"),
    ),
    (
        "docker",
        include_str!("../../../examples/templates/docker/main.tf"),
    ),
    (
        "kubernetes",
        include_str!("../../../examples/templates/kubernetes/main.tf"),
    ),
];

/// `templates init`: writes a starter into `dir`.
fn init(dir: &std::path::Path, starter: &str) -> anyhow::Result<()> {
    let (_, main_tf) = STARTERS
        .iter()
        .find(|(n, _)| *n == starter)
        .with_context(|| format!("no starter named {starter}"))?;
    fresh_directory(dir)?;
    let path = dir.join("main.tf");
    std::fs::write(&path, main_tf).with_context(|| format!("writing {}", path.display()))?;
    println!("Wrote the {starter} starter to {}.", path.display());
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| starter.to_owned());
    println!(
        "Push it with: devmesh templates push {name} -d {}",
        dir.display()
    );
    Ok(())
}

/// Refuses a directory that exists and is not empty.
fn fresh_directory(dir: &std::path::Path) -> anyhow::Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        anyhow::ensure!(
            entries.next().is_none(),
            "{} is not empty; choose a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

pub(crate) async fn templates(g: &Global, cmd: TemplatesCommand) -> anyhow::Result<()> {
    if let TemplatesCommand::Init { directory, starter } = &cmd {
        return init(directory, starter);
    }
    let client = g.client()?;
    match cmd {
        TemplatesCommand::Create {
            name,
            file,
            description,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let definition: ExternalDefinition = if file.extension().is_some_and(|e| e == "toml") {
                toml_like(&text)?
            } else {
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a valid definition", file.display()))?
            };
            let t: Template = client
                .post(
                    "/templates",
                    &CreateTemplateRequest {
                        name,
                        description,
                        kind: TemplateKind::External,
                        definition,
                        archive: None,
                        provisioner_tags: Default::default(),
                    },
                )
                .await?;
            println!(
                "Created template {} (version {}).",
                t.name, t.active_version.number
            );
        }
        TemplatesCommand::Push {
            name,
            directory,
            message,
            provisioner_tags,
        } => {
            let provisioner_tags: devmesh_shared::provisionerd::Tags =
                provisioner_tags.into_iter().collect();
            use base64::Engine as _;
            let tar = devmesh_provisioner::archive::pack(&directory)?;
            anyhow::ensure!(
                tar.len() <= devmesh_shared::api::MAX_TEMPLATE_ARCHIVE,
                "{} packs to {} KiB; templates may be at most {} KiB",
                directory.display(),
                tar.len() / 1024,
                devmesh_shared::api::MAX_TEMPLATE_ARCHIVE / 1024
            );
            let archive = Some(base64::engine::general_purpose::STANDARD.encode(&tar));
            let exists = client
                .get::<Template>(&format!("/templates/{name}"))
                .await
                .is_ok();
            let t: Template = if exists {
                client
                    .post(
                        &format!("/templates/{name}/versions"),
                        &devmesh_shared::api::CreateTemplateVersionRequest {
                            kind: TemplateKind::Terraform,
                            definition: ExternalDefinition::default(),
                            archive,
                            message,
                            provisioner_tags,
                        },
                    )
                    .await?
            } else {
                client
                    .post(
                        "/templates",
                        &CreateTemplateRequest {
                            name,
                            description: String::new(),
                            kind: TemplateKind::Terraform,
                            definition: ExternalDefinition::default(),
                            archive,
                            provisioner_tags,
                        },
                    )
                    .await?
            };
            // The pushed version is the newest; it becomes active once its
            // import (a provisioner planning it) succeeds.
            let newest = || async {
                let versions: devmesh_shared::api::TemplateVersionsResponse = client
                    .get(&format!("/templates/{}/versions", t.name))
                    .await?;
                versions
                    .versions
                    .into_iter()
                    .next()
                    .context("the template has no versions")
            };
            if let Some(import) = newest().await?.import {
                follow_job(g, &client, import.job_id, "import").await?;
            }
            let pushed = &newest().await?;
            if g.output == Format::Json {
                return json(pushed);
            }
            println!(
                "Pushed template {} (version {}, {} KiB).",
                t.name,
                pushed.number,
                tar.len().div_ceil(1024)
            );
            for p in &pushed.parameters {
                let default = p
                    .default
                    .as_deref()
                    .map_or("required".to_owned(), |d| format!("default {d:?}"));
                println!(
                    "  parameter {} ({}, {default}){}",
                    p.name,
                    p.kind,
                    p.description
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                );
            }
        }
        TemplatesCommand::Versions(VersionsCommand::List { name }) => {
            let t: Template = client.get(&format!("/templates/{name}")).await?;
            let resp: devmesh_shared::api::TemplateVersionsResponse =
                client.get(&format!("/templates/{name}/versions")).await?;
            if g.output == Format::Json {
                return json(&resp.versions);
            }
            table(
                &[
                    "VERSION",
                    "KIND",
                    "STATE",
                    "PARAMETERS",
                    "CREATED",
                    "MESSAGE",
                ],
                resp.versions
                    .iter()
                    .map(|v| {
                        let state = match (&v.import, v.id == t.active_version.id) {
                            (_, true) => "active".to_owned(),
                            _ if v.archived => "archived".to_owned(),
                            (Some(i), false) if i.status == "succeeded" => "imported".to_owned(),
                            (Some(i), false) => format!("import {}", i.status),
                            (None, false) => "inactive".to_owned(),
                        };
                        let params: Vec<&str> =
                            v.parameters.iter().map(|p| p.name.as_str()).collect();
                        vec![
                            v.number.to_string(),
                            format!("{:?}", v.kind).to_lowercase(),
                            state,
                            params.join(","),
                            v.created_at.format("%Y-%m-%d %H:%M").to_string(),
                            v.message.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        TemplatesCommand::Versions(VersionsCommand::Promote { name, version }) => {
            let t: Template = client
                .post(
                    &format!("/templates/{name}/versions/{version}/promote"),
                    &serde_json::json!({}),
                )
                .await?;
            println!(
                "Version {} of {} is active: new workspaces use it, `devmesh update` moves existing ones.",
                t.active_version.number, t.name
            );
        }
        TemplatesCommand::Versions(VersionsCommand::Archive { name, version }) => {
            client
                .post::<_, serde_json::Value>(
                    &format!("/templates/{name}/versions/{version}/archive"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("Archived version {version} of {name}.");
        }
        TemplatesCommand::Versions(VersionsCommand::Unarchive { name, version }) => {
            client
                .post::<_, serde_json::Value>(
                    &format!("/templates/{name}/versions/{version}/unarchive"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("Unarchived version {version} of {name}.");
        }
        TemplatesCommand::Pull {
            name,
            version,
            directory,
        } => {
            let number = match version {
                Some(n) => n,
                None => {
                    let t: Template = client.get(&format!("/templates/{name}")).await?;
                    t.active_version.number
                }
            };
            let tar = client
                .get_bytes(&format!("/templates/{name}/versions/{number}/files"))
                .await?;
            fresh_directory(&directory)?;
            devmesh_provisioner::archive::unpack(&tar, &directory)?;
            println!(
                "Pulled version {number} of {name} into {}.",
                directory.display()
            );
        }
        TemplatesCommand::Init { .. } => unreachable!("handled before signing in"),
        TemplatesCommand::List => {
            let resp: TemplatesResponse = client.get("/templates").await?;
            if g.output == Format::Json {
                return json(&resp.templates);
            }
            table(
                &["NAME", "VERSION", "AGENTS", "DESCRIPTION"],
                resp.templates
                    .iter()
                    .map(|t| {
                        let agents: Vec<&str> = t
                            .active_version
                            .definition
                            .agents
                            .iter()
                            .map(|a| a.name.as_str())
                            .collect();
                        vec![
                            t.name.clone(),
                            t.active_version.number.to_string(),
                            agents.join(","),
                            t.description.clone(),
                        ]
                    })
                    .collect(),
            );
        }
    }
    Ok(())
}

fn toml_like(_: &str) -> anyhow::Result<ExternalDefinition> {
    anyhow::bail!("template files are JSON (name them *.json)")
}

/// Prints new agent tokens with the exact command to start each agent.
fn print_tokens(g: &Global, base: &str, resp: &WorkspaceBuildResponse) {
    // A private CA the CLI trusts must be trusted by the agent too.
    let ca = g
        .ca_cert
        .as_ref()
        .map(|p| {
            format!(
                "DEVMESH_CA_CERT={} ",
                std::path::absolute(p).unwrap_or(p.clone()).display()
            )
        })
        .unwrap_or_default();
    for t in &resp.agent_tokens {
        println!("Agent {} token: {}", t.agent_name, t.token);
        println!("  Start it on the workspace's machine with:");
        println!(
            "  {ca}DEVMESH_URL={base} DEVMESH_AGENT_TOKEN={} devmesh agent",
            t.token
        );
    }
}

async fn find(client: &crate::client::Client, name: &str) -> anyhow::Result<Workspace> {
    let (owner, ws) = name.split_once('/').unwrap_or(("me", name));
    client.get(&format!("/users/{owner}/workspaces/{ws}")).await
}

pub(crate) async fn create(
    g: &Global,
    name: String,
    template: String,
    parameters: Vec<(String, String)>,
    yes: bool,
) -> anyhow::Result<()> {
    let client = g.client()?;
    let mut parameters: std::collections::BTreeMap<String, String> =
        parameters.into_iter().collect();
    // At a terminal, ask for the required parameters not given (each
    // checked as it is typed); elsewhere, or with --yes, the server's
    // answer names whatever is missing.
    if !yes && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let t: Template = client.get(&format!("/templates/{template}")).await?;
        for p in &t.active_version.parameters {
            if p.default.is_none() && !parameters.contains_key(&p.name) {
                let value = ask(p)?;
                parameters.insert(p.name.clone(), value);
            }
        }
    }
    let resp: WorkspaceBuildResponse = client
        .post(
            "/workspaces",
            &devmesh_shared::api::CreateWorkspaceRequest {
                name,
                template,
                owner: None,
                parameters,
            },
        )
        .await?;
    if g.output == Format::Json {
        return json(&resp);
    }
    let name = resp.workspace.name.clone();
    follow_build(g, &client, &resp.workspace).await?;
    println!("Created workspace {name}.");
    print_tokens(g, client.base(), &resp);
    if resp.workspace.latest_build.job_id.is_some() {
        print_app_urls(g, &client, resp.workspace.id).await?;
    }
    Ok(())
}

/// Asks for one parameter's value at the terminal until it passes the
/// parameter's checks.
fn ask(p: &devmesh_shared::parameters::TemplateParameter) -> anyhow::Result<String> {
    use std::io::{BufRead, Write};
    let mut hint = p.kind.clone();
    if !p.options.is_empty() {
        hint = format!("one of {}", p.options.join(", "));
    }
    if let Some(d) = &p.description {
        eprintln!("{}: {d}", p.name);
    }
    loop {
        eprint!("{} ({hint}): ", p.name);
        std::io::stderr().flush()?;
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            anyhow::bail!("no value for parameter {}", p.name);
        }
        let value = line.trim().to_owned();
        match devmesh_shared::parameters::check_value(p, &value) {
            Ok(()) => return Ok(value),
            Err(e) => eprintln!("  {} {e}", p.name),
        }
    }
}

/// A workspace's subdomain apps and their URLs through the region nearest
/// to this machine that serves apps (or the one `--region` pins).
pub(crate) async fn app_urls(
    g: &Global,
    client: &crate::client::Client,
    ws: &Workspace,
) -> anyhow::Result<(Option<String>, Vec<(String, String)>)> {
    let regions = crate::regions::ranked(client, g.region.as_deref(), g.ca_cert.as_deref()).await?;
    let Some(region) = regions.iter().find(|r| r.wildcard.is_some()) else {
        return Ok((None, Vec::new()));
    };
    let wildcard = region.wildcard.as_deref().unwrap_or_default();
    let (scheme, rest) = region
        .url
        .split_once("://")
        .unwrap_or(("https", &region.url));
    let mut suffix = wildcard.trim_start_matches("*.").to_owned();
    if !suffix.contains(':')
        && let Some((_, port)) = rest.split('/').next().and_then(|h| h.rsplit_once(':'))
    {
        suffix = format!("{suffix}:{port}");
    }
    let mut urls = Vec::new();
    for agent in &ws.agents {
        for app in agent.apps.iter().filter(|a| a.subdomain) {
            let url = format!(
                "{scheme}://{}--{}--{}--{}.{suffix}/",
                app.slug, agent.name, ws.name, ws.owner_name
            );
            let name = if ws.agents.len() > 1 {
                format!("{}.{}", agent.name, app.slug)
            } else {
                app.slug.clone()
            };
            urls.push((name, url));
        }
    }
    Ok((Some(region.name.clone()), urls))
}

/// Prints a workspace's app URLs through the nearest region.
async fn print_app_urls(
    g: &Global,
    client: &crate::client::Client,
    id: uuid::Uuid,
) -> anyhow::Result<()> {
    let ws: Workspace = client.get(&format!("/workspaces/{id}")).await?;
    let (region, urls) = app_urls(g, client, &ws).await?;
    if let (Some(region), false) = (region, urls.is_empty()) {
        println!("Apps, through region {region} (`--region` picks another):");
        for (name, url) in urls {
            println!("App {name}: {url}");
        }
    }
    Ok(())
}

/// `devmesh open WS APP`: the app's URL through the nearest region, opened
/// in a browser when there is one to open.
pub(crate) async fn open(g: &Global, name: String, app: String) -> anyhow::Result<()> {
    let client = g.client()?;
    let ws = find(&client, &name).await?;
    let (region, urls) = app_urls(g, &client, &ws).await?;
    let found = urls
        .iter()
        .find(|(n, _)| *n == app || n.rsplit_once('.').is_some_and(|(_, slug)| slug == app));
    let Some((_, url)) = found else {
        let names: Vec<&str> = urls.iter().map(|(n, _)| n.as_str()).collect();
        anyhow::bail!(
            "{name} has no app {app:?}{}",
            if names.is_empty() {
                String::new()
            } else {
                format!(": it has {}", names.join(", "))
            }
        );
    };
    println!("{url}");
    let browser = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.is_empty())
        .or_else(|| {
            let graphical = std::env::var_os("DISPLAY").is_some()
                || std::env::var_os("WAYLAND_DISPLAY").is_some();
            graphical.then(|| "xdg-open".to_owned())
        });
    if let Some(browser) = browser {
        let started = std::process::Command::new(&browser)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = started {
            eprintln!("Could not open a browser ({browser}: {e}); open the URL above.");
        }
    }
    if let Some(region) = region {
        eprintln!("(through region {region})");
    }
    Ok(())
}

/// For a build a provisioner runs (Terraform templates): prints its log
/// as it comes and waits for it to end; errs when it did not succeed.
async fn follow_build(
    g: &Global,
    client: &crate::client::Client,
    ws: &Workspace,
) -> anyhow::Result<()> {
    match ws.latest_build.job_id {
        Some(job) => follow_job(g, client, job, "build").await,
        None => Ok(()),
    }
}

/// Prints a provisioner job's log as it comes until the job ends; errs
/// when it did not succeed.
async fn follow_job(
    g: &Global,
    client: &crate::client::Client,
    job: uuid::Uuid,
    what: &str,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let mut after = 0i64;
    let mut said_waiting = false;
    // At a terminal, a spinner under the log says which step runs and for
    // how long; piped output stays plain lines.
    let progress = (g.output != Format::Json
        && std::io::stdout().is_terminal()
        && std::io::stderr().is_terminal())
    .then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(format!("{what}: waiting for a provisioner"));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let say = |text: &str, err: bool| match &progress {
        Some(bar) => bar.suspend(|| {
            if err {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
        }),
        None if err => eprintln!("{text}"),
        None => println!("{text}"),
    };
    let ended = loop {
        let resp: devmesh_shared::api::JobLogsResponse = client
            .get(&format!("/jobs/{job}/logs?after={after}"))
            .await?;
        if let Some(why) = resp.waiting.as_deref().filter(|_| !said_waiting) {
            say(why, true);
            said_waiting = true;
        }
        for l in &resp.logs {
            if g.output != Format::Json {
                let line = printable(&l.line);
                match l.stream.as_str() {
                    "provisioner" => {
                        if let (Some(bar), Some(step)) = (&progress, line.strip_prefix("devmesh: "))
                        {
                            bar.set_message(format!("{what}: {step}"));
                        }
                        say(&line, false);
                    }
                    "stderr" => say(&format!("  {line}"), true),
                    _ => say(&format!("  {line}"), false),
                }
            }
            after = l.id;
        }
        match resp.status.as_str() {
            "succeeded" => break Ok(()),
            "failed" => {
                break Err(anyhow::anyhow!(
                    "the {what} failed: {}",
                    resp.error.unwrap_or_else(|| "no reason given".into())
                ));
            }
            "canceled" => break Err(anyhow::anyhow!("the {what} was canceled")),
            _ if resp.logs.is_empty() => tokio::time::sleep(Duration::from_millis(300)).await,
            _ => {}
        }
    };
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    ended
}

pub(crate) async fn list(g: &Global, all: bool) -> anyhow::Result<()> {
    let client = g.client()?;
    let resp: WorkspacesResponse = client
        .get(if all {
            "/workspaces?owner=all"
        } else {
            "/workspaces"
        })
        .await?;
    if g.output == Format::Json {
        return json(&resp.workspaces);
    }
    table(
        &["WORKSPACE", "TEMPLATE", "STATE", "AGENTS"],
        resp.workspaces
            .iter()
            .map(|w| {
                let agents: Vec<String> = w
                    .agents
                    .iter()
                    .map(|a| match (&a.relay_region, a.status) {
                        (Some(region), AgentStatus::Connected) => {
                            format!("{} (connected via {region}, {})", a.name, a.lifecycle_state)
                        }
                        _ => format!("{} ({}, {})", a.name, a.status, a.lifecycle_state),
                    })
                    .collect();
                let state = match w.latest_build.transition {
                    Transition::Start => "started",
                    Transition::Stop => "stopped",
                    Transition::Delete => "deleted",
                };
                vec![
                    format!("{}/{}", w.owner_name, w.name),
                    w.template_name.clone(),
                    state.into(),
                    agents.join(", "),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub(crate) async fn transition(
    g: &Global,
    name: String,
    transition: Transition,
) -> anyhow::Result<()> {
    let req = CreateBuildRequest {
        transition,
        update: false,
        parameters: Default::default(),
    };
    run_build(g, &name, req).await
}

/// `devmesh update`: the template's active version (and new values of
/// mutable parameters), applied by a start build.
pub(crate) async fn update(
    g: &Global,
    name: String,
    parameters: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let req = CreateBuildRequest {
        transition: Transition::Start,
        update: true,
        parameters: parameters.into_iter().collect(),
    };
    run_build(g, &name, req).await
}

/// `devmesh restart`: a stop build, then a start build once it ended.
pub(crate) async fn restart(g: &Global, name: String) -> anyhow::Result<()> {
    let client = g.client()?;
    let ws = find(&client, &name).await?;
    if ws.latest_build.transition == Transition::Start {
        transition(g, name.clone(), Transition::Stop).await?;
    }
    transition(g, name, Transition::Start).await
}

async fn run_build(g: &Global, name: &str, req: CreateBuildRequest) -> anyhow::Result<()> {
    let client = g.client()?;
    let ws = find(&client, name).await?;
    let transition = req.transition;
    let resp: WorkspaceBuildResponse = client
        .post(&format!("/workspaces/{}/builds", ws.id), &req)
        .await?;
    follow_build(g, &client, &resp.workspace).await?;
    match transition {
        Transition::Start => {
            if req.update {
                println!("Updated {name}.");
            } else {
                println!("Started {name}.");
            }
            print_tokens(g, client.base(), &resp);
            if resp.workspace.latest_build.job_id.is_some() {
                print_app_urls(g, &client, resp.workspace.id).await?;
            }
        }
        Transition::Stop => println!("Stopped {name}."),
        Transition::Delete => println!("Deleted {name}."),
    }
    Ok(())
}

/// `devmesh show`: a workspace's build, resources, agents and app URLs.
pub(crate) async fn show(g: &Global, name: String) -> anyhow::Result<()> {
    let client = g.client()?;
    let ws = find(&client, &name).await?;
    if g.output == Format::Json {
        return json(&ws);
    }
    let b = &ws.latest_build;
    println!(
        "Workspace {}/{} (template {})",
        ws.owner_name, ws.name, ws.template_name
    );
    println!(
        "Build #{}: {} {}{}",
        b.build_number,
        b.transition.as_str(),
        serde_json::to_value(b.status)?.as_str().unwrap_or_default(),
        b.error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    if !ws.resources.is_empty() {
        println!();
        table(
            &["RESOURCE", "LIFETIME", "AGENTS", "METADATA"],
            ws.resources
                .iter()
                .map(|r| {
                    vec![
                        r.address.clone(),
                        match r.persistent {
                            Some(true) => "persistent",
                            Some(false) => "ephemeral",
                            None => "-",
                        }
                        .to_owned(),
                        if r.agents.is_empty() {
                            "-".to_owned()
                        } else {
                            r.agents.join(", ")
                        },
                        r.metadata
                            .iter()
                            .map(|(k, v)| format!("{k}={}", printable(v)))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]
                })
                .collect(),
        );
    }
    if !ws.agents.is_empty() {
        println!();
        table(
            &["AGENT", "STATUS", "LIFECYCLE", "REGION", "APPS"],
            ws.agents
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.status.to_string(),
                        serde_json::to_value(a.lifecycle_state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        a.relay_region.clone().unwrap_or_else(|| "-".into()),
                        a.apps
                            .iter()
                            .map(|app| app.slug.clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]
                })
                .collect(),
        );
        let measured: Vec<Vec<String>> = ws
            .agents
            .iter()
            .flat_map(|a| {
                a.metadata.iter().map(|m| {
                    vec![
                        a.name.clone(),
                        m.key.clone(),
                        printable(&m.value).into_owned(),
                        m.error
                            .as_deref()
                            .map(|e| printable(e).into_owned())
                            .unwrap_or_default(),
                    ]
                })
            })
            .collect();
        if !measured.is_empty() {
            println!();
            table(&["AGENT", "METADATA", "VALUE", "ERROR"], measured);
        }
        println!();
        print_app_urls(g, &client, ws.id).await?;
    }
    Ok(())
}

pub(crate) async fn cancel(g: &Global, name: String) -> anyhow::Result<()> {
    let client = g.client()?;
    let ws = find(&client, &name).await?;
    let ws: Workspace = client
        .post(&format!("/workspaces/{}/builds/cancel", ws.id), &())
        .await?;
    match ws.latest_build.status {
        devmesh_shared::api::BuildStatus::Canceled => println!("Canceled the build of {name}."),
        _ => println!("Canceling the build of {name}: Terraform is being interrupted."),
    }
    Ok(())
}

pub(crate) async fn logs(g: &Global, name: String, follow: bool) -> anyhow::Result<()> {
    let client = g.client()?;
    let ws = find(&client, &name).await?;
    anyhow::ensure!(!ws.agents.is_empty(), "{name} has no running agents");
    let mut after = vec![0i64; ws.agents.len()];
    loop {
        let mut settled = true;
        for (i, agent) in ws.agents.iter().enumerate() {
            let resp: AgentLogsResponse = client
                .get(&format!(
                    "/workspaceagents/{}/logs?after={}",
                    agent.id, after[i]
                ))
                .await?;
            for l in &resp.logs {
                let prefix = if ws.agents.len() > 1 {
                    format!("{}/{}", agent.name, l.source)
                } else {
                    l.source.clone()
                };
                let (prefix, output) = (printable(&prefix), printable(&l.output));
                if l.level == "error" {
                    eprintln!("[{prefix}] {output}");
                } else {
                    println!("[{prefix}] {output}");
                }
                after[i] = l.id;
            }
            if resp.overflowed && resp.logs.is_empty() && !follow {
                eprintln!("(later output was dropped: the 1 MiB log limit was reached)");
            }
            if matches!(
                resp.lifecycle_state,
                LifecycleState::Created | LifecycleState::Starting | LifecycleState::ShuttingDown
            ) {
                settled = false;
            }
        }
        if !follow || settled {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
