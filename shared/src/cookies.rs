//! The rules that keep devmesh's cookies away from apps: which names are
//! devmesh's, removing them from what an app receives, and which
//! `Set-Cookie` an app may send back. Byte-level, so no encoding hides a
//! name; fuzzed by `fuzz/fuzz_targets/cookie_filter.rs`.

use http::{HeaderMap, HeaderValue, header};

/// Whether `name` is a cookie devmesh sets, on any of its domains: any
/// name starting with `devmesh` (ASCII case ignored), bare or behind a
/// `__Host-` or `__Secure-` prefix. Works on raw bytes, so no encoding
/// trick hides a name.
pub fn is_devmesh_cookie(name: &[u8]) -> bool {
    let name = name.trim_ascii();
    let has = |s: &[u8], p: &[u8]| s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p);
    let bare = if has(name, b"__host-") {
        &name[7..]
    } else if has(name, b"__secure-") {
        &name[9..]
    } else {
        name
    };
    has(bare, b"devmesh")
}

/// Removes every devmesh cookie from the request's `Cookie` headers,
/// keeping the app's own cookies byte for byte.
pub fn strip_devmesh_cookies(headers: &mut HeaderMap) {
    let mut kept: Vec<u8> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        for pair in value.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            // A pair without `=` is a nameless cookie: its value is what
            // browsers would show as the name.
            let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
            if pair.is_empty() || is_devmesh_cookie(name) {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    headers.remove(header::COOKIE);
    if let Ok(v) = HeaderValue::from_bytes(&kept)
        && !kept.is_empty()
    {
        headers.insert(header::COOKIE, v);
    }
}

/// Whether an app may send this `Set-Cookie` to the browser: it must have a
/// name (browsers store a nameless cookie under its value), made of visible
/// ASCII, and the name must not be one of devmesh's.
pub fn app_may_set_cookie(value: &[u8]) -> bool {
    let first = value.split(|&b| b == b';').next().unwrap_or_default();
    let Some(eq) = first.iter().position(|&b| b == b'=') else {
        return false;
    };
    let name = first[..eq].trim_ascii();
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(b))
        && !is_devmesh_cookie(name)
}
