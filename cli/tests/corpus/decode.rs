//! Reads `http.txt`, the malformed-input corpus. Shared by the tests that
//! send its cases (`cli/tests/system/corpus.rs`, and the agent's tunnel
//! tests for its `TUNNEL` lines) through `#[path]`, so there is one decoder.

#![allow(dead_code)]

/// The corpus.
pub(super) const CORPUS: &str = include_str!("http.txt");

/// Prefixes of lines that are QUIC stream cases rather than HTTP requests:
/// an agent's control stream to a relay, a mesh peer's stream to a relay,
/// a relay's stream to an agent.
pub(super) const STREAM_PREFIXES: [&str; 3] = ["QUIC ", "MESH ", "TUNNEL "];

/// The cases of the lines starting with `prefix` (`"QUIC "`, `"MESH "`,
/// `"TUNNEL "`), decoded, with their line numbers.
pub(super) fn cases(prefix: &str) -> Vec<(usize, Vec<u8>)> {
    CORPUS
        .lines()
        .enumerate()
        .filter_map(|(n, l)| Some((n + 1, decode(l.strip_prefix(prefix)?))))
        .collect()
}

/// Decodes a corpus line: `\r \n \0 \\ \xHH`, and `{C*N}` repeating `C`
/// (itself decoded) `N` times. A `{` is a repetition only when `*N}` comes
/// before the next `{`; JSON braces stay literal.
pub(super) fn decode(line: &str) -> Vec<u8> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if i + 1 < b.len() => {
                match b[i + 1] {
                    b'r' => out.push(b'\r'),
                    b'n' => out.push(b'\n'),
                    b'0' => out.push(0),
                    b't' => out.push(b'\t'),
                    b'\\' => out.push(b'\\'),
                    b'x' if i + 3 < b.len() => {
                        let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                        out.push(u8::from_str_radix(hex, 16).unwrap());
                        i += 2;
                    }
                    other => out.extend_from_slice(&[b'\\', other]),
                }
                i += 2;
            }
            b'{' => {
                let rest = &line[i + 1..];
                let next_open = rest.find('{');
                let repeat = rest.find('*').and_then(|star| {
                    let digits: String = rest[star + 1..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    let close = star + 1 + digits.len();
                    (!digits.is_empty() && rest[close..].starts_with('}'))
                        .then(|| (star, digits.parse::<usize>().unwrap(), close))
                });
                match repeat {
                    Some((star, n, close)) if next_open.is_none_or(|o| o > close) => {
                        let unit = decode(&rest[..star]);
                        for _ in 0..n {
                            out.extend_from_slice(&unit);
                        }
                        i += 1 + close + 1;
                    }
                    _ => {
                        out.push(b'{');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}
