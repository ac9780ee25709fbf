//! The embedded PostgreSQL: a private cluster run from the system's server
//! binaries, so `devmesh server` works with no database to set up.
//!
//! The cluster lives in `<data-dir>/postgres`, listens only on a unix socket
//! in a private directory (no TCP port), authenticates with a random password
//! kept in `<data-dir>/postgres.password`, and is stopped when the server
//! stops. `initdb` refuses to run as root, so as root the cluster runs as the
//! unprivileged `postgres` system user.
//!
//! Crash safety: a guardian shell process holds the read end of a pipe whose
//! write end only this process has; when this process dies for any reason,
//! even SIGKILL, the pipe closes and the guardian stops PostgreSQL. A
//! `devmesh.lock` file lock proves no other devmesh uses the data directory,
//! so a leftover `postmaster.pid` can be judged stale safely.
//!
//! Everything here blocks; async callers use `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use devmesh_shared::secret::{Secret, random_alphanumeric};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use sqlx::postgres::PgConnectOptions;
use thiserror::Error;

/// The oldest PostgreSQL major version devmesh supports.
pub const MIN_MAJOR_VERSION: u32 = 13;
/// The database role devmesh creates in its cluster.
const DB_ROLE: &str = "devmesh";
/// The role the primary connects as: it owns devmesh's database, nothing
/// more.
pub const APP_ROLE: &str = "devmesh_app";
/// The port number only names the socket file; no TCP port is opened.
const SOCKET_PORT: u16 = 5432;
/// Unix socket paths are limited to 107 bytes on Linux.
const MAX_SOCKET_PATH: usize = 100;

/// Why the embedded database could not be started.
#[derive(Debug, Error)]
pub enum EmbeddedError {
    /// No `initdb`/`postgres` pair was found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found in PATH, `pg_config --bindir` or /usr/lib/postgresql/*/bin: install them (Debian/Ubuntu: apt-get install postgresql) or pass --postgres-url"
    )]
    BinariesNotFound,
    /// The binaries found are too old.
    #[error(
        "PostgreSQL {found} found in {dir}, but devmesh needs {MIN_MAJOR_VERSION} or newer: upgrade it or pass --postgres-url"
    )]
    TooOld {
        /// The major version found.
        found: u32,
        /// The directory the too-old `initdb` and `postgres` were found in.
        dir: String,
    },
    /// Running as root with no unprivileged user to run the cluster as.
    #[error(
        "running as root, PostgreSQL needs an unprivileged user to run as, and there is no \"postgres\" user: create one (useradd --system postgres) or pass --postgres-url"
    )]
    NoDatabaseUser,
    /// The database user cannot enter the data directory.
    #[error(
        "the database user \"{user}\" cannot reach {path}: choose a --data-dir that every parent directory lets it enter (as root the default is /var/lib/devmesh), or pass --postgres-url"
    )]
    Unreachable {
        /// The OS user PostgreSQL runs as.
        user: String,
        /// The directory it cannot reach.
        path: PathBuf,
    },
    /// Another devmesh process holds the data directory.
    #[error("the data directory {0} is in use by another devmesh server")]
    InUse(PathBuf),
    /// `initdb` failed.
    #[error("initdb failed (see {log}): {tail}")]
    Initdb {
        /// Log file with the whole output.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// `postgres` exited or never became ready.
    #[error("PostgreSQL did not start (see {log}): {tail}")]
    Start {
        /// Log file with the whole output.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// The cluster exists but its password file is missing.
    #[error(
        "the cluster in {0} exists but its password file is missing; restore it or move the cluster away to start afresh"
    )]
    MissingPassword(PathBuf),
    /// A filesystem or process error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmbeddedError {
    let context = context.into();
    move |source| EmbeddedError::Io { context, source }
}

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// devmesh's data directory; the cluster goes in `postgres/` inside it.
    pub data_dir: PathBuf,
    /// Trade durability for speed (no fsync): for test clusters only.
    pub ephemeral: bool,
    /// Remove `data_dir` once PostgreSQL has stopped after this process
    /// exits (test clusters).
    pub remove_on_exit: bool,
}

/// A running embedded cluster. Dropping it stops PostgreSQL.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    child: Option<Child>,
    guardian: Option<(Child, ChildStdin)>,
    _lock: File,
    socket_dir: PathBuf,
    password: Secret,
    log_path: PathBuf,
    data_dir: PathBuf,
    /// What starting the postmaster again needs.
    restart: Restart,
    /// The OS user the cluster runs as, if not this process's.
    pub run_as: Option<String>,
    /// `major.minor` of the server.
    pub version: String,
}

/// How the postmaster was started, to start it the same way again.
#[derive(Debug)]
struct Restart {
    bindir: PathBuf,
    cluster: PathBuf,
    user: DbUser,
    ephemeral: bool,
    remove_on_exit: bool,
}

/// The OS identity PostgreSQL runs under.
#[derive(Debug, Clone)]
struct DbUser {
    name: String,
    /// `Some` when different from this process (we are root).
    switch_to: Option<(Uid, Gid)>,
}

impl EmbeddedPostgres {
    /// Initialises the cluster if needed and starts it, waiting until it
    /// accepts connections.
    pub fn start(opts: &EmbeddedOptions) -> Result<Self, EmbeddedError> {
        let (bindir, version, major) = find_binaries()?;
        if major < MIN_MAJOR_VERSION {
            return Err(EmbeddedError::TooOld {
                found: major,
                dir: bindir.display().to_string(),
            });
        }
        let user = db_user()?;
        let data_dir = &opts.data_dir;
        let root = user.switch_to.is_some();
        // As root the data directory must be enterable by the database user.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(if root { 0o755 } else { 0o700 })
            .create(data_dir)
            .map_err(io_err(format!(
                "creating data directory {}",
                data_dir.display()
            )))?;

        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(data_dir.join("devmesh.lock"))
            .map_err(io_err("opening devmesh.lock"))?;
        if lock.try_lock().is_err() {
            return Err(EmbeddedError::InUse(data_dir.clone()));
        }

        let cluster = data_dir.join("postgres");
        let run_dir = data_dir.join("run");
        for dir in [&cluster, &run_dir] {
            make_private_dir(dir, &user)?;
        }
        let socket_dir = if run_dir
            .join(format!(".s.PGSQL.{SOCKET_PORT}"))
            .as_os_str()
            .len()
            < MAX_SOCKET_PATH
        {
            run_dir.clone()
        } else {
            let short = std::env::temp_dir().join(format!(
                "devmesh-pg-{}",
                &hex::encode(devmesh_shared::secret::sha256(
                    data_dir.as_os_str().as_encoded_bytes()
                ))[..12]
            ));
            make_private_shared_dir(&short, &user)?;
            short
        };
        if let Some((uid, gid)) = user.switch_to {
            probe_reachable(&cluster, uid, gid, &user.name)?;
            probe_reachable(&socket_dir, uid, gid, &user.name)?;
            tracing::info!(user = %user.name, "running the embedded PostgreSQL as the unprivileged user {:?} because devmesh runs as root", user.name);
        }

        let log_path = data_dir.join("postgres.log");
        let password_path = data_dir.join("postgres.password");
        let password = if cluster.join("PG_VERSION").exists() {
            let pw = fs::read_to_string(&password_path)
                .map_err(|_| EmbeddedError::MissingPassword(cluster.clone()))?;
            Secret::new(pw.trim().to_owned())
        } else {
            let pw = Secret::new(random_alphanumeric(32));
            write_private(&password_path, pw.expose())?;
            initdb(
                &bindir,
                &cluster,
                &run_dir,
                &pw,
                &user,
                &log_path,
                opts.ephemeral,
            )?;
            pw
        };

        clear_stale_pid(&cluster)?;
        let child = spawn_postgres(
            &bindir,
            &cluster,
            &socket_dir,
            &user,
            &log_path,
            opts.ephemeral,
        )?;
        let guardian = spawn_guardian(
            child.id(),
            opts.remove_on_exit.then_some(data_dir.as_path()),
        );
        let run_as = user.switch_to.map(|_| user.name.clone());
        let mut me = Self {
            child: Some(child),
            guardian,
            _lock: lock,
            socket_dir,
            password,
            log_path,
            data_dir: data_dir.clone(),
            restart: Restart {
                bindir,
                cluster: cluster.clone(),
                user,
                ephemeral: opts.ephemeral,
                remove_on_exit: opts.remove_on_exit,
            },
            run_as,
            version,
        };
        me.wait_ready(&cluster)?;
        Ok(me)
    }

    /// How the postmaster ended, once it has (killed, crashed, out of
    /// memory); `None` while it runs or after [`stop`](Self::stop).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Starts the postmaster again on the same cluster after it died, and
    /// waits until it accepts connections: PostgreSQL replays its
    /// write-ahead log first (crash recovery), so every committed
    /// transaction is there again.
    pub fn restart(&mut self) -> Result<(), EmbeddedError> {
        // The guardian watches a PID that is gone: retire it before the
        // PID can be reused by anything it would signal.
        if let Some((mut guardian, _stdin)) = self.guardian.take() {
            let _ = guardian.kill();
            let _ = guardian.wait();
        }
        // The old postmaster's backends can outlive it for a moment, still
        // attached to its shared memory; none may run beside a new one.
        // They share its process group: end the group, and wait until it
        // is gone before the stale lock file may be removed.
        if let Some(mut child) = self.child.take() {
            let group = Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
            let _ = child.wait();
            for _ in 0..100 {
                if nix::sys::signal::killpg(group, None).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let r = &self.restart;
        clear_stale_pid(&r.cluster)?;
        let child = spawn_postgres(
            &r.bindir,
            &r.cluster,
            &self.socket_dir,
            &r.user,
            &self.log_path,
            r.ephemeral,
        )?;
        self.guardian = spawn_guardian(
            child.id(),
            r.remove_on_exit.then_some(self.data_dir.as_path()),
        );
        self.child = Some(child);
        let cluster = r.cluster.clone();
        self.wait_ready(&cluster)
    }

    /// The last lines of PostgreSQL's log, for saying why it stopped.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    /// Connection options for `database` on this cluster.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(SOCKET_PORT)
            .username(DB_ROLE)
            .password(self.password.expose())
            .database(database)
    }

    /// Connection options for devmesh's own role on `database`: a login
    /// role without any other privilege ([`APP_ROLE`]) that owns the
    /// database and every table in it, so the primary never runs as a
    /// superuser. Creates the role (its password kept beside the
    /// superuser's) and hands it what earlier versions created as the
    /// superuser; safe to repeat.
    pub async fn app_options(&self, database: &str) -> Result<PgConnectOptions, sqlx::Error> {
        use sqlx::Connection;
        let path = self.data_dir.join("postgres.app-password");
        let password = match fs::read_to_string(&path) {
            Ok(p) => p.trim().to_owned(),
            Err(_) => {
                let p = random_alphanumeric(32);
                write_private(&path, &p).map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?;
                p
            }
        };
        let mut admin = sqlx::PgConnection::connect_with(&self.connect_options(database)).await?;
        // Role and database names are constants; the password is
        // alphanumeric, so quoting it literally is safe.
        sqlx::query(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                 CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
               END IF;
             END $$"
        ))
        .execute(&mut admin)
        .await?;
        sqlx::query(&format!("ALTER ROLE {APP_ROLE} PASSWORD '{password}'"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!(
            "ALTER DATABASE \"{database}\" OWNER TO {APP_ROLE}"
        ))
        .execute(&mut admin)
        .await?;
        sqlx::query(&format!(
            "DO $$ DECLARE r record; BEGIN
               FOR r IN SELECT tablename FROM pg_tables
                        WHERE schemaname = 'public' AND tableowner <> '{APP_ROLE}' LOOP
                 EXECUTE format('ALTER TABLE public.%I OWNER TO {APP_ROLE}', r.tablename);
               END LOOP;
               FOR r IN SELECT sequencename FROM pg_sequences
                        WHERE schemaname = 'public' AND sequenceowner <> '{APP_ROLE}' LOOP
                 EXECUTE format('ALTER SEQUENCE public.%I OWNER TO {APP_ROLE}', r.sequencename);
               END LOOP;
             END $$"
        ))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok(self
            .connect_options(database)
            .username(APP_ROLE)
            .password(&password))
    }

    /// The same as a URL, for handing to another process.
    pub fn url(&self, database: &str) -> Secret {
        Secret::new(format!(
            "postgres://{DB_ROLE}:{}@localhost:{SOCKET_PORT}/{database}?host={}",
            self.password.expose(),
            percent_encode_path(&self.socket_dir)
        ))
    }

    fn wait_ready(&mut self, cluster: &Path) -> Result<(), EmbeddedError> {
        let deadline = std::time::SystemTime::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(EmbeddedError::Start {
                    log: self.log_path.clone(),
                    tail: format!("exited with {status}: {}", log_tail(&self.log_path)),
                });
            }
            // Line 8 of postmaster.pid is the postmaster's status.
            if let Ok(pid) = fs::read_to_string(cluster.join("postmaster.pid"))
                && pid.lines().nth(7).is_some_and(|s| s.trim() == "ready")
            {
                return Ok(());
            }
            if std::time::SystemTime::now() > deadline {
                return Err(EmbeddedError::Start {
                    log: self.log_path.clone(),
                    tail: format!("not ready after 60s: {}", log_tail(&self.log_path)),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops PostgreSQL with a fast shutdown (open transactions roll back,
    /// committed data is kept), escalating if it does not stop in 30 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // A clean stop needs no guardian; retire it first so it cannot
        // signal the PID after PostgreSQL has exited and the PID is reused.
        if let Some((mut guardian, _stdin)) = self.guardian.take() {
            let _ = guardian.kill();
            let _ = guardian.wait();
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        for _ in 0..300 {
            if let Ok(Some(_)) = child.try_wait() {
                tracing::info!("embedded PostgreSQL stopped");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::warn!("embedded PostgreSQL did not stop in 30s; sending SIGQUIT");
        let _ = kill(pid, Signal::SIGQUIT);
        let _ = child.wait();
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

// === Binaries and users ===

/// Finds a directory holding both `initdb` and `postgres`, newest first.
fn find_binaries() -> Result<(PathBuf, String, u32), EmbeddedError> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        candidates.extend(versions.into_iter().map(|(_, p)| p));
    }
    for dir in candidates {
        let postgres = dir.join("postgres");
        if !(dir.join("initdb").is_file() && postgres.is_file()) {
            continue;
        }
        let Ok(out) = Command::new(&postgres).arg("--version").output() else {
            continue;
        };
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(version) = text.split_whitespace().nth(2) else {
            continue;
        };
        let Some(major) = version.split('.').next().and_then(|m| m.parse().ok()) else {
            continue;
        };
        return Ok((dir, version.to_owned(), major));
    }
    Err(EmbeddedError::BinariesNotFound)
}

fn db_user() -> Result<DbUser, EmbeddedError> {
    if !Uid::effective().is_root() {
        let name = User::from_uid(Uid::effective())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| Uid::effective().to_string());
        return Ok(DbUser {
            name,
            switch_to: None,
        });
    }
    match User::from_name("postgres") {
        Ok(Some(u)) if !u.uid.is_root() => Ok(DbUser {
            name: u.name,
            switch_to: Some((u.uid, u.gid)),
        }),
        _ => Err(EmbeddedError::NoDatabaseUser),
    }
}

fn as_db_user(cmd: &mut Command, user: &DbUser) {
    if let Some((uid, gid)) = user.switch_to {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
}

/// Creates `dir` (mode 0700) owned by the database user.
fn make_private_dir(dir: &Path, user: &DbUser) -> Result<(), EmbeddedError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("setting permissions of {}", dir.display())))?;
    if let Some((uid, gid)) = user.switch_to {
        std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw()))
            .map_err(io_err(format!("giving {} to {}", dir.display(), user.name)))?;
    }
    Ok(())
}

/// Like [`make_private_dir`], for a directory at a predictable path in a
/// directory others can write (`$TMPDIR`): created without following links,
/// or, if it exists, opened without following a link and accepted only if
/// it is a directory owned by us (or the database user). Permissions and
/// ownership are then set on the opened directory, never by path, so a link
/// swapped in meanwhile is never followed (as root, that would hand any
/// directory to the database user).
fn make_private_shared_dir(dir: &Path, user: &DbUser) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let not_ours = || EmbeddedError::Io {
        context: format!(
            "the socket directory {} exists and is not ours; remove it or choose a shorter --data-dir",
            dir.display()
        ),
        source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    };
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
    }
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
        .open(dir)
        .map_err(|_| not_ours())?;
    let meta = opened
        .metadata()
        .map_err(io_err(format!("reading {}", dir.display())))?;
    let owners = [
        Some(Uid::effective().as_raw()),
        user.switch_to.map(|(uid, _)| uid.as_raw()),
    ];
    if !meta.is_dir() || !owners.contains(&Some(meta.uid())) {
        return Err(not_ours());
    }
    opened
        .set_permissions(fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("setting permissions of {}", dir.display())))?;
    if let Some((uid, gid)) = user.switch_to {
        std::os::unix::fs::fchown(&opened, Some(uid.as_raw()), Some(gid.as_raw()))
            .map_err(io_err(format!("giving {} to {}", dir.display(), user.name)))?;
    }
    Ok(())
}

/// Asks the kernel, as the database user, whether it can write `dir`; that
/// includes entering every parent.
fn probe_reachable(dir: &Path, uid: Uid, gid: Gid, name: &str) -> Result<(), EmbeddedError> {
    let ok = Command::new("test")
        .arg("-w")
        .arg(dir)
        .uid(uid.as_raw())
        .gid(gid.as_raw())
        .current_dir("/")
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(EmbeddedError::Unreachable {
            user: name.to_owned(),
            path: dir.to_owned(),
        })
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), EmbeddedError> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.write_all(contents.as_bytes())
        .map_err(io_err(format!("writing {}", path.display())))
}

fn log_file(path: &Path) -> Result<File, EmbeddedError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))
}

/// The last few lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(2048)));
        let _ = f.read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

// === Cluster lifecycle ===

fn initdb(
    bindir: &Path,
    cluster: &Path,
    run_dir: &Path,
    password: &Secret,
    user: &DbUser,
    log_path: &Path,
    ephemeral: bool,
) -> Result<(), EmbeddedError> {
    tracing::info!(cluster = %cluster.display(), "initialising the embedded PostgreSQL cluster (first start)");
    // initdb reads the superuser password from a file the database user can read.
    let pwfile = run_dir.join("initdb.pw");
    write_private(&pwfile, password.expose())?;
    if let Some((uid, gid)) = user.switch_to {
        std::os::unix::fs::chown(&pwfile, Some(uid.as_raw()), Some(gid.as_raw()))
            .map_err(io_err("giving the password file to the database user"))?;
    }
    let log = log_file(log_path)?;
    let mut cmd = Command::new(bindir.join("initdb"));
    cmd.arg("-D")
        .arg(cluster)
        .args([
            "-U",
            DB_ROLE,
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .current_dir(cluster)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_err("initdb log"))?)
        .stderr(log);
    if ephemeral {
        cmd.arg("--no-sync");
    }
    as_db_user(&mut cmd, user);
    let status = cmd.status().map_err(io_err("running initdb"));
    let _ = fs::remove_file(&pwfile);
    if !status?.success() {
        return Err(EmbeddedError::Initdb {
            log: log_path.to_owned(),
            tail: log_tail(log_path),
        });
    }
    Ok(())
}

/// Removes a `postmaster.pid` left by a crash. We hold the data directory
/// lock, so a live postmaster on this cluster is an orphan of a devmesh that
/// died; it is stopped so this start owns the cluster.
fn clear_stale_pid(cluster: &Path) -> Result<(), EmbeddedError> {
    let pid_path = cluster.join("postmaster.pid");
    let Ok(contents) = fs::read_to_string(&pid_path) else {
        return Ok(());
    };
    let pid = contents
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok());
    let alive_postgres = pid.filter(|&p| p > 0).is_some_and(|p| {
        // Only a postmaster of *this* cluster: its command line names our
        // data directory (never the system's PostgreSQL, never ourselves).
        fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"postgres"))
                && args.contains(&cluster.as_os_str().as_encoded_bytes())
        })
    });
    if let (Some(pid), true) = (pid, alive_postgres) {
        tracing::warn!(
            pid,
            "an orphaned PostgreSQL from an earlier run is still up; stopping it"
        );
        let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        for _ in 0..300 {
            if !pid_path.exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
        std::thread::sleep(Duration::from_millis(500));
    }
    if pid_path.exists() {
        tracing::warn!(path = %pid_path.display(), "removing a stale postmaster.pid left by a crash");
        fs::remove_file(&pid_path).map_err(io_err("removing stale postmaster.pid"))?;
    }
    Ok(())
}

fn spawn_postgres(
    bindir: &Path,
    cluster: &Path,
    socket_dir: &Path,
    user: &DbUser,
    log_path: &Path,
    ephemeral: bool,
) -> Result<Child, EmbeddedError> {
    let log = log_file(log_path)?;
    let mut cmd = Command::new(bindir.join("postgres"));
    cmd.arg("-D")
        .arg(cluster)
        .args(["-c", "listen_addresses="])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", socket_dir.display()))
        .args(["-c", "unix_socket_permissions=0700"])
        .args(["-p", &SOCKET_PORT.to_string()])
        .args(["-c", "shared_buffers=64MB"])
        .args(["-c", "max_connections=200"])
        .current_dir(cluster)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_err("postgres log"))?)
        .stderr(log)
        // Its own process group: a Ctrl-C in the terminal reaches devmesh,
        // which then stops PostgreSQL after in-flight requests finish.
        .process_group(0);
    if ephemeral {
        for setting in [
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ] {
            cmd.args(["-c", setting]);
        }
    }
    as_db_user(&mut cmd, user);
    cmd.spawn().map_err(io_err("starting postgres"))
}

/// Spawns a shell that waits for its stdin to close (this process exited)
/// and then stops PostgreSQL, optionally removing the data directory.
fn spawn_guardian(pid: u32, remove: Option<&Path>) -> Option<(Child, ChildStdin)> {
    let script = r#"while read -r _; do :; done
kill -INT "$1" 2>/dev/null
while kill -0 "$1" 2>/dev/null; do sleep 0.1; done
if [ -n "$2" ]; then rm -rf -- "$2"; fi"#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("devmesh-pg-guardian")
        .arg(pid.to_string())
        .arg(remove.map(|p| p.as_os_str().to_owned()).unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| tracing::warn!(error = %e, "could not start the PostgreSQL guardian; a crash may leave PostgreSQL running"))
        .ok()?;
    let stdin = child.stdin.take()?;
    Some((child, stdin))
}

fn percent_encode_path(path: &Path) -> String {
    let mut out = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                out.push(*b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_at_the_shared_socket_path_is_refused_and_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
        let planted = tmp.path().join("devmesh-pg-0123456789ab");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let me = DbUser {
            name: "me".into(),
            switch_to: None,
        };
        let err = make_private_shared_dir(&planted, &me).unwrap_err();
        assert!(err.to_string().contains("not ours"), "{err}");
        let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "the link's target was changed");

        // A fresh path is created private; an existing one of ours is reused.
        let fresh = tmp.path().join("devmesh-pg-fresh");
        make_private_shared_dir(&fresh, &me).unwrap();
        make_private_shared_dir(&fresh, &me).unwrap();
        let mode = fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn socket_paths_are_percent_encoded() {
        assert_eq!(percent_encode_path(Path::new("/tmp/a b/c")), "/tmp/a%20b/c");
    }
}
