//! Datagrams on a [`StreamHeader::Udp`](super::StreamHeader::Udp) stream:
//! each way, a big-endian `u16` length and the datagram. From the agent,
//! the length [`REFUSED`] (longer than any datagram) says the port
//! refused (nothing listens there); the stream then ends.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// The length that says the workspace's port refused.
pub const REFUSED: u16 = u16::MAX;

/// What came off the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A datagram of this many bytes, now at the front of the buffer.
    Datagram(usize),
    /// The port refused.
    Refused,
    /// The stream ended between datagrams.
    End,
}

/// Appends `datagram`, framed, to `out`.
///
/// # Panics
///
/// If `datagram` is longer than [`MAX_DATAGRAM`], which no UDP socket
/// receives.
pub fn frame(datagram: &[u8], out: &mut Vec<u8>) {
    assert!(datagram.len() <= MAX_DATAGRAM, "not a UDP datagram");
    out.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    out.extend_from_slice(datagram);
}

/// Reads framed datagrams, keeping a partly read frame between calls, so
/// [`Reader::next`] may be cancelled (in a `select!`) without losing bytes
/// as long as the underlying reads are cancel-safe (quinn's are).
#[derive(Debug)]
pub struct Reader {
    buf: Vec<u8>,
    filled: usize,
}

impl Default for Reader {
    fn default() -> Self {
        Self {
            buf: vec![0u8; 2 + MAX_DATAGRAM],
            filled: 0,
        }
    }
}

impl Reader {
    /// The next datagram (its bytes in [`Reader::datagram`]), the refusal
    /// marker, or the end.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<Received> {
        loop {
            if self.filled >= 2 {
                let len = u16::from_be_bytes([self.buf[0], self.buf[1]]);
                if len == REFUSED {
                    self.filled = 0;
                    return Ok(Received::Refused);
                }
                let len = usize::from(len);
                if len > MAX_DATAGRAM {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "datagram frame longer than a datagram",
                    ));
                }
                if self.filled >= 2 + len {
                    // Whole: hand it out; the next call starts afresh.
                    self.filled = 0;
                    self.buf.copy_within(2..2 + len, 0);
                    return Ok(Received::Datagram(len));
                }
                let n = r.read(&mut self.buf[self.filled..2 + len]).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                self.filled += n;
            } else {
                let n = r.read(&mut self.buf[self.filled..2]).await?;
                if n == 0 {
                    return if self.filled == 0 {
                        Ok(Received::End)
                    } else {
                        Err(std::io::ErrorKind::UnexpectedEof.into())
                    };
                }
                self.filled += n;
            }
        }
    }

    /// The datagram the last [`Reader::next`] returned, `n` bytes long.
    pub fn datagram(&self, n: usize) -> &[u8] {
        &self.buf[..n]
    }
}

/// Reads one framed datagram into `buf` (at least [`MAX_DATAGRAM`] long).
/// A length over [`MAX_DATAGRAM`] other than [`REFUSED`] is an error.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut len = [0u8; 2];
    match r.read(&mut len[..1]).await? {
        0 => return Ok(Received::End),
        _ => r.read_exact(&mut len[1..]).await?,
    };
    let len = u16::from_be_bytes(len);
    if len == REFUSED {
        return Ok(Received::Refused);
    }
    let len = usize::from(len);
    if len > MAX_DATAGRAM || len > buf.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "datagram frame longer than a datagram",
        ));
    }
    r.read_exact(&mut buf[..len]).await?;
    Ok(Received::Datagram(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_read_back_as_framed_and_garbage_is_an_error() {
        let mut bytes = Vec::new();
        frame(b"ping", &mut bytes);
        frame(b"", &mut bytes);
        bytes.extend_from_slice(&REFUSED.to_be_bytes());
        let mut r = &bytes[..];
        let mut buf = vec![0u8; MAX_DATAGRAM];
        assert_eq!(read(&mut r, &mut buf).await.unwrap(), Received::Datagram(4));
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(read(&mut r, &mut buf).await.unwrap(), Received::Datagram(0));
        assert_eq!(read(&mut r, &mut buf).await.unwrap(), Received::Refused);
        assert_eq!(read(&mut r, &mut buf).await.unwrap(), Received::End);

        for bad in [&[0xff, 0xfe][..], &[0x00][..], &[0x00, 0x05, b'a'][..]] {
            let mut r = bad;
            assert!(read(&mut r, &mut buf).await.is_err(), "{bad:?}");
            let mut r = bad;
            assert!(Reader::default().next(&mut r).await.is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_reader_survives_being_cancelled_mid_frame() {
        let mut bytes = Vec::new();
        frame(b"first", &mut bytes);
        frame(b"second one", &mut bytes);
        // The bytes come one at a time, and each read may be cancelled.
        let (mut tx, mut rx) = tokio::io::duplex(1);
        tokio::spawn(async move {
            for b in bytes {
                tokio::io::AsyncWriteExt::write_all(&mut tx, &[b])
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut reader = Reader::default();
        let mut got = Vec::new();
        while got.len() < 2 {
            tokio::select! {
                r = reader.next(&mut rx) => match r.unwrap() {
                    Received::Datagram(n) => got.push(reader.datagram(n).to_vec()),
                    other => panic!("{other:?}"),
                },
                () = tokio::task::yield_now() => {}
            }
        }
        assert_eq!(got, [b"first".to_vec(), b"second one".to_vec()]);
    }
}
