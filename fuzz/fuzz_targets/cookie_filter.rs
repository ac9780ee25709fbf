//! Feeds arbitrary `Cookie` and `Set-Cookie` values to the app proxy's cookie
//! filters, which stand between a browser holding devmesh credentials and an
//! app that must never see or overwrite them.
//!
//! The input is split on `\n` (a byte no header value may hold) into header
//! values; those `HeaderValue::from_bytes` refuses are skipped, like a
//! request hyper would have rejected. Properties:
//!
//! - nothing panics;
//! - after `strip_devmesh_cookies`, no cookie pair left (split on `;`, name
//!   = bytes before the first `=`, spaces and tabs trimmed) is devmesh-named
//!   per `is_devmesh_cookie`; every other non-empty pair is kept byte for
//!   byte and in order, in at most one `Cookie` header; other headers are
//!   untouched;
//! - `app_may_set_cookie` refuses every `Set-Cookie` whose name is empty
//!   (or absent) or devmesh-named, whether the name is read as the bytes
//!   before the first `=` of the whole value or, as browsers do, of the
//!   part before the first `;`.

#![no_main]

use devmesh_shared::cookies::{app_may_set_cookie, is_devmesh_cookie, strip_devmesh_cookies};
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fn trim_wsp(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The name of a cookie pair or `Set-Cookie` string: the bytes before the
/// first `=`, trimmed; `None` when there is no `=` (a nameless cookie).
fn name_of(s: &[u8]) -> Option<&[u8]> {
    let eq = s.iter().position(|&b| b == b'=')?;
    Some(trim_wsp(&s[..eq]))
}

/// A name as the proxy compares it: a pair without `=` is all name.
fn pair_name(pair: &[u8]) -> &[u8] {
    name_of(pair).unwrap_or(trim_wsp(pair))
}

fn pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b';')
}

fn check_set_cookie(value: &[u8]) {
    let allowed = app_may_set_cookie(value);
    // The name as the bytes before the first `=` of the whole value.
    let whole = name_of(value);
    // The name as a browser reads it: the name-value pair ends at the first `;`.
    let first_pair = pairs(value).next().unwrap_or_default();
    let browser = name_of(first_pair);
    for name in [whole, browser] {
        let forbidden = name.is_none_or(|n| n.is_empty() || is_devmesh_cookie(n));
        assert!(
            !(allowed && forbidden),
            "app may set {:?} (name {:?})",
            String::from_utf8_lossy(value),
            name.map(String::from_utf8_lossy),
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes, whatever they are, must not panic the name check.
    let _ = is_devmesh_cookie(data);

    let values: Vec<HeaderValue> = data
        .split(|&b| b == b'\n')
        .filter_map(|v| HeaderValue::from_bytes(v).ok())
        .collect();

    let mut headers = HeaderMap::new();
    let other = HeaderName::from_static("x-other");
    headers.append(other.clone(), HeaderValue::from_static("keep"));
    for v in &values {
        check_set_cookie(v.as_bytes());
        headers.append(COOKIE, v.clone());
        headers.append(SET_COOKIE, v.clone());
    }

    // What should survive: every non-empty pair not named like devmesh's.
    let expected: Vec<&[u8]> = values
        .iter()
        .flat_map(|v| pairs(v.as_bytes()))
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty() && !is_devmesh_cookie(pair_name(p)))
        .collect();

    let mut stripped = headers.clone();
    strip_devmesh_cookies(&mut stripped);

    let cookies: Vec<&HeaderValue> = stripped.get_all(COOKIE).iter().collect();
    assert!(cookies.len() <= 1, "{} Cookie headers left", cookies.len());
    let kept: Vec<&[u8]> = cookies
        .iter()
        .flat_map(|v| pairs(v.as_bytes()))
        .map(trim_wsp)
        .collect();
    for pair in &kept {
        assert!(
            !is_devmesh_cookie(pair_name(pair)),
            "devmesh cookie left: {:?}",
            String::from_utf8_lossy(pair)
        );
    }
    assert_eq!(kept, expected, "app cookies not kept byte for byte");

    // Nothing but `Cookie` changes.
    headers.remove(COOKIE);
    stripped.remove(COOKIE);
    assert_eq!(headers, stripped);
});
