//! Feeds arbitrary bytes to the tunnel decoders and the token verifier:
//! none may panic, a decoder never claims more bytes than it was given, and
//! whatever decodes re-encodes to bytes that decode to the same value.

#![no_main]

use std::sync::LazyLock;

use devmesh_shared::signing::{AppToken, SigningKey, Verifier};
use devmesh_shared::tunnel::{Control, MeshHeader, StreamHeader};
use libfuzzer_sys::fuzz_target;

/// A fixed verifier; its key is generated once per process, which is fine
/// because no fuzz input can forge a signature anyway.
static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let key = SigningKey::generate("fuzz");
    Verifier::new(&[key.public_key()]).expect("a generated key loads")
});

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, consumed))) = StreamHeader::decode(data) {
        assert!(consumed <= data.len());
        let mut again = Vec::new();
        header.encode(&mut again);
        assert_eq!(again, data[..consumed]);
        assert_eq!(StreamHeader::decode(&again), Ok(Some((header, consumed))));
    }

    if let Ok(Some((control, consumed))) = Control::decode(data) {
        assert!(consumed <= data.len());
        let mut again = Vec::new();
        control.encode(&mut again);
        assert_eq!(again, data[..consumed]);
        assert_eq!(Control::decode(&again), Ok(Some((control, consumed))));
    }

    if let Ok(Some((mesh, consumed))) = MeshHeader::decode(data) {
        assert!(consumed <= data.len());
        let mut again = Vec::new();
        mesh.try_encode(&mut again).expect("a decoded header re-encodes");
        assert_eq!(again, data[..consumed]);
    }

    if let Ok(token) = std::str::from_utf8(data) {
        assert!(VERIFIER.verify::<AppToken>(token, 0).is_err());
    }
});
