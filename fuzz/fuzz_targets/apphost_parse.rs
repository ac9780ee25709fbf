//! Feeds arbitrary hosts to the app-host parser, the first thing every
//! proxy does with a request a stranger sent: it must never panic, and
//! whatever parses must name only hostname-safe parts.

#![no_main]

use devmesh_shared::apphost::{parse_label, wildcard_label};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(host) = std::str::from_utf8(data) else {
        return;
    };
    for wildcard in ["*.apps.example.com", "*.eu.apps.example.com:8443"] {
        let Some(label) = wildcard_label(host, wildcard) else {
            continue;
        };
        assert!(!label.is_empty() && !label.contains('.'));
        if let Some(app) = parse_label(label) {
            for part in app.agent.iter().chain([&app.workspace, &app.user]) {
                assert!(devmesh_shared::names::validate_name(part).is_ok());
            }
        }
    }
});
