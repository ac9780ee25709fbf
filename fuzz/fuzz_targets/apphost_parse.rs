//! Feeds arbitrary hosts to the app-host parser, the first thing every
//! proxy does with a request a stranger sent: it must never panic, and
//! whatever parses must name only hostname-safe parts.
//!
//! Raw bytes alone almost never end in `.apps.example.com` or spell a
//! `<a>--<b>--<c>` label of valid names, so the input is also used in
//! shapes that reach the interesting code: as the label in front of each
//! wildcard's suffix, and mapped onto the name alphabet (`a-z0-9-`) before
//! it goes to `parse_label`. Properties, besides not panicking:
//!
//! - `wildcard_label` returns a non-empty label without a dot, and for a
//!   non-empty dotless label put in front of the suffix it returns exactly
//!   that label (the suffix matched case-insensitively);
//! - what `parse_label` accepts fits in a DNS label, names only valid
//!   names, and is canonical: its parts put back together give the label.

#![no_main]

use devmesh_shared::apphost::{AppTarget, MAX_LABEL_LEN, label, parse_label, wildcard_label};
use devmesh_shared::names::validate_name;
use libfuzzer_sys::fuzz_target;

/// The wildcards, and host suffixes under each (case varied, port matched).
const WILDCARDS: [(&str, &[&str]); 2] = [
    (
        "*.apps.example.com",
        &[".apps.example.com", ".APPS.Example.com:3000"],
    ),
    (
        "*.eu.apps.example.com:8443",
        &[".eu.apps.example.com:8443", ".EU.apps.example.COM:8443"],
    ),
];

/// The characters names are made of, so mapped input mostly spells names.
const NAME_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";

fn check_host(host: &str) {
    for (wildcard, _) in WILDCARDS {
        if let Some(label) = wildcard_label(host, wildcard) {
            assert!(
                !label.is_empty() && !label.contains('.'),
                "{host:?} -> {label:?}"
            );
            check_label(label);
        }
    }
}

fn check_label(l: &str) {
    let Some(app) = parse_label(l) else {
        return;
    };
    assert!(l.len() <= MAX_LABEL_LEN, "{l:?} parsed but is too long");
    for part in app.agent.iter().chain([&app.workspace, &app.user]) {
        assert!(validate_name(part).is_ok(), "{l:?}: invalid part {part:?}");
    }
    let first = match &app.target {
        AppTarget::Slug(slug) => {
            assert!(validate_name(slug).is_ok(), "{l:?}: invalid slug {slug:?}");
            assert!(
                !slug.bytes().all(|b| b.is_ascii_digit()),
                "{l:?}: numeric slug"
            );
            slug.clone()
        }
        AppTarget::Port { port, https } => {
            assert!(*port > 0, "{l:?}: port 0");
            format!("{port}{}", if *https { "s" } else { "" })
        }
    };
    let rebuilt = match &app.agent {
        Some(agent) => label(&first, agent, &app.workspace, &app.user),
        None => format!("{first}--{}--{}", app.workspace, app.user),
    };
    assert_eq!(rebuilt, l, "parsed {app:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check_host(s);
        check_label(s);
        for (wildcard, suffixes) in WILDCARDS {
            for suffix in suffixes {
                let host = format!("{s}{suffix}");
                let got = wildcard_label(&host, wildcard);
                if !s.is_empty() && !s.contains('.') {
                    assert_eq!(got, Some(s), "{host:?} under {wildcard:?}");
                }
                check_host(&host);
            }
        }
    }

    let mapped: String = data
        .iter()
        .map(|&b| char::from(NAME_ALPHABET[usize::from(b) % NAME_ALPHABET.len()]))
        .collect();
    check_label(&mapped);
    check_host(&format!("{mapped}.apps.example.com"));
});
