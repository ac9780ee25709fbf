//! The agent's SSH server, on `Ssh` tunnel streams. The stream itself is
//! the authentication: the relay opened it only for the workspace's owner
//! (the primary checked who, and audits it), so the SSH layer accepts the
//! user as they come, with no key on disk. Commands run as the agent's user
//! in the agent's directory and environment, never with its token.
//!
//! Served: `exec` (a command with its exit status), `shell` (the login
//! shell), terminals (a pty of the client's size and `TERM`, resized as the
//! client's window changes), environment variables, end of input, and
//! local forwarding (`ssh -L`, `-D`: connections from the workspace to
//! where the client asks), remote forwarding (`ssh -R`: a listener in the
//! workspace whose connections come back to the client), and the `sftp`
//! subsystem (so `sftp` and `scp` work). Not yet: agent forwarding.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;

use russh::keys::PrivateKey;
use russh::server::{Auth, Handle, Msg, Session};
use russh::{Channel, ChannelId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};

use crate::scripts::ScriptEnv;

/// What SSH streams are served with: the server's settings and the
/// environment commands run in. Installed once the manifest is known; an
/// agent process serves one agent.
struct Service {
    config: Arc<russh::server::Config>,
    env: ScriptEnv,
}

static SERVICE: std::sync::OnceLock<Service> = std::sync::OnceLock::new();

/// Makes `Ssh` streams served, with commands in `env`.
pub(crate) fn install(env: ScriptEnv) -> anyhow::Result<()> {
    let config = config()?;
    let _ = SERVICE.set(Service { config, env });
    Ok(())
}

/// Whether `Ssh` streams are served yet.
pub(crate) fn ready() -> bool {
    SERVICE.get().is_some()
}

/// Serves one `Ssh` stream (dropped when SSH is not installed).
pub(crate) fn spawn_session<S>(stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if let Some(service) = SERVICE.get() {
        tokio::spawn(serve(service.config.clone(), service.env.clone(), stream));
    }
}

/// The server's settings and host key (new each time the agent starts: the
/// tunnel, not the key, proves which workspace this is).
fn config() -> anyhow::Result<Arc<russh::server::Config>> {
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ));
    Ok(Arc::new(russh::server::Config {
        keys: vec![key],
        auth_rejection_time: std::time::Duration::from_millis(0),
        auth_rejection_time_initial: Some(std::time::Duration::from_millis(0)),
        inactivity_timeout: None,
        ..Default::default()
    }))
}

/// Serves one SSH connection over `stream` until it ends.
async fn serve<S>(config: Arc<russh::server::Config>, env: ScriptEnv, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handler = Sessions {
        forwards: HashMap::new(),
        agent_socket: None,
        env,
        channels: HashMap::new(),
        pending: HashMap::new(),
    };
    match russh::server::run_stream(config, stream, handler).await {
        Ok(running) => {
            if let Err(e) = running.await {
                tracing::debug!(error = %e, "ssh session ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "ssh handshake failed"),
    }
}

/// Where a channel's input goes.
enum Input {
    /// A command's standard input.
    Pipe(ChildStdin),
    /// A terminal (also resized through it).
    Pty(pty_process::OwnedWritePty),
}

/// A terminal the client asked for.
#[derive(Clone)]
struct Terminal {
    term: String,
    cols: u16,
    rows: u16,
}

/// One channel's state.
#[derive(Default)]
struct ChannelState {
    env: Vec<(String, String)>,
    terminal: Option<Terminal>,
    stdin: Option<Input>,
}

struct Sessions {
    /// Listeners of remote forwards (`ssh -R`), by address and port; each
    /// stops when its entry goes (cancelled, or the session ended).
    forwards: HashMap<(String, u32), tokio_util::sync::DropGuard>,
    /// The socket forwarded agent requests come to (`ssh -A`), once asked
    /// for; removed with the session.
    agent_socket: Option<AgentSocket>,
    env: ScriptEnv,
    channels: HashMap<ChannelId, ChannelState>,
    /// Session channels not yet given a use: a subsystem takes the channel
    /// itself as a stream.
    pending: HashMap<ChannelId, Channel<Msg>>,
}

impl Sessions {
    /// Starts `command` (`None`: the login shell) on `channel`, streaming
    /// its output and, when it ends, its exit status.
    fn start(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        handle: Handle,
    ) -> std::io::Result<()> {
        let shell = user_shell();
        if let Some(terminal) = self.channels.get(&channel).and_then(|c| c.terminal.clone()) {
            return self.start_terminal(channel, &shell, command, terminal, handle);
        }
        let mut cmd = Command::new(&shell);
        match &command {
            Some(c) => cmd.arg("-c").arg(c),
            None => cmd.arg("-l"),
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        self.env.apply(&mut cmd);
        let state = self.channels.entry(channel).or_default();
        cmd.envs(state.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn()?;
        state.stdin = child.stdin.take().map(Input::Pipe);
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        tokio::spawn(async move {
            let out = {
                let handle = handle.clone();
                async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = stdout.read(&mut buf).await {
                        if n == 0 || handle.data(channel, buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                }
            };
            let err = {
                let handle = handle.clone();
                async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = stderr.read(&mut buf).await {
                        if n == 0
                            || handle
                                .extended_data(channel, 1, buf[..n].to_vec())
                                .await
                                .is_err()
                        {
                            break;
                        }
                    }
                }
            };
            tokio::join!(out, err);
            ended(&handle, channel, child.wait().await).await;
        });
        Ok(())
    }
}

impl Sessions {
    /// Like [`Sessions::start`], on a new terminal the command leads.
    fn start_terminal(
        &mut self,
        channel: ChannelId,
        shell: &str,
        command: Option<String>,
        terminal: Terminal,
        handle: Handle,
    ) -> std::io::Result<()> {
        let extra = self
            .channels
            .get(&channel)
            .map(|c| c.env.clone())
            .unwrap_or_default();
        let (pty, mut child) = open_terminal(
            &self.env,
            shell,
            command.as_deref(),
            (&terminal.term, terminal.cols, terminal.rows),
            &extra,
        )?;
        let state = self.channels.entry(channel).or_default();
        let (mut output, input) = pty.into_split();
        state.stdin = Some(Input::Pty(input));
        tokio::spawn(async move {
            let copy = async {
                let mut buf = vec![0u8; 32 * 1024];
                // Ends with an error once nothing holds the terminal open.
                while let Ok(n) = output.read(&mut buf).await {
                    if n == 0 || handle.data(channel, buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            };
            tokio::pin!(copy);
            let status = tokio::select! {
                s = child.wait() => {
                    // What the command wrote last is still in the terminal.
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), &mut copy).await;
                    s
                }
                () = &mut copy => child.wait().await,
            };
            ended(&handle, channel, status).await;
        });
        Ok(())
    }
}

impl Sessions {
    /// Starts `command` (`None`: the shell) on `channel` and tells the
    /// client whether it could.
    fn begin(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        // The channel's use is known now: its messages go to the callbacks.
        self.pending.remove(&channel);
        match self.start(channel, command, session.handle()) {
            Ok(()) => session.channel_success(channel)?,
            Err(e) => {
                tracing::debug!(error = %e, "cannot start an ssh command or shell");
                session.channel_failure(channel)?;
            }
        }
        Ok(())
    }
}

/// Starts `command` (`None`: a login shell) through `shell`, leading a new
/// terminal of type `term` and size `cols`×`rows`, in `env` plus `extra`;
/// the agent's token is never in its environment.
pub(crate) fn open_terminal(
    env: &ScriptEnv,
    shell: &str,
    command: Option<&str>,
    (term, cols, rows): (&str, u16, u16),
    extra: &[(String, String)],
) -> std::io::Result<(pty_process::Pty, tokio::process::Child)> {
    let failed = |e: pty_process::Error| std::io::Error::other(e.to_string());
    let (pty, pts) = pty_process::open().map_err(failed)?;
    pty.resize(pty_process::Size::new(rows, cols))
        .map_err(failed)?;
    let mut cmd = pty_process::Command::new(shell);
    cmd = match command {
        Some(c) => cmd.arg("-c").arg(c),
        None => cmd.arg("-l"),
    };
    cmd = cmd
        .env_remove(crate::scripts::TOKEN_ENV)
        .envs(&env.env)
        .env(crate::scripts::AGENT_ENV, "1")
        .env("TERM", term)
        .kill_on_drop(true);
    if let Some(dir) = &env.directory {
        cmd = cmd.current_dir(dir);
    }
    cmd = cmd.envs(extra.iter().map(|(k, v)| (k, v)));
    let child = cmd.spawn(pts).map_err(failed)?;
    Ok((pty, child))
}

/// The user's shell (`$SHELL`, else `/bin/sh`).
pub(crate) fn user_shell() -> String {
    std::env::var("SHELL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".into())
}

/// The environment commands run in, once the manifest is known.
pub(crate) fn script_env() -> Option<&'static ScriptEnv> {
    SERVICE.get().map(|s| &s.env)
}

/// A Unix socket in a directory of its own (mode 0700), whose connections
/// each become an agent channel back to the client (`ssh -A`). The
/// directory goes when the session does.
struct AgentSocket {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
    _stop: tokio_util::sync::DropGuard,
}

impl AgentSocket {
    fn listen(handle: Handle) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let mut name = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut name);
        let dir =
            std::env::temp_dir().join(format!("devmesh-ssh-{:016x}", u64::from_le_bytes(name)));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("agent.sock");
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = until.cancelled() => return,
                };
                let Ok((mut unix, _)) = accepted else {
                    continue;
                };
                let handle = handle.clone();
                tokio::spawn(async move {
                    if let Ok(channel) = handle.channel_open_agent().await {
                        let mut stream = channel.into_stream();
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut unix).await;
                    }
                });
            }
        });
        Ok(Self {
            dir,
            path,
            _stop: stop.drop_guard(),
        })
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Tells the client how the command on `channel` ended (a signal as
/// 128 + its number, as shells do) and closes the channel.
async fn ended(
    handle: &Handle,
    channel: ChannelId,
    status: std::io::Result<std::process::ExitStatus>,
) {
    let code = match status {
        Ok(s) => s.code().unwrap_or(128 + signal_of(&s)),
        Err(_) => 255,
    };
    let _ = handle.exit_status_request(channel, code as u32).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

fn signal_of(status: &std::process::ExitStatus) -> i32 {
    std::os::unix::process::ExitStatusExt::signal(status).unwrap_or(127)
}

impl russh::server::Handler for Sessions {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), ChannelState::default());
        self.pending.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The token stays the agent's, whatever the client sends.
        if name != "DEVMESH_AGENT_TOKEN" {
            self.channels
                .entry(channel)
                .or_default()
                .env
                .push((name.to_owned(), value.to_owned()));
        }
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.begin(channel, Some(command), session)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.begin(channel, None, session)
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let written = match self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.stdin.as_mut())
        {
            Some(Input::Pipe(p)) => p.write_all(data).await,
            Some(Input::Pty(t)) => t.write_all(data).await,
            None => Ok(()),
        };
        if written.is_err() {
            // The command stopped reading; what it said still comes back.
            self.channels.get_mut(&channel).map(|c| c.stdin.take());
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // End of input closes a command's stdin; a terminal stays (its
        // shell ends with `exit`, as at a desk).
        if let Some(c) = self.channels.get_mut(&channel)
            && matches!(c.stdin, Some(Input::Pipe(_)))
        {
            c.stdin = None;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let clamp = |v: u32, default: u16| match u16::try_from(v) {
            Ok(0) | Err(_) => default,
            Ok(v) => v,
        };
        let term = if term.is_empty() || term.len() > 64 || term.chars().any(char::is_control) {
            "xterm".to_owned()
        } else {
            term.to_owned()
        };
        self.channels.entry(channel).or_default().terminal = Some(Terminal {
            term,
            cols: clamp(cols, 80),
            rows: clamp(rows, 24),
        });
        session.channel_success(channel)?;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(Input::Pty(t)) = self.channels.get(&channel).and_then(|c| c.stdin.as_ref())
            && let (Ok(cols), Ok(rows)) = (u16::try_from(cols), u16::try_from(rows))
            && cols > 0
            && rows > 0
        {
            let _ = t.resize(pty_process::Size::new(rows, cols));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(port) = u16::try_from(port) else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        // Connect first, so a refused port is refused to the client at once.
        let connect = tokio::net::TcpStream::connect((host.to_owned(), port));
        match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
            Ok(Ok(mut tcp)) => {
                let _ = tcp.set_nodelay(true);
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
            _ => {
                tracing::debug!(host, port, "a forwarded connection was refused");
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.pending.remove(&channel)) {
            ("sftp", Some(ch)) => {
                session.channel_success(channel)?;
                let home = self
                    .env
                    .directory
                    .clone()
                    .or_else(|| std::env::var_os("HOME").map(Into::into))
                    .unwrap_or_else(|| "/".into());
                // The sftp server runs on one end of a pipe, the channel is
                // spliced to the other: when both are done the client gets
                // an exit status, as from OpenSSH's sftp-server (scp fails
                // without one).
                let (ours, theirs) = tokio::io::duplex(256 * 1024);
                russh_sftp::server::run(theirs, crate::sftp::Sftp::new(home)).await;
                let handle = session.handle();
                tokio::spawn(async move {
                    let mut stream = ch.into_stream();
                    let mut ours = ours;
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut ours).await;
                    let _ = handle.exit_status_request(channel, 0).await;
                    let _ = handle.eof(channel).await;
                    let _ = handle.close(channel).await;
                });
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Listen in the workspace (loopback unless the client names an
        // address); each connection becomes a channel back to the client.
        let bind = match address {
            "" | "localhost" => "127.0.0.1",
            "*" | "0.0.0.0" => "0.0.0.0",
            other => other,
        };
        let Ok(wanted) = u16::try_from(*port) else {
            return Ok(false);
        };
        let listener = match tokio::net::TcpListener::bind((bind, wanted)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(address, port = wanted, error = %e, "cannot listen for a remote forward");
                return Ok(false);
            }
        };
        let Ok(local) = listener.local_addr() else {
            return Ok(false);
        };
        *port = u32::from(local.port());
        let stop = tokio_util::sync::CancellationToken::new();
        let (handle, address) = (session.handle(), address.to_owned());
        let announced = (address.clone(), *port);
        let until = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = until.cancelled() => return,
                };
                let Ok((mut tcp, peer)) = accepted else {
                    continue;
                };
                let (handle, address) = (handle.clone(), address.clone());
                let port = u32::from(local.port());
                tokio::spawn(async move {
                    let opened = handle
                        .channel_open_forwarded_tcpip(
                            address,
                            port,
                            peer.ip().to_string(),
                            u32::from(peer.port()),
                        )
                        .await;
                    if let Ok(channel) = opened {
                        let mut stream = channel.into_stream();
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                    }
                });
            }
        });
        self.forwards.insert(announced, stop.drop_guard());
        Ok(true)
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self.agent_socket.is_none() {
            match AgentSocket::listen(session.handle()) {
                Ok(s) => self.agent_socket = Some(s),
                Err(e) => {
                    tracing::info!(error = %e, "cannot offer agent forwarding");
                    session.channel_failure(channel)?;
                    return Ok(false);
                }
            }
        }
        if let Some(socket) = &self.agent_socket {
            let path = socket.path.to_string_lossy().into_owned();
            self.channels
                .entry(channel)
                .or_default()
                .env
                .push(("SSH_AUTH_SOCK".into(), path));
        }
        session.channel_success(channel)?;
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.forwards.remove(&(address.to_owned(), port)).is_some())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.pending.remove(&channel);
        Ok(())
    }
}
