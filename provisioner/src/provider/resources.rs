//! What the devmesh provider offers templates: its data sources (the
//! workspace being built, its owner, its parameters) and resources (agents,
//! apps, metadata), with their schemas and behaviour.
//!
//! The provider never calls the primary. What it knows about the build
//! comes from the environment the provisioner runs Terraform in
//! ([`BuildEnv`]); what templates declare ends up in Terraform's state,
//! which the provisioner reads after `apply`.

use std::collections::HashMap;

use rmpv::Value;

use super::cty::{get, get_str, is_unknown, set, shaped, unknown};
use super::wire::{Attribute, Block, Schema};

/// How an attribute is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The template must set it.
    Required,
    /// The template may set it.
    Optional,
    /// The provider sets it.
    Computed,
}

/// One attribute of a resource or data source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attr {
    pub(crate) name: &'static str,
    /// cty's JSON type notation.
    pub(crate) ty: &'static str,
    pub(crate) mode: Mode,
    /// A change replaces the resource instead of updating it.
    pub(crate) force_new: bool,
    pub(crate) sensitive: bool,
    pub(crate) description: &'static str,
}

const fn attr(name: &'static str, ty: &'static str, mode: Mode, description: &'static str) -> Attr {
    Attr {
        name,
        ty,
        mode,
        force_new: false,
        sensitive: false,
        description,
    }
}

const fn replacing(a: Attr) -> Attr {
    Attr {
        force_new: true,
        ..a
    }
}

const fn secret(a: Attr) -> Attr {
    Attr {
        sensitive: true,
        ..a
    }
}

use Mode::{Computed, Optional, Required};

const STRING: &str = "\"string\"";
const NUMBER: &str = "\"number\"";
const BOOL: &str = "\"bool\"";
const STRING_MAP: &str = "[\"map\",\"string\"]";
const STRING_LIST: &str = "[\"list\",\"string\"]";

/// A resource type or data source.
#[derive(Debug)]
pub(crate) struct Kind {
    pub(crate) name: &'static str,
    pub(crate) attrs: &'static [Attr],
}

impl Kind {
    fn names(&self) -> Vec<&'static str> {
        self.attrs.iter().map(|a| a.name).collect()
    }

    /// The schema Terraform checks templates against.
    pub(crate) fn schema(&self) -> Schema {
        Schema {
            version: 0,
            block: Some(Block {
                version: 0,
                attributes: self
                    .attrs
                    .iter()
                    .map(|a| Attribute {
                        name: a.name.to_owned(),
                        r#type: a.ty.as_bytes().to_vec(),
                        description: a.description.to_owned(),
                        required: a.mode == Required,
                        optional: a.mode == Optional,
                        computed: a.mode == Computed,
                        sensitive: a.sensitive,
                    })
                    .collect(),
                description: String::new(),
            }),
        }
    }
}

/// `devmesh_agent`: the agent that runs in what the template creates.
pub(crate) const AGENT: Kind = Kind {
    name: "devmesh_agent",
    attrs: &[
        replacing(attr(
            "os",
            STRING,
            Required,
            "Operating system the agent runs on: linux, darwin or windows.",
        )),
        replacing(attr(
            "arch",
            STRING,
            Required,
            "CPU architecture: amd64 or arm64.",
        )),
        attr(
            "dir",
            STRING,
            Optional,
            "Directory scripts and terminals start in.",
        ),
        attr(
            "env",
            STRING_MAP,
            Optional,
            "Environment of scripts and terminals.",
        ),
        attr(
            "startup_script",
            STRING,
            Optional,
            "Shell script run when the agent starts.",
        ),
        attr(
            "metadata",
            STRING_MAP,
            Optional,
            "Values the agent measures and reports: name → shell command, whose first line of output is the value.",
        ),
        attr(
            "metadata_interval",
            NUMBER,
            Optional,
            "Seconds between two runs of each metadata command (default 10).",
        ),
        attr("id", STRING, Computed, "The agent's id."),
        secret(attr(
            "token",
            STRING,
            Computed,
            "The agent's token: pass it as DEVMESH_AGENT_TOKEN to the init script.",
        )),
        attr(
            "init_script",
            STRING,
            Computed,
            "Shell script that downloads the agent from the primary and runs it.",
        ),
    ],
};

/// `devmesh_app`: an app an agent serves.
pub(crate) const APP: Kind = Kind {
    name: "devmesh_app",
    attrs: &[
        replacing(attr(
            "agent_id",
            STRING,
            Required,
            "The devmesh_agent serving the app.",
        )),
        replacing(attr("slug", STRING, Required, "The app's name in its URL.")),
        attr(
            "display_name",
            STRING,
            Optional,
            "The app's name in the dashboard.",
        ),
        attr("port", NUMBER, Optional, "Local port the app listens on."),
        attr(
            "url",
            STRING,
            Optional,
            "Local URL of the app, instead of port.",
        ),
        attr(
            "share",
            STRING,
            Optional,
            "Who may open it: owner (default), authenticated or public.",
        ),
        attr(
            "subdomain",
            BOOL,
            Optional,
            "Serve on its own subdomain (default true).",
        ),
        attr(
            "healthcheck_url",
            STRING,
            Optional,
            "Local URL the agent polls for the app's health.",
        ),
        attr("id", STRING, Computed, "The app's id."),
    ],
};

/// `devmesh_metadata`: key/value items shown on a resource.
pub(crate) const METADATA: Kind = Kind {
    name: "devmesh_metadata",
    attrs: &[
        replacing(attr(
            "resource_id",
            STRING,
            Required,
            "The id of the resource the items describe.",
        )),
        attr("items", STRING_MAP, Required, "The items, by key."),
        attr("id", STRING, Computed, "The metadata's id."),
    ],
};

/// `devmesh_workspace`: the workspace being built.
pub(crate) const WORKSPACE: Kind = Kind {
    name: "devmesh_workspace",
    attrs: &[
        attr("id", STRING, Computed, "The workspace's id."),
        attr("name", STRING, Computed, "The workspace's name."),
        attr(
            "transition",
            STRING,
            Computed,
            "What the build does: start, stop or delete.",
        ),
        attr(
            "start_count",
            NUMBER,
            Computed,
            "1 when the build starts the workspace, else 0: count ephemeral resources with it.",
        ),
        attr(
            "access_url",
            STRING,
            Computed,
            "The primary's URL, as agents reach it.",
        ),
    ],
};

/// `devmesh_workspace_owner`: who the workspace belongs to.
pub(crate) const OWNER: Kind = Kind {
    name: "devmesh_workspace_owner",
    attrs: &[
        attr("name", STRING, Computed, "The owner's username."),
        attr("email", STRING, Computed, "The owner's email."),
    ],
};

/// `devmesh_parameter`: a value the workspace's owner chooses.
pub(crate) const PARAMETER: Kind = Kind {
    name: "devmesh_parameter",
    attrs: &[
        attr("name", STRING, Required, "The parameter's name."),
        attr(
            "type",
            STRING,
            Optional,
            "string (default), number, bool or list(string).",
        ),
        attr(
            "description",
            STRING,
            Optional,
            "What the parameter is for.",
        ),
        attr(
            "default",
            STRING,
            Optional,
            "The value when the owner gives none; without it the parameter is required.",
        ),
        attr(
            "mutable",
            BOOL,
            Optional,
            "Whether it may change after the workspace is created.",
        ),
        attr(
            "options",
            STRING_LIST,
            Optional,
            "The values allowed, when only some are.",
        ),
        attr(
            "validation_min",
            NUMBER,
            Optional,
            "Smallest allowed number.",
        ),
        attr(
            "validation_max",
            NUMBER,
            Optional,
            "Largest allowed number.",
        ),
        attr(
            "validation_regex",
            STRING,
            Optional,
            "Pattern a string must match.",
        ),
        attr("value", STRING, Computed, "The value for this build."),
    ],
};

/// Every resource type.
pub(crate) const RESOURCES: &[&Kind] = &[&AGENT, &APP, &METADATA];
/// Every data source.
pub(crate) const DATA_SOURCES: &[&Kind] = &[&WORKSPACE, &OWNER, &PARAMETER];

/// What the provisioner tells the provider about the build, through
/// Terraform's environment.
#[derive(Debug, Clone, Default)]
pub(crate) struct BuildEnv {
    pub(crate) workspace_id: String,
    pub(crate) workspace_name: String,
    pub(crate) transition: String,
    pub(crate) access_url: String,
    pub(crate) owner_name: String,
    pub(crate) owner_email: String,
    /// The build being run (empty outside a devmesh build).
    pub(crate) build_id: String,
    /// Parameter values by name.
    pub(crate) parameters: HashMap<String, String>,
}

impl BuildEnv {
    /// From `DEVMESH_WORKSPACE_*`, `DEVMESH_ACCESS_URL` and
    /// `DEVMESH_PARAMETERS` (a JSON object of strings).
    pub(crate) fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            workspace_id: var("DEVMESH_WORKSPACE_ID"),
            workspace_name: var("DEVMESH_WORKSPACE_NAME"),
            transition: var("DEVMESH_WORKSPACE_TRANSITION"),
            access_url: var("DEVMESH_ACCESS_URL"),
            owner_name: var("DEVMESH_WORKSPACE_OWNER"),
            owner_email: var("DEVMESH_WORKSPACE_OWNER_EMAIL"),
            build_id: var("DEVMESH_BUILD_ID"),
            parameters: serde_json::from_str(&var("DEVMESH_PARAMETERS")).unwrap_or_default(),
        }
    }
}

/// A problem with a template's configuration, pointing at an attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) attribute: Option<&'static str>,
    pub(crate) summary: String,
}

fn problem(attribute: &'static str, summary: impl Into<String>) -> Problem {
    Problem {
        attribute: Some(attribute),
        summary: summary.into(),
    }
}

/// Checks a resource's configuration (unknown values pass: they are
/// checked when known).
pub(crate) fn validate(kind: &Kind, config: &Value) -> Vec<Problem> {
    let mut problems = Vec::new();
    let known = |name| Some(get(config, name)).filter(|v| !v.is_nil() && !is_unknown(v));
    match kind.name {
        "devmesh_agent" => {
            if let Some(os) = known("os").and_then(Value::as_str)
                && !matches!(os, "linux" | "darwin" | "windows")
            {
                problems.push(problem(
                    "os",
                    format!("os must be linux, darwin or windows, not {os:?}"),
                ));
            }
            if let Some(arch) = known("arch").and_then(Value::as_str)
                && !matches!(arch, "amd64" | "arm64")
            {
                problems.push(problem(
                    "arch",
                    format!("arch must be amd64 or arm64, not {arch:?}"),
                ));
            }
        }
        "devmesh_app" => {
            if let Some(slug) = known("slug").and_then(Value::as_str)
                && let Err(e) = devmesh_shared::names::validate_name(slug)
            {
                problems.push(problem("slug", format!("slug {slug:?}: {e}")));
            }
            if let Some(port) = known("port")
                && !port.as_u64().is_some_and(|p| (1..=65535).contains(&p))
            {
                problems.push(problem("port", "port must be between 1 and 65535"));
            }
            if let Some(share) = known("share").and_then(Value::as_str)
                && !matches!(share, "owner" | "authenticated" | "public")
            {
                problems.push(problem(
                    "share",
                    "share must be owner, authenticated or public",
                ));
            }
            if known("port").is_some() == known("url").is_some()
                && !is_unknown(get(config, "port"))
                && !is_unknown(get(config, "url"))
            {
                problems.push(Problem {
                    attribute: None,
                    summary: "an app needs exactly one of port and url".into(),
                });
            }
        }
        "devmesh_parameter" => {
            if let Some(ty) = known("type").and_then(Value::as_str)
                && !matches!(ty, "string" | "number" | "bool" | "list(string)")
            {
                problems.push(problem(
                    "type",
                    "type must be string, number, bool or list(string)",
                ));
            }
        }
        _ => {}
    }
    problems
}

/// The state Terraform should expect: null when deleting; otherwise the
/// proposed state with computed attributes kept from the prior state, or
/// unknown when creating or replacing. Returns the attributes whose change
/// forces a replacement.
///
/// An agent gets a new token in every devmesh build (`build` differs from
/// `prior_build`, the build that made its current one), so a token lives
/// exactly as long as its build.
pub(crate) fn plan(
    kind: &Kind,
    prior: &Value,
    proposed: &Value,
    build: &str,
    prior_build: &str,
) -> (Value, Vec<&'static str>) {
    if proposed.is_nil() {
        return (Value::Nil, Vec::new());
    }
    let mut planned = shaped(proposed, &kind.names());
    let replace: Vec<&'static str> = if prior.is_nil() {
        Vec::new()
    } else {
        kind.attrs
            .iter()
            .filter(|a| a.force_new && get(prior, a.name) != get(proposed, a.name))
            .map(|a| a.name)
            .collect()
    };
    for a in kind.attrs.iter().filter(|a| a.mode == Computed) {
        let kept = get(prior, a.name);
        let value = if prior.is_nil() || !replace.is_empty() || kept.is_nil() {
            unknown()
        } else {
            kept.clone()
        };
        set(&mut planned, a.name, value);
    }
    if kind.name == AGENT.name && !prior.is_nil() && !build.is_empty() && build != prior_build {
        set(&mut planned, "token", unknown());
    }
    (planned, replace)
}

/// The state after applying `planned`: computed attributes Terraform does
/// not know yet are filled in.
pub(crate) fn apply(kind: &Kind, planned: &Value, env: &BuildEnv) -> Value {
    if planned.is_nil() {
        return Value::Nil;
    }
    let mut state = planned.clone();
    for a in kind.attrs.iter().filter(|a| a.mode == Computed) {
        if !is_unknown(get(&state, a.name)) {
            continue;
        }
        let value = match a.name {
            "token" => devmesh_shared::token::new_agent_token(),
            "init_script" => init_script(
                &env.access_url,
                get_str(planned, "os").unwrap_or("linux"),
                get_str(planned, "arch").unwrap_or("amd64"),
            ),
            _ => uuid::Uuid::new_v4().to_string(),
        };
        set(&mut state, a.name, Value::from(value));
    }
    state
}

/// A data source's state for `config`.
pub(crate) fn read(kind: &Kind, config: &Value, env: &BuildEnv) -> Value {
    let mut state = shaped(config, &kind.names());
    let s = |v: &str| Value::from(v);
    match kind.name {
        "devmesh_workspace" => {
            set(&mut state, "id", s(&env.workspace_id));
            set(&mut state, "name", s(&env.workspace_name));
            set(&mut state, "transition", s(&env.transition));
            set(
                &mut state,
                "start_count",
                Value::from(u8::from(env.transition == "start")),
            );
            set(&mut state, "access_url", s(&env.access_url));
        }
        "devmesh_workspace_owner" => {
            set(&mut state, "name", s(&env.owner_name));
            set(&mut state, "email", s(&env.owner_email));
        }
        "devmesh_parameter" => {
            let name = get_str(config, "name").unwrap_or_default();
            let value = env
                .parameters
                .get(name)
                .map(String::as_str)
                .or_else(|| get_str(config, "default"));
            set(&mut state, "value", value.map_or(Value::Nil, s));
        }
        _ => {}
    }
    state
}

/// The agent's bootstrap: fetch the agent binary for `os`/`arch` from the
/// primary at `access_url` and run it. The token is not in it (scripts end
/// up in logs and process lists): templates pass `token` as
/// `DEVMESH_AGENT_TOKEN`.
pub(crate) fn init_script(access_url: &str, os: &str, arch: &str) -> String {
    format!(
        r#"#!/bin/sh
# devmesh agent bootstrap: download the agent and run it.
set -eu
: "${{DEVMESH_AGENT_TOKEN:?pass the devmesh_agent token as DEVMESH_AGENT_TOKEN}}"
dir="${{DEVMESH_AGENT_DIR:-${{TMPDIR:-/tmp}}/devmesh-agent}}"
mkdir -p "$dir"
bin="$dir/devmesh"
url="{access_url}/api/v2/buildinfo/agent/{os}/{arch}"
# A private CA (DEVMESH_CA_CERT) is trusted for the download as the agent
# trusts it afterwards.
if command -v curl >/dev/null 2>&1; then
  curl -fsSL --retry 10 --retry-delay 1 --retry-all-errors ${{DEVMESH_CA_CERT:+--cacert "$DEVMESH_CA_CERT"}} -o "$bin.part" "$url"
else
  wget -q ${{DEVMESH_CA_CERT:+--ca-certificate="$DEVMESH_CA_CERT"}} -O "$bin.part" "$url"
fi
chmod +x "$bin.part"
mv "$bin.part" "$bin"
export DEVMESH_URL="{access_url}"
exec "$bin" agent
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::cty::get_str;

    fn obj(pairs: &[(&str, Value)]) -> Value {
        Value::Map(
            pairs
                .iter()
                .map(|(k, v)| (Value::from(*k), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn creating_an_agent_fills_its_id_token_and_init_script_once() {
        let config = obj(&[("os", "linux".into()), ("arch", "amd64".into())]);
        let (planned, replace) = plan(&AGENT, &Value::Nil, &config, "", "");
        assert!(replace.is_empty());
        assert!(is_unknown(get(&planned, "token")));
        let env = BuildEnv {
            access_url: "https://devmesh.example.com".into(),
            ..Default::default()
        };
        let state = apply(&AGENT, &planned, &env);
        let token = get_str(&state, "token").unwrap().to_owned();
        assert!(
            devmesh_shared::token::looks_like_agent_token(&token),
            "{token}"
        );
        assert!(
            get_str(&state, "init_script")
                .unwrap()
                .contains("https://devmesh.example.com/api/v2/buildinfo/agent/linux/amd64")
        );

        // A new startup script updates in place: same token.
        let mut changed = state.clone();
        set(&mut changed, "startup_script", "echo hi".into());
        let (planned, replace) = plan(&AGENT, &state, &changed, "", "");
        assert!(replace.is_empty());
        assert_eq!(get_str(&planned, "token"), Some(token.as_str()));
        // Another architecture replaces it: a new token.
        set(&mut changed, "arch", "arm64".into());
        let (planned, replace) = plan(&AGENT, &state, &changed, "", "");
        assert_eq!(replace, vec!["arch"]);
        assert!(is_unknown(get(&planned, "token")));
        // Deleting plans null.
        assert_eq!(plan(&AGENT, &state, &Value::Nil, "", "").0, Value::Nil);

        // The same build keeps the token; the next build gets a new one.
        let (same, _) = plan(&AGENT, &state, &state, "b1", "b1");
        assert_eq!(get_str(&same, "token"), Some(token.as_str()));
        let (next, _) = plan(&AGENT, &state, &state, "b2", "b1");
        assert!(is_unknown(get(&next, "token")));
        assert_eq!(get(&next, "id"), get(&state, "id"), "same agent, new token");
    }

    #[test]
    fn bad_configurations_name_the_attribute() {
        let bad = obj(&[("os", "plan9".into()), ("arch", "amd64".into())]);
        assert_eq!(validate(&AGENT, &bad)[0].attribute, Some("os"));
        let app = obj(&[("slug", "Web App".into()), ("port", 70000.into())]);
        let problems = validate(&APP, &app);
        let attrs: Vec<_> = problems.iter().map(|p| p.attribute).collect();
        assert!(
            attrs.contains(&Some("slug")) && attrs.contains(&Some("port")),
            "{problems:?}"
        );
        let neither = obj(&[("slug", "web".into())]);
        assert_eq!(validate(&APP, &neither)[0].attribute, None);
        let unknown_port = obj(&[("slug", "web".into()), ("port", unknown())]);
        assert!(validate(&APP, &unknown_port).is_empty());
    }

    #[test]
    fn data_sources_read_the_build_from_the_environment() {
        let env = BuildEnv {
            workspace_name: "dev".into(),
            transition: "stop".into(),
            parameters: [("region".to_owned(), "eu".to_owned())].into(),
            ..Default::default()
        };
        let ws = read(&WORKSPACE, &Value::Map(vec![]), &env);
        assert_eq!(get_str(&ws, "name"), Some("dev"));
        assert_eq!(get(&ws, "start_count").as_u64(), Some(0));
        let p = read(&PARAMETER, &obj(&[("name", "region".into())]), &env);
        assert_eq!(get_str(&p, "value"), Some("eu"));
        let d = read(
            &PARAMETER,
            &obj(&[("name", "size".into()), ("default", "10".into())]),
            &env,
        );
        assert_eq!(get_str(&d, "value"), Some("10"));
    }
}
