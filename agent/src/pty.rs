//! Reconnecting terminals on `Pty` streams: a terminal outlives the
//! stream that started it. A client that drops and comes back within the
//! grace period with the same session id gets the same shell, first with
//! the output it kept of the recent past ([`KEEP`] bytes); a newer client
//! for a session takes it over from an older one. A terminal ends when its
//! command does (its client's stream then ends), or when no client came
//! back within the grace period (its command is killed).
//!
//! A malformed frame from a client ends that client's stream only; the
//! terminal waits for a reconnect as if it had dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use devmesh_shared::tunnel::pty::Frame;
use devmesh_shared::tunnel::status;
use parking_lot::Mutex;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::tunnel::{answer_and_finish, stream_code};

/// Recent output replayed to a client that reconnects.
pub(crate) const KEEP: usize = 64 * 1024;
/// The most terminals an agent keeps at once.
const MAX_TERMINALS: usize = 64;
/// The type of terminal clients get.
const TERM: &str = "xterm-256color";
/// Chunks of output in flight to one client before the terminal waits.
const IN_FLIGHT: usize = 64;
/// How long output may wait for a client before the client is let go.
const STALLED: Duration = Duration::from_secs(10);

static GRACE: OnceLock<Duration> = OnceLock::new();
static TERMINALS: LazyLock<Mutex<HashMap<Uuid, Arc<Terminal>>>> = LazyLock::new(Default::default);

/// Sets how long a terminal waits for its client to come back.
pub(crate) fn set_grace(grace: Duration) {
    let _ = GRACE.set(grace);
}

fn grace() -> Duration {
    GRACE.get().copied().unwrap_or(Duration::from_secs(300))
}

/// One terminal and whoever is attached to it.
struct Terminal {
    input: tokio::sync::Mutex<pty_process::OwnedWritePty>,
    state: Mutex<State>,
    /// Cancelled to kill the command.
    kill: CancellationToken,
}

#[derive(Default)]
struct State {
    recent: VecDeque<u8>,
    /// The attached client: its number and where its output goes.
    client: Option<(u64, mpsc::Sender<Vec<u8>>)>,
    /// Clients attached so far (numbers them).
    attached: u64,
    exited: bool,
}

/// Serves a `Pty` stream: attaches to terminal `session`, or starts one
/// running `command` (empty: a login shell) at `cols`×`rows`.
pub(crate) async fn serve(
    (session, cols, rows, command): (Uuid, u16, u16, String),
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let Some(env) = crate::ssh::script_env() else {
        tracing::debug!("a terminal stream before the manifest");
        return answer_and_finish(send, recv, status::UNSUPPORTED).await;
    };
    let (cols, rows) = (
        if cols == 0 { 80 } else { cols },
        if rows == 0 { 24 } else { rows },
    );
    let terminal = match find_or_start(session, env, &command, cols, rows) {
        Ok((terminal, resumed)) => {
            if resumed {
                let _ = terminal
                    .input
                    .lock()
                    .await
                    .resize(pty_process::Size::new(rows, cols));
            }
            terminal
        }
        Err(e) => {
            tracing::info!(%session, error = %e, "cannot start a terminal");
            return answer_and_finish(send, recv, status::REFUSED).await;
        }
    };
    // Attached before anything can fail, so every way out detaches (and a
    // terminal nobody reaches ends after the grace period).
    let (me, replay, mut output) = terminal.attach();
    if send.write_all(&[status::OK]).await.is_err() {
        terminal.detach(session, me);
        return;
    }
    // Output: what was kept, then what comes, until the terminal ends or a
    // newer client takes over.
    let writer = tokio::spawn(async move {
        if send.write_all(&replay).await.is_err() {
            return;
        }
        while let Some(chunk) = output.recv().await {
            if send.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    // Input, until the client goes.
    loop {
        match Frame::read(&mut recv).await {
            Ok(Some(Frame::Input(bytes))) => {
                if terminal.input.lock().await.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            Ok(Some(Frame::Resize { cols, rows })) if cols > 0 && rows > 0 => {
                let _ = terminal
                    .input
                    .lock()
                    .await
                    .resize(pty_process::Size::new(rows, cols));
            }
            Ok(Some(Frame::Resize { .. })) => {}
            Ok(None) => break,
            Err(e) => {
                tracing::info!(%session, error = %e, "ending a terminal client's stream");
                let _ = recv.stop(stream_code::BAD_HEADER);
                writer.abort();
                break;
            }
        }
    }
    terminal.detach(session, me);
}

/// The terminal `session`, and whether it already ran; else a new one.
fn find_or_start(
    session: Uuid,
    env: &crate::scripts::ScriptEnv,
    command: &str,
    cols: u16,
    rows: u16,
) -> std::io::Result<(Arc<Terminal>, bool)> {
    let mut all = TERMINALS.lock();
    if let Some(t) = all.get(&session) {
        return Ok((t.clone(), true));
    }
    if all.len() >= MAX_TERMINALS {
        return Err(std::io::Error::other(format!(
            "this agent already keeps {MAX_TERMINALS} terminals"
        )));
    }
    let command = (!command.trim().is_empty()).then_some(command);
    let (pty, child) = crate::ssh::open_terminal(
        env,
        &crate::ssh::user_shell(),
        command,
        (TERM, cols, rows),
        &[],
    )?;
    let (output, input) = pty.into_split();
    let terminal = Arc::new(Terminal {
        input: tokio::sync::Mutex::new(input),
        state: Mutex::new(State::default()),
        kill: CancellationToken::new(),
    });
    all.insert(session, terminal.clone());
    tokio::spawn(run(session, terminal.clone(), output, child));
    tracing::info!(%session, "terminal started");
    Ok((terminal, false))
}

/// Keeps the terminal's output and passes it on, until the command ends
/// (or is killed) and nothing holds the terminal open.
async fn run(
    session: Uuid,
    terminal: Arc<Terminal>,
    mut output: pty_process::OwnedReadPty,
    mut child: tokio::process::Child,
) {
    let copy = {
        let terminal = terminal.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            // Ends with an error once nothing holds the terminal open.
            while let Ok(n) = output.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let client = {
                    let mut state = terminal.state.lock();
                    state.recent.extend(&buf[..n]);
                    let excess = state.recent.len().saturating_sub(KEEP);
                    state.recent.drain(..excess);
                    state.client.as_ref().map(|(_, tx)| tx.clone())
                };
                if let Some(tx) = client {
                    // A slow client slows the terminal, as a real one would;
                    // one that takes nothing for a while (a laptop asleep) is
                    // let go, so a client that reconnects is not stuck
                    // behind it.
                    let sent = tokio::time::timeout(STALLED, tx.send(buf[..n].to_vec())).await;
                    if sent.is_err() {
                        let mut state = terminal.state.lock();
                        if state
                            .client
                            .as_ref()
                            .is_some_and(|(_, t)| t.same_channel(&tx))
                        {
                            state.client = None;
                        }
                    }
                }
            }
        }
    };
    tokio::pin!(copy);
    tokio::select! {
        _ = child.wait() => {
            // What the command wrote last is still in the terminal.
            let _ = tokio::time::timeout(Duration::from_millis(200), &mut copy).await;
        }
        () = &mut copy => {
            let _ = child.wait().await;
        }
        () = terminal.kill.cancelled() => {
            // The shell leads its own session: hang up on all of it (jobs
            // it started included), then make sure.
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGHUP,
                );
            }
            if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
    {
        let mut state = terminal.state.lock();
        state.exited = true;
        // Its client's stream ends once what was sent is written.
        state.client = None;
    }
    let mut all = TERMINALS.lock();
    if all.get(&session).is_some_and(|t| Arc::ptr_eq(t, &terminal)) {
        all.remove(&session);
    }
    tracing::info!(%session, "terminal ended");
}

impl Terminal {
    /// Attaches a new client, replacing any other: its number, the output
    /// kept so far, and the output to come.
    fn attach(&self) -> (u64, Vec<u8>, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let mut state = self.state.lock();
        state.attached += 1;
        let me = state.attached;
        let replay = state.recent.iter().copied().collect();
        if !state.exited {
            state.client = Some((me, tx));
        }
        (me, replay, rx)
    }

    /// Client `me` went; unless another came since, the terminal waits the
    /// grace period for one and then ends.
    fn detach(self: &Arc<Self>, session: Uuid, me: u64) {
        {
            let mut state = self.state.lock();
            if state.attached != me {
                return;
            }
            state.client = None;
        }
        let terminal = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace()).await;
            if terminal.state.lock().attached == me {
                tracing::info!(%session, "no client came back to a terminal; ending it");
                terminal.kill.cancel();
            }
        });
    }
}
