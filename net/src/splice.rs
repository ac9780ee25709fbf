//! Moving bytes between tunnel streams and sockets without extra copies.
//!
//! `tokio::io::copy` reads a QUIC stream into an 8 KiB buffer and writes
//! that buffer into the next stream, which copies it again into a fresh
//! allocation: two memcpys per byte per hop, the largest single cost a
//! relay had in a bulk transfer (15% of its CPU in `memmove`). Here a QUIC
//! stream's received chunks are passed on as they are (`read_chunk`,
//! `write_chunk` share the buffer), and a socket is read into a buffer
//! that is then handed to QUIC whole.
//!
//! Each direction ends with its writer's end of data (a QUIC FIN, a TCP
//! half-close), so either peer's end travels through.

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first read buffer from a socket; it doubles while reads fill it,
/// up to [`MAX_READ`], so a request costs little and a download gets large
/// chunks.
const FIRST_READ: usize = 8 * 1024;
/// The largest read buffer from a socket.
const MAX_READ: usize = 256 * 1024;

/// Chunks taken from a QUIC stream at once: what arrived since the last
/// read, so a burst of packets costs one write (one syscall on a socket).
const CHUNKS_PER_READ: usize = 32;

/// Copies `recv` into `send` as the chunks arrive until `recv` ends, then
/// finishes `send`. Returns the bytes moved.
pub async fn quic_to_quic(recv: &mut RecvStream, send: &mut SendStream) -> std::io::Result<u64> {
    let mut moved = 0;
    let mut chunks: [Bytes; CHUNKS_PER_READ] = Default::default();
    while let Some(n) = recv.read_chunks(&mut chunks).await? {
        moved += chunks[..n].iter().map(|c| c.len() as u64).sum::<u64>();
        send.write_all_chunks(&mut chunks[..n]).await?;
        chunks[..n].fill(Bytes::new());
    }
    send.finish()?;
    Ok(moved)
}

/// Copies `recv` into a socket's writer until `recv` ends, then shuts the
/// writer down (a TCP half-close). The chunks of one read go out in one
/// vectored write. Returns the bytes moved.
pub async fn quic_to_socket<W>(recv: &mut RecvStream, w: &mut W) -> std::io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut moved = 0;
    let mut chunks: [Bytes; CHUNKS_PER_READ] = Default::default();
    while let Some(n) = recv.read_chunks(&mut chunks).await? {
        let mut pending = Pending {
            chunks: &mut chunks[..n],
            at: 0,
        };
        moved += pending.remaining() as u64;
        w.write_all_buf(&mut pending).await?;
    }
    w.shutdown().await?;
    Ok(moved)
}

/// Received chunks as one [`Buf`], so a writer can send them vectored.
struct Pending<'a> {
    chunks: &'a mut [Bytes],
    /// The first chunk not fully written.
    at: usize,
}

impl Buf for Pending<'_> {
    fn remaining(&self) -> usize {
        self.chunks[self.at..].iter().map(Bytes::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.chunks[self.at..]
            .iter()
            .find(|c| !c.is_empty())
            .map_or(&[], |c| &c[..])
    }

    fn chunks_vectored<'b>(&'b self, dst: &mut [std::io::IoSlice<'b>]) -> usize {
        let mut filled = 0;
        for (slot, c) in dst.iter_mut().zip(&self.chunks[self.at..]) {
            *slot = std::io::IoSlice::new(c);
            filled += 1;
        }
        filled
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(c) = self.chunks.get_mut(self.at) else {
                return;
            };
            let step = cnt.min(c.len());
            c.advance(step);
            cnt -= step;
            if c.is_empty() {
                // An empty slice still holds its receive buffer: let it go.
                *c = Bytes::new();
                self.at += 1;
            }
        }
    }
}

/// Reads this small or smaller are copied out, so the read buffer stays
/// this connection's own instead of being pinned by QUIC until acknowledged.
const COPY_BELOW: usize = 4 * 1024;

/// Copies a socket's reader into `send` until the reader ends, then
/// finishes `send`. Large reads go to QUIC without another copy; small ones
/// (interactive traffic) are copied so each does not pin a whole buffer.
/// The buffer doubles while reads fill it and shrinks back when they are
/// small, so an idle connection that once carried a download holds 8 KiB.
pub async fn socket_to_quic<R>(r: &mut R, send: &mut SendStream) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    let mut moved = 0;
    let mut size = FIRST_READ;
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < size {
            buf = BytesMut::with_capacity(size);
        }
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            send.finish()?;
            return Ok(moved);
        }
        moved += n as u64;
        if n < COPY_BELOW {
            send.write_chunk(Bytes::copy_from_slice(&buf[..n])).await?;
            buf.clear();
        } else {
            send.write_chunk(buf.split().freeze()).await?;
        }
        if n >= size {
            size = (size * 2).min(MAX_READ);
        } else if n < size / 4 && size > FIRST_READ {
            size = FIRST_READ;
            buf = BytesMut::new();
        }
    }
}

/// Both directions between a QUIC stream and a TCP connection, until both
/// end or either fails: (bytes from QUIC, bytes to QUIC).
pub async fn quic_and_tcp(
    send: &mut SendStream,
    recv: &mut RecvStream,
    tcp: &mut tokio::net::TcpStream,
) -> std::io::Result<(u64, u64)> {
    let (mut r, mut w) = tcp.split();
    tokio::try_join!(quic_to_socket(recv, &mut w), socket_to_quic(&mut r, send))
}

/// The smallest and largest buffers of [`copy_adaptive`].
const ADAPTIVE_MIN: usize = 2 * 1024;
const ADAPTIVE_MAX: usize = 64 * 1024;

/// Copies `r` into `w` until `r` ends, then shuts `w` down, with a buffer
/// that follows the traffic: it doubles while reads fill it and halves
/// while they use under a quarter, between 2 and 64 KiB. An idle
/// WebSocket holds 2 KiB per direction instead of `tokio::io::copy`'s
/// 8 KiB, and a large transfer still moves 64 KiB per read.
pub async fn copy_adaptive<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut moved = 0;
    let mut buf = vec![0u8; ADAPTIVE_MIN];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(moved);
        }
        w.write_all(&buf[..n]).await?;
        // A TLS writer may keep what it encrypted until flushed; the next
        // read may not come for a long time (an idle WebSocket).
        w.flush().await?;
        moved += n as u64;
        let size = buf.len();
        if n == size && size < ADAPTIVE_MAX {
            buf = vec![0u8; size * 2];
        } else if n < size / 4 && size > ADAPTIVE_MIN {
            buf = vec![0u8; size / 2];
        }
    }
}

/// Both directions between two connections with [`copy_adaptive`], until
/// both end or either fails: (bytes from `a` to `b`, bytes from `b` to `a`).
pub async fn bidirectional_adaptive<A, B>(a: A, b: B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    tokio::try_join!(
        copy_adaptive(&mut a_read, &mut b_write),
        copy_adaptive(&mut b_read, &mut a_write)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pending_chunks_survive_partial_writes_and_empty_chunks() {
        // A pipe that takes at most 3 bytes at a time: every write is partial.
        let (mut w, mut r) = tokio::io::duplex(3);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut chunks = [
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cdefg"),
            Bytes::from_static(b"h"),
        ];
        let mut pending = Pending {
            chunks: &mut chunks,
            at: 0,
        };
        assert_eq!(pending.remaining(), 8);
        w.write_all_buf(&mut pending).await.unwrap();
        assert_eq!(pending.remaining(), 0);
        drop(w);
        assert_eq!(reader.await.unwrap(), b"abcdefgh");
    }

    #[tokio::test]
    async fn adaptive_copies_carry_both_ways_and_pass_each_end_on() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 20);
        let (app, mut app_peer) = tokio::io::duplex(1 << 20);
        let splice = tokio::spawn(bidirectional_adaptive(client, app));
        // A large upload (the buffer grows), then the client's end.
        let upload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        client_peer.write_all(&upload).await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        app_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, upload);
        // The other way still flows after the client's half-close.
        app_peer.write_all(b"small answer").await.unwrap();
        app_peer.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client_peer.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"small answer");
        assert_eq!(splice.await.unwrap().unwrap(), (300_000, 12));
    }

    #[tokio::test]
    async fn adaptive_copies_flush_what_a_buffering_writer_holds() {
        // A writer that keeps bytes until flushed, as TLS may: a small
        // message must still arrive while the connection stays open.
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (app, mut app_peer) = tokio::io::duplex(1 << 16);
        let _splice = tokio::spawn(bidirectional_adaptive(
            client,
            tokio::io::BufWriter::new(app),
        ));
        client_peer.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            app_peer.read_exact(&mut got),
        )
        .await
        .expect("the message arrives without the connection closing")
        .unwrap();
        assert_eq!(&got, b"hello");
    }
}
