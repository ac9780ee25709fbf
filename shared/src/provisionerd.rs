//! What provisioner daemons and the primary say to each other, and the
//! owner-facing records of daemons and their keys.
//!
//! A daemon (built into `devmesh server`, or external: `devmesh provisioner
//! start`) never touches the database. It registers, long-polls for a job,
//! and gets everything the job needs in one [`JobSpec`]: the template
//! archive, the workspace's last Terraform state, the environment for the
//! devmesh provider. While it runs it heartbeats (learning of
//! cancellation), streams log lines, saves the new state; it ends with a
//! [`Completion`]. The primary turns that into builds, agents and
//! parameters. External daemons do this over `/api/v2/provisionerd`;
//! built-in ones call the same functions in-process.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::parameters::TemplateParameter;

/// Tags a daemon offers or a job requires (`{"region": "sydney"}`): a daemon
/// takes a job only when the job's tags are a subset of its own.
pub type Tags = BTreeMap<String, String>;

/// The header external daemons send their provisioner key in.
pub const PROVISIONER_KEY_HEADER: &str = "Devmesh-Provisioner-Key";

/// How long the primary holds an acquire request open when there is no
/// job (the daemon asks again at once).
pub const ACQUIRE_WAIT_SECS: u64 = 20;

/// The largest Terraform state a daemon may save (bytes).
pub const MAX_STATE_BYTES: usize = 32 * 1024 * 1024;

/// At most this many log lines per append.
pub const MAX_LOG_BATCH: usize = 500;

/// The longest log line stored; longer ones are cut, marked with `…`.
pub const MAX_LOG_LINE: usize = 8 * 1024;

/// Checks a set of tags: at most 16; keys of 1 to 64 lowercase letters,
/// digits, `-`, `_` or `.`; values of at most 128 printable characters.
pub fn check_tags(tags: &Tags) -> Result<(), String> {
    if tags.len() > 16 {
        return Err(format!("{} tags: at most 16", tags.len()));
    }
    for (k, v) in tags {
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !key_ok {
            return Err(format!(
                "tag {k:?}: a key is 1 to 64 lowercase letters, digits, '-', '_' or '.'"
            ));
        }
        if v.len() > 128 || v.chars().any(char::is_control) {
            return Err(format!(
                "tag {k:?}: a value is at most 128 printable characters"
            ));
        }
    }
    Ok(())
}

/// Parses `k=v` as a tag.
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: write a tag as key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// Tags for people: `region=sydney gpu=true`, or `(none)`.
pub fn show_tags(tags: &Tags) -> String {
    if tags.is_empty() {
        return "(none)".into();
    }
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes carried in JSON as standard base64.
mod b64 {
    use super::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }

    pub(super) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(
            v: &Option<Vec<u8>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<u8>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// `POST /api/v2/provisioner-keys`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProvisionerKeyRequest {
    /// Unique, hostname-safe.
    pub name: String,
    /// The tags every daemon using the key serves. Empty: daemons declare
    /// their own.
    #[serde(default)]
    pub tags: Tags,
}

/// A provisioner key (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProvisionerKey {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The tags its daemons serve (empty: their own).
    pub tags: Tags,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// The answer to creating a key: the secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CreateProvisionerKeyResponse {
    /// The key.
    pub key: ProvisionerKey,
    /// What daemons pass as `--key`.
    pub secret: String,
}

/// `GET /api/v2/provisioner-keys`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProvisionerKeysResponse {
    /// Every key, by name.
    pub keys: Vec<ProvisionerKey>,
}

/// A provisioner daemon as owners see it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProvisionerDaemon {
    /// Its id (new each time a daemon starts).
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The tags it serves.
    pub tags: Tags,
    /// The devmesh version it runs.
    pub version: String,
    /// Built into a primary, or external.
    pub built_in: bool,
    /// The key an external daemon authenticated with.
    pub key_name: Option<String>,
    /// When it last asked for work or heartbeat.
    pub last_seen_at: DateTime<Utc>,
    /// Seen recently enough to be taking jobs.
    pub connected: bool,
    /// The job it runs, if any.
    pub current_job: Option<Uuid>,
}

/// `GET /api/v2/provisioner-daemons`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProvisionerDaemonsResponse {
    /// Daemons seen in the last day, most recently seen first.
    pub daemons: Vec<ProvisionerDaemon>,
}

/// `POST /api/v2/provisionerd/register`: an external daemon starting.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDaemonRequest {
    /// Its name (defaults to the host name).
    pub name: String,
    /// Tags it declares (must agree with its key's, when the key has any).
    #[serde(default)]
    pub tags: Tags,
    /// Its devmesh version.
    pub version: String,
}

/// The answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RegisterDaemonResponse {
    /// Its id, for the calls that follow.
    pub id: Uuid,
    /// The tags it serves (its key's, or its own).
    pub tags: Tags,
    /// How often to heartbeat a running job.
    pub heartbeat_every_ms: u64,
}

/// What a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Validate a pushed template version and record its parameters.
    Import,
    /// Run a workspace build (start, stop or delete).
    Build,
}

/// Everything a daemon needs to run a job.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobSpec {
    /// The job.
    pub id: Uuid,
    /// Import or build.
    pub kind: JobKind,
    /// What it does, for the log ("start dev", "importing version 3").
    pub what: String,
    /// The template directory (a tar archive).
    #[serde(with = "b64")]
    #[schemars(with = "String")]
    pub archive: Vec<u8>,
    /// The environment of Terraform and the devmesh provider.
    pub env: BTreeMap<String, String>,
    /// The workspace's last Terraform state (builds).
    #[serde(with = "b64::option", default)]
    #[schemars(with = "Option<String>")]
    pub state: Option<Vec<u8>>,
    /// Run `terraform destroy` rather than `apply` (delete builds).
    #[serde(default)]
    pub destroy: bool,
    /// How long the job may run before the daemon interrupts Terraform
    /// and fails it (seconds; 0: no limit).
    #[serde(default)]
    pub timeout_secs: u64,
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Beat {
    /// Keep going.
    Continue,
    /// Someone asked to cancel: interrupt the work, then complete as
    /// canceled.
    Cancel,
    /// The job is no longer this daemon's (it timed out and failed, or was
    /// completed elsewhere): stop working on it and report nothing.
    Lost,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeartbeatResponse {
    /// What to do.
    pub beat: Beat,
}

/// Which stream a log line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// devmesh's own steps.
    Provisioner,
    /// Terraform's standard output.
    Stdout,
    /// Terraform's standard error.
    Stderr,
}

impl LogStream {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Provisioner => "provisioner",
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// One line a daemon logs.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LogLine {
    /// Its stream.
    pub stream: LogStream,
    /// The text.
    pub line: String,
}

/// `POST /api/v2/provisionerd/jobs/{id}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendLogsRequest {
    /// At most [`MAX_LOG_BATCH`] lines, in order.
    pub lines: Vec<LogLine>,
}

/// How a job ended, as its daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// It did what it had to.
    Succeeded,
    /// It failed, for this reason.
    Failed {
        /// Why.
        error: String,
    },
    /// It stopped because it was canceled.
    Canceled,
}

/// A resource a template version declares, as its import planned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TemplateResource {
    /// Its address without an index (`terraform_data.home`,
    /// `module.disk.docker_volume.home`).
    pub address: String,
    /// Its resource type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Still planned when the workspace is stopped: it survives a stop
    /// (a home volume); otherwise it is ephemeral (counted by
    /// `start_count`, destroyed on stop).
    pub persistent: bool,
}

/// `POST /api/v2/provisionerd/jobs/{id}/complete`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Completion {
    /// How it ended.
    pub outcome: Outcome,
    /// An import's parameters (the `devmesh_parameter` data sources).
    #[serde(default)]
    pub parameters: Vec<TemplateParameter>,
    /// An import's resources.
    #[serde(default)]
    pub resources: Vec<TemplateResource>,
}

impl Completion {
    /// A failure, for this reason.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed {
                error: error.into(),
            },
            parameters: Vec::new(),
            resources: Vec::new(),
        }
    }
}

/// The largest number of resources an import may report.
pub const MAX_TEMPLATE_RESOURCES: usize = 1000;

/// The answer to a completion.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompleteResponse {
    /// False when the job was no longer this daemon's: its result was
    /// dropped.
    pub recorded: bool,
}

/// A job's outcome written for the log.
pub fn outcome_line(what: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Succeeded => format!("devmesh: {what} succeeded"),
        Outcome::Failed { error } => format!("devmesh: {what} failed: {error}"),
        Outcome::Canceled => format!("devmesh: {what} canceled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_spec_carries_its_archive_and_state_as_base64() {
        let spec = JobSpec {
            id: Uuid::nil(),
            kind: JobKind::Build,
            what: "start dev".into(),
            archive: vec![0, 1, 2, 255],
            env: BTreeMap::from([("K".into(), "v".into())]),
            state: Some(b"{}".to_vec()),
            destroy: false,
            timeout_secs: 60,
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["archive"], "AAEC/w==");
        assert_eq!(json["state"], "e30=");
        let back: JobSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back.archive, spec.archive);
        assert_eq!(back.state, spec.state);
        let none: JobSpec = serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(), "kind": "import", "what": "x", "archive": "", "env": {}
        }))
        .unwrap();
        assert_eq!(none.state, None);
        assert!(
            serde_json::from_value::<JobSpec>(serde_json::json!({
                "id": Uuid::nil(), "kind": "import", "what": "x", "archive": "!!", "env": {}
            }))
            .is_err()
        );
    }

    #[test]
    fn tags_are_checked() {
        let ok = Tags::from([("region".into(), "sydney".into())]);
        assert!(check_tags(&ok).is_ok());
        let upper = Tags::from([("Region".into(), "x".into())]);
        assert!(check_tags(&upper).is_err());
        let control = Tags::from([("a".into(), "x\ny".into())]);
        assert!(check_tags(&control).is_err());
        let many: Tags = (0..17).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(check_tags(&many).is_err());
        assert_eq!(parse_tag("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_tag("nope").is_err());
    }

    #[test]
    fn outcomes_read_as_their_status() {
        let c: Completion = serde_json::from_value(serde_json::json!({
            "outcome": {"status": "failed", "error": "boom"}
        }))
        .unwrap();
        assert_eq!(
            c.outcome,
            Outcome::Failed {
                error: "boom".into()
            }
        );
        assert!(c.parameters.is_empty());
    }
}
