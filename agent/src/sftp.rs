//! The `sftp` subsystem of the agent's SSH server, on the workspace's
//! filesystem as the agent's user: what `sftp`, `scp` (which speaks sftp
//! since OpenSSH 9) and editors' remote file browsers use. Relative paths
//! start in the agent's directory.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// The most one read returns.
const MAX_READ: u32 = 256 * 1024;

/// At most this many open files and directories per session.
const MAX_HANDLES: usize = 1024;

pub(crate) struct Sftp {
    home: PathBuf,
    files: HashMap<String, tokio::fs::File>,
    /// A directory's entries, handed out by the first `readdir`.
    dirs: HashMap<String, Option<Vec<File>>>,
    next: u64,
}

impl Sftp {
    pub(crate) fn new(home: PathBuf) -> Self {
        Self {
            home,
            files: HashMap::new(),
            dirs: HashMap::new(),
            next: 0,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        if p.is_empty() || p == "." {
            self.home.clone()
        } else if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            self.home.join(p)
        }
    }

    fn handle(&mut self) -> Result<String, StatusCode> {
        if self.files.len() + self.dirs.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure);
        }
        self.next += 1;
        Ok(self.next.to_string())
    }
}

fn status(e: std::io::Error) -> StatusCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusCode;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let mut o = tokio::fs::OpenOptions::new();
        o.read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE) || pflags.contains(OpenFlags::APPEND))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE));
        if pflags.contains(OpenFlags::EXCLUDE) {
            o.create_new(true);
        } else if pflags.contains(OpenFlags::CREATE) {
            o.create(true);
        }
        if let Some(mode) = attrs.permissions {
            o.mode(mode & 0o7777);
        }
        let file = o.open(self.path(&filename)).await.map_err(status)?;
        let handle = self.handle()?;
        self.files.insert(handle.clone(), file);
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        if let Some(mut f) = self.files.remove(&handle) {
            f.flush().await.map_err(status)?;
        } else {
            self.dirs.remove(&handle);
        }
        Ok(ok(id))
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let f = self.files.get_mut(&handle).ok_or(StatusCode::Failure)?;
        f.seek(SeekFrom::Start(offset)).await.map_err(status)?;
        let mut data = vec![0u8; len.min(MAX_READ) as usize];
        let n = f.read(&mut data).await.map_err(status)?;
        if n == 0 {
            return Err(StatusCode::Eof);
        }
        data.truncate(n);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let f = self.files.get_mut(&handle).ok_or(StatusCode::Failure)?;
        f.seek(SeekFrom::Start(offset)).await.map_err(status)?;
        f.write_all(&data).await.map_err(status)?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let m = tokio::fs::symlink_metadata(self.path(&path))
            .await
            .map_err(status)?;
        Ok(Attrs {
            id,
            attrs: (&m).into(),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let m = tokio::fs::metadata(self.path(&path))
            .await
            .map_err(status)?;
        Ok(Attrs {
            id,
            attrs: (&m).into(),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let f = self.files.get(&handle).ok_or(StatusCode::Failure)?;
        let m = f.metadata().await.map_err(status)?;
        Ok(Attrs {
            id,
            attrs: (&m).into(),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        if let Some(mode) = attrs.permissions {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .await
                .map_err(status)?;
        }
        if let Some(size) = attrs.size {
            let f = tokio::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .await
                .map_err(status)?;
            f.set_len(size).await.map_err(status)?;
        }
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let f = self.files.get(&handle).ok_or(StatusCode::Failure)?;
        if let Some(mode) = attrs.permissions {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .await
                .map_err(status)?;
        }
        if let Some(size) = attrs.size {
            f.set_len(size).await.map_err(status)?;
        }
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let mut entries = tokio::fs::read_dir(self.path(&path))
            .await
            .map_err(status)?;
        let mut files = Vec::new();
        while let Some(e) = entries.next_entry().await.map_err(status)? {
            if let Ok(m) = tokio::fs::symlink_metadata(e.path()).await {
                let name = e.file_name().to_string_lossy().into_owned();
                files.push(File::new(name, FileAttributes::from(&m)));
            }
        }
        let handle = self.handle()?;
        self.dirs.insert(handle.clone(), Some(files));
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.dirs.get_mut(&handle) {
            Some(entries) => match entries.take() {
                Some(files) if !files.is_empty() => Ok(Name { id, files }),
                _ => Err(StatusCode::Eof),
            },
            None => Err(StatusCode::Failure),
        }
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        tokio::fs::remove_file(self.path(&filename))
            .await
            .map_err(status)?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        tokio::fs::create_dir(self.path(&path))
            .await
            .map_err(status)?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        tokio::fs::remove_dir(self.path(&path))
            .await
            .map_err(status)?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let full = self.path(&path);
        let real = tokio::fs::canonicalize(&full).await.unwrap_or(full);
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        tokio::fs::rename(self.path(&oldpath), self.path(&newpath))
            .await
            .map_err(status)?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = tokio::fs::read_link(self.path(&path))
            .await
            .map_err(status)?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        tokio::fs::symlink(&targetpath, self.path(&linkpath))
            .await
            .map_err(status)?;
        Ok(ok(id))
    }
}
