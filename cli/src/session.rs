//! The stored session: `<config dir>/devmesh/session.json`, mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A deployment URL and the session token for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Session {
    pub(crate) url: String,
    pub(crate) token: String,
}

/// The directory holding devmesh's CLI state (`DEVMESH_CONFIG_DIR` overrides).
pub(crate) fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DEVMESH_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    dirs::config_dir()
        .map(|d| d.join("devmesh"))
        .context("cannot find a config directory ($HOME unset); set DEVMESH_CONFIG_DIR")
}

fn path() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join("session.json"))
}

/// Loads the stored session, if any.
pub(crate) fn load() -> anyhow::Result<Option<Session>> {
    let path = path()?;
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!("{} is corrupt; run devmesh login", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Stores the session, readable by this user only.
pub(crate) fn save(session: &Session) -> anyhow::Result<()> {
    let dir = config_dir()?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let path = dir.join("session.json");
    let tmp = dir.join("session.json.tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(serde_json::to_string_pretty(session)?.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Forgets the stored session.
pub(crate) fn clear() -> anyhow::Result<()> {
    match fs::remove_file(path()?) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}
