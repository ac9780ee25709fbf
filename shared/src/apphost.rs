//! App and dev-URL hostnames.
//!
//! Apps live at `<slug>--<agent>--<workspace>--<user>.<apps domain>` and dev
//! URLs at `<port>[s]--<agent>--<workspace>--<user>.<apps domain>`. The whole
//! routing key is one DNS label, so it must fit in 63 characters; resources
//! whose label would not fit are refused when they are created.

use thiserror::Error;

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
    /// Its length.
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

#[cfg(test)]
mod tests {
    use super::*;

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
