//! App and dev-URL hostnames.
//!
//! Apps live at `<slug>--<agent>--<workspace>--<user>.<apps domain>` and dev
//! URLs at `<port>[s]--<agent>--<workspace>--<user>.<apps domain>`. The whole
//! routing key is one DNS label, so it must fit in 63 characters; resources
//! whose label would not fit are refused when they are created.

use thiserror::Error;

pub use crate::signing::AppTarget;

/// The longest DNS label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// The longest dev-URL prefix: a five-digit port plus `s` for HTTPS upstreams.
const LONGEST_PORT_PREFIX: &str = "65535s";

/// A hostname label would be longer than a DNS label may be.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "the hostname label \"{label}\" is {len} characters; DNS allows at most {MAX_LABEL_LEN}: use shorter names"
)]
pub struct LabelTooLong {
    /// The label that does not fit.
    pub label: String,
    /// Its length in bytes, over [`MAX_LABEL_LEN`].
    pub len: usize,
}

/// Builds the label `<first>--<agent>--<workspace>--<user>`.
pub fn label(first: &str, agent: &str, workspace: &str, user: &str) -> String {
    format!("{first}--{agent}--{workspace}--{user}")
}

/// Checks that the app `slug` and every dev URL of `agent` fit in one label.
pub fn check_fits(
    slug: Option<&str>,
    agent: &str,
    workspace: &str,
    user: &str,
) -> Result<(), LabelTooLong> {
    for first in slug.into_iter().chain([LONGEST_PORT_PREFIX]) {
        let l = label(first, agent, workspace, user);
        if l.len() > MAX_LABEL_LEN {
            let len = l.len();
            return Err(LabelTooLong { label: l, len });
        }
    }
    Ok(())
}

/// A parsed app or dev-URL hostname label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppHost {
    /// The app slug, or the port of a dev URL.
    pub target: AppTarget,
    /// The agent, when the label names one (it may be left out when the
    /// workspace has a single agent).
    pub agent: Option<String>,
    /// The workspace name.
    pub workspace: String,
    /// The owner's username.
    pub user: String,
}

/// Parses `<slug|port[s]>--[<agent>--]<workspace>--<user>`. Every part must
/// be a valid name; `None` for anything else.
pub fn parse_label(label: &str) -> Option<AppHost> {
    if label.len() > MAX_LABEL_LEN {
        return None;
    }
    let parts: Vec<&str> = label.split("--").collect();
    let (first, agent, workspace, user) = match parts.as_slice() {
        [f, a, w, u] => (*f, Some(*a), *w, *u),
        [f, w, u] => (*f, None, *w, *u),
        _ => return None,
    };
    for part in agent.iter().chain([&workspace, &user]) {
        crate::names::validate_name(part).ok()?;
    }
    Some(AppHost {
        target: parse_target(first)?,
        agent: agent.map(str::to_owned),
        workspace: workspace.to_owned(),
        user: user.to_owned(),
    })
}

/// `8080` and `8443s` are dev-URL ports (the `s` means an HTTPS upstream);
/// anything else must be a valid slug.
fn parse_target(first: &str) -> Option<AppTarget> {
    let (digits, https) = match first.strip_suffix('s') {
        Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) => (d, true),
        _ => (first, false),
    };
    if digits.bytes().all(|b| b.is_ascii_digit()) {
        if digits.len() > 5 || digits.starts_with('0') {
            return None;
        }
        let port: u16 = digits.parse().ok().filter(|p| *p > 0)?;
        return Some(AppTarget::Port { port, https });
    }
    crate::names::validate_name(first).ok()?;
    Some(AppTarget::Slug(first.to_owned()))
}

/// Whether a slug would be read as a dev-URL port (and so cannot be a slug).
pub fn looks_like_port(slug: &str) -> bool {
    matches!(parse_target(slug), Some(AppTarget::Port { .. }))
        || slug
            .strip_suffix('s')
            .unwrap_or(slug)
            .bytes()
            .all(|b| b.is_ascii_digit())
}

/// If `host` (which may carry a `:port`) is under `wildcard`
/// (`*.apps.example.com`, possibly with a port), returns its first label.
pub fn wildcard_label<'a>(host: &'a str, wildcard: &str) -> Option<&'a str> {
    let suffix = wildcard.strip_prefix("*.")?;
    let (suffix_host, suffix_port) = split_port(suffix);
    let (host_name, host_port) = split_port(host);
    if suffix_port.is_some() && suffix_port != host_port {
        return None;
    }
    let (label, rest) = host_name.split_once('.')?;
    (rest.eq_ignore_ascii_case(suffix_host) && !label.is_empty()).then_some(label)
}

fn split_port(host: &str) -> (&str, Option<&str>) {
    match host.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_into_their_parts() {
        let h = parse_label("code--main--dev--alice").unwrap();
        assert_eq!(h.target, AppTarget::Slug("code".into()));
        assert_eq!(h.agent.as_deref(), Some("main"));
        assert_eq!((h.workspace.as_str(), h.user.as_str()), ("dev", "alice"));
        let h = parse_label("8080--dev--alice").unwrap();
        assert_eq!(
            h.target,
            AppTarget::Port {
                port: 8080,
                https: false
            }
        );
        assert_eq!(h.agent, None);
        assert_eq!(
            parse_label("8443s--a--dev--alice").unwrap().target,
            AppTarget::Port {
                port: 8443,
                https: true
            }
        );
        for bad in [
            "",
            "code",
            "code--dev",
            "a--b--c--d--e",
            "Code--dev--alice",
            "0--dev--alice",
            "65536--dev--alice",
            "08080--dev--alice",
            "code--dev--al_ice",
            "code----alice",
            "-x--dev--alice",
        ] {
            assert_eq!(parse_label(bad), None, "{bad}");
        }
        assert!(looks_like_port("8080") && looks_like_port("80s") && !looks_like_port("code"));
    }

    #[test]
    fn wildcards_match_hosts_and_ports() {
        assert_eq!(
            wildcard_label("a--b--c.apps.example.com", "*.apps.example.com"),
            Some("a--b--c")
        );
        assert_eq!(
            wildcard_label("a--b--c.apps.example.com:3000", "*.apps.example.com"),
            Some("a--b--c")
        );
        assert_eq!(
            wildcard_label("x.APPS.example.com:3000", "*.apps.example.com:3000"),
            Some("x")
        );
        assert_eq!(
            wildcard_label("x.apps.example.com:4000", "*.apps.example.com:3000"),
            None
        );
        assert_eq!(
            wildcard_label("apps.example.com", "*.apps.example.com"),
            None
        );
        assert_eq!(
            wildcard_label("x.y.apps.example.com", "*.apps.example.com"),
            None
        );
        assert_eq!(wildcard_label("x.evil.com", "*.apps.example.com"), None);
    }

    #[test]
    fn short_names_fit_and_long_ones_are_refused() {
        assert_eq!(check_fits(Some("code"), "main", "dev", "alice"), Ok(()));
        let long = "x".repeat(20);
        let err = check_fits(Some("code"), &long, &long, &long).unwrap_err();
        assert_eq!(err.len, 4 + 3 * 2 + 20 * 3);
        assert!(err.to_string().contains("at most 63"));
        // The dev-URL prefix alone can overflow even without apps.
        let n = "y".repeat(18);
        assert!(check_fits(None, &n, &n, &n).is_err());
    }
}
