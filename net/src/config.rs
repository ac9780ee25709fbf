//! What the long-running processes' configurations share: the error every
//! bad setting becomes (the binary prints it on one line and exits 64),
//! reading the optional TOML file, and the checks of URLs and wildcards.

use std::path::Path;

use serde::de::DeserializeOwned;
use thiserror::Error;

/// A configuration problem, found before anything binds.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Reads a TOML settings file (kebab-case keys, unknown keys refused by
/// the target type).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_owned();
        ConfigError(format!("config file {}: {msg}", path.display()))
    })
}

/// An `http://` or `https://` URL with a host, without a trailing slash.
pub fn validate_url(flag: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            ConfigError(format!(
                "{flag} {url:?} must start with http:// or https://"
            ))
        })?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(ConfigError(format!("{flag} {url:?} has no host")));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A wildcard like `*.apps.example.com` (a port may follow), lower-cased.
pub fn validate_wildcard(flag: &str, w: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError(format!("{flag} {w:?} must look like *.apps.example.com"));
    let rest = w.strip_prefix("*.").ok_or_else(bad)?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    let labels_ok = !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    if !labels_ok || !port_ok {
        return Err(bad());
    }
    Ok(w.to_ascii_lowercase())
}

/// Where the primary keeps its state unless told otherwise:
/// `/var/lib/devmesh` as root, else `$XDG_DATA_HOME/devmesh`
/// (`~/.local/share/devmesh`). An edge on the same machine finds the
/// primary's self-signed CA under it.
pub fn default_data_dir(flag: &str) -> Result<std::path::PathBuf, ConfigError> {
    if nix::unistd::Uid::effective().is_root() {
        return Ok("/var/lib/devmesh".into());
    }
    dirs::data_dir().map(|d| d.join("devmesh")).ok_or_else(|| {
        ConfigError(format!(
            "cannot find a data directory ($HOME unset): pass {flag}"
        ))
    })
}
