//! The OpenAPI document of `/api/v2`, built by the same table that routes
//! requests, so the two cannot drift.
//!
//! Every API route is added through [`ApiRoutes`], which hands the handler
//! to axum and describes the operation from the handler's own extractors:
//! its path parameters and their types ([`ApiPath`]), query parameters
//! ([`ApiQuery`]), body ([`ApiJson`]) and the credential it demands
//! ([`Authed`], an edge's, an agent's or a provisioner's). An extractor
//! without a description does not compile. What a handler answers is
//! declared beside its route ([`ApiRoutes::returns`]); the schemathesis run
//! in CI checks real answers against those declarations.

use std::collections::BTreeMap;

use axum::Router;
use axum::handler::Handler;
use axum::routing::{MethodFilter, on};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Value, json};

use super::AppState;
use super::extract::{ApiJson, ApiPath, ApiQuery, ApiWebSocket, Authed, ClientIp};

/// The credentials an operation may demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A user's API key or session: the `Devmesh-Session-Token` header, a
    /// bearer token, or the session cookie.
    User,
    /// A user's key as a program sends it (the header or a bearer token):
    /// routes that open streams to a workspace refuse the ambient cookie.
    UserKey,
    /// A user's session if there is one (the cookie or a header); without
    /// one the route still answers (a browser is sent to sign in).
    UserOptional,
    /// An edge's token (`Devmesh-Edge-Token`).
    Edge,
    /// A workspace agent's token (`Devmesh-Agent-Token`).
    Agent,
    /// A provisioner key (`Devmesh-Provisioner-Key`).
    Provisioner,
}

impl Credential {
    fn security(self) -> Value {
        match self {
            Credential::User => {
                json!([{"session_header": []}, {"bearer": []}, {"session_cookie": []}])
            }
            Credential::UserKey => json!([{"session_header": []}, {"bearer": []}]),
            Credential::UserOptional => json!([
                {"session_cookie": []},
                {"session_header": []},
                {"bearer": []},
                {}
            ]),
            Credential::Edge => json!([{"edge_token": []}]),
            Credential::Agent => json!([{"agent_token": []}]),
            Credential::Provisioner => json!([{"provisioner_key": []}]),
        }
    }
}

/// One operation as the document shows it.
#[derive(Debug, Default)]
pub struct Operation {
    summary: &'static str,
    operation_id: String,
    path_types: Vec<Value>,
    query: Vec<Value>,
    body: Option<(&'static str, Value)>,
    credential: Option<Credential>,
    responses: BTreeMap<String, Value>,
}

/// What one extractor (or a handler's whole argument list) adds to the
/// description of its operation.
pub trait Describe {
    /// Adds to `op`, with schemas from `schemas`.
    fn describe(op: &mut Operation, schemas: &mut SchemaGenerator);
}

macro_rules! describe_handler_args {
    ($($arg:ident),*) => {
        // axum's `Handler<(M, T1, …, Tn), S>`: `M` marks how the last
        // argument is extracted and describes nothing.
        impl<M, $($arg: Describe),*> Describe for (M, $($arg,)*) {
            #[allow(unused_variables)]
            fn describe(op: &mut Operation, schemas: &mut SchemaGenerator) {
                $($arg::describe(op, schemas);)*
            }
        }
    };
}

describe_handler_args!();
describe_handler_args!(A);
describe_handler_args!(A, B);
describe_handler_args!(A, B, C);
describe_handler_args!(A, B, C, D);
describe_handler_args!(A, B, C, D, E);
describe_handler_args!(A, B, C, D, E, F);
describe_handler_args!(A, B, C, D, E, F, G);

/// Extractors that add nothing a client sends on purpose.
macro_rules! describes_nothing {
    ($($t:ty),*) => {
        $(impl Describe for $t {
            fn describe(_: &mut Operation, _: &mut SchemaGenerator) {}
        })*
    };
}

describes_nothing!(ClientIp, axum::http::HeaderMap, ApiWebSocket);

impl<S> Describe for axum::extract::State<S> {
    fn describe(_: &mut Operation, _: &mut SchemaGenerator) {}
}

impl Describe for Authed {
    fn describe(op: &mut Operation, _: &mut SchemaGenerator) {
        op.credential = Some(Credential::User);
    }
}

impl Describe for super::extract::KeyAuthed {
    fn describe(op: &mut Operation, _: &mut SchemaGenerator) {
        op.credential = Some(Credential::UserKey);
    }
}

impl Describe for super::edges::EdgeAuth {
    fn describe(op: &mut Operation, _: &mut SchemaGenerator) {
        op.credential = Some(Credential::Edge);
    }
}

impl Describe for super::agents::AgentAuth {
    fn describe(op: &mut Operation, _: &mut SchemaGenerator) {
        op.credential = Some(Credential::Agent);
    }
}

impl Describe for super::provisioners::KeyAuth {
    fn describe(op: &mut Operation, _: &mut SchemaGenerator) {
        op.credential = Some(Credential::Provisioner);
    }
}

impl<T: JsonSchema> Describe for ApiJson<T> {
    fn describe(op: &mut Operation, schemas: &mut SchemaGenerator) {
        op.body = Some(("application/json", schemas.subschema_for::<T>().to_value()));
    }
}

impl Describe for axum::body::Body {
    fn describe(op: &mut Operation, _: &mut SchemaGenerator) {
        let bytes = json!({"type": "string", "format": "binary"});
        op.body = Some(("application/octet-stream", bytes));
    }
}

impl<T: JsonSchema> Describe for ApiQuery<T> {
    fn describe(op: &mut Operation, schemas: &mut SchemaGenerator) {
        let schema = schemas.root_schema_for::<T>().to_value();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(properties) = schema["properties"].as_object() {
            for (name, property) in properties {
                let mut property = property.clone();
                // Absent, not null: a query string has no null.
                let (description, _) = property
                    .as_object_mut()
                    .map(|p| (p.remove("description"), p.remove("nullable")))
                    .unwrap_or_default();
                let mut parameter = json!({
                    "name": name,
                    "in": "query",
                    "required": required.contains(&name.as_str()),
                    "schema": property,
                });
                if let Some(d) = description {
                    parameter["description"] = d;
                }
                op.query.push(parameter);
            }
        }
    }
}

/// Types a path parameter list may have: one value or a tuple, in the
/// order the route's template names them.
pub trait PathTypes {
    /// One schema per parameter.
    fn path_types() -> Vec<Value>;
}

impl PathTypes for String {
    fn path_types() -> Vec<Value> {
        vec![json!({"type": "string"})]
    }
}

impl PathTypes for uuid::Uuid {
    fn path_types() -> Vec<Value> {
        vec![json!({"type": "string", "format": "uuid"})]
    }
}

impl PathTypes for i32 {
    fn path_types() -> Vec<Value> {
        vec![json!({"type": "integer", "format": "int32"})]
    }
}

impl<A: PathTypes, B: PathTypes> PathTypes for (A, B) {
    fn path_types() -> Vec<Value> {
        let mut all = A::path_types();
        all.extend(B::path_types());
        all
    }
}

impl<T: PathTypes> Describe for ApiPath<T> {
    fn describe(op: &mut Operation, _: &mut SchemaGenerator) {
        op.path_types = T::path_types();
    }
}

/// The API's routes and the document describing them, built together.
pub struct ApiRoutes {
    router: Router<AppState>,
    paths: BTreeMap<&'static str, BTreeMap<&'static str, Operation>>,
    schemas: SchemaGenerator,
    last: Option<(&'static str, &'static str)>,
}

impl Default for ApiRoutes {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiRoutes {
    /// No routes yet.
    pub fn new() -> Self {
        Self {
            router: Router::new(),
            paths: BTreeMap::new(),
            schemas: SchemaGenerator::new(SchemaSettings::openapi3()),
            last: None,
        }
    }

    /// `GET path`, handled by `handler`.
    pub fn get<H, T>(self, path: &'static str, summary: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: Describe + 'static,
    {
        self.add::<H, T>(MethodFilter::GET, "get", path, summary, handler)
    }

    /// `POST path`, handled by `handler`.
    pub fn post<H, T>(self, path: &'static str, summary: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: Describe + 'static,
    {
        self.add::<H, T>(MethodFilter::POST, "post", path, summary, handler)
    }

    /// `PUT path`, handled by `handler`.
    pub fn put<H, T>(self, path: &'static str, summary: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: Describe + 'static,
    {
        self.add::<H, T>(MethodFilter::PUT, "put", path, summary, handler)
    }

    /// `PATCH path`, handled by `handler`.
    pub fn patch<H, T>(self, path: &'static str, summary: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: Describe + 'static,
    {
        self.add::<H, T>(MethodFilter::PATCH, "patch", path, summary, handler)
    }

    /// `DELETE path`, handled by `handler`.
    pub fn delete<H, T>(self, path: &'static str, summary: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: Describe + 'static,
    {
        self.add::<H, T>(MethodFilter::DELETE, "delete", path, summary, handler)
    }

    fn add<H, T>(
        mut self,
        filter: MethodFilter,
        method: &'static str,
        path: &'static str,
        summary: &'static str,
        handler: H,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: Describe + 'static,
    {
        let mut op = Operation {
            summary,
            operation_id: operation_id::<H>(),
            ..Operation::default()
        };
        T::describe(&mut op, &mut self.schemas);
        let previous = self.paths.entry(path).or_default().insert(method, op);
        assert!(previous.is_none(), "{method} {path} is routed twice");
        self.router = self.router.route(path, on(filter, handler));
        self.last = Some((path, method));
        self
    }

    fn last_op(&mut self) -> &mut Operation {
        let (path, method) = self.last.expect("a route is added before its responses");
        self.paths
            .get_mut(path)
            .and_then(|p| p.get_mut(method))
            .expect("the last route is in the table")
    }

    /// The last route answers `status` with a JSON `T`.
    pub fn returns<T: JsonSchema>(mut self, status: u16, description: &'static str) -> Self {
        let schema = self.schemas.subschema_for::<T>().to_value();
        self.last_op().responses.insert(
            status.to_string(),
            json!({"description": description, "content": {"application/json": {"schema": schema}}}),
        );
        self
    }

    /// The last route takes `credential` rather than what its extractors
    /// say (a handler that checks further, or reads the session itself).
    pub fn credential(mut self, credential: Credential) -> Self {
        self.last_op().credential = Some(credential);
        self
    }

    /// The last route's raw body is a JSON document of its own kind (a
    /// Terraform state), not bytes.
    pub fn json_document_body(mut self, description: &'static str) -> Self {
        self.last_op().body = Some((
            "application/json",
            json!({"type": "object", "description": description}),
        ));
        self
    }

    /// The last route answers `status` with no body.
    pub fn empty(mut self, status: u16, description: &'static str) -> Self {
        self.last_op()
            .responses
            .insert(status.to_string(), json!({"description": description}));
        self
    }

    /// The last route answers `status` with a body of `content_type` (not
    /// JSON: a file, an event stream, a byte stream).
    pub fn raw(
        mut self,
        status: u16,
        content_type: &'static str,
        description: &'static str,
    ) -> Self {
        self.last_op().responses.insert(
            status.to_string(),
            json!({"description": description, "content": {content_type: {"schema": {"type": "string", "format": "binary"}}}}),
        );
        self
    }

    /// The router, and the document describing it.
    pub fn finish(mut self) -> (Router<AppState>, Value) {
        let error = self
            .schemas
            .subschema_for::<devmesh_shared::api::Error>()
            .to_value();
        let mut paths = serde_json::Map::new();
        for (path, ops) in std::mem::take(&mut self.paths) {
            let names = template_names(path);
            let mut item = serde_json::Map::new();
            for (method, op) in ops {
                item.insert(method.to_owned(), op.into_value(path, &names, &error));
            }
            paths.insert(path.to_owned(), Value::Object(item));
        }
        let document = json!({
            "openapi": "3.0.3",
            "info": {
                "title": "devmesh API",
                "version": env!("CARGO_PKG_VERSION"),
                "description": "The HTTP API of a devmesh primary. Errors are JSON `Error` \
                    objects. Generated from the server's routing table: \
                    `GET /api/v2/openapi.json` on any primary serves the same document.",
            },
            "servers": [{"url": "/api/v2"}],
            "paths": paths,
            "components": {
                "schemas": self.schemas.take_definitions(true),
                "securitySchemes": {
                    "session_header": {"type": "apiKey", "in": "header", "name": super::extract::SESSION_HEADER, "description": "A user's API key or session token."},
                    "bearer": {"type": "http", "scheme": "bearer", "description": "A user's API key or session token."},
                    "session_cookie": {"type": "apiKey", "in": "cookie", "name": devmesh_proxy::app::SESSION_COOKIE, "description": "The dashboard's session cookie (`__Host-devmesh_session_token` over HTTPS); changes also need a same-origin request."},
                    "edge_token": {"type": "apiKey", "in": "header", "name": devmesh_shared::api::EDGE_TOKEN_HEADER, "description": "An edge's token, from `POST /edges` or `POST /edges/{edge}/token`."},
                    "agent_token": {"type": "apiKey", "in": "header", "name": devmesh_shared::api::AGENT_TOKEN_HEADER, "description": "A workspace agent's token, from the build that created it."},
                    "provisioner_key": {"type": "apiKey", "in": "header", "name": devmesh_shared::provisionerd::PROVISIONER_KEY_HEADER, "description": "A provisioner key, from `POST /provisioner-keys`."},
                },
            },
        });
        (self.router, document)
    }
}

impl Operation {
    fn into_value(self, path: &str, names: &[&str], error: &Value) -> Value {
        assert!(
            self.path_types.is_empty() || self.path_types.len() == names.len(),
            "{path}: the handler takes {} path parameters, the route names {}",
            self.path_types.len(),
            names.len()
        );
        assert!(
            self.responses
                .keys()
                .any(|s| matches!(&s[..1], "1" | "2" | "3")),
            "{path}: declare what the route answers on success"
        );
        let mut parameters: Vec<Value> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let schema = self
                    .path_types
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "string"}));
                json!({"name": name, "in": "path", "required": true, "schema": schema})
            })
            .collect();
        parameters.extend(self.query);
        let mut responses = serde_json::Map::new();
        for (status, response) in self.responses {
            responses.insert(status, response);
        }
        responses.insert(
            "default".into(),
            json!({"description": "An error.", "content": {"application/json": {"schema": error}}}),
        );
        let tag = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let mut op = json!({
            "operationId": self.operation_id,
            "summary": self.summary,
            "tags": [tag],
            "responses": responses,
        });
        if !parameters.is_empty() {
            op["parameters"] = Value::Array(parameters);
        }
        if let Some((content_type, schema)) = self.body {
            op["requestBody"] =
                json!({"required": true, "content": {content_type: {"schema": schema}}});
        }
        match self.credential {
            Some(c) => op["security"] = c.security(),
            None => op["security"] = json!([]),
        }
        op
    }
}

/// The parameter names of a route template (`/users/{user}/keys/{id}`).
fn template_names(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// `users.create_key` for the handler `crate::api::users::create_key`.
fn operation_id<H>() -> String {
    let name = std::any::type_name::<H>();
    let mut parts = name.rsplit("::");
    let function = parts.next().unwrap_or(name);
    match parts.next() {
        Some(module) => format!("{module}.{function}"),
        None => function.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json`, as published.
    const PUBLISHED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

    fn document() -> Value {
        crate::api::api_routes().finish().1
    }

    #[test]
    fn the_published_document_is_the_one_the_server_serves() {
        let current = serde_json::to_string_pretty(&document()).unwrap() + "\n";
        if std::env::var_os("DEVMESH_UPDATE_OPENAPI").is_some() {
            std::fs::write(PUBLISHED, &current).unwrap();
        }
        let published = std::fs::read_to_string(PUBLISHED).unwrap_or_default();
        assert!(
            published == current,
            "docs/openapi.json is out of date: run \
             `DEVMESH_UPDATE_OPENAPI=1 cargo test -p devmesh-primary published_document`"
        );
    }

    #[test]
    fn operations_carry_their_handlers_credentials_parameters_and_bodies() {
        let doc = document();
        let create_key = &doc["paths"]["/users/me/keys"]["post"];
        assert_eq!(create_key["operationId"], "users.create_key");
        assert_eq!(create_key["security"][0], json!({"session_header": []}));
        assert_eq!(
            create_key["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/CreateKeyRequest"
        );
        let heartbeat =
            &doc["paths"]["/provisionerd/daemons/{daemon}/jobs/{job}/heartbeat"]["post"];
        assert_eq!(heartbeat["security"], json!([{"provisioner_key": []}]));
        let params: Vec<_> = heartbeat["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["schema"]["format"].as_str()))
            .collect();
        assert_eq!(params, [("daemon", Some("uuid")), ("job", Some("uuid"))]);
        let audit = &doc["paths"]["/audit"]["get"]["parameters"];
        let names: Vec<_> = audit
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].clone())
            .collect();
        assert_eq!(names, [json!("action"), json!("before"), json!("limit")]);
        assert_eq!(doc["paths"]["/buildinfo"]["get"]["security"], json!([]));
        assert!(
            doc["components"]["schemas"]["Workspace"]["properties"]["latest_build"].is_object()
        );
    }

    #[test]
    fn operation_ids_are_unique() {
        let doc = document();
        let mut ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .map(|op| op["operationId"].as_str().unwrap())
            .collect();
        let all = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all, "two routes share a handler name");
        assert!(all >= 75, "{all} operations");
    }

    #[test]
    fn template_names_are_read_in_order() {
        assert_eq!(
            template_names("/users/{user}/workspaces/{name}"),
            ["user", "name"]
        );
        assert!(template_names("/users/me").is_empty());
    }
}
