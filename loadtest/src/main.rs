//! `devmesh-loadtest`: measurements with their baselines in the same run.
//!
//! `devmesh-loadtest run <scenario.toml>` starts a whole topology from a
//! scenario file, runs the scenarios beside the baselines and writes
//! `report.json`, `report.md` and PNG plots (see `devmesh_loadtest::run`).
//!
//! `devmesh-loadtest tunnel` starts a real `devmesh server` (embedded
//! PostgreSQL in a temporary directory) and a real `devmesh agent`, serves
//! an upstream app from this process, and measures, side by side:
//! * the throughput of one large download straight from the app on loopback
//!   and through primary → QUIC tunnel → agent → app;
//! * the latency of small keep-alive requests both ways (p50, p99).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use devmesh_tests::process::{AgentProcess, Launch, ServerProcess};
use devmesh_tests::upstream::Upstream;
use serde_json::{Value, json};
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(
    name = "devmesh-loadtest",
    about = "devmesh measurements with side-by-side baselines"
)]
enum Cli {
    /// Run a scenario file: topology, scenarios, baselines, report.
    Run(RunArgs),
    /// Tunnel throughput and added latency against a direct loopback baseline.
    Tunnel(TunnelArgs),
}

#[derive(Debug, clap::Args)]
struct TunnelArgs {
    /// The devmesh binary [default: `devmesh` next to this executable].
    #[arg(long)]
    devmesh: Option<PathBuf>,
    /// Size of the large download in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Small requests per side.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The scenario file (TOML), like loadtest/scenarios/full.toml.
    scenario: PathBuf,
    /// Every scenario at tiny sizes, in well under two minutes (for CI).
    #[arg(long, env = "DEVMESH_LOADTEST_QUICK")]
    quick: bool,
    /// Where report.json, report.md, the plots and the logs go.
    #[arg(long, env = "DEVMESH_LOADTEST_OUT", default_value = "loadtest-report")]
    out: PathBuf,
    /// The devmesh binary [default: `devmesh` next to this executable].
    #[arg(long, env = "DEVMESH_LOADTEST_DEVMESH")]
    devmesh: Option<PathBuf>,
    /// Exit with status 1 when a scenario failed (CI), after writing the report.
    #[arg(long)]
    fail_on_error: bool,
    /// Run only these scenarios (comma-separated names: small,bulk,…).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Target an existing deployment at this URL instead of starting one
    /// (agents and baselines still run here).
    #[arg(long, env = "DEVMESH_LOADTEST_URL", requires = "api_key")]
    url: Option<String>,
    /// An owner's API key for --url.
    #[arg(long, env = "DEVMESH_LOADTEST_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Extra CA (PEM) to trust for --url.
    #[arg(long, env = "DEVMESH_LOADTEST_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    devmesh_net::runtime::install_crypto_provider();
    let work = async {
        match Cli::parse() {
            Cli::Run(args) => run(args).await,
            Cli::Tunnel(args) => tunnel(args).await,
        }
    };
    // Interrupted, the work is dropped before exiting: every process it
    // started (the deployment, the baselines and their process groups)
    // is killed on drop instead of outliving the run.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signal = tokio::select! {
        done = work => return done,
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    eprintln!("{signal}: stopping every process this run started");
    // Let the kills land before this process exits.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::process::exit(130);
}

fn devmesh_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let devmesh = match given {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("devmesh"),
    };
    anyhow::ensure!(
        devmesh.exists(),
        "{} not found: build it (cargo build --release --bin devmesh) or pass --devmesh",
        devmesh.display()
    );
    Ok(devmesh)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use devmesh_loadtest::scenario::Scenario;
    use devmesh_loadtest::topology::{Existing, Options};
    let scenario = match Scenario::load(&args.scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e:#}", args.scenario.display());
            std::process::exit(64);
        }
    };
    let scenario = if args.quick {
        scenario.quick()
    } else {
        scenario
    };
    let opts = Options {
        devmesh: devmesh_binary(args.devmesh)?,
        out: args.out,
        existing: args.url.map(|url| Existing {
            url,
            api_key: args.api_key.unwrap_or_default(),
            ca_cert: args.ca_cert,
        }),
    };
    let started = Instant::now();
    let (path, failed) = devmesh_loadtest::run::run(scenario, opts, args.only, args.quick).await?;
    eprintln!(
        "report written to {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    if args.fail_on_error && !failed.is_empty() {
        eprintln!("failed scenarios: {}", failed.join(", "));
        std::process::exit(1);
    }
    Ok(())
}

async fn tunnel(args: TunnelArgs) -> anyhow::Result<()> {
    let devmesh = devmesh_binary(args.devmesh)?;
    let data = tempfile::Builder::new()
        .prefix("devmesh-bench-")
        .tempdir()?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    eprintln!(
        "starting devmesh server (embedded PostgreSQL in {})",
        data.path().display()
    );
    let launch = |name: &str| Launch {
        bin: devmesh.clone(),
        args: Vec::new(),
        env: Vec::new(),
        log: data.path().join(format!("{name}.log")),
        log_filter: "warn".into(),
    };
    let server = ServerProcess::launch(
        launch("server").args([
            "--wildcard-access-url".to_owned(),
            "*.apps.localhost".to_owned(),
            "--data-dir".to_owned(),
            data.path().join("data").display().to_string(),
        ]),
        Duration::from_secs(120),
    )
    .await?;
    let base = server.url.clone();
    let port: u16 = base.rsplit(':').next().context("port")?.parse()?;

    let http = reqwest::Client::new();
    let api = |path: &str| format!("{base}/api/v2{path}");
    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut req = http.post(api(path)).json(&body);
        if let Some(t) = token {
            req = req.header("Devmesh-Session-Token", t);
        }
        async move {
            let resp = req.send().await?;
            let status = resp.status();
            let v: Value = resp.json().await?;
            if !status.is_success() {
                bail!("{status}: {v}");
            }
            anyhow::Ok(v)
        }
    };
    post(
        "/users/first",
        None,
        json!({"email": "bench@example.com", "username": "bench", "password": "bench-password"}),
    )
    .await?;
    let token = post(
        "/users/login",
        None,
        json!({"email": "bench", "password": "bench-password"}),
    )
    .await?["session_token"]
        .as_str()
        .context("token")?
        .to_owned();
    let upstream = Upstream::try_start().await?;
    let up = upstream.port();
    post("/templates", Some(&token), json!({"name": "bench", "definition": {"agents": [{"name": "main", "apps": [{"slug": "app", "port": up}]}]}})).await?;
    let ws = post(
        "/workspaces",
        Some(&token),
        json!({"name": "bench", "template": "bench"}),
    )
    .await?;
    let agent_token = ws["agent_tokens"][0]["token"]
        .as_str()
        .context("agent token")?;
    let _agent = AgentProcess::launch(&base, agent_token, launch("agent"))?;

    let tunnel_base = format!("http://app--main--bench--bench.apps.localhost:{port}");
    let direct_base = format!("http://127.0.0.1:{up}");
    let client = reqwest::Client::builder()
        .resolve(
            "app--main--bench--bench.apps.localhost",
            ([127, 0, 0, 1], port).into(),
        )
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .get(format!("{tunnel_base}/blob/1024"))
            .header("Devmesh-Session-Token", &token)
            .send()
            .await;
        if r.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent did not attach within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let size = args.size_mib * 1024 * 1024;
    let mut rows = Vec::new();
    for (name, url, auth) in [
        ("direct", &direct_base, false),
        ("tunnel", &tunnel_base, true),
    ] {
        let get = |path: String| {
            let mut r = client.get(path);
            if auth {
                r = r.header("Devmesh-Session-Token", &token);
            }
            r
        };
        // Warm up the keep-alive connection and the tunnel stream path.
        for _ in 0..50 {
            get(format!("{url}/blob/1024"))
                .send()
                .await?
                .bytes()
                .await?;
        }
        let mut lat = Vec::with_capacity(args.requests);
        for _ in 0..args.requests {
            let t = Instant::now();
            let body = get(format!("{url}/blob/1024"))
                .send()
                .await?
                .bytes()
                .await?;
            lat.push(t.elapsed());
            anyhow::ensure!(body.len() == 1024, "short body");
        }
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        let t = Instant::now();
        let mut resp = get(format!("{url}/bytes/{size}")).send().await?;
        let mut got = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            got += chunk.len() as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(got == size, "{name}: got {got} of {size} bytes");
        rows.push((
            name,
            size as f64 / secs / 1024.0 / 1024.0,
            pct(0.5),
            pct(0.99),
        ));
    }
    let (d, t) = (&rows[0], &rows[1]);
    println!(
        "devmesh-loadtest tunnel: {} MiB download, {} small keep-alive requests per side",
        args.size_mib, args.requests
    );
    println!("| path | download MiB/s | small p50 | small p99 |");
    println!("|---|---|---|---|");
    for (name, mibs, p50, p99) in &rows {
        println!(
            "| {name} | {mibs:.0} | {:.0} µs | {:.0} µs |",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    println!(
        "| tunnel ÷ direct | {:.2} | {:.2} | {:.2} |",
        t.1 / d.1,
        t.2.as_secs_f64() / d.2.as_secs_f64(),
        t.3.as_secs_f64() / d.3.as_secs_f64()
    );
    println!(
        "added latency through the tunnel: p50 +{:.0} µs, p99 +{:.0} µs",
        (t.2.as_secs_f64() - d.2.as_secs_f64()) * 1e6,
        (t.3.as_secs_f64() - d.3.as_secs_f64()) * 1e6
    );
    Ok(())
}
