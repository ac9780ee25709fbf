//! Template directories as tar archives: packed by the CLI, checked by the
//! primary before it stores one, unpacked by the provisioner that runs it.
//!
//! Only plain files and directories under relative paths are allowed: an
//! entry that would land outside the directory (`..`, an absolute path),
//! a link, a device, or an archive too large is refused with the entry
//! named, before anything is written.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The most entries an archive may hold.
pub const MAX_ENTRIES: usize = 1000;
/// The most bytes its files may hold, unpacked.
pub const MAX_UNPACKED: u64 = 8 * 1024 * 1024;

/// Why an archive is refused.
#[derive(Debug, thiserror::Error)]
#[error("template archive: {0}")]
pub struct ArchiveError(String);

fn refuse(msg: impl Into<String>) -> ArchiveError {
    ArchiveError(msg.into())
}

/// A checked entry: where it goes and what it holds.
enum Entry {
    Dir(PathBuf),
    File(PathBuf, Vec<u8>),
}

/// Reads and checks every entry of `tar`.
fn entries(tar: &[u8]) -> Result<Vec<Entry>, ArchiveError> {
    let mut archive = tar::Archive::new(tar);
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut has_tf = false;
    for entry in archive.entries().map_err(|e| refuse(e.to_string()))? {
        let mut entry = entry.map_err(|e| refuse(format!("unreadable: {e}")))?;
        if out.len() == MAX_ENTRIES {
            return Err(refuse(format!("more than {MAX_ENTRIES} entries")));
        }
        let path = entry
            .path()
            .map_err(|e| refuse(format!("unreadable path: {e}")))?
            .into_owned();
        let shown = path.display().to_string();
        if path.as_os_str().is_empty()
            || !path
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(refuse(format!(
                "{shown:?} points outside the template directory"
            )));
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => out.push(Entry::Dir(path)),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(|e| refuse(e.to_string()))?;
                total = total.saturating_add(size);
                if total > MAX_UNPACKED {
                    return Err(refuse(format!(
                        "more than {} MiB of files",
                        MAX_UNPACKED / 1024 / 1024
                    )));
                }
                let mut data = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut data)
                    .map_err(|e| refuse(format!("{shown}: {e}")))?;
                has_tf |= path.components().count() == 1 && shown.ends_with(".tf");
                out.push(Entry::File(path, data));
            }
            // Extended headers carry long names; the tar crate applies them.
            tar::EntryType::XHeader
            | tar::EntryType::XGlobalHeader
            | tar::EntryType::GNULongName => {}
            other => {
                return Err(refuse(format!(
                    "{shown:?} is a {other:?}: only files and directories are allowed"
                )));
            }
        }
    }
    if !has_tf {
        return Err(refuse("no .tf file at the top of the template directory"));
    }
    Ok(out)
}

/// Checks `tar` as a template directory; returns its file names.
pub fn check(tar: &[u8]) -> Result<Vec<String>, ArchiveError> {
    Ok(entries(tar)?
        .into_iter()
        .filter_map(|e| match e {
            Entry::File(p, _) => Some(p.display().to_string()),
            Entry::Dir(_) => None,
        })
        .collect())
}

/// Unpacks `tar` into `dir` (which exists) after checking all of it.
pub fn unpack(tar: &[u8], dir: &Path) -> Result<(), ArchiveError> {
    let io = |e: std::io::Error| refuse(format!("cannot write {}: {e}", dir.display()));
    for entry in entries(tar)? {
        match entry {
            Entry::Dir(p) => std::fs::create_dir_all(dir.join(p)).map_err(io)?,
            Entry::File(p, data) => {
                let target = dir.join(&p);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                std::fs::write(target, data).map_err(io)?;
            }
        }
    }
    Ok(())
}

/// Packs the template directory `dir`: its files and directories, minus
/// Terraform's own working files (`.terraform/`, state, lock-free caches),
/// following no links. Checked as [`check`] would.
pub fn pack(dir: &Path) -> Result<Vec<u8>, ArchiveError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(&rel))
            .map_err(|e| refuse(format!("cannot read {}: {e}", dir.join(&rel).display())))?
            .filter_map(Result::ok)
            .collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n == ".terraform" || n.starts_with("terraform.tfstate") || n == ".git" {
                continue;
            }
            let path = rel.join(&name);
            let kind = e.file_type().map_err(|e| refuse(e.to_string()))?;
            if kind.is_dir() {
                builder
                    .append_dir(&path, e.path())
                    .map_err(|e| refuse(e.to_string()))?;
                stack.push(path);
            } else if kind.is_file() {
                builder
                    .append_path_with_name(e.path(), &path)
                    .map_err(|e| refuse(e.to_string()))?;
            } else {
                return Err(refuse(format!(
                    "{} is not a file or directory",
                    path.display()
                )));
            }
        }
    }
    let tar = builder.into_inner().map_err(|e| refuse(e.to_string()))?;
    check(&tar)?;
    Ok(tar)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Written raw so hostile paths get in as they would from a
            // hand-made archive.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_template_directory_survives_pack_and_unpack() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("main.tf"), "# main").unwrap();
        std::fs::create_dir_all(src.path().join("scripts/.terraform")).unwrap();
        std::fs::write(src.path().join("scripts/start.sh"), "echo hi").unwrap();
        std::fs::write(src.path().join("terraform.tfstate"), "{}").unwrap();
        let tar = pack(src.path()).unwrap();
        let mut files = check(&tar).unwrap();
        files.sort();
        assert_eq!(files, ["main.tf", "scripts/start.sh"]);
        let dst = tempfile::tempdir().unwrap();
        unpack(&tar, dst.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dst.path().join("scripts/start.sh")).unwrap(),
            "echo hi"
        );
        assert!(!dst.path().join("terraform.tfstate").exists());
    }

    #[test]
    fn entries_that_escape_or_are_not_files_are_refused_before_anything_is_written() {
        let tf = ("main.tf", tar::EntryType::Regular, b"#".as_slice());
        for (bad, needle) in [
            (
                ("../evil.tf", tar::EntryType::Regular, b"x".as_slice()),
                "outside",
            ),
            (
                ("/etc/passwd", tar::EntryType::Regular, b"x".as_slice()),
                "outside",
            ),
            (
                ("a/../../b", tar::EntryType::Regular, b"x".as_slice()),
                "outside",
            ),
            (
                ("link", tar::EntryType::Symlink, b"".as_slice()),
                "only files",
            ),
            (("hard", tar::EntryType::Link, b"".as_slice()), "only files"),
            (("dev", tar::EntryType::Char, b"".as_slice()), "only files"),
        ] {
            let archive = tar_of(&[tf, bad]);
            let dst = tempfile::tempdir().unwrap();
            let err = unpack(&archive, dst.path()).unwrap_err().to_string();
            assert!(err.contains(needle), "{}: {err}", bad.0);
            assert_eq!(
                std::fs::read_dir(dst.path()).unwrap().count(),
                0,
                "nothing written"
            );
        }
        let err = check(&tar_of(&[("README", tar::EntryType::Regular, b"x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no .tf file"), "{err}");
        assert!(check(b"not a tar at all, just some bytes that go on").is_err());
        let big = vec![0u8; MAX_UNPACKED as usize + 1];
        let err = check(&tar_of(&[tf, ("big", tar::EntryType::Regular, &big)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("MiB"), "{err}");
    }
}
