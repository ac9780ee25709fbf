//! `devmesh`: one binary for the daemons and for the user's terminal commands.
//!
//! Parse, validate, run; the logic lives in the libraries and the command
//! modules.

#![forbid(unsafe_code)]

mod client;
mod commands;
mod output;
mod regions;
mod session;
mod udp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use devmesh_shared::api::Transition;

/// Exit code for bad configuration or usage (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Remote development workspaces with a multi-region edge mesh.
#[derive(Debug, Parser)]
#[command(name = "devmesh", version, about)]
struct Cli {
    #[command(flatten)]
    global: commands::Global,
    #[command(subcommand)]
    command: Command,
}

/// The long-running processes, parsed on their own: their flags are theirs
/// alone, without the client's `--url`, `--token`, `--ca-cert` and `-o`.
#[derive(Debug, Parser)]
#[command(name = "devmesh", version)]
struct Daemon {
    #[command(subcommand)]
    command: DaemonCommand,
}

#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Run the primary server (API, embedded PostgreSQL by default).
    Server(devmesh_primary::ServerArgs),
    /// Run the workspace agent (inside the workspace).
    Agent(devmesh_agent::AgentArgs),
    /// Run a regional edge proxy.
    Edge(devmesh_edge_proxy::EdgeArgs),
}

impl DaemonCommand {
    const NAMES: [&'static str; 3] = ["server", "agent", "edge"];

    async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Server(args) => commands::server::run(args).await,
            Self::Agent(args) => commands::processes::agent(args).await,
            Self::Edge(args) => commands::processes::edge(args).await,
        }
    }
}

/// A parsed command line.
enum Parsed {
    /// A long-running process.
    Daemon(DaemonCommand),
    /// A client command.
    Client(Cli),
}

/// Parses the command line: the daemons with their own parser, the rest
/// with the client's global flags.
fn parse() -> Result<Parsed, clap::Error> {
    let daemon = std::env::args_os()
        .nth(1)
        .is_some_and(|a| DaemonCommand::NAMES.iter().any(|n| a == *n));
    if daemon {
        Ok(Parsed::Daemon(Daemon::try_parse()?.command))
    } else {
        Cli::try_parse().map(Parsed::Client)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the primary server (API, embedded PostgreSQL by default).
    Server(devmesh_primary::ServerArgs),
    /// Sign in to a deployment (creates the first user on a new one).
    Login(commands::auth::LoginArgs),
    /// Sign out and forget the stored session.
    Logout,
    /// Show who you are signed in as.
    Whoami,
    /// Manage users (owners).
    #[command(subcommand)]
    Users(commands::users::UsersCommand),
    /// Manage your API keys.
    #[command(subcommand)]
    Keys(commands::keys::KeysCommand),
    /// Manage regional edge proxies (owners).
    #[command(subcommand)]
    Edges(commands::edges::EdgesCommand),
    /// List regions and their health.
    Regions,
    /// Provisioner daemons: run one (`start`), list them, manage their keys.
    #[command(subcommand)]
    Provisioner(commands::provisioner::ProvisionerCommand),
    /// Manage templates.
    #[command(subcommand)]
    Templates(commands::workspaces::TemplatesCommand),
    /// Create a workspace from a template: shows a Terraform template's build
    /// as it runs, or prints each agent's token for a bring-your-own one.
    Create {
        /// Workspace name.
        name: String,
        /// Template name.
        #[arg(long, short)]
        template: String,
        /// A template parameter's value, as NAME=VALUE (repeatable).
        #[arg(long = "parameter", short = 'p', value_name = "NAME=VALUE", value_parser = parse_parameter)]
        parameters: Vec<(String, String)>,
        /// Ask nothing: parameters not given take their defaults (a
        /// required one missing is an error).
        #[arg(long, short)]
        yes: bool,
    },
    /// List your workspaces.
    #[command(alias = "ls")]
    List {
        /// Everyone's workspaces (owners).
        #[arg(long)]
        all: bool,
    },
    /// Start a stopped workspace (new agent tokens are printed).
    Start {
        /// Workspace name, or owner/name.
        name: String,
    },
    /// Stop a workspace.
    Stop {
        /// Workspace name, or owner/name.
        name: String,
    },
    /// Delete a workspace.
    Delete {
        /// Workspace name, or owner/name.
        name: String,
    },
    /// Show a workspace: its latest build, resources (persistent or
    /// ephemeral), agents and app URLs.
    Show {
        /// Workspace name, or owner/name.
        name: String,
    },
    /// Restart a workspace: stop it, then start it.
    Restart {
        /// Workspace name, or owner/name.
        name: String,
    },
    /// Move a workspace to its template's active version, and change
    /// mutable parameters, with a start build (a stopped workspace is
    /// started; a started one is updated in place).
    Update {
        /// Workspace name, or owner/name.
        name: String,
        /// A new value of a mutable parameter, as NAME=VALUE (repeatable).
        #[arg(long = "parameter", short = 'p', value_name = "NAME=VALUE", value_parser = parse_parameter)]
        parameters: Vec<(String, String)>,
    },
    /// Cancel a workspace's running build (Terraform is interrupted
    /// gracefully).
    Cancel {
        /// Workspace name, or owner/name.
        name: String,
    },
    /// SSH into a workspace (OpenSSH through the deployment's HTTPS):
    /// interactive, or `-- CMD…` with its exit status.
    Ssh {
        /// WS, WS.AGENT, OWNER/WS or OWNER/WS.AGENT.
        target: String,
        /// Only carry the connection on stdin and stdout (OpenSSH's
        /// ProxyCommand).
        #[arg(long)]
        stdio: bool,
        /// The command to run, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Write a managed block into ~/.ssh/config so `ssh devmesh.WS`, scp,
    /// sftp and editors' remote-SSH reach your workspaces.
    ConfigSsh {
        /// The SSH config file [default: ~/.ssh/config].
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Change it without asking.
        #[arg(long, short)]
        yes: bool,
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Forward local ports to ports in a workspace, through its SSH
    /// connection, until interrupted.
    PortForward {
        /// WS, WS.AGENT, OWNER/WS or OWNER/WS.AGENT.
        target: String,
        /// [ADDR:]LOCAL:REMOTE (repeatable): listen on LOCAL (on ADDR,
        /// 127.0.0.1 by default), connect to REMOTE in the workspace.
        #[arg(long)]
        tcp: Vec<String>,
        /// [ADDR:]LOCAL:REMOTE (repeatable): UDP datagrams to LOCAL go to
        /// REMOTE in the workspace, and its answers come back.
        #[arg(long)]
        udp: Vec<String>,
    },
    /// Time the path to a workspace, hop by hop: you → region → the
    /// agent's relay → the agent.
    Ping {
        /// WS, WS.AGENT, OWNER/WS or OWNER/WS.AGENT.
        target: String,
        /// How many round trips.
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
    },
    /// Measure throughput to and from a workspace's agent.
    Speedtest {
        /// WS, WS.AGENT, OWNER/WS or OWNER/WS.AGENT.
        target: String,
        /// MiB to send each way.
        #[arg(long, default_value_t = 64)]
        megabytes: u64,
    },
    /// Print a workspace app's URL through the nearest region, and open it
    /// in a browser when there is one ($BROWSER, or xdg-open on a desktop).
    Open {
        /// Workspace name, or owner/name.
        name: String,
        /// The app's slug (AGENT.SLUG when agents share slugs).
        app: String,
    },
    /// Check every region: HTTPS latency from here, and whether UDP (QUIC)
    /// gets through to its relay.
    Netcheck,
    /// Show a workspace's startup script output.
    Logs {
        /// Workspace name, or owner/name.
        name: String,
        /// Keep following while scripts run.
        #[arg(long, short)]
        follow: bool,
    },
    /// Run the workspace agent (inside the workspace).
    Agent(devmesh_agent::AgentArgs),
    /// Run a regional edge proxy.
    Edge(devmesh_edge_proxy::EdgeArgs),
}

fn main() -> ExitCode {
    devmesh_net::runtime::install_crypto_provider();
    if invoked_as_terraform_provider() {
        return terraform_provider();
    }
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see devmesh --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let ran = match cli {
        Parsed::Daemon(d) => runtime.block_on(d.run()),
        Parsed::Client(cli) => runtime.block_on(run(cli)),
    };
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e
                .downcast_ref::<devmesh_primary::config::ConfigError>()
                .is_some()
            {
                EXIT_USAGE
            } else {
                1
            };
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// `NAME=VALUE`.
fn parse_parameter(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// The async runtime every command runs on (`None`, said on stderr, when
/// the OS refuses its threads).
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            None
        }
    }
}

/// Whether this binary runs as `terraform-provider-devmesh…`: a
/// provisioner installs it under that name in Terraform's filesystem
/// mirror.
fn invoked_as_terraform_provider() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .is_some_and(|n| n.starts_with(devmesh_provisioner::provider::EXECUTABLE_PREFIX))
}

/// Serves the Terraform provider; logs go to stderr, which Terraform reads
/// (stdout carries the plugin handshake).
fn terraform_provider() -> ExitCode {
    devmesh_net::runtime::init_logging(devmesh_net::runtime::LogFormat::Text);
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(devmesh_provisioner::provider::serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;

    match cli.command {
        // Reached only with client flags before the name
        // (`devmesh -o json server`); they do not apply.
        Command::Server(args) => DaemonCommand::Server(args).run().await,
        Command::Login(args) => commands::auth::login(&g, args).await,
        Command::Logout => commands::auth::logout(&g).await,
        Command::Whoami => commands::auth::whoami(&g).await,
        Command::Users(c) => commands::users::run(&g, c).await,
        Command::Keys(c) => commands::keys::run(&g, c).await,
        Command::Edges(c) => commands::edges::run(&g, c).await,
        Command::Regions => commands::edges::regions(&g).await,
        Command::Provisioner(c) => commands::provisioner::run(&g, c).await,
        Command::Templates(c) => commands::workspaces::templates(&g, c).await,
        Command::Create {
            name,
            template,
            parameters,
            yes,
        } => commands::workspaces::create(&g, name, template, parameters, yes).await,
        Command::List { all } => commands::workspaces::list(&g, all).await,
        Command::Start { name } => {
            commands::workspaces::transition(&g, name, Transition::Start).await
        }
        Command::Stop { name } => {
            commands::workspaces::transition(&g, name, Transition::Stop).await
        }
        Command::Delete { name } => {
            commands::workspaces::transition(&g, name, Transition::Delete).await
        }
        Command::Show { name } => commands::workspaces::show(&g, name).await,
        Command::Restart { name } => commands::workspaces::restart(&g, name).await,
        Command::Update { name, parameters } => {
            commands::workspaces::update(&g, name, parameters).await
        }
        Command::Cancel { name } => commands::workspaces::cancel(&g, name).await,
        Command::Ssh {
            target,
            stdio,
            command,
        } => commands::ssh::ssh(&g, target, stdio, command).await,
        Command::ConfigSsh { file, yes, dry_run } => {
            commands::ssh::config_ssh(&g, file, yes, dry_run).await
        }
        Command::PortForward { target, tcp, udp } => {
            commands::ssh::port_forward(&g, target, tcp, udp).await
        }
        Command::Ping { target, count } => commands::diag::ping(&g, target, count).await,
        Command::Speedtest { target, megabytes } => {
            commands::diag::speedtest(&g, target, megabytes).await
        }
        Command::Netcheck => commands::diag::netcheck(&g).await,
        Command::Open { name, app } => commands::workspaces::open(&g, name, app).await,
        Command::Logs { name, follow } => commands::workspaces::logs(&g, name, follow).await,
        Command::Agent(args) => DaemonCommand::Agent(args).run().await,
        Command::Edge(args) => DaemonCommand::Edge(args).run().await,
    }
}
