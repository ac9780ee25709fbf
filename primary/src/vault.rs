//! Envelope encryption of the primary's keys at rest. The signing keys, the
//! mesh CA key and the sealing key live in PostgreSQL encrypted
//! (AES-256-GCM) under a key-encryption key kept outside the database, in a
//! file (`--secrets-key-file`, default `<data-dir>/secrets.key`). Reading
//! the database alone no longer lets anyone mint tokens, tickets or
//! certificates. Every primary replica of a deployment needs the same file.
//!
//! A stored value is `dmv1` ‖ nonce ‖ ciphertext ‖ tag, bound (as associated
//! data) to what it is (`signing_key:<kid>`, `mesh_ca`, `sealing_key:<kid>`),
//! so one wrapped key cannot be swapped in for another. Values stored in
//! plain text by older versions are read once and re-encrypted in place.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

const MAGIC: &[u8] = b"dmv1";
const TEXT_MAGIC: &str = "dmv1:";

/// The key-encryption key.
pub struct Vault {
    key: LessSafeKey,
    path: PathBuf,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("path", &self.path).finish()
    }
}

/// What reading a stored key found.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// It was encrypted; here it is.
    Encrypted(Vec<u8>),
    /// It was plain text (written by an older version); encrypt it now.
    Plain(Vec<u8>),
}

impl Stored {
    /// The key, whichever way it was stored.
    pub fn plain(&self) -> &[u8] {
        match self {
            Self::Encrypted(p) | Self::Plain(p) => p,
        }
    }
}

impl Vault {
    /// Reads the key file, creating it (mode 0600, 32 random bytes in hex)
    /// if it does not exist. Concurrent first starts agree on one file.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path)?,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read the secrets key {}", path.display()));
            }
        };
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .with_context(|| {
                format!(
                    "the secrets key {} is not 64 hex characters",
                    path.display()
                )
            })?;
        Self::from_bytes(&bytes, path)
    }

    fn from_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<Self> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| anyhow::anyhow!("unusable secrets key"))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            path: path.to_owned(),
        })
    }

    /// Encrypts `plain` as the key `purpose` names.
    pub fn wrap(&self, purpose: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the OS random number generator failed");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM seals any key-sized input");
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out
    }

    /// Reads a value stored by [`Vault::wrap`], or a plain one stored by
    /// an older version (`is_plain` says which values can be plain).
    pub fn unwrap(
        &self,
        purpose: &str,
        stored: &[u8],
        is_plain: impl Fn(&[u8]) -> bool,
    ) -> anyhow::Result<Stored> {
        let Some(body) = stored.strip_prefix(MAGIC).filter(|_| !is_plain(stored)) else {
            return Ok(Stored::Plain(stored.to_vec()));
        };
        let refused = || {
            anyhow::anyhow!(
                "cannot decrypt the {purpose} stored in the database with the secrets key {}: \
                 every primary replica needs the same key file (--secrets-key-file); \
                 restore the one the database was set up with",
                self.path.display()
            )
        };
        let (nonce, sealed) = body.split_at_checked(NONCE_LEN).ok_or_else(refused)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut buf)
            .map_err(|_| refused())?;
        Ok(Stored::Encrypted(plain.to_vec()))
    }

    /// [`Vault::wrap`] for a text column.
    pub fn wrap_text(&self, purpose: &str, plain: &str) -> String {
        format!(
            "{TEXT_MAGIC}{}",
            B64.encode(&self.wrap(purpose, plain.as_bytes())[MAGIC.len()..])
        )
    }

    /// [`Vault::unwrap`] for a text column (plain text is whatever does not
    /// start with the marker).
    pub fn unwrap_text(&self, purpose: &str, stored: &str) -> anyhow::Result<(String, bool)> {
        let Some(body) = stored.strip_prefix(TEXT_MAGIC) else {
            return Ok((stored.to_owned(), true));
        };
        let mut bytes = MAGIC.to_vec();
        bytes.extend(B64.decode(body).context("a damaged encrypted key")?);
        let plain = self.unwrap(purpose, &bytes, |_| false)?;
        Ok((
            String::from_utf8(plain.plain().to_vec()).context("a damaged encrypted key")?,
            false,
        ))
    }
}

/// Writes a fresh key file without replacing one another process wrote
/// meanwhile; returns what the file holds.
fn create(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
    f.sync_all()?;
    drop(f);
    // A hard link fails if the name exists: of two first starts, one wins
    // and both read the winner.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created the secrets key that encrypts devmesh's keys in the database; back it up");
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create {}", path.display()));
        }
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the secrets key {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> (tempfile::TempDir, Vault) {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::load_or_create(&dir.path().join("secrets.key")).unwrap();
        (dir, v)
    }

    #[test]
    fn a_wrapped_key_opens_only_as_what_it_was_wrapped_as_and_only_with_its_key() {
        let (dir, v) = vault();
        let wrapped = v.wrap("signing_key:a", b"secret");
        assert!(!wrapped.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            v.unwrap("signing_key:a", &wrapped, |_| false).unwrap(),
            Stored::Encrypted(b"secret".to_vec())
        );
        assert!(v.unwrap("signing_key:b", &wrapped, |_| false).is_err());
        let other = Vault::load_or_create(&dir.path().join("other.key")).unwrap();
        let err = other
            .unwrap("signing_key:a", &wrapped, |_| false)
            .unwrap_err();
        assert!(err.to_string().contains("same key file"), "{err}");
        // The same file gives the same key.
        let again = Vault::load_or_create(&dir.path().join("secrets.key")).unwrap();
        assert!(again.unwrap("signing_key:a", &wrapped, |_| false).is_ok());
    }

    #[test]
    fn plain_values_from_older_versions_are_recognised() {
        let (_dir, v) = vault();
        assert_eq!(
            v.unwrap("x", b"\x30\x51plain", |_| false).unwrap(),
            Stored::Plain(b"\x30\x51plain".to_vec())
        );
        let (text, plain) = v.unwrap_text("mesh_ca", "-----BEGIN").unwrap();
        assert!(plain && text == "-----BEGIN");
        let wrapped = v.wrap_text("mesh_ca", "-----BEGIN PRIVATE KEY");
        assert_eq!(
            v.unwrap_text("mesh_ca", &wrapped).unwrap(),
            ("-----BEGIN PRIVATE KEY".to_owned(), false)
        );
    }

    #[test]
    fn the_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        Vault::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "not hex").unwrap();
        assert!(Vault::load_or_create(&path).is_err());
    }
}
