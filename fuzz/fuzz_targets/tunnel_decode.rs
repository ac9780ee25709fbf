//! Feeds arbitrary bytes to the tunnel decoders (the synchronous ones only:
//! the tokio `io` wrappers just read a frame and call these) and the token
//! verifier: none may panic, a decoder never claims more bytes than it was
//! given, whatever decodes re-encodes to exactly the bytes it was decoded
//! from (and those decode to the same value), every shorter prefix of a
//! frame is merely incomplete, and no frame is accepted by two decoders.

#![no_main]

use std::fmt::Debug;
use std::sync::LazyLock;

use devmesh_shared::signing::{AppToken, SigningKey, Verifier};
use devmesh_shared::tunnel::{Control, DecodeError, MeshHeader, PREFIX_LEN, StreamHeader};
use libfuzzer_sys::fuzz_target;

/// A fixed verifier; its key is generated once per process, which is fine
/// because no fuzz input can forge a signature anyway.
static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let key = SigningKey::generate("fuzz");
    Verifier::new(&[key.public_key()]).expect("a generated key loads")
});

type Decoded<T> = Result<Option<(T, usize)>, DecodeError>;

/// The properties every frame decoder shares, given the decoder and its
/// fallible encoder. Uses only `decode` and `try_encode`, so it keeps
/// compiling whatever fields the types gain.
fn check<T: PartialEq + Debug>(
    data: &[u8],
    decode: fn(&[u8]) -> Decoded<T>,
    try_encode: fn(&T, &mut Vec<u8>) -> Result<(), devmesh_shared::tunnel::EncodeError>,
) -> bool {
    let decoded = decode(data);
    let accepted = decoded.is_ok();
    let Ok(Some((value, consumed))) = decoded else {
        return accepted;
    };
    assert!(
        consumed <= data.len(),
        "consumed {consumed} of {}",
        data.len()
    );
    assert!(consumed >= PREFIX_LEN);

    let mut again = Vec::new();
    try_encode(&value, &mut again).expect("a decoded value re-encodes");
    assert_eq!(
        again,
        data[..consumed],
        "re-encoding differs from the input"
    );
    assert_eq!(decode(&again), Ok(Some((value, consumed))));

    // Any prefix of a valid frame is incomplete, never an error: a reader
    // that gets the frame in pieces must wait, not give up.
    for cut in 0..consumed {
        assert_eq!(decode(&again[..cut]), Ok(None), "prefix of {cut} bytes");
    }
    accepted
}

fuzz_target!(|data: &[u8]| {
    let accepted = [
        check(data, StreamHeader::decode, StreamHeader::try_encode),
        check(data, Control::decode, Control::try_encode),
        check(data, MeshHeader::decode, MeshHeader::try_encode),
    ];
    // Stream headers, control messages and mesh headers use disjoint kinds:
    // once the kind byte is there, at most one decoder may accept the bytes
    // (as a frame or as an incomplete one).
    if data.len() >= 2 {
        let n = accepted.iter().filter(|a| **a).count();
        assert!(n <= 1, "{n} decoders accepted the same kind: {accepted:?}");
    }

    if let Ok(token) = std::str::from_utf8(data) {
        assert!(VERIFIER.verify::<AppToken>(token, 0).is_err());
    }
});
