//! Processes of the real binaries, for the system tests and the load tool
//! alike: a child that is killed when dropped and logs to a file
//! ([`Process`]), started and waited for until it prints the line that says
//! where it listens ([`Process::spawn_ready`]); the `devmesh server`,
//! `devmesh edge` and `devmesh agent` fixtures on top; and the small tools
//! around them (free ports, the loopback resolver, [`eventually`]).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// What the devmesh daemons log in tests: enough to debug a failure.
pub const DEBUG_LOG: &str = "debug,hyper=info,reqwest=info,quinn=info,rustls=info,h2=info";

/// The `devmesh` binary next to the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/devmesh`), or
/// `$DEVMESH_BIN`.
pub fn devmesh_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("DEVMESH_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable lives in target/<profile>/deps");
    profile.join("devmesh")
}

/// A child process that logs to a file and is killed (SIGKILL) when
/// dropped — with every process it started, when it leads its own process
/// group ([`Process::spawn_group`]).
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// Where its output goes.
    pub log: PathBuf,
    /// It leads a process group of its own: signals go to the group.
    group: bool,
}

impl Drop for Process {
    fn drop(&mut self) {
        // `kill_on_drop` ends the child itself; a group's other members
        // (nginx's workers, say) would outlive it.
        if self.group {
            self.signal(Signal::SIGKILL);
        }
    }
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.as_std().get_program()))?;
        Ok(Self {
            child,
            log,
            group: false,
        })
    }

    /// [`Process::spawn`] in a new process group that `cmd` leads, so that
    /// signals (and the kill on drop) reach the processes it forks too: a
    /// daemon's master and its workers end together.
    pub fn spawn_group(mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        cmd.process_group(0);
        let mut process = Self::spawn(cmd, log)?;
        process.group = true;
        Ok(process)
    }

    /// Starts `cmd` with stderr to `log`, reads its stdout until a line
    /// starts with `ready` and returns the rest of that line (the address
    /// it listens at). Stdout keeps being drained so the process never
    /// blocks on a full pipe. Fails with the log's tail when the line does
    /// not come within `timeout`.
    pub async fn spawn_ready(
        mut cmd: Command,
        log: PathBuf,
        ready: &str,
        timeout: Duration,
    ) -> anyhow::Result<(Self, String)> {
        let err = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.as_std().get_program()))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let found = tokio::time::timeout(timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix(ready) {
                    return Some(rest.to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let process = Self {
            child,
            log,
            group: false,
        };
        let Some(rest) = found else {
            bail!(
                "{} did not start (log {}):\n{}",
                cmd.as_std().get_program().to_string_lossy(),
                process.log.display(),
                process.log_text()
            );
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((process, rest))
    }

    /// Its pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `sig` if it still runs (to its whole group when it leads one).
    pub fn signal(&self, sig: Signal) {
        if let Some(id) = self.child.id() {
            let pid = Pid::from_raw(id as i32);
            let _ = if self.group {
                nix::sys::signal::killpg(pid, sig)
            } else {
                kill(pid, sig)
            };
        }
    }

    /// SIGKILL, as a crash would, and reap.
    pub async fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait for the exit, at most `within`.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.wait(within).await
    }

    /// Waits for the process to exit on its own, at most `within`.
    pub async fn wait(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "still running after {within:?} (log {})",
                self.log.display()
            ),
        }
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

// === The devmesh daemons ===

/// How to start a daemon: the binary, its flags and environment, where it
/// logs and at what level.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `devmesh` binary.
    pub bin: PathBuf,
    /// Flags after the subcommand.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// The log file.
    pub log: PathBuf,
    /// `DEVMESH_LOG`.
    pub log_filter: String,
}

impl Launch {
    /// The test binary ([`devmesh_bin`]) logging at [`DEBUG_LOG`] to a
    /// fresh file named after `name` in `log_dir`.
    pub fn for_tests(name: &str, log_dir: &Path) -> Self {
        Self {
            bin: devmesh_bin(),
            args: Vec::new(),
            env: Vec::new(),
            log: log_dir.join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple())),
            log_filter: DEBUG_LOG.into(),
        }
    }

    /// Appends flags.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds environment variables.
    pub fn envs<K: AsRef<str>, V: AsRef<str>>(
        mut self,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env.extend(
            env.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        self
    }

    /// Whether `flag` is among the flags.
    fn has(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    fn command(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(subcommand)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DEVMESH_LOG", &self.log_filter);
        cmd
    }
}

/// A `devmesh server`, killed on drop.
#[derive(Debug)]
pub struct ServerProcess {
    /// The process.
    pub process: Process,
    /// Where its HTTP listener is (`http://127.0.0.1:<port>` or https).
    pub url: String,
}

impl ServerProcess {
    /// Starts `devmesh server` on free loopback ports unless `launch` sets
    /// `--http-address` or `--relay-address`; waits until it listens.
    pub async fn launch(mut launch: Launch, timeout: Duration) -> anyhow::Result<Self> {
        for flag in ["--http-address", "--relay-address"] {
            if !launch.has(flag) {
                launch = launch.args([flag, "127.0.0.1:0"]);
            }
        }
        let cmd = launch.command("server");
        let (process, url) =
            Process::spawn_ready(cmd, launch.log, "Started HTTP listener at ", timeout).await?;
        Ok(Self { process, url })
    }

    /// [`ServerProcess::launch`] of the test binary; panics with the log
    /// when it does not start.
    pub async fn start(args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Self {
        let launch = Launch::for_tests("server", log_dir)
            .args(args)
            .envs(env.iter().copied());
        Self::launch(launch, Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: Signal) {
        self.process.signal(sig);
    }

    /// SIGTERM; asserts a clean exit within 30 s.
    pub async fn stop(mut self) {
        self.terminate().await;
    }

    /// SIGTERM and wait, keeping the value (to replace it afterwards);
    /// asserts a clean exit within 30 s.
    pub async fn terminate(&mut self) {
        let status = self
            .process
            .terminate(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            status.success(),
            "exit {status}:\n{}",
            self.process.log_text()
        );
    }

    /// SIGKILL, as a crash would.
    pub async fn crash(mut self) {
        self.process.kill().await;
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.process.log
    }
}

/// A `devmesh edge`, killed on drop.
#[derive(Debug)]
pub struct EdgeProcess {
    /// The process.
    pub process: Process,
    /// Where its HTTP listener is (`http://127.0.0.1:<port>` or https).
    pub url: String,
}

impl EdgeProcess {
    /// Starts `devmesh edge` with `launch`'s flags; waits until it listens.
    pub async fn launch(launch: Launch, timeout: Duration) -> anyhow::Result<Self> {
        let cmd = launch.command("edge");
        let (process, url) =
            Process::spawn_ready(cmd, launch.log, "Started edge listener at ", timeout).await?;
        Ok(Self { process, url })
    }

    /// Starts an edge of the test binary for `region` listening on `port`,
    /// with apps on `*.<region>.apps.localhost`, plus `extra` flags (which
    /// win over these defaults). Panics with the log when it does not start.
    pub async fn start(
        primary: &str,
        token: &str,
        region: &str,
        port: u16,
        extra: &[&str],
        log_dir: &Path,
    ) -> Self {
        let mut launch = Launch::for_tests(&format!("edge-{region}"), log_dir)
            .args(["--primary-url", primary])
            .envs([("DEVMESH_EDGE_TOKEN", token)]);
        // The access URL must name the real port: the primary calls the
        // edge's /healthz-report there.
        let defaults = [
            ("--listen", format!("127.0.0.1:{port}")),
            ("--relay-address", "127.0.0.1:0".to_owned()),
            ("--access-url", format!("http://127.0.0.1:{port}")),
            (
                "--wildcard-access-url",
                format!("*.{region}.apps.localhost"),
            ),
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                launch = launch.args([flag, &value]);
            }
        }
        Self::launch(launch.args(extra), Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `devmesh edge` of the test binary with nothing but a settings
    /// file.
    pub async fn start_with_config(config: &Path, log_dir: &Path) -> Self {
        let launch = Launch::for_tests("edge", log_dir)
            .args(["--config".to_owned(), config.display().to_string()]);
        Self::launch(launch, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The HTTP port.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the listener's URL ends with its port")
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: Signal) {
        self.process.signal(sig);
    }

    /// Waits for the process to exit on its own; panics after `secs`.
    pub async fn wait(&mut self, secs: u64) -> ExitStatus {
        self.process
            .wait(Duration::from_secs(secs))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// What the edge logged.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(mut self) {
        self.process.kill().await;
    }
}

/// A `devmesh agent`, killed on drop.
#[derive(Debug)]
pub struct AgentProcess {
    /// The process.
    pub process: Process,
}

impl AgentProcess {
    /// Starts `devmesh agent` for the primary at `primary_url` with the
    /// agent token `token`, plus `launch`'s environment.
    pub fn launch(primary_url: &str, token: &str, launch: Launch) -> anyhow::Result<Self> {
        let mut cmd = launch.command("agent");
        cmd.env("DEVMESH_URL", primary_url)
            .env("DEVMESH_AGENT_TOKEN", token);
        Ok(Self {
            process: Process::spawn(cmd, launch.log)?,
        })
    }

    /// [`AgentProcess::launch`] of the test binary.
    pub fn start(primary_url: &str, token: &str, log_dir: &Path) -> Self {
        Self::start_with(primary_url, token, log_dir, &[])
    }

    /// [`AgentProcess::start`] with extra environment.
    pub fn start_with(
        primary_url: &str,
        token: &str,
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let launch = Launch::for_tests("agent", log_dir).envs(env.iter().copied());
        Self::launch(primary_url, token, launch).expect("spawn devmesh agent")
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: Signal) {
        self.process.signal(sig);
    }

    /// SIGTERM and wait for the exit; panics after 30 s.
    pub async fn stop(mut self) -> ExitStatus {
        self.process
            .terminate(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) {
        self.process.kill().await;
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.process.log
    }
}

// === Tools ===

/// Polls `check` every 50 ms until it returns `Some`; panics after `secs`
/// seconds naming `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resolves every name to 127.0.0.1, so `*.apps.localhost` (and every
/// region's app domain) reaches the local servers whatever the system
/// resolver thinks of `.localhost`.
#[derive(Debug, Clone)]
pub struct Loopback;

impl reqwest::dns::Resolve for Loopback {
    fn resolve(&self, _: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async {
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once(std::net::SocketAddr::from(
                ([127, 0, 0, 1], 0),
            )));
            Ok(addrs)
        })
    }
}

/// A free loopback TCP port (bound and released: a small race that a
/// daemon's start-up catches).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free loopback UDP port.
pub fn free_udp_port() -> std::io::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `sh -c` forked, as it wrote the pid into its log.
    async fn forked_pid(log: &Path) -> i32 {
        eventually(10, "the forked pid in the log", || async {
            std::fs::read_to_string(log).ok()?.trim().parse().ok()
        })
        .await
    }

    fn alive(pid: i32) -> bool {
        // A zombie awaiting its reaper counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split(' ').nth(2).is_none_or(|state| state != "Z"))
    }

    #[tokio::test]
    async fn a_group_leader_takes_what_it_forked_with_it_and_a_plain_child_does_not() {
        let dir = tempfile::tempdir().unwrap();
        for (group, survives) in [(true, false), (false, true)] {
            let log = dir.path().join(format!("group-{group}.log"));
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "sleep 30 & echo $!; wait"]);
            let process = if group {
                Process::spawn_group(cmd, log.clone()).unwrap()
            } else {
                Process::spawn(cmd, log.clone()).unwrap()
            };
            let forked = forked_pid(&log).await;
            let leader = process.pid().expect("running") as i32;
            assert!(alive(forked));
            drop(process);
            // Once the leader is gone, what it forked is gone with it, or
            // not, depending on the group.
            eventually(5, "the leader to die", || async {
                (!alive(leader)).then_some(())
            })
            .await;
            if !survives {
                eventually(5, "the forked process to die", || async {
                    (!alive(forked)).then_some(())
                })
                .await;
            }
            assert_eq!(alive(forked), survives, "group {group}");
            if survives {
                let _ = kill(Pid::from_raw(forked), Signal::SIGKILL);
            }
        }
    }
}
