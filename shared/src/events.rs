//! The primary → edge event stream's framing
//! (`GET /api/v2/edges/me/events`): one [`EdgeEvent`] as JSON per line. The
//! primary encodes with [`encode`]; an edge decodes whatever chunks the
//! body arrives in with a [`Decoder`].

use thiserror::Error;

use crate::api::EdgeEvent;

/// One event as a line (JSON and `\n`).
pub fn encode(event: &EdgeEvent) -> String {
    // An enum of plain data always serialises.
    let mut line = serde_json::to_string(event).unwrap_or_default();
    line.push('\n');
    line
}

/// Why a stream's bytes are not events.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// A line grew past the limit without ending.
    #[error("an event longer than {0} bytes")]
    TooLong(usize),
    /// A line is not an event.
    #[error("an unreadable event: {0}")]
    Json(#[from] serde_json::Error),
}

/// Splits a byte stream into events, holding at most one partial line.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max_line: usize,
}

impl Decoder {
    /// A decoder refusing lines longer than `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            max_line,
        }
    }

    /// Adds `chunk` and returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<EdgeEvent>, DecodeError> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + end;
            events.push(serde_json::from_slice(&self.buf[start..end])?);
            start = end + 1;
            self.scanned = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > self.max_line {
            return Err(DecodeError::TooLong(self.max_line));
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentLocation, EdgeEvent};

    fn moved(n: u128) -> EdgeEvent {
        EdgeEvent::AgentMoved(AgentLocation {
            agent_id: uuid::Uuid::from_u128(n),
            relay: None,
        })
    }

    #[test]
    fn events_survive_any_chunking() {
        let sent = [moved(1), EdgeEvent::Ping, moved(2)];
        let bytes: String = sent.iter().map(encode).collect();
        for size in [1, 2, 7, 64, bytes.len()] {
            let mut d = Decoder::new(1 << 20);
            let mut got = Vec::new();
            for chunk in bytes.as_bytes().chunks(size) {
                got.extend(d.push(chunk).unwrap());
            }
            let got: Vec<String> = got.iter().map(encode).collect();
            let want: Vec<String> = sent.iter().map(encode).collect();
            assert_eq!(got, want, "chunks of {size}");
        }
    }

    #[test]
    fn overlong_and_unreadable_lines_are_errors() {
        let mut d = Decoder::new(16);
        assert!(matches!(d.push(&[b'x'; 17]), Err(DecodeError::TooLong(16))));
        let mut d = Decoder::new(1024);
        assert!(matches!(d.push(b"{not json}\n"), Err(DecodeError::Json(_))));
    }
}
