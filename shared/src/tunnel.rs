//! Wire codecs of the agent↔relay QUIC tunnel (ALPN `devmesh-tunnel/1`).
//!
//! The agent opens one bidirectional control stream and exchanges
//! [`Control`] frames on it; the relay opens one bidirectional stream per
//! forwarded connection, starting with a [`StreamHeader`] frame after which
//! raw bytes follow. Both are sans-IO: [`StreamHeader::decode`] and
//! [`Control::decode`] take bytes and tell "incomplete" from "invalid";
//! [`io`] holds the only async reads and writes. What the control stream
//! says, and when, is [`session`]: one state machine per end.
//!
//! Every frame is `[version u8][kind u8][body_len u16 BE][body]`. The body
//! length is checked against [`MAX_FRAME_LEN`] before anything is allocated,
//! strings inside a body carry their own `u16` length, and a body with bytes
//! left over is invalid so that each value has exactly one encoding.

use thiserror::Error;

/// The ALPN protocol id of the tunnel.
pub const ALPN: &[u8] = b"devmesh-tunnel/1";
/// The ALPN protocol id of relay-to-relay mesh connections (mutual TLS on
/// mesh-CA certificates). Each stream starts with a [`MeshHeader`].
pub const MESH_ALPN: &[u8] = b"devmesh-mesh/1";
/// The frame version this code speaks; any other is refused.
pub const VERSION: u8 = 1;
/// Upper bound of any frame body.
pub const MAX_FRAME_LEN: usize = 16 * 1024;
/// Bytes before a frame's body: version, kind and body length.
pub const PREFIX_LEN: usize = 4;

/// QUIC application close codes on tunnels and mesh links, one meaning
/// each whichever side closes (agent codes below 16, relay codes from 16),
/// so a log line or a test names the reason without knowing who sent it.
pub mod close {
    /// The side closing shuts down.
    pub const SHUTDOWN: u32 = 0;
    /// Agent: the relay stopped answering pings or closed the control stream.
    pub const LOST: u32 = 1;
    /// Agent: the attach did not complete (refused, timed out, protocol error).
    pub const ATTACH_FAILED: u32 = 2;
    /// Agent: the connection only measured the round-trip time.
    pub const PROBE: u32 = 3;
    /// Agent: it attached to a nearer relay and leaves this one.
    pub const MOVED: u32 = 4;
    /// Relay: the first control message was not an attach.
    pub const EXPECTED_ATTACH: u32 = 16;
    /// Relay: the attach ticket was refused.
    pub const REFUSED: u32 = 17;
    /// Relay: the agent attached again; this older tunnel is dropped.
    pub const REPLACED: u32 = 18;
    /// Relay: a mesh connection without a client certificate.
    pub const NO_MESH_CERTIFICATE: u32 = 19;
    /// Relay: the certificate is not (or no longer) a listed mesh peer's.
    pub const NOT_A_MESH_PEER: u32 = 20;
}

/// QUIC stream error codes (RESET_STREAM / STOP_SENDING) on tunnel and
/// mesh streams.
pub mod stream_code {
    /// Done with the stream, nothing went wrong.
    pub const DONE: u32 = 0;
    /// The header was invalid or did not arrive in time.
    pub const BAD_HEADER: u32 = 1;
    /// The splice failed on one side; the other side is torn down.
    pub const FAILED: u32 = 2;
}

/// After reading a [`StreamHeader`], the agent answers with one status byte
/// before any raw bytes, so the relay can tell "the app refused" from "the
/// app closed". The relay may pipeline its first bytes without waiting.
pub mod status {
    /// Connected; raw bytes follow.
    pub const OK: u8 = 0x00;
    /// Nothing listens on the port (or it refused).
    pub const REFUSED: u8 = 0x01;
    /// The header kind is not served by this agent.
    pub const UNSUPPORTED: u8 = 0x02;
    /// Mesh streams only: the agent is not attached to this relay.
    pub const NOT_CONNECTED: u8 = 0x03;
    /// Mesh streams only: the grant does not authorise this stream.
    pub const DENIED: u8 = 0x04;
}

// Stream headers and control messages use disjoint kind ranges so a frame
// read on the wrong kind of stream fails as `UnknownKind` instead of being
// misread as something else.
const KIND_TCP: u8 = 0x01;
const KIND_SSH: u8 = 0x02;
const KIND_PTY: u8 = 0x03;
const KIND_PROBE: u8 = 0x04;
const KIND_UDP: u8 = 0x05;
const KIND_ATTACH: u8 = 0x10;
const KIND_ATTACHED: u8 = 0x11;
const KIND_REFUSED: u8 = 0x12;
const KIND_PING: u8 = 0x13;
const KIND_PONG: u8 = 0x14;
const KIND_MESH: u8 = 0x20;

// === Types ===

/// The first frame of every relay-opened stream (relay → agent): what the
/// agent should connect the stream to. Raw bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamHeader {
    /// Forward to `127.0.0.1:port` on the agent's machine.
    Tcp {
        /// The local TCP port.
        port: u16,
    },
    /// Hand the stream to the agent's built-in SSH server.
    Ssh,
    /// A reconnecting terminal: attach to terminal `session`, or start
    /// `command` in a new one of the given size. After the status byte the
    /// agent sends the terminal's output (first what it kept of the recent
    /// past); the client sends [`pty`] frames.
    Pty {
        /// Chosen by the client; reconnecting with it gets the same terminal.
        session: uuid::Uuid,
        /// Terminal width in columns.
        cols: u16,
        /// Terminal height in rows.
        rows: u16,
        /// The command line; empty means the user's login shell.
        command: String,
    },
    /// Measures the path (`devmesh ping`, `devmesh speedtest`): the agent
    /// reads and discards what the client sends until it finishes, then
    /// answers with how many bytes that was (a big-endian `u64`), then sends
    /// `download` zero bytes, then finishes.
    Probe {
        /// Bytes the agent sends after the count; at most [`MAX_PROBE_BYTES`].
        download: u64,
    },
    /// UDP datagrams to `127.0.0.1:port` on the agent's machine, one flow
    /// (one client address) per stream, each way framed as a big-endian
    /// `u16` length and the datagram.
    Udp {
        /// The local UDP port.
        port: u16,
    },
}

/// The most a [`StreamHeader::Probe`] may ask the agent to send.
pub const MAX_PROBE_BYTES: u64 = 4 << 30;

/// The first frame of every stream on a mesh connection (relay → home
/// relay): which attached agent the stream is for and what to open there.
/// The home relay answers with one [`status`] byte, then raw bytes flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshHeader {
    /// The agent, which must be attached to the receiving relay.
    pub agent_id: uuid::Uuid,
    /// What authorises the stream, signed by the primary: an app token or a
    /// stream grant naming this agent and this port (see
    /// `devmesh_shared::signing`). A mesh certificate alone opens nothing.
    pub grant: String,
    /// The stream to open to it.
    pub inner: StreamHeader,
}

/// A message on the agent-opened control stream, in either direction.
/// `Debug` masks the attach ticket: it works as a credential until it expires.
#[derive(Clone, PartialEq, Eq)]
pub enum Control {
    /// Agent → relay, the first message: the signed attach ticket.
    Attach {
        /// The ticket, as minted by the primary.
        ticket: String,
    },
    /// Relay → agent: the ticket was accepted.
    Attached {
        /// The relay's name, for the agent's logs.
        relay: String,
    },
    /// Relay → agent: the ticket was refused; the relay closes next.
    Refused {
        /// Why, for a person.
        reason: String,
    },
    /// Liveness probe; the peer answers with a [`Control::Pong`].
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Answer to a [`Control::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The first byte is not [`VERSION`].
    #[error("unsupported tunnel version {0}")]
    UnsupportedVersion(u8),
    /// The kind byte names no frame of the type being decoded.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The announced body length exceeds [`MAX_FRAME_LEN`].
    #[error("frame body of {len} bytes exceeds {max}")]
    TooLong {
        /// The announced body length.
        len: usize,
        /// The limit, [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// A string field is not UTF-8.
    #[error("string is not valid utf-8")]
    InvalidUtf8,
    /// The body does not match its kind's layout (too short, or bytes left
    /// over); the detail says which.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// Why a value cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The body would exceed [`MAX_FRAME_LEN`], so no peer would accept it.
    #[error("frame body of {len} bytes exceeds {max}")]
    TooLong {
        /// The body length the value needs.
        len: usize,
        /// The limit, [`MAX_FRAME_LEN`].
        max: usize,
    },
}

// === StreamHeader ===

impl StreamHeader {
    fn known_kind(kind: u8) -> bool {
        matches!(kind, KIND_TCP | KIND_SSH | KIND_PTY | KIND_PROBE | KIND_UDP)
    }

    /// The length of the body this header encodes to.
    fn body_len(&self) -> usize {
        match self {
            StreamHeader::Tcp { .. } => 2,
            StreamHeader::Ssh => 0,
            StreamHeader::Pty { command, .. } => 16 + 2 + 2 + 2 + command.len(),
            StreamHeader::Probe { .. } => 8,
            StreamHeader::Udp { .. } => 2,
        }
    }

    /// Appends the frame to `out`, or leaves `out` untouched if the body
    /// would exceed [`MAX_FRAME_LEN`].
    pub fn try_encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let len = check_body_len(self.body_len())?;
        match self {
            StreamHeader::Tcp { port } => {
                put_prefix(out, KIND_TCP, len);
                out.extend_from_slice(&port.to_be_bytes());
            }
            StreamHeader::Ssh => put_prefix(out, KIND_SSH, len),
            StreamHeader::Pty {
                session,
                cols,
                rows,
                command,
            } => {
                put_prefix(out, KIND_PTY, len);
                out.extend_from_slice(session.as_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
                out.extend_from_slice(&rows.to_be_bytes());
                put_str(out, command);
            }
            StreamHeader::Probe { download } => {
                put_prefix(out, KIND_PROBE, len);
                out.extend_from_slice(&download.to_be_bytes());
            }
            StreamHeader::Udp { port } => {
                put_prefix(out, KIND_UDP, len);
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Appends the frame to `out`.
    ///
    /// # Panics
    ///
    /// If `command` is so long that the body exceeds [`MAX_FRAME_LEN`]; use
    /// [`StreamHeader::try_encode`] for values that are not known to fit.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.try_encode(out) {
            panic!("cannot encode stream header: {e}");
        }
    }

    /// Decodes one header from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `Ok(Some((header, consumed)))`
    /// means the header took the first `consumed` bytes and whatever follows
    /// is the stream's payload. Never panics, and allocates at most
    /// [`MAX_FRAME_LEN`] bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(StreamHeader, usize)>, DecodeError> {
        let Some(Frame {
            kind,
            body,
            consumed,
        }) = split_frame(buf, Self::known_kind)?
        else {
            return Ok(None);
        };
        let mut r = Body(body);
        let header = match kind {
            KIND_TCP => StreamHeader::Tcp { port: r.u16()? },
            KIND_SSH => StreamHeader::Ssh,
            KIND_PTY => StreamHeader::Pty {
                session: uuid::Uuid::from_bytes(r.take()?),
                cols: r.u16()?,
                rows: r.u16()?,
                command: r.string()?,
            },
            KIND_PROBE => StreamHeader::Probe { download: r.u64()? },
            KIND_UDP => StreamHeader::Udp { port: r.u16()? },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(Some((header, consumed)))
    }
}

// === MeshHeader ===

impl MeshHeader {
    fn known_kind(kind: u8) -> bool {
        kind == KIND_MESH
    }

    /// Appends the frame to `out`, or leaves `out` untouched if it would not fit.
    pub fn try_encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut inner = Vec::new();
        self.inner.try_encode(&mut inner)?;
        let len = check_body_len(16 + 2 + self.grant.len() + inner.len())?;
        put_prefix(out, KIND_MESH, len);
        out.extend_from_slice(self.agent_id.as_bytes());
        put_str(out, &self.grant);
        out.extend_from_slice(&inner);
        Ok(())
    }

    /// Decodes one mesh header from the front of `buf`, like
    /// [`StreamHeader::decode`]; the inner header must fill the rest of the body.
    pub fn decode(buf: &[u8]) -> Result<Option<(MeshHeader, usize)>, DecodeError> {
        let Some(Frame { body, consumed, .. }) = split_frame(buf, Self::known_kind)? else {
            return Ok(None);
        };
        let mut r = Body(body);
        let agent_id = uuid::Uuid::from_bytes(r.take()?);
        let grant = r.string()?;
        let inner = match StreamHeader::decode(r.0)? {
            Some((inner, used)) if used == r.0.len() => inner,
            Some(_) => return Err(DecodeError::Malformed("trailing bytes in body")),
            None => return Err(DecodeError::Malformed("truncated inner header")),
        };
        Ok(Some((
            MeshHeader {
                agent_id,
                grant,
                inner,
            },
            consumed,
        )))
    }
}

// === Control ===

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Attach { .. } => f.debug_struct("Attach").field("ticket", &"****").finish(),
            Self::Attached { relay } => f.debug_struct("Attached").field("relay", relay).finish(),
            Self::Refused { reason } => f.debug_struct("Refused").field("reason", reason).finish(),
            Self::Ping { nonce } => f.debug_struct("Ping").field("nonce", nonce).finish(),
            Self::Pong { nonce } => f.debug_struct("Pong").field("nonce", nonce).finish(),
        }
    }
}

impl Control {
    fn known_kind(kind: u8) -> bool {
        matches!(
            kind,
            KIND_ATTACH | KIND_ATTACHED | KIND_REFUSED | KIND_PING | KIND_PONG
        )
    }

    /// The length of the body this message encodes to.
    fn body_len(&self) -> usize {
        match self {
            Control::Attach { ticket: s }
            | Control::Attached { relay: s }
            | Control::Refused { reason: s } => 2 + s.len(),
            Control::Ping { .. } | Control::Pong { .. } => 8,
        }
    }

    /// Appends the frame to `out`, or leaves `out` untouched if the body
    /// would exceed [`MAX_FRAME_LEN`].
    pub fn try_encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let len = check_body_len(self.body_len())?;
        let (kind, string, nonce) = match self {
            Control::Attach { ticket } => (KIND_ATTACH, Some(ticket), None),
            Control::Attached { relay } => (KIND_ATTACHED, Some(relay), None),
            Control::Refused { reason } => (KIND_REFUSED, Some(reason), None),
            Control::Ping { nonce } => (KIND_PING, None, Some(*nonce)),
            Control::Pong { nonce } => (KIND_PONG, None, Some(*nonce)),
        };
        put_prefix(out, kind, len);
        if let Some(s) = string {
            put_str(out, s);
        }
        if let Some(n) = nonce {
            out.extend_from_slice(&n.to_be_bytes());
        }
        Ok(())
    }

    /// Appends the frame to `out`.
    ///
    /// # Panics
    ///
    /// If a string is so long that the body exceeds [`MAX_FRAME_LEN`]; use
    /// [`Control::try_encode`] for values that are not known to fit.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.try_encode(out) {
            panic!("cannot encode control message: {e}");
        }
    }

    /// Decodes one message from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `Ok(Some((message,
    /// consumed)))` means the message took the first `consumed` bytes. Never
    /// panics, and allocates at most [`MAX_FRAME_LEN`] bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(Control, usize)>, DecodeError> {
        let Some(Frame {
            kind,
            body,
            consumed,
        }) = split_frame(buf, Self::known_kind)?
        else {
            return Ok(None);
        };
        let mut r = Body(body);
        let message = match kind {
            KIND_ATTACH => Control::Attach {
                ticket: r.string()?,
            },
            KIND_ATTACHED => Control::Attached { relay: r.string()? },
            KIND_REFUSED => Control::Refused {
                reason: r.string()?,
            },
            KIND_PING => Control::Ping { nonce: r.u64()? },
            KIND_PONG => Control::Pong { nonce: r.u64()? },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(Some((message, consumed)))
    }
}

// === Framing ===

fn check_body_len(len: usize) -> Result<u16, EncodeError> {
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // MAX_FRAME_LEN < u16::MAX, so this cannot fail once checked above.
    u16::try_from(len).map_err(|_| EncodeError::TooLong {
        len,
        max: MAX_FRAME_LEN,
    })
}

fn put_prefix(out: &mut Vec<u8>, kind: u8, body_len: u16) {
    out.reserve(PREFIX_LEN + usize::from(body_len));
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&body_len.to_be_bytes());
}

/// Writes a length-prefixed string. Callers have bounded the body, so the
/// length fits in a `u16`.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Checks as much of the 4-byte prefix as `buf` holds and returns the body
/// length once the whole prefix is there. Each byte is checked as soon as it
/// arrives, so garbage fails fast and any prefix of a valid frame is merely
/// incomplete.
fn check_prefix(buf: &[u8], known_kind: fn(u8) -> bool) -> Result<Option<usize>, DecodeError> {
    if let Some(&version) = buf.first()
        && version != VERSION
    {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if let Some(&kind) = buf.get(1)
        && !known_kind(kind)
    {
        return Err(DecodeError::UnknownKind(kind));
    }
    let Some(&[hi, lo]) = buf.get(2..PREFIX_LEN) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(Some(len))
}

/// A complete frame found at the front of a buffer.
struct Frame<'a> {
    kind: u8,
    body: &'a [u8],
    /// Prefix plus body: where the next frame or the raw payload starts.
    consumed: usize,
}

/// Splits a complete frame off the front of `buf`.
fn split_frame(buf: &[u8], known_kind: fn(u8) -> bool) -> Result<Option<Frame<'_>>, DecodeError> {
    let Some(len) = check_prefix(buf, known_kind)? else {
        return Ok(None);
    };
    let consumed = PREFIX_LEN + len;
    let Some(body) = buf.get(PREFIX_LEN..consumed) else {
        return Ok(None);
    };
    Ok(Some(Frame {
        kind: buf[1],
        body,
        consumed,
    }))
}

/// A cursor over a complete body. Running short here is invalid, not
/// incomplete: the body length already said how many bytes there are.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let Some((head, rest)) = self.0.split_first_chunk::<N>() else {
            return Err(DecodeError::Malformed("body too short"));
        };
        self.0 = rest;
        Ok(*head)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.take().map(u16::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.take().map(u64::from_be_bytes)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        let Some((bytes, rest)) = self.0.split_at_checked(len) else {
            return Err(DecodeError::Malformed("string longer than body"));
        };
        self.0 = rest;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        Ok(s.to_owned())
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("trailing bytes in body"))
        }
    }
}

// === Async I/O ===

/// Reading and writing whole frames on tokio streams. These read exactly one
/// frame (prefix, then the announced body), never further, so the raw bytes
/// after a [`StreamHeader`] stay in the stream for the caller.
pub mod pty;
pub mod session;
pub mod udp;

pub mod io {
    use std::io::{Error, ErrorKind, Result};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::session::{AgentSession, Outbox, SessionError};
    use super::{
        Control, DecodeError, EncodeError, MeshHeader, PREFIX_LEN, StreamHeader, check_prefix,
    };

    /// Reads the header that opens a mesh stream.
    pub async fn read_mesh_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<MeshHeader> {
        let frame = read_frame(r, MeshHeader::known_kind, false)
            .await?
            .ok_or_else(|| Error::from(ErrorKind::UnexpectedEof))?;
        whole(MeshHeader::decode(&frame), frame.len())
    }

    /// Writes a mesh header and flushes it.
    pub async fn write_mesh_header<W: AsyncWrite + Unpin>(w: &mut W, h: &MeshHeader) -> Result<()> {
        let mut buf = Vec::new();
        h.try_encode(&mut buf).map_err(invalid_input)?;
        write_frame(w, &buf).await
    }

    /// Reads the header that opens a relay stream.
    ///
    /// End of stream anywhere before the header is complete is
    /// `UnexpectedEof`; an invalid header is `InvalidData`.
    pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader> {
        let frame = read_frame(r, StreamHeader::known_kind, false)
            .await?
            .ok_or_else(|| Error::from(ErrorKind::UnexpectedEof))?;
        whole(StreamHeader::decode(&frame), frame.len())
    }

    /// Writes a stream header and flushes it.
    ///
    /// A header too long to encode is `InvalidInput` and nothing is written.
    pub async fn write_header<W: AsyncWrite + Unpin>(w: &mut W, h: &StreamHeader) -> Result<()> {
        let mut buf = Vec::new();
        h.try_encode(&mut buf).map_err(invalid_input)?;
        write_frame(w, &buf).await
    }

    /// Reads the next control message.
    ///
    /// `Ok(None)` on a clean end of stream before the message's first byte;
    /// an end of stream inside a message is `UnexpectedEof` and an invalid
    /// message is `InvalidData`.
    pub async fn read_control<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Control>> {
        let Some(frame) = read_frame(r, Control::known_kind, true).await? else {
            return Ok(None);
        };
        whole(Control::decode(&frame), frame.len()).map(Some)
    }

    /// Reads the control messages of one stream, safe to cancel: a
    /// `select!` that drops [`ControlReader::next`] half-way through a
    /// message loses nothing, since the bytes read so far stay buffered for
    /// the next call (at most one frame, [`super::MAX_FRAME_LEN`], plus one
    /// read).
    #[derive(Debug)]
    pub struct ControlReader<R> {
        inner: R,
        buf: Vec<u8>,
    }

    impl<R: AsyncRead + Unpin> ControlReader<R> {
        /// Reads from `inner`.
        pub fn new(inner: R) -> Self {
            Self {
                inner,
                buf: Vec::new(),
            }
        }

        /// The next message, like [`read_control`]: `Ok(None)` on a clean
        /// end of stream between messages, `UnexpectedEof` inside one,
        /// `InvalidData` for garbage (found as soon as its prefix arrives).
        pub async fn next(&mut self) -> Result<Option<Control>> {
            loop {
                if let Some((message, used)) = Control::decode(&self.buf).map_err(invalid_data)? {
                    self.buf.drain(..used);
                    return Ok(Some(message));
                }
                let mut chunk = [0u8; 1024];
                // Cancel-safe: nothing is consumed unless the read completes.
                let n = self.inner.read(&mut chunk).await?;
                if n == 0 {
                    return if self.buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(ErrorKind::UnexpectedEof.into())
                    };
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }

    /// Writes a control message and flushes it.
    ///
    /// A message too long to encode is `InvalidInput` and nothing is written.
    pub async fn write_control<W: AsyncWrite + Unpin>(w: &mut W, c: &Control) -> Result<()> {
        let mut buf = Vec::new();
        c.try_encode(&mut buf).map_err(invalid_input)?;
        write_frame(w, &buf).await
    }

    /// Writes every message `session` has queued, in order.
    pub async fn flush<W: AsyncWrite + Unpin>(w: &mut W, session: &mut impl Outbox) -> Result<()> {
        while let Some(message) = session.transmit() {
            write_control(w, &message).await?;
        }
        Ok(())
    }

    /// The agent's opening exchange: presents the session's ticket on a
    /// fresh control stream and reads until the relay answers. Returns the
    /// relay's name; a refusal is [`SessionError::Refused`].
    pub async fn attach<W, R>(
        send: &mut W,
        recv: &mut R,
        session: &mut AgentSession,
    ) -> std::result::Result<String, SessionError>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        loop {
            flush(send, session).await?;
            if let Some(relay) = session.relay() {
                return Ok(relay.to_owned());
            }
            let message = read_control(recv).await?;
            session.receive(message, tokio::time::Instant::now())?;
        }
    }

    /// Reads one frame's bytes: the prefix, validated before the body is
    /// allocated, then exactly the body. `None` only if `eof_ok` and the
    /// stream ended before the first byte.
    async fn read_frame<R: AsyncRead + Unpin>(
        r: &mut R,
        known_kind: fn(u8) -> bool,
        eof_ok: bool,
    ) -> Result<Option<Vec<u8>>> {
        let mut prefix = [0u8; PREFIX_LEN];
        if r.read(&mut prefix[..1]).await? == 0 {
            return if eof_ok {
                Ok(None)
            } else {
                Err(ErrorKind::UnexpectedEof.into())
            };
        }
        r.read_exact(&mut prefix[1..]).await?;
        let len = check_prefix(&prefix, known_kind)
            .map_err(invalid_data)?
            .ok_or_else(|| invalid_data(DecodeError::Malformed("incomplete prefix")))?;
        let mut frame = vec![0u8; PREFIX_LEN + len];
        frame[..PREFIX_LEN].copy_from_slice(&prefix);
        r.read_exact(&mut frame[PREFIX_LEN..]).await?;
        Ok(Some(frame))
    }

    /// Turns the decode of a complete frame into its value. The frame was
    /// read by its own length, so anything but "all of it" is a bug here,
    /// reported rather than panicked on.
    fn whole<T>(
        decoded: std::result::Result<Option<(T, usize)>, DecodeError>,
        len: usize,
    ) -> Result<T> {
        match decoded.map_err(invalid_data)? {
            Some((value, consumed)) if consumed == len => Ok(value),
            _ => Err(invalid_data(DecodeError::Malformed(
                "frame length mismatch",
            ))),
        }
    }

    async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<()> {
        w.write_all(frame).await?;
        // Flushed so a buffered writer never holds a control message back.
        w.flush().await
    }

    fn invalid_data(e: DecodeError) -> Error {
        Error::new(ErrorKind::InvalidData, e)
    }

    fn invalid_input(e: EncodeError) -> Error {
        Error::new(ErrorKind::InvalidInput, e)
    }
}

// === Tests ===

#[cfg(test)]
mod tests {
    #[test]
    fn debug_never_shows_an_attach_ticket() {
        let c = super::Control::Attach {
            ticket: "secret-ticket".into(),
        };
        assert!(!format!("{c:?}").contains("secret-ticket"));
    }

    use proptest::prelude::*;

    use super::*;

    fn encoded_header(h: &StreamHeader) -> Vec<u8> {
        let mut out = Vec::new();
        h.encode(&mut out);
        out
    }

    fn encoded_control(c: &Control) -> Vec<u8> {
        let mut out = Vec::new();
        c.encode(&mut out);
        out
    }

    fn all_headers() -> Vec<StreamHeader> {
        vec![
            StreamHeader::Tcp { port: 8080 },
            StreamHeader::Ssh,
            StreamHeader::Pty {
                session: uuid::Uuid::from_u128(7),
                cols: 80,
                rows: 24,
                command: "htop -d 10 ✓".into(),
            },
            StreamHeader::Probe { download: 1 << 40 },
            StreamHeader::Udp { port: 53 },
            StreamHeader::Pty {
                session: uuid::Uuid::nil(),
                cols: 0,
                rows: u16::MAX,
                command: String::new(),
            },
        ]
    }

    fn all_controls() -> Vec<Control> {
        vec![
            Control::Attach {
                ticket: "eyJ.eyJ.sig".into(),
            },
            Control::Attached {
                relay: "eu-1".into(),
            },
            Control::Refused {
                reason: "ticket expired".into(),
            },
            Control::Ping { nonce: 0 },
            Control::Pong { nonce: u64::MAX },
        ]
    }

    // --- Unit tests ---

    #[test]
    fn every_header_round_trips() {
        for h in all_headers() {
            let bytes = encoded_header(&h);
            assert_eq!(
                StreamHeader::decode(&bytes),
                Ok(Some((h.clone(), bytes.len()))),
                "{h:?}"
            );
        }
    }

    #[test]
    fn every_control_round_trips() {
        for c in all_controls() {
            let bytes = encoded_control(&c);
            assert_eq!(
                Control::decode(&bytes),
                Ok(Some((c.clone(), bytes.len()))),
                "{c:?}"
            );
        }
    }

    #[test]
    fn layout_is_as_documented() {
        assert_eq!(
            encoded_header(&StreamHeader::Tcp { port: 0x1f90 }),
            [VERSION, KIND_TCP, 0, 2, 0x1f, 0x90]
        );
        assert_eq!(
            encoded_control(&Control::Attached { relay: "ab".into() }),
            [VERSION, KIND_ATTACHED, 0, 4, 0, 2, b'a', b'b']
        );
    }

    #[test]
    fn decode_leaves_the_payload_after_a_header() {
        let mut bytes = encoded_header(&StreamHeader::Ssh);
        let header_len = bytes.len();
        bytes.extend_from_slice(b"SSH-2.0-OpenSSH\r\n");
        assert_eq!(
            StreamHeader::decode(&bytes),
            Ok(Some((StreamHeader::Ssh, header_len)))
        );
    }

    #[tokio::test]
    async fn a_control_reader_cancelled_mid_message_loses_nothing() {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = super::io::ControlReader::new(rx);
        let bytes = encoded_control(&Control::Ping { nonce: 7 });
        let (first, rest) = bytes.split_at(3);
        tx.write_all(first).await.unwrap();
        // Another branch wins while the message is half there.
        tokio::select! {
            _ = reader.next() => panic!("a half message decoded"),
            () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
        }
        tx.write_all(rest).await.unwrap();
        tx.write_all(&encoded_control(&Control::Pong { nonce: 8 }))
            .await
            .unwrap();
        assert_eq!(
            reader.next().await.unwrap(),
            Some(Control::Ping { nonce: 7 })
        );
        assert_eq!(
            reader.next().await.unwrap(),
            Some(Control::Pong { nonce: 8 })
        );
        drop(tx);
        assert_eq!(reader.next().await.unwrap(), None);
    }

    #[test]
    fn close_codes_have_one_meaning_each() {
        use super::close::*;
        let all = [
            SHUTDOWN,
            LOST,
            ATTACH_FAILED,
            PROBE,
            MOVED,
            EXPECTED_ATTACH,
            REFUSED,
            REPLACED,
            NO_MESH_CERTIFICATE,
            NOT_A_MESH_PEER,
        ];
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
    }

    #[test]
    fn bad_version_is_refused_at_the_first_byte() {
        assert_eq!(
            StreamHeader::decode(&[2]),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            Control::decode(&[0, KIND_PING, 0, 8]),
            Err(DecodeError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn unknown_kinds_are_refused_including_the_other_streams_kinds() {
        assert_eq!(
            StreamHeader::decode(&[VERSION, 0x7f]),
            Err(DecodeError::UnknownKind(0x7f))
        );
        let ping = encoded_control(&Control::Ping { nonce: 1 });
        assert_eq!(
            StreamHeader::decode(&ping),
            Err(DecodeError::UnknownKind(KIND_PING))
        );
        let tcp = encoded_header(&StreamHeader::Tcp { port: 1 });
        assert_eq!(
            Control::decode(&tcp),
            Err(DecodeError::UnknownKind(KIND_TCP))
        );
    }

    #[test]
    fn too_long_is_refused_before_the_body_arrives() {
        let len = MAX_FRAME_LEN + 1;
        let [hi, lo] = u16::try_from(len).unwrap().to_be_bytes();
        assert_eq!(
            Control::decode(&[VERSION, KIND_ATTACH, hi, lo]),
            Err(DecodeError::TooLong {
                len,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(
            StreamHeader::decode(&[VERSION, KIND_PTY, 0xff, 0xff]),
            Err(DecodeError::TooLong {
                len: 0xffff,
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn bad_utf8_is_refused() {
        let frame = [VERSION, KIND_REFUSED, 0, 4, 0, 2, 0xc3, 0x28];
        assert_eq!(Control::decode(&frame), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        // Body shorter than the kind's fixed fields.
        assert!(matches!(
            Control::decode(&[VERSION, KIND_PING, 0, 2, 0, 0]),
            Err(DecodeError::Malformed(_))
        ));
        // String length pointing past the body.
        assert!(matches!(
            Control::decode(&[VERSION, KIND_ATTACH, 0, 3, 0, 9, b'x']),
            Err(DecodeError::Malformed(_))
        ));
        // Trailing garbage inside the body.
        assert!(matches!(
            StreamHeader::decode(&[VERSION, KIND_SSH, 0, 1, 0]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            StreamHeader::decode(&[VERSION, KIND_TCP, 0, 3, 0, 22, 0]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_frames_need_more_bytes() {
        let bytes = encoded_control(&Control::Attach { ticket: "t".into() });
        for end in 0..bytes.len() {
            assert_eq!(Control::decode(&bytes[..end]), Ok(None), "{end}");
        }
    }

    #[test]
    fn the_largest_body_encodes_and_one_more_byte_does_not() {
        let fits = Control::Refused {
            reason: "r".repeat(MAX_FRAME_LEN - 2),
        };
        let bytes = encoded_control(&fits);
        assert_eq!(bytes.len(), PREFIX_LEN + MAX_FRAME_LEN);
        assert_eq!(Control::decode(&bytes), Ok(Some((fits, bytes.len()))));

        let too_long = StreamHeader::Pty {
            session: uuid::Uuid::nil(),
            cols: 1,
            rows: 1,
            command: "c".repeat(MAX_FRAME_LEN - 21),
        };
        let mut out = vec![9];
        assert_eq!(
            too_long.try_encode(&mut out),
            Err(EncodeError::TooLong {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(out, [9], "nothing is written on error");
    }

    #[test]
    #[should_panic(expected = "cannot encode control message")]
    fn encode_panics_on_values_that_cannot_fit() {
        Control::Attach {
            ticket: "t".repeat(MAX_FRAME_LEN),
        }
        .encode(&mut Vec::new());
    }

    // --- Async I/O ---

    #[tokio::test]
    async fn header_read_leaves_the_payload_unread() {
        let (mut relay, mut agent) = tokio::io::duplex(64);
        let header = StreamHeader::Pty {
            session: uuid::Uuid::from_u128(1),
            cols: 120,
            rows: 40,
            command: "bash -l".into(),
        };
        io::write_header(&mut relay, &header).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut relay, b"raw payload")
            .await
            .unwrap();
        drop(relay);

        assert_eq!(io::read_header(&mut agent).await.unwrap(), header);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut agent, &mut rest)
            .await
            .unwrap();
        assert_eq!(rest, b"raw payload");
    }

    #[tokio::test]
    async fn control_messages_stream_until_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            for c in all_controls() {
                io::write_control(&mut a, &c).await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(c) = io::read_control(&mut b).await.unwrap() {
            got.push(c);
        }
        writer.await.unwrap();
        assert_eq!(got, all_controls());
    }

    #[tokio::test]
    async fn io_errors_map_to_their_kinds() {
        use std::io::ErrorKind;

        // Invalid prefix: InvalidData, carrying the decode error's message.
        let mut r: &[u8] = &[VERSION, 0x7f, 0, 0];
        let err = io::read_control(&mut r).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        assert_eq!(err.to_string(), DecodeError::UnknownKind(0x7f).to_string());

        // End of stream inside a frame, or before a header.
        let mut r: &[u8] = &[VERSION, KIND_PING, 0, 8, 1];
        let err = io::read_control(&mut r).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        let mut r: &[u8] = &[];
        let err = io::read_header(&mut r).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);

        // A value that cannot be encoded writes nothing.
        let mut w = Vec::new();
        let long = Control::Refused {
            reason: "x".repeat(MAX_FRAME_LEN),
        };
        let err = io::write_control(&mut w, &long).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(w.is_empty());
    }

    // --- Properties ---

    /// Strings up to the largest that fits any body, weighted towards short.
    fn any_string() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => any::<String>(),
            1 => (0..=MAX_FRAME_LEN - 22).prop_map(|n| "é".repeat(n / 2)),
        ]
    }

    fn any_header() -> impl Strategy<Value = StreamHeader> {
        prop_oneof![
            any::<u16>().prop_map(|port| StreamHeader::Tcp { port }),
            Just(StreamHeader::Ssh),
            any::<u64>().prop_map(|download| StreamHeader::Probe { download }),
            any::<u16>().prop_map(|port| StreamHeader::Udp { port }),
            (any::<u128>(), any::<u16>(), any::<u16>(), any_string()).prop_map(
                |(session, cols, rows, command)| StreamHeader::Pty {
                    session: uuid::Uuid::from_u128(session),
                    cols,
                    rows,
                    command,
                }
            ),
        ]
    }

    fn any_control() -> impl Strategy<Value = Control> {
        prop_oneof![
            any_string().prop_map(|ticket| Control::Attach { ticket }),
            any_string().prop_map(|relay| Control::Attached { relay }),
            any_string().prop_map(|reason| Control::Refused { reason }),
            any::<u64>().prop_map(|nonce| Control::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Control::Pong { nonce }),
        ]
    }

    /// Mostly frame-shaped bytes (right version, plausible kind, a length
    /// matching the body) so decoding gets past the prefix, plus pure noise.
    fn frame_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        let shaped = (
            prop_oneof![
                Just(KIND_TCP),
                Just(KIND_PTY),
                Just(KIND_ATTACH),
                Just(KIND_PING),
                any::<u8>()
            ],
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..8),
        )
            .prop_map(|(kind, body, tail)| {
                let mut v = vec![VERSION, kind];
                v.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
                v.extend(body);
                v.extend(tail);
                v
            });
        prop_oneof![shaped, proptest::collection::vec(any::<u8>(), 0..64)]
    }

    proptest! {
        #[test]
        fn headers_round_trip(h in any_header(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = encoded_header(&h);
            let len = bytes.len();
            bytes.extend(tail);
            prop_assert_eq!(StreamHeader::decode(&bytes), Ok(Some((h, len))));
        }

        #[test]
        fn controls_round_trip(c in any_control(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = encoded_control(&c);
            let len = bytes.len();
            bytes.extend(tail);
            prop_assert_eq!(Control::decode(&bytes), Ok(Some((c, len))));
        }

        #[test]
        fn mesh_headers_round_trip(h in any_header(), id in any::<u128>(), grant in "[a-zA-Z0-9._-]{0,64}", tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let m = MeshHeader { agent_id: uuid::Uuid::from_u128(id), grant, inner: h };
            let mut bytes = Vec::new();
            // The largest stream headers leave no room for a mesh header's
            // agent and grant: those are refused, not encoded.
            prop_assume!(m.try_encode(&mut bytes).is_ok());
            let len = bytes.len();
            bytes.extend(tail);
            prop_assert_eq!(MeshHeader::decode(&bytes), Ok(Some((m, len))));
        }

        #[test]
        fn mesh_header_prefixes_are_incomplete_and_garbage_is_refused(h in any_header(), cut in 0usize..64, junk in any::<u8>()) {
            let m = MeshHeader { agent_id: uuid::Uuid::from_u128(7), grant: "g.r.ant".into(), inner: h };
            let mut bytes = Vec::new();
            // The largest stream headers leave no room for a mesh header's
            // agent and grant: those are refused, not encoded.
            prop_assume!(m.try_encode(&mut bytes).is_ok());
            let cut = cut.min(bytes.len() - 1);
            prop_assert_eq!(MeshHeader::decode(&bytes[..cut]), Ok(None));
            // A stream header is never mistaken for a mesh header.
            prop_assert!(MeshHeader::decode(&encoded_header(&m.inner)).is_err());
            // Extra bytes inside the body are refused.
            let mut longer = bytes.clone();
            longer.push(junk);
            let body_len = u16::from_be_bytes([longer[2], longer[3]]) + 1;
            longer[2..4].copy_from_slice(&body_len.to_be_bytes());
            prop_assert!(MeshHeader::decode(&longer).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_decode_canonically(bytes in frame_like_bytes()) {
            // Whatever decodes re-encodes to exactly the bytes it consumed.
            if let Ok(Some((h, n))) = StreamHeader::decode(&bytes) {
                prop_assert!(n <= bytes.len());
                prop_assert_eq!(encoded_header(&h), &bytes[..n]);
            }
            if let Ok(Some((c, n))) = Control::decode(&bytes) {
                prop_assert!(n <= bytes.len());
                prop_assert_eq!(encoded_control(&c), &bytes[..n]);
            }
        }

        #[test]
        fn strict_prefixes_need_more_bytes(h in any_header(), c in any_control(), cut in any::<prop::sample::Index>()) {
            let bytes = encoded_header(&h);
            let end = cut.index(bytes.len());
            prop_assert_eq!(StreamHeader::decode(&bytes[..end]), Ok(None));
            let bytes = encoded_control(&c);
            let end = cut.index(bytes.len());
            prop_assert_eq!(Control::decode(&bytes[..end]), Ok(None));
        }
    }
}
