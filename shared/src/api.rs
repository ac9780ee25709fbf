//! The JSON shapes of `/api/v2`, shared by the primary (which serves them),
//! the CLI and tests (which consume them). Requests reject unknown fields so
//! a typo is an error, not a silently ignored setting.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

// === Errors ===

/// Every non-2xx response body.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Error {
    /// One sentence for a person.
    pub message: String,
    /// More context, possibly empty.
    #[serde(default)]
    pub detail: String,
    /// Per-field problems with the request.
    #[serde(default)]
    pub validations: Vec<Validation>,
    /// For app requests refused by the primary on an edge's behalf: which
    /// refusal (`not_found`, `stopped`, …), so the edge shows the right
    /// page without reading meaning back out of the HTTP status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial: Option<String>,
}

/// One field's problem.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Validation {
    /// The request field, dotted for nested ones (`agents.0.name`).
    pub field: String,
    /// What is wrong with it.
    pub detail: String,
}

// === Users and sessions ===

/// A user's role.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May do everything: manage users, templates, edges, read the audit log.
    Owner,
    /// May use templates to run their own workspaces.
    Member,
}

impl Role {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct User {
    /// Stable id.
    pub id: Uuid,
    /// Unique, hostname-safe name.
    pub username: String,
    /// Unique email address.
    pub email: String,
    /// Always includes `member`.
    pub roles: Vec<Role>,
    /// `active` or `suspended`.
    pub status: UserStatus,
    /// When the user was created.
    pub created_at: DateTime<Utc>,
}

/// Whether a user may sign in.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    /// May sign in and use keys.
    Active,
    /// Every key is refused.
    Suspended,
}

/// `POST /api/v2/users/first`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFirstUserRequest {
    /// Unique; must contain `@` (not at either end), no whitespace, at
    /// most 254 bytes.
    pub email: String,
    /// Unique; a name by [`crate::names::validate_name`], since it becomes
    /// part of app hostnames.
    pub username: String,
    /// 8 characters to 256 bytes.
    pub password: String,
}

/// `GET /api/v2/users/first`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FirstUserStatus {
    /// Whether the deployment already has its first user.
    pub has_first_user: bool,
}

/// `POST /api/v2/users`: an owner creates a user.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// As for [`CreateFirstUserRequest::email`].
    pub email: String,
    /// As for [`CreateFirstUserRequest::username`].
    pub username: String,
    /// 8 characters to 256 bytes.
    pub password: String,
    /// Extra roles (`member` is implied).
    #[serde(default)]
    pub roles: Vec<Role>,
}

/// `POST /api/v2/users/login`. `email` may also hold a username.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Email address or username.
    pub email: String,
    /// At most 1,024 bytes (longer ones are refused before hashing).
    pub password: String,
}

/// The answer to a login: a new session.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LoginResponse {
    /// An `id-secret` key with scope `all`.
    pub session_token: String,
}

/// `GET /api/v2/users`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UsersResponse {
    /// Every user that is not deleted.
    pub users: Vec<User>,
}

// === API keys ===

/// What a key may be used for.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum KeyScope {
    /// The whole API.
    #[default]
    All,
    /// Only opening workspace apps.
    ApplicationConnect,
}

impl KeyScope {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::All => "all",
            KeyScope::ApplicationConnect => "application_connect",
        }
    }
}

/// `POST /api/v2/users/me/keys`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// A label to recognise the key by.
    #[serde(default)]
    pub name: Option<String>,
    /// Defaults to `all`.
    #[serde(default)]
    pub scope: Option<KeyScope>,
    /// Defaults to 30 days; at most 365 days.
    #[serde(default)]
    pub lifetime_seconds: Option<i64>,
}

/// A created key, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CreateKeyResponse {
    /// The whole `id-secret` key.
    pub key: String,
    /// The key's description.
    #[serde(flatten)]
    pub info: ApiKey,
}

/// A key as listed (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct ApiKey {
    /// The public id, the part before the `-`.
    pub id: String,
    /// The label given when it was created (`devmesh keys create --name`).
    pub name: String,
    /// `password` for login sessions, `token` for created keys.
    pub login_type: String,
    /// What it may do.
    pub scope: KeyScope,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// After this it is refused.
    pub expires_at: DateTime<Utc>,
    /// Last time it authenticated a request (written at most every 30 seconds).
    pub last_used_at: DateTime<Utc>,
}

/// `GET /api/v2/users/me/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct KeysResponse {
    /// The caller's keys.
    pub keys: Vec<ApiKey>,
}

// === Templates ===

pub use crate::signing::SharingLevel;

/// The kind of a template version.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// Bring your own machine: agents and apps declared in JSON, started by
    /// running `devmesh agent` anywhere with the token a build returns.
    #[default]
    External,
    /// Terraform code (an uploaded directory): every build is a job a
    /// provisioner daemon runs, and agents start by themselves in what
    /// Terraform creates.
    Terraform,
}

/// An external template's declaration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExternalDefinition {
    /// At least one agent.
    pub agents: Vec<AgentSpec>,
}

/// One agent of an external template.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Hostname-safe, unique in the workspace.
    pub name: String,
    /// Working directory for scripts and terminals.
    #[serde(default)]
    pub directory: Option<String>,
    /// Extra environment for scripts and sessions.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Web apps the agent serves.
    #[serde(default)]
    pub apps: Vec<AppSpec>,
    /// Startup and stop scripts.
    #[serde(default)]
    pub scripts: Vec<ScriptSpec>,
    /// Values the agent measures and reports (disk free, the branch checked
    /// out), each by running a command periodically.
    #[serde(default)]
    pub metadata: Vec<MetadataSpec>,
}

/// One value an agent measures: `script`'s first line of output, every
/// `interval_seconds`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetadataSpec {
    /// Its name (1 to 64 characters), unique per agent.
    pub key: String,
    /// A shell command (`sh -c`) run in the agent's directory and
    /// environment; at most 8 KiB.
    pub script: String,
    /// How often it runs (1 s to a day).
    #[serde(default = "ten")]
    pub interval_seconds: u32,
    /// How long a run may take before it is killed (at most the interval).
    #[serde(default = "ten")]
    pub timeout_seconds: u32,
}

fn ten() -> u32 {
    10
}

/// At most this many metadata items per agent.
pub const MAX_AGENT_METADATA: usize = 16;

/// The longest metadata value kept (bytes); longer ones are cut.
pub const MAX_METADATA_VALUE: usize = 1024;

/// A metadata value as last reported.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct AgentMetadata {
    /// Its name.
    pub key: String,
    /// The first line the script printed (empty until it first ran).
    pub value: String,
    /// Why the last run failed (a non-zero exit, a timeout), if it did.
    #[serde(default)]
    pub error: Option<String>,
    /// When the primary received it (agents send none).
    #[serde(default)]
    pub collected_at: Option<DateTime<Utc>>,
}

/// `POST /api/v2/workspaceagents/me/metadata`: values that changed.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentMetadataRequest {
    /// The changed values.
    pub metadata: Vec<AgentMetadata>,
}

/// A web app served by an agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// Hostname-safe, unique per agent.
    pub slug: String,
    /// Shown in the dashboard; defaults to the slug.
    #[serde(default)]
    pub display_name: Option<String>,
    /// A local port (`http://127.0.0.1:<port>`); give this or `url`.
    #[serde(default)]
    pub port: Option<u16>,
    /// The upstream URL as the agent reaches it.
    #[serde(default)]
    pub url: Option<String>,
    /// Served on its own subdomain (default) or under a path.
    #[serde(default = "yes")]
    pub subdomain: bool,
    /// Who may open it.
    #[serde(default)]
    pub sharing_level: SharingLevel,
    /// Optional health check.
    #[serde(default)]
    pub healthcheck: Option<HealthcheckSpec>,
}

fn yes() -> bool {
    true
}

/// How an agent checks an app's health.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthcheckSpec {
    /// URL the agent polls; any 2xx or 3xx is healthy.
    pub url: String,
    /// Seconds between checks.
    #[serde(default = "default_interval")]
    pub interval_seconds: u32,
    /// Consecutive failures before `unhealthy`.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
}

fn default_interval() -> u32 {
    5
}
fn default_threshold() -> u32 {
    3
}

/// When a script runs.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum ScriptTrigger {
    /// When the agent starts.
    #[default]
    Start,
    /// When the agent shuts down.
    Stop,
}

/// A startup or stop script.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScriptSpec {
    /// Shown in logs.
    pub name: String,
    /// Run with `sh -c`.
    pub script: String,
    /// When it runs.
    #[serde(default)]
    pub run_on: ScriptTrigger,
    /// Killed after this many seconds.
    #[serde(default = "default_script_timeout")]
    pub timeout_seconds: u32,
}

fn default_script_timeout() -> u32 {
    300
}

/// `POST /api/v2/templates`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplateRequest {
    /// Hostname-safe unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Defaults to `external`.
    #[serde(default)]
    pub kind: TemplateKind,
    /// The declaration, for `external` templates.
    #[serde(default)]
    pub definition: ExternalDefinition,
    /// The template directory as a base64 tar archive, for `terraform`
    /// templates (at most [`MAX_TEMPLATE_ARCHIVE`] bytes before encoding).
    #[serde(default)]
    pub archive: Option<String>,
    /// The tags a provisioner daemon needs to run this version's jobs
    /// (`terraform` templates; empty: any daemon without tags).
    #[serde(default)]
    pub provisioner_tags: crate::provisionerd::Tags,
}

/// The largest template archive (a tar of the template directory).
pub const MAX_TEMPLATE_ARCHIVE: usize = 512 * 1024;

/// `POST /api/v2/templates/{name}/versions`: a new active version.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplateVersionRequest {
    /// Defaults to `external`.
    #[serde(default)]
    pub kind: TemplateKind,
    /// The new declaration, for `external` templates.
    #[serde(default)]
    pub definition: ExternalDefinition,
    /// The new directory, for `terraform` templates (base64 tar).
    #[serde(default)]
    pub archive: Option<String>,
    /// The tags a provisioner daemon needs to run this version's jobs.
    #[serde(default)]
    pub provisioner_tags: crate::provisionerd::Tags,
    /// What changed.
    #[serde(default)]
    pub message: String,
}

/// A template.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
pub struct Template {
    /// Stable id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The version new workspaces and builds use.
    pub active_version: TemplateVersion,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// One version of a template.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
pub struct TemplateVersion {
    /// Stable id.
    pub id: Uuid,
    /// 1, 2, 3… per template.
    pub number: i32,
    /// How workspaces of it are built.
    pub kind: TemplateKind,
    /// The declaration.
    pub definition: ExternalDefinition,
    /// Its parameters, once imported (Terraform templates).
    #[serde(default)]
    pub parameters: Vec<crate::parameters::TemplateParameter>,
    /// The tags a provisioner daemon needs to run its jobs.
    #[serde(default)]
    pub provisioner_tags: crate::provisionerd::Tags,
    /// The resources it declares, once imported.
    #[serde(default)]
    pub resources: Vec<crate::provisionerd::TemplateResource>,
    /// Archived: it cannot be promoted or updated to (workspaces already
    /// on it keep working).
    #[serde(default)]
    pub archived: bool,
    /// The import job that plans a Terraform version and records its
    /// parameters: workspaces can use the version once it succeeded.
    #[serde(default)]
    pub import: Option<VersionImport>,
    /// What changed.
    pub message: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// How a Terraform template version's import went.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct VersionImport {
    /// The provisioner job (its log: `GET /api/v2/jobs/{id}/logs`).
    pub job_id: Uuid,
    /// `pending`, `running`, `succeeded`, `failed`, `canceled`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// `GET /api/v2/templates`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TemplatesResponse {
    /// Every template.
    pub templates: Vec<Template>,
}

/// `GET /api/v2/templates/{name}/versions`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TemplateVersionsResponse {
    /// Newest first.
    pub versions: Vec<TemplateVersion>,
}

// === Workspaces ===

/// What a build does to a workspace.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// Bring the workspace up (new agents, new tokens).
    Start,
    /// Take it down.
    Stop,
    /// Remove it.
    Delete,
}

impl Transition {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Start => "start",
            Transition::Stop => "stop",
            Transition::Delete => "delete",
        }
    }
}

/// `POST /api/v2/workspaces`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspaceRequest {
    /// Hostname-safe, unique per owner.
    pub name: String,
    /// Template name or id.
    pub template: String,
    /// Owners may create workspaces for another user (username or id).
    #[serde(default)]
    pub owner: Option<String>,
    /// Values of the template's parameters, by name (Terraform templates).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// `POST /api/v2/workspaces/{id}/builds`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBuildRequest {
    /// What to do.
    pub transition: Transition,
    /// Start builds: move to the template's active version (otherwise a
    /// Terraform workspace starts with the version it has). Allowed on a
    /// started workspace: Terraform applies the difference.
    #[serde(default)]
    pub update: bool,
    /// Start builds: new values of the template's mutable parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// A workspace.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Workspace {
    /// Stable id.
    pub id: Uuid,
    /// Unique per owner.
    pub name: String,
    /// The owner's id.
    pub owner_id: Uuid,
    /// The owner's username.
    pub owner_name: String,
    /// The template's id.
    pub template_id: Uuid,
    /// The template's name.
    pub template_name: String,
    /// The most recent build.
    pub latest_build: WorkspaceBuild,
    /// The agents of the latest start build (empty when stopped).
    pub agents: Vec<WorkspaceAgent>,
    /// What the latest successful build left (Terraform templates).
    #[serde(default)]
    pub resources: Vec<WorkspaceResource>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v2/jobs/{id}/logs?after=N`: a provisioner job's state and
/// its log lines after line `N` (0: from the start).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobLogsResponse {
    /// `pending`, `running`, `succeeded`, `failed`, `canceling`, `canceled`.
    pub status: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Why a pending job is not being taken (no connected daemon serves
    /// its tags), when that is so.
    #[serde(default)]
    pub waiting: Option<String>,
    /// The lines, oldest first.
    pub logs: Vec<JobLogLine>,
}

/// One line of a job's log.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobLogLine {
    /// Increasing: pass the last one seen as `after`.
    pub id: i64,
    /// `provisioner` (devmesh's own steps), `stdout` or `stderr`.
    pub stream: String,
    /// The text.
    pub line: String,
    /// When it was logged.
    pub created_at: DateTime<Utc>,
}

/// Reads a value stored in the database as its JSON name (what the
/// `snake_case` enums here serialise to); `None` for an unknown name.
pub fn from_stored<T: serde::de::DeserializeOwned>(stored: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(stored.to_owned())).ok()
}

/// A build's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Recorded, waiting for a provisioner daemon (Terraform templates; a
    /// build of an `external` template succeeds as it is created).
    Pending,
    /// Being carried out.
    Running,
    /// Finished: the workspace is as the transition asked.
    Succeeded,
    /// It failed; the workspace is as the build left it.
    Failed,
    /// Someone canceled it; the workspace is as the build left it.
    Canceled,
}

/// Whether an agent's tunnel is up, from its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// It has never attached.
    Connecting,
    /// Attached, and heard from recently.
    Connected,
    /// Its tunnel ended.
    Disconnected,
    /// Attached, but not heard from for over 60 s.
    Timeout,
}

impl std::fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Timeout => "timeout",
        })
    }
}

/// A resource a workspace's Terraform state holds.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct WorkspaceResource {
    /// Its full address (`terraform_data.agent[0]`).
    pub address: String,
    /// Its resource type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Survives a stop (`None`: its version's import did not say).
    pub persistent: Option<bool>,
    /// The agents it runs (computational when not empty, else peripheral).
    #[serde(default)]
    pub agents: Vec<String>,
    /// Items a `devmesh_metadata` resource attached to it.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A build of a workspace.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct WorkspaceBuild {
    /// Stable id.
    pub id: Uuid,
    /// 1, 2, 3… per workspace.
    pub build_number: i32,
    /// What it did.
    pub transition: Transition,
    /// Its progress.
    pub status: BuildStatus,
    /// The provisioner job running it (Terraform templates), whose logs
    /// `GET /api/v2/jobs/{id}/logs` streams.
    #[serde(default)]
    pub job_id: Option<Uuid>,
    /// Why it failed, when it did.
    #[serde(default)]
    pub error: Option<String>,
    /// The template version it used.
    pub template_version_id: Uuid,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// The template parameters' values the build used (defaults included
    /// only where the workspace set them).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// An agent of a workspace.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct WorkspaceAgent {
    /// Stable id.
    pub id: Uuid,
    /// Unique in the workspace.
    pub name: String,
    /// Where its startup and stop scripts are.
    pub lifecycle_state: LifecycleState,
    /// Whether its tunnel is up.
    pub status: AgentStatus,
    /// When it first attached to a relay.
    pub first_connected_at: Option<DateTime<Utc>>,
    /// When it was last heard from: its relay reports an attached agent at
    /// most every 30 s, so this lags by up to that.
    pub last_connected_at: Option<DateTime<Utc>>,
    /// When it went away.
    pub disconnected_at: Option<DateTime<Utc>>,
    /// The region of the relay it is attached to (`primary` or an edge's).
    #[serde(default)]
    pub relay_region: Option<String>,
    /// The apps its template declares for it.
    pub apps: Vec<WorkspaceApp>,
    /// The values it measures, in the template's order.
    #[serde(default)]
    pub metadata: Vec<AgentMetadata>,
}

/// A web app of an agent.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct WorkspaceApp {
    /// Stable id.
    pub id: Uuid,
    /// Unique per agent.
    pub slug: String,
    /// Shown in the dashboard.
    pub display_name: String,
    /// Upstream URL as the agent reaches it.
    pub url: String,
    /// `true`: served on its own hostname under the apps wildcard;
    /// `false`: under the dashboard's origin, only with `--enable-path-apps`.
    pub subdomain: bool,
    /// Who may open it.
    pub sharing_level: SharingLevel,
    /// Its health check's verdict.
    pub health: AppHealthState,
    /// The check, if any.
    pub healthcheck: Option<HealthcheckSpec>,
}

/// An agent token, returned once by a start build.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct AgentToken {
    /// The agent's id.
    pub agent_id: Uuid,
    /// The agent's name.
    pub agent_name: String,
    /// Pass as `DEVMESH_AGENT_TOKEN` to `devmesh agent`.
    pub token: String,
}

/// Answer to creating a workspace or a build.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkspaceBuildResponse {
    /// The workspace after the build.
    pub workspace: Workspace,
    /// New agent tokens (start builds only), shown once.
    pub agent_tokens: Vec<AgentToken>,
}

/// `GET /api/v2/workspaces`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkspacesResponse {
    /// The caller's workspaces (an owner's `?owner=all`: everyone's).
    pub workspaces: Vec<Workspace>,
}

// === Edges and regions ===

/// `POST /api/v2/edges`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEdgeRequest {
    /// Region name: hostname-safe, not `primary`.
    pub name: String,
    /// Shown to users; defaults to the name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// The region's base URL, like `https://eu.example.com`. An edge
    /// without one cannot register; a replica's registration must name
    /// exactly the access URL and wildcards set here, and a relay on one of
    /// the relay hosts (the access URL's host when none are listed).
    #[serde(default)]
    pub access_url: Option<String>,
    /// The region's app wildcard, like `*.eu.apps.example.com`.
    #[serde(default)]
    pub wildcard_hostname: Option<String>,
    /// A global app wildcard the edge also serves (behind GeoDNS).
    #[serde(default)]
    pub global_wildcard_hostname: Option<String>,
    /// Hosts (names or IPs) the edge's relays may advertise, at any port.
    #[serde(default)]
    pub relay_hosts: Vec<String>,
}

/// `PATCH /api/v2/edges/{edge}`: each field given replaces the current
/// one; an empty string clears an optional address.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEdgeRequest {
    /// New region name.
    #[serde(default)]
    pub name: Option<String>,
    /// New display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// New access URL.
    #[serde(default)]
    pub access_url: Option<String>,
    /// New regional app wildcard.
    #[serde(default)]
    pub wildcard_hostname: Option<String>,
    /// New global app wildcard.
    #[serde(default)]
    pub global_wildcard_hostname: Option<String>,
    /// New relay hosts.
    #[serde(default)]
    pub relay_hosts: Option<Vec<String>>,
}

/// Whether an edge (or the primary's region) is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EdgeStatus {
    /// A replica heartbeated recently and the primary reaches it.
    Ok,
    /// It heartbeats, but the primary cannot call it back at its access URL
    /// (or it cannot reach the primary).
    Unhealthy,
    /// No heartbeat for 30 s.
    Unreachable,
    /// No replica has registered.
    Unregistered,
}

impl std::fmt::Display for EdgeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Unhealthy => "unhealthy",
            Self::Unreachable => "unreachable",
            Self::Unregistered => "unregistered",
        })
    }
}

/// An edge (one region's proxy, possibly several replicas).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Edge {
    /// Stable id; the first part of its token.
    pub id: Uuid,
    /// Region name.
    pub name: String,
    /// Shown to users.
    pub display_name: String,
    /// Registration and reachability, as the primary last saw them.
    pub status: EdgeStatus,
    /// `true` exactly when `status` is `ok`.
    pub healthy: bool,
    /// The region's base URL.
    pub access_url: Option<String>,
    /// The region's app wildcard.
    pub wildcard_hostname: Option<String>,
    /// The global app wildcard it also serves.
    #[serde(default)]
    pub global_wildcard_hostname: Option<String>,
    /// Hosts its relays may advertise.
    #[serde(default)]
    pub relay_hosts: Vec<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A created edge with its token, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CreateEdgeResponse {
    /// The edge.
    pub edge: Edge,
    /// `<edge-id>:<secret>`: pass as `--edge-token` to `devmesh edge`.
    pub edge_token: String,
}

/// `GET /api/v2/edges`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EdgesResponse {
    /// Every edge.
    pub edges: Vec<Edge>,
}

/// A region: the primary's own, or an edge's.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Region {
    /// The edge id (nil for the primary).
    pub id: Uuid,
    /// `primary` or the edge's name.
    pub name: String,
    /// Shown to users.
    pub display_name: String,
    /// `true` exactly when `status` is `ok` (always, for the primary).
    pub healthy: bool,
    /// Registration and reachability, as the primary last saw them.
    pub status: EdgeStatus,
    /// Where users reach the region (the primary's access URL for
    /// `primary`).
    pub access_url: Option<String>,
    /// App wildcard (`*.apps.example.com`).
    pub wildcard_hostname: Option<String>,
    /// QUIC relay address, once known.
    pub relay_address: Option<String>,
}

/// `GET /api/v2/regions`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RegionsResponse {
    /// The primary first, then edges by name.
    pub regions: Vec<Region>,
    /// The CA that signs relays' certificates (public), so clients can
    /// check a relay they reach over QUIC (`devmesh netcheck`).
    #[serde(default)]
    pub mesh_ca_pem: String,
}

// === Meta ===

/// `GET /api/v2/buildinfo`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BuildInfo {
    /// Semantic version.
    pub version: String,
    /// The access URL users reach the primary at.
    pub access_url: String,
}

/// One audit log entry.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditEntry {
    /// Increasing id.
    pub id: i64,
    /// When the action happened.
    pub time: DateTime<Utc>,
    /// Who (absent for anonymous or failed logins).
    pub user_id: Option<Uuid>,
    /// Their username at the time.
    pub username: Option<String>,
    /// Client address.
    pub ip: Option<String>,
    /// `login`, `login_failed`, `create`, `delete`, …
    pub action: String,
    /// `user`, `api_key`, `edge`, `workspace`, `template`, …
    pub resource_type: String,
    /// The resource's id; empty when there is none (a failed login).
    pub resource_id: String,
    /// The resource's name at the time, kept after it is deleted.
    pub resource_name: String,
    /// Anything else worth keeping.
    pub details: serde_json::Value,
}

/// `GET /api/v2/audit`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditResponse {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
}

// === Agents (`/api/v2/workspaceagents/me/...`, authenticated by the agent token) ===

/// The header an agent sends its token in.
pub const AGENT_TOKEN_HEADER: &str = "Devmesh-Agent-Token";

/// `GET /api/v2/workspaceagents/me/manifest`: what an agent needs to run.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct AgentManifest {
    /// The agent's id.
    pub agent_id: Uuid,
    /// Its name in the workspace.
    pub agent_name: String,
    /// The workspace's id.
    pub workspace_id: Uuid,
    /// The workspace's name.
    pub workspace_name: String,
    /// The owner's username.
    pub owner_name: String,
    /// Working directory for scripts.
    pub directory: Option<String>,
    /// Extra environment for scripts.
    pub env: BTreeMap<String, String>,
    /// Apps the agent serves (for health checks).
    pub apps: Vec<ManifestApp>,
    /// Startup and stop scripts.
    pub scripts: Vec<ScriptSpec>,
    /// Values to measure and report.
    #[serde(default)]
    pub metadata: Vec<MetadataSpec>,
    /// Relays the agent may attach to, nearest-first candidates.
    pub relays: Vec<RelayInfo>,
    /// PEM of the mesh CA: the only root the agent trusts for relays.
    pub mesh_ca_pem: String,
}

/// An app as the agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct ManifestApp {
    /// The app's name in its hostname, unique per agent.
    pub slug: String,
    /// Where the agent reaches the app (`http://127.0.0.1:8000`).
    pub url: String,
    /// Health check, if any.
    pub healthcheck: Option<HealthcheckSpec>,
}

/// A relay an agent can attach to.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct RelayInfo {
    /// Region name (`primary` or an edge's).
    pub region: String,
    /// UDP `host:port` of its QUIC endpoint.
    pub address: String,
    /// TLS server name on its mesh certificate.
    pub server_name: String,
}

/// `POST /api/v2/workspaceagents/me/attach-ticket`: a ticket for one attach
/// to one relay.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AttachTicketRequest {
    /// The address of the relay the agent is about to attach to, as the
    /// manifest lists it; the ticket is valid there only.
    pub relay: String,
}

/// The answer to [`AttachTicketRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AttachTicketResponse {
    /// Ed25519-signed ticket to present on the control stream.
    pub ticket: String,
    /// When it stops being accepted.
    pub expires_at: DateTime<Utc>,
}

/// An agent's lifecycle state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    /// Not started yet.
    Created,
    /// Running startup scripts.
    Starting,
    /// Startup scripts finished.
    Ready,
    /// A startup script failed.
    StartError,
    /// A startup script timed out.
    StartTimeout,
    /// Running stop scripts.
    ShuttingDown,
    /// Stopped cleanly.
    Off,
    /// A stop script failed.
    ShutdownError,
    /// A stop script timed out.
    ShutdownTimeout,
}

impl std::fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LifecycleState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::StartError => "start_error",
            Self::StartTimeout => "start_timeout",
            Self::ShuttingDown => "shutting_down",
            Self::Off => "off",
            Self::ShutdownError => "shutdown_error",
            Self::ShutdownTimeout => "shutdown_timeout",
        }
    }
}

/// `POST /api/v2/workspaceagents/me/lifecycle`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleRequest {
    /// The new state.
    pub state: LifecycleState,
}

/// One line (or chunk) of script output.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentLogEntry {
    /// The script's name (or `agent`).
    pub source: String,
    /// `info` or `error` (stderr).
    #[serde(default = "info")]
    pub level: String,
    /// The text, without a trailing newline.
    pub output: String,
}

fn info() -> String {
    "info".into()
}

/// `POST /api/v2/workspaceagents/me/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentLogsRequest {
    /// A batch, oldest first.
    pub logs: Vec<AgentLogEntry>,
}

/// Answer to a log batch.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentLogsAccepted {
    /// Entries stored.
    pub accepted: usize,
    /// The agent's 1 MiB of logs is full; stop sending.
    pub overflowed: bool,
}

/// A stored log entry, as users read it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct AgentLog {
    /// Increasing id; pass the last as `?after=` to follow.
    pub id: i64,
    /// Script name.
    pub source: String,
    /// `info` or `error`.
    pub level: String,
    /// The text.
    pub output: String,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// `GET /api/v2/workspaceagents/{id}/logs?after=N`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentLogsResponse {
    /// Entries after `after`, oldest first.
    pub logs: Vec<AgentLog>,
    /// Whether later output was dropped (1 MiB per agent).
    pub overflowed: bool,
    /// The agent's lifecycle state now.
    pub lifecycle_state: LifecycleState,
}

/// An app's health as users see it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AppHealthState {
    /// The app has no health check.
    Disabled,
    /// No check result yet.
    Initializing,
    /// The last check passed.
    Healthy,
    /// `threshold` checks in a row failed.
    Unhealthy,
}

/// An app's health as the agent reports it (never `disabled`: that is the
/// template's to say).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AppHealth {
    /// No check result yet.
    Initializing,
    /// The last check passed.
    Healthy,
    /// `threshold` checks in a row failed.
    Unhealthy,
}

/// `POST /api/v2/workspaceagents/me/app-health`: changed apps only.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppHealthRequest {
    /// Slug → health.
    pub health: BTreeMap<String, AppHealth>,
}

/// A port shared beyond the workspace owner (dev URLs).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortShare {
    /// The agent serving the port.
    pub agent_name: String,
    /// The port.
    pub port: u16,
    /// Who may open it; `owner` removes the share.
    pub sharing_level: SharingLevel,
}

/// `GET /api/v2/workspaces/{id}/port-shares`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PortSharesResponse {
    /// Current shares.
    pub shares: Vec<PortShare>,
}

// === Edges (`/api/v2/edges/me/...`, authenticated by `Devmesh-Edge-Token`) ===

/// The header an edge sends its token in.
pub const EDGE_TOKEN_HEADER: &str = "Devmesh-Edge-Token";

/// `POST /api/v2/edges/me/register`: an edge replica announces itself (and
/// heartbeats by registering again).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeRegisterRequest {
    /// Stable for the life of the replica process.
    pub replica_id: Uuid,
    /// The edge's version; must share the primary's major and minor version.
    pub version: String,
    /// The region's base URL.
    pub access_url: String,
    /// The region's app wildcard (`*.eu.apps.example.com`).
    pub wildcard_hostname: Option<String>,
    /// A global wildcard every edge also serves (`*.apps.example.com`).
    #[serde(default)]
    pub global_wildcard_hostname: Option<String>,
    /// UDP `host:port` of the replica's QUIC relay.
    pub relay_address: String,
    /// PEM certificate signing request for the replica's mesh certificate.
    pub csr_pem: String,
    /// The attach tickets of the agents attached to this replica's relay
    /// right now: proof, signed by the primary and addressed to this relay,
    /// that each agent chose to attach here. The primary records each as
    /// the agent's home relay unless the agent has since attached with a
    /// newer ticket elsewhere.
    #[serde(default)]
    pub attachments: Vec<String>,
}

/// What a registered edge replica needs.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EdgeRegisterResponse {
    /// The edge's id.
    pub edge_id: Uuid,
    /// The edge's name: its region, and the first label of its relay's
    /// TLS name (`<name>.relay.devmesh.internal`).
    pub edge_name: String,
    /// The replica's mesh certificate, signed by the mesh CA.
    pub mesh_cert_pem: String,
    /// PEM of the mesh CA: the only root the relay trusts for mesh peers.
    pub mesh_ca_pem: String,
    /// Keys that verify app tokens.
    pub app_token_keys: Vec<crate::signing::PublicKey>,
    /// The relays this replica's relay may exchange mesh traffic with now
    /// (also pushed as events; each heartbeat brings it again).
    #[serde(default)]
    pub mesh_peers: Vec<MeshPeer>,
    /// Register again within this many seconds to stay healthy.
    pub heartbeat_interval_seconds: u64,
}

/// `POST /api/v2/edges/me/deregister`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeDeregisterRequest {
    /// The replica leaving.
    pub replica_id: Uuid,
}

/// `GET /healthz-report` on an edge.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct EdgeHealthReport {
    /// The edge's name, once a registration has succeeded.
    pub edge_name: Option<String>,
    /// This replica's id, new each time the process starts.
    pub replica_id: Uuid,
    /// The edge's version.
    pub version: String,
    /// Whether the last registration with the primary succeeded.
    pub primary_reachable: bool,
    /// When the primary last accepted a registration.
    pub last_registered_at: Option<DateTime<Utc>>,
    /// The last registration error, if any.
    pub last_error: Option<String>,
}

/// Where an agent is attached (`None`: nowhere).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct AgentLocation {
    /// The agent.
    pub agent_id: Uuid,
    /// The relay it is attached to (its home relay); `None` once detached.
    pub relay: Option<RelayInfo>,
}

/// What a revocation cuts off: every app token about the subject issued at
/// or before [`Revocation::at_ms`].
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq, Hash)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RevokedSubject {
    /// A user signed out, was suspended or deleted.
    User {
        /// The user.
        id: Uuid,
    },
    /// A workspace was stopped, deleted, or its sharing changed.
    Workspace {
        /// The workspace.
        id: Uuid,
    },
    /// An API key was deleted.
    Key {
        /// The key's public id.
        id: String,
    },
}

/// A revocation and when it happened.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Revocation {
    /// What is revoked.
    pub subject: RevokedSubject,
    /// Unix milliseconds; tokens issued at or before then are refused.
    pub at_ms: i64,
}

impl Revocation {
    /// Whether this revocation cuts off `token`.
    pub fn revokes(&self, token: &crate::signing::AppToken) -> bool {
        let about = match &self.subject {
            RevokedSubject::User { id } => token.user_id == Some(*id),
            RevokedSubject::Workspace { id } => token.workspace_id == *id,
            RevokedSubject::Key { id } => token.key_id.as_deref() == Some(id.as_str()),
        };
        about && token.issued_at_ms <= self.at_ms
    }
}

/// One line of `GET /api/v2/edges/me/events` (newline-delimited JSON). The
/// stream starts with a [`EdgeEvent::Snapshot`]; after a reconnect the edge
/// replaces its state with the new snapshot, since it cannot trust the gap.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeEvent {
    /// Everything an edge caches, as of now.
    Snapshot {
        /// Where every attached agent is.
        agents: Vec<AgentLocation>,
        /// Revocations young enough to matter (a token's lifetime).
        revocations: Vec<Revocation>,
        /// Keys that verify app tokens and attach tickets.
        app_token_keys: Vec<crate::signing::PublicKey>,
        /// The relays a relay may exchange mesh traffic with.
        mesh_peers: Vec<MeshPeer>,
    },
    /// An agent attached somewhere, moved, or detached.
    AgentMoved(AgentLocation),
    /// Access was revoked; drop cached decisions about the subject.
    Revoked(Revocation),
    /// The signing keys changed.
    Keys {
        /// The keys now valid.
        app_token_keys: Vec<crate::signing::PublicKey>,
    },
    /// An edge was created, renamed, deleted or had its token regenerated.
    MeshPeers {
        /// The relays a relay may exchange mesh traffic with now.
        peers: Vec<MeshPeer>,
    },
    /// Keeps the stream alive; an edge that hears nothing for a while reconnects.
    Ping,
}

/// A relay others may exchange mesh traffic with: the primary's, or an
/// edge's (all its replicas share the name). A relay refuses a peer whose
/// certificate names no listed relay, or was issued before the peer's
/// `certs_valid_from` (its edge's token was regenerated since).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MeshPeer {
    /// The TLS name on its mesh certificates.
    pub server_name: String,
    /// Certificates issued before this (unix seconds) are refused.
    pub certs_valid_from: i64,
}

/// `POST /api/v2/edges/me/app-access`: may the holder of `key` (or anyone,
/// without one) open the app at `host`?
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeAppAccessRequest {
    /// The app host, with the port if not the scheme's default.
    pub host: String,
    /// The user's API key or `application_connect` key.
    pub key: Option<String>,
    /// An app token for this host, close to expiry, to renew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A yes to [`EdgeAppAccessRequest`]: a signed app token and where to find
/// the agent.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EdgeAppAccess {
    /// The signed token, for the browser's cookie and local verification.
    pub token: String,
    /// `token`'s claims, decoded: what the edge caches the decision by and
    /// checks expiry and revocations against.
    pub claims: crate::signing::AppToken,
    /// The agent's home relay, if attached.
    pub location: Option<RelayInfo>,
}

/// `POST /api/v2/edges/me/app-connect`: redeem the sealed one-time grant a
/// browser brought back from the auth redirect, for an app token.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeAppConnectRequest {
    /// The sealed one-time grant from the URL.
    pub sealed: String,
    /// The state cookie of the browser that brought it.
    pub state: String,
    /// The app host it was brought to, with the port if not the default.
    pub host: String,
}

/// The query of `GET /api/v2/workspaceagents/{id}/pty` (a terminal's
/// WebSocket), on the primary and on edges.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TerminalQuery {
    /// The terminal: reconnecting with the same id gets the same shell.
    pub session: Uuid,
    /// Its width, when it starts and on each reconnect (80 by default).
    #[serde(default)]
    pub cols: Option<u16>,
    /// Its height (24 by default).
    #[serde(default)]
    pub rows: Option<u16>,
    /// What it runs when it starts; the login shell by default.
    #[serde(default)]
    pub command: Option<String>,
}

/// The longest command line a terminal may be started with.
pub const MAX_TERMINAL_COMMAND: usize = 4096;

impl TerminalQuery {
    /// The stream header that opens it, or why the query cannot.
    pub fn header(self) -> Result<crate::tunnel::StreamHeader, String> {
        let command = self.command.unwrap_or_default();
        if command.len() > MAX_TERMINAL_COMMAND {
            return Err(format!(
                "The command may be at most {MAX_TERMINAL_COMMAND} bytes."
            ));
        }
        Ok(crate::tunnel::StreamHeader::Pty {
            session: self.session,
            cols: self.cols.unwrap_or(80),
            rows: self.rows.unwrap_or(24),
            command,
        })
    }
}

/// The query of `POST /api/v2/workspaceagents/{id}/probe`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeQuery {
    /// Bytes the agent sends back (at most
    /// [`MAX_PROBE_BYTES`](crate::tunnel::MAX_PROBE_BYTES)).
    #[serde(default)]
    pub download: u64,
}

impl ProbeQuery {
    /// The stream header that opens it, or why the query cannot.
    pub fn header(self) -> Result<crate::tunnel::StreamHeader, String> {
        if self.download > crate::tunnel::MAX_PROBE_BYTES {
            return Err("At most 4 GiB may be downloaded.".into());
        }
        Ok(crate::tunnel::StreamHeader::Probe {
            download: self.download,
        })
    }
}

/// The query of `POST /api/v2/workspaceagents/{id}/udp`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UdpQuery {
    /// The UDP port in the workspace.
    pub port: u16,
}

impl UdpQuery {
    /// The stream header that opens it, or why the query cannot.
    pub fn header(self) -> Result<crate::tunnel::StreamHeader, String> {
        if self.port == 0 {
            return Err("Port 0 is not a port.".into());
        }
        Ok(crate::tunnel::StreamHeader::Udp { port: self.port })
    }
}

/// `PUT /api/v2/users/{user}/roles`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRolesRequest {
    /// The user's roles from now on (`member` is implied).
    pub roles: Vec<Role>,
}

/// `GET`/`PUT /api/v2/users/me/preferences`: what the dashboard remembers
/// for a user.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    /// The region app links go through; `None` for the nearest healthy one.
    #[serde(default)]
    pub region: Option<String>,
}

/// `POST /api/v2/edges/me/shell-access`: may the holder of `key` open a
/// shell (SSH or a terminal) to `agent_id` through this edge?
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeShellAccessRequest {
    /// The agent.
    pub agent_id: Uuid,
    /// The user's API key, as the client sent it to the edge.
    pub key: String,
    /// The client's address, as the edge saw it, for the audit log.
    pub client_ip: String,
    /// What the session is.
    #[serde(default)]
    pub kind: ShellKind,
}

/// What a shell session carries, as the audit log names it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ShellKind {
    /// An SSH connection.
    #[default]
    Ssh,
    /// A reconnecting terminal.
    Terminal,
    /// A UDP flow of `devmesh port-forward --udp`.
    Udp,
    /// `devmesh ping` or `speedtest`: not audited.
    Probe,
}

impl ShellKind {
    /// What a stream of `header`'s kind carries.
    pub fn of(header: &crate::tunnel::StreamHeader) -> Self {
        use crate::tunnel::StreamHeader;
        match header {
            StreamHeader::Ssh | StreamHeader::Tcp { .. } => ShellKind::Ssh,
            StreamHeader::Pty { .. } => ShellKind::Terminal,
            StreamHeader::Probe { .. } => ShellKind::Probe,
            StreamHeader::Udp { .. } => ShellKind::Udp,
        }
    }

    /// The audit action of its start (its end's adds `_end`); `None` for
    /// what is not audited.
    pub fn action(self) -> Option<&'static str> {
        match self {
            ShellKind::Ssh => Some("ssh"),
            ShellKind::Terminal => Some("terminal"),
            ShellKind::Udp => Some("port_forward_udp"),
            ShellKind::Probe => None,
        }
    }
}

/// A yes to [`EdgeShellAccessRequest`]: the session, recorded in the audit
/// log, and what the edge needs to open and police it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EdgeShellAccess {
    /// The session, as the audit log names it; the edge reports its end.
    pub session_id: Uuid,
    /// A signed stream grant for the agent, for the agent's home relay when
    /// the agent is attached elsewhere.
    pub grant: String,
    /// When access was decided, unix milliseconds: revocations of the
    /// subjects below at or after it end the session.
    pub began_ms: i64,
    /// The user, their key and the workspace.
    pub subjects: Vec<RevokedSubject>,
    /// The agent's home relay, if attached.
    pub location: Option<RelayInfo>,
}

/// `POST /api/v2/edges/me/shell-ended`: a session this edge carried ended.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeShellEnded {
    /// The session, from [`EdgeShellAccess`].
    pub session_id: Uuid,
    /// Bytes from the client to the agent.
    pub bytes_up: u64,
    /// Bytes from the agent to the client.
    pub bytes_down: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_are_the_json_names() {
        for state in [
            LifecycleState::Created,
            LifecycleState::Starting,
            LifecycleState::Ready,
            LifecycleState::StartError,
            LifecycleState::StartTimeout,
            LifecycleState::ShuttingDown,
            LifecycleState::Off,
            LifecycleState::ShutdownError,
            LifecycleState::ShutdownTimeout,
        ] {
            assert_eq!(from_stored::<LifecycleState>(state.as_str()), Some(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::String(state.to_string())
            );
        }
        assert_eq!(
            from_stored::<BuildStatus>("succeeded"),
            Some(BuildStatus::Succeeded)
        );
        assert_eq!(
            serde_json::to_value(AgentStatus::Timeout).unwrap(),
            serde_json::Value::String(AgentStatus::Timeout.to_string())
        );
        assert_eq!(from_stored::<BuildStatus>("exploded"), None);
    }
}

// === Query strings ===

/// `?after=N`: log lines after the one numbered `N`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AfterQuery {
    /// The last line already read (0 or absent: from the start).
    #[serde(default)]
    pub after: i64,
}

/// `GET /audit`'s query.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditQuery {
    /// At most this many entries (1–1000; default 100).
    pub limit: Option<i64>,
    /// Only entries older than this id (the last one of the previous page).
    pub before: Option<i64>,
    /// Only entries of this action (`login`, `create`, …).
    pub action: Option<String>,
}

/// `GET /workspaces`' query.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkspacesQuery {
    /// Whose: `me` (the default), a username, or `all` (owners).
    pub owner: Option<String>,
}

/// `GET /applications/auth-redirect`'s query.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuthRedirectQuery {
    /// The app URL to return to.
    pub redirect_uri: String,
    /// The app host's sign-in flow id, 16–64 letters and digits.
    pub state: String,
}

/// A short answer with nothing else to say.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Message {
    /// For a person.
    pub message: String,
}
