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
        }
    }
}
