//! What a client sends on a reconnecting terminal's stream after its
//! [`StreamHeader::Pty`](super::StreamHeader::Pty): frames of one kind
//! byte, a big-endian `u16` length and that many bytes. The agent's side
//! is raw terminal output, unframed.

use tokio::io::{AsyncRead, AsyncReadExt};

const INPUT: u8 = 0;
const RESIZE: u8 = 1;

/// The most input one frame carries.
pub const MAX_INPUT: usize = 16 * 1024;

/// One message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Keystrokes (or pasted text) for the terminal.
    Input(Vec<u8>),
    /// The client's window changed size.
    Resize {
        /// Width in columns.
        cols: u16,
        /// Height in rows.
        rows: u16,
    },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed, or ended inside a frame.
    #[error("the stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// An unknown kind, an oversized input or a resize of the wrong length.
    #[error("malformed terminal frame: {0}")]
    Malformed(&'static str),
}

impl Frame {
    /// Appends the frame to `out`; input longer than [`MAX_INPUT`] becomes
    /// several frames.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Input(bytes) => {
                for chunk in bytes.chunks(MAX_INPUT) {
                    out.push(INPUT);
                    out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
                    out.extend_from_slice(chunk);
                }
            }
            Frame::Resize { cols, rows } => {
                out.push(RESIZE);
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
                out.extend_from_slice(&rows.to_be_bytes());
            }
        }
    }

    /// Reads one frame; `Ok(None)` when the stream ended between frames.
    /// Allocates at most [`MAX_INPUT`] bytes, whatever the length says.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut kind = [0u8; 1];
        if r.read(&mut kind).await? == 0 {
            return Ok(None);
        }
        let len = usize::from(r.read_u16().await?);
        match kind[0] {
            INPUT if len <= MAX_INPUT => {
                let mut bytes = vec![0u8; len];
                r.read_exact(&mut bytes).await?;
                Ok(Some(Frame::Input(bytes)))
            }
            INPUT => Err(FrameError::Malformed("input frame too long")),
            RESIZE if len == 4 => Ok(Some(Frame::Resize {
                cols: r.read_u16().await?,
                rows: r.read_u16().await?,
            })),
            RESIZE => Err(FrameError::Malformed("resize frame of the wrong length")),
            _ => Err(FrameError::Malformed("unknown frame kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8]) -> Vec<Result<Frame, String>> {
        let mut r = bytes;
        let mut out = Vec::new();
        loop {
            match Frame::read(&mut r).await {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_read_back_as_written_and_long_input_is_split() {
        let long: Vec<u8> = (0..MAX_INPUT + 10).map(|i| i as u8).collect();
        let mut bytes = Vec::new();
        Frame::Input(b"ls\r".to_vec()).encode(&mut bytes);
        Frame::Resize {
            cols: 120,
            rows: 40,
        }
        .encode(&mut bytes);
        Frame::Input(long.clone()).encode(&mut bytes);
        let frames = read_all(&bytes).await;
        assert_eq!(
            frames,
            [
                Ok(Frame::Input(b"ls\r".to_vec())),
                Ok(Frame::Resize {
                    cols: 120,
                    rows: 40
                }),
                Ok(Frame::Input(long[..MAX_INPUT].to_vec())),
                Ok(Frame::Input(long[MAX_INPUT..].to_vec())),
            ]
        );
    }

    #[tokio::test]
    async fn garbage_is_an_error_never_a_panic_or_a_huge_allocation() {
        for bad in [
            &[9u8, 0, 0][..],        // unknown kind
            &[0, 0xff, 0xff][..],    // input longer than allowed
            &[1, 0, 3, 1, 2, 3][..], // resize of three bytes
            &[0, 0, 5, b'a'][..],    // ends inside a frame
            &[0][..],                // ends inside a length
        ] {
            let frames = read_all(bad).await;
            assert!(
                matches!(frames.last(), Some(Err(_))),
                "{bad:?} gave {frames:?}"
            );
        }
    }
}
