//! Names of users, workspaces, agents, apps, templates and edges become
//! labels of hostnames (`<slug>--<agent>--<workspace>--<user>.<apps domain>`),
//! so they follow one rule: lowercase ASCII letters and digits, single
//! hyphens between them, 32 characters at most. The double hyphen is
//! reserved as the separator of app hostnames.

use thiserror::Error;

/// The longest name any devmesh resource may have.
pub const MAX_NAME_LEN: usize = 32;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("must be at most {MAX_NAME_LEN} characters (got {0})")]
    TooLong(usize),
    /// The name contains something other than `a-z`, `0-9` and single inner hyphens.
    #[error("must be lowercase letters and digits separated by single hyphens, like \"my-name-2\"")]
    Invalid,
    /// The name is reserved for devmesh itself.
    #[error("\"{0}\" is reserved")]
    Reserved(String),
}

/// Checks `name` against `[a-z0-9]+(-[a-z0-9]+)*`, at most 32 characters.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    let bytes = name.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(NameError::Invalid);
    }
    let mut prev_hyphen = false;
    for &b in bytes {
        match b {
            b'-' if prev_hyphen => return Err(NameError::Invalid),
            b'-' => prev_hyphen = true,
            b if alnum(b) => prev_hyphen = false,
            _ => return Err(NameError::Invalid),
        }
    }
    Ok(())
}

/// The TLS name on a region's relay certificate (and what agents and other
/// relays check when they dial it).
pub fn relay_server_name(region: &str) -> String {
    format!("{region}.relay.devmesh.internal")
}

/// Like [`validate_name`], refusing the names devmesh keeps for itself as an
/// edge (region) name.
pub fn validate_region_name(name: &str) -> Result<(), NameError> {
    validate_name(name)?;
    if name == "primary" {
        return Err(NameError::Reserved(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_dns_label_safe_names() {
        for ok in ["a", "abc", "a-b", "a1-b2-c3", "0", &"x".repeat(32)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"x".repeat(33)), Err(NameError::TooLong(33)));
        for bad in ["-a", "a-", "a--b", "A", "a_b", "a.b", "a b", "é", "a/b"] {
            assert_eq!(validate_name(bad), Err(NameError::Invalid), "{bad}");
        }
        assert!(matches!(
            validate_region_name("primary"),
            Err(NameError::Reserved(_))
        ));
        assert_eq!(validate_region_name("eu-west"), Ok(()));
    }

    proptest! {
        #[test]
        fn valid_names_never_contain_the_separator(s in "\\PC{0,40}") {
            if validate_name(&s).is_ok() {
                prop_assert!(!s.contains("--"));
                prop_assert!(s.len() <= MAX_NAME_LEN);
                prop_assert!(s.bytes().all(|b| b == b'-' || b.is_ascii_lowercase() || b.is_ascii_digit()));
            }
        }
    }
}
