//! Templates, workspaces, edges, regions and the audit log.

use devmesh_shared::secret::sha256;
use devmesh_tests::{Api, TestPrimary, assert_error};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn definition() -> Value {
    json!({"agents": [{
        "name": "main",
        "apps": [
            {"slug": "code", "port": 8080, "sharing_level": "authenticated",
             "healthcheck": {"url": "http://127.0.0.1:8080/healthz"}},
            {"slug": "docs", "url": "http://127.0.0.1:9000", "display_name": "Docs"}
        ],
        "scripts": [{"name": "setup", "script": "echo hello"}]
    }]})
}

async fn template(owner: &Api, name: &str) -> Value {
    let (s, t) = owner
        .post(
            "/templates",
            json!({"name": name, "description": "BYO", "definition": definition()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    t
}

#[tokio::test]
async fn templates_are_validated_versioned_and_owner_managed() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let member = p.member(&owner, "dev").await;

    let t = template(&owner, "byo").await;
    assert_eq!(t["active_version"]["number"], 1);
    assert_eq!(t["active_version"]["kind"], "external");
    assert_eq!(
        t["active_version"]["definition"]["agents"][0]["apps"][0]["subdomain"],
        true
    );

    assert_error(
        &owner
            .post(
                "/templates",
                json!({"name": "byo", "definition": definition()}),
            )
            .await,
        StatusCode::CONFLICT,
        "already exists",
    );
    assert_error(
        &member
            .post(
                "/templates",
                json!({"name": "x", "definition": definition()}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "Only owners",
    );

    let bad = owner
        .post(
            "/templates",
            json!({"name": "bad", "definition": {"agents": [
                {"name": "a", "apps": [{"slug": "x", "port": 1, "url": "http://y"}, {"slug": "x", "url": "ftp://z"}]},
                {"name": "a", "scripts": [{"name": "", "script": "true", "timeout_seconds": 0}]}
            ]}}),
        )
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "Validation failed");
    let fields: Vec<&str> = bad.1["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "definition.agents[0].apps[0]",
            "definition.agents[0].apps[1].slug",
            "definition.agents[0].apps[1].url",
            "definition.agents[1].name",
            "definition.agents[1].scripts[0].name",
            "definition.agents[1].scripts[0].timeout_seconds",
        ]
    );
    assert_error(
        &owner
            .post(
                "/templates",
                json!({"name": "empty", "definition": {"agents": []}}),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "at least one agent",
    );
    assert_error(
        &owner.post("/templates", json!({"name": "x", "definition": {"agents": [{"name": "a", "apps": [{"slug": "s", "port": 1, "sharing": "public"}]}]}})).await,
        StatusCode::BAD_REQUEST,
        "unknown field",
    );

    // Members can read; a new version becomes active.
    assert_eq!(
        member.get("/templates").await.1["templates"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (s, t2) = owner
        .post(
            "/templates/byo/versions",
            json!({"definition": {"agents": [{"name": "main"}]}, "message": "no apps"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t2}");
    assert_eq!(t2["active_version"]["number"], 2);
    let (_, versions) = member.get("/templates/byo/versions").await;
    let numbers: Vec<i64> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["number"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [2, 1]);
    assert_eq!(
        member
            .get(&format!("/templates/{}", t["id"].as_str().unwrap()))
            .await
            .0,
        StatusCode::OK
    );
    assert_error(
        &member.get("/templates/nope").await,
        StatusCode::NOT_FOUND,
        "No template",
    );
}

#[tokio::test]
async fn workspaces_build_through_start_stop_and_delete() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let dev = p.member(&owner, "dev").await;
    template(&owner, "byo").await;

    let (s, created) = dev
        .post("/workspaces", json!({"name": "ws1", "template": "byo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let ws = &created["workspace"];
    let id = ws["id"].as_str().unwrap().to_owned();
    assert_eq!(ws["owner_name"], "dev");
    assert_eq!(ws["latest_build"]["transition"], "start");
    assert_eq!(ws["latest_build"]["status"], "succeeded");
    let agent = &ws["agents"][0];
    assert_eq!(agent["name"], "main");
    assert_eq!(agent["lifecycle_state"], "created");
    assert_eq!(agent["status"], "connecting");
    let apps = agent["apps"].as_array().unwrap();
    assert_eq!(apps[0]["slug"], "code");
    assert_eq!(apps[0]["url"], "http://127.0.0.1:8080");
    assert_eq!(apps[0]["health"], "initializing");
    assert_eq!(apps[0]["sharing_level"], "authenticated");
    assert_eq!(apps[1]["display_name"], "Docs");
    assert_eq!(apps[1]["health"], "disabled");

    // The agent token is returned once and stored hashed.
    let tokens = created["agent_tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1);
    let token = tokens[0]["token"].as_str().unwrap();
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT token_hash FROM workspace_agents WHERE id = $1::uuid")
            .bind(tokens[0]["agent_id"].as_str().unwrap())
            .fetch_one(p.pool())
            .await
            .unwrap();
    assert_eq!(stored, sha256(token.as_bytes()).to_vec());
    assert!(
        !dev.get(&format!("/workspaces/{id}"))
            .await
            .1
            .to_string()
            .contains(token)
    );

    assert_error(
        &dev.post("/workspaces", json!({"name": "ws1", "template": "byo"}))
            .await,
        StatusCode::CONFLICT,
        "already has",
    );
    assert_error(
        &dev.post("/workspaces", json!({"name": "WS", "template": "byo"}))
            .await,
        StatusCode::BAD_REQUEST,
        "name",
    );
    assert_error(
        &dev.post("/workspaces", json!({"name": "x", "template": "nope"}))
            .await,
        StatusCode::NOT_FOUND,
        "No template",
    );
    // A hostname label over 63 characters is refused at creation.
    let long = "w".repeat(32);
    let long_user = p.member(&owner, &"u".repeat(30)).await;
    assert_error(
        &long_user
            .post("/workspaces", json!({"name": long, "template": "byo"}))
            .await,
        StatusCode::BAD_REQUEST,
        "at most 63",
    );
    assert_eq!(
        long_user.get("/workspaces").await.1["workspaces"],
        json!([])
    );
    // Members cannot create for others; owners can.
    assert_error(
        &dev.post(
            "/workspaces",
            json!({"name": "x", "template": "byo", "owner": "owner"}),
        )
        .await,
        StatusCode::FORBIDDEN,
        "Only owners",
    );
    let (s, _) = owner
        .post(
            "/workspaces",
            json!({"name": "for-dev", "template": "byo", "owner": "dev"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // Visibility: other members get 404; owners see all.
    let eve = p.member(&owner, "eve").await;
    assert_error(
        &eve.get(&format!("/workspaces/{id}")).await,
        StatusCode::NOT_FOUND,
        "No such workspace",
    );
    assert_eq!(
        eve.get("/workspaces?owner=dev").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        owner.get(&format!("/workspaces/{id}")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        dev.get("/users/me/workspaces/ws1").await.1["id"],
        id.as_str()
    );
    assert_eq!(
        owner.get("/users/dev/workspaces/ws1").await.1["id"],
        id.as_str()
    );
    assert_eq!(
        dev.get("/workspaces").await.1["workspaces"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        owner.get("/workspaces?owner=all").await.1["workspaces"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        dev.get("/workspaces?owner=all").await.0,
        StatusCode::FORBIDDEN
    );

    // Stop, stop again, start (new tokens), delete.
    let build = |t: &str| json!({"transition": t});
    let (s, stopped) = dev
        .post(&format!("/workspaces/{id}/builds"), build("stop"))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{stopped}");
    assert_eq!(stopped["workspace"]["latest_build"]["build_number"], 2);
    assert_eq!(stopped["workspace"]["agents"], json!([]));
    assert_error(
        &dev.post(&format!("/workspaces/{id}/builds"), build("stop"))
            .await,
        StatusCode::CONFLICT,
        "already stopped",
    );
    let (_, started) = dev
        .post(&format!("/workspaces/{id}/builds"), build("start"))
        .await;
    assert_eq!(started["workspace"]["latest_build"]["build_number"], 3);
    let new_token = started["agent_tokens"][0]["token"].as_str().unwrap();
    assert_ne!(new_token, token);
    assert_error(
        &dev.post(&format!("/workspaces/{id}/builds"), build("start"))
            .await,
        StatusCode::CONFLICT,
        "already started",
    );
    assert_error(
        &dev.post(&format!("/workspaces/{id}/builds"), build("explode"))
            .await,
        StatusCode::BAD_REQUEST,
        "unknown variant",
    );
    assert_eq!(
        eve.post(&format!("/workspaces/{id}/builds"), build("delete"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, deleted) = dev
        .post(&format!("/workspaces/{id}/builds"), build("delete"))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(deleted["workspace"]["latest_build"]["transition"], "delete");
    assert_eq!(
        dev.get(&format!("/workspaces/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    // The name is free again, and a template in use cannot be deleted.
    assert_eq!(
        dev.post("/workspaces", json!({"name": "ws1", "template": "byo"}))
            .await
            .0,
        StatusCode::CREATED
    );
    assert_error(
        &owner.delete("/templates/byo").await,
        StatusCode::CONFLICT,
        "still use",
    );
    assert_error(
        &owner.delete("/users/dev").await,
        StatusCode::CONFLICT,
        "still owns",
    );
}

#[tokio::test]
async fn edges_are_owner_managed_with_hashed_tokens_and_listed_as_regions() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let dev = p.member(&owner, "dev").await;

    assert_error(
        &dev.post("/edges", json!({"name": "eu-west"})).await,
        StatusCode::FORBIDDEN,
        "Only owners",
    );
    let (s, created) = owner
        .post(
            "/edges",
            json!({"name": "eu-west", "display_name": "Frankfurt"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let id = created["edge"]["id"].as_str().unwrap().to_owned();
    let token = created["edge_token"].as_str().unwrap();
    let (tid, secret) = token.split_once(':').unwrap();
    assert_eq!(tid, id);
    let stored: Vec<u8> = sqlx::query_scalar("SELECT token_hash FROM edges WHERE name = 'eu-west'")
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(stored, sha256(secret.as_bytes()).to_vec());
    assert_eq!(created["edge"]["status"], "unregistered");
    assert_eq!(created["edge"]["healthy"], false);

    assert_error(
        &owner.post("/edges", json!({"name": "primary"})).await,
        StatusCode::BAD_REQUEST,
        "reserved",
    );
    assert_error(
        &owner.post("/edges", json!({"name": "eu-west"})).await,
        StatusCode::CONFLICT,
        "already exists",
    );
    assert_error(
        &owner.post("/edges", json!({"name": "EU_West"})).await,
        StatusCode::BAD_REQUEST,
        "lowercase",
    );
    assert_error(
        &owner.post("/edges", json!({"name": "x".repeat(33)})).await,
        StatusCode::BAD_REQUEST,
        "at most 32",
    );
    assert_error(
        &owner
            .post("/edges", json!({"name": "ap", "display_name": ""}))
            .await,
        StatusCode::BAD_REQUEST,
        "1-64",
    );

    let (_, renamed) = owner
        .patch("/edges/eu-west", json!({"name": "eu-central"}))
        .await;
    assert_eq!(renamed["name"], "eu-central");
    assert_eq!(renamed["display_name"], "Frankfurt");
    assert_error(
        &owner
            .patch(&format!("/edges/{id}"), json!({"name": "primary"}))
            .await,
        StatusCode::BAD_REQUEST,
        "reserved",
    );

    let (s, regenerated) = owner.post(&format!("/edges/{id}/token"), json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let new_token = regenerated["edge_token"].as_str().unwrap();
    assert_ne!(new_token, token);
    let stored_after: Vec<u8> =
        sqlx::query_scalar("SELECT token_hash FROM edges WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(p.pool())
            .await
            .unwrap();
    assert_ne!(stored_after, stored);

    owner.post("/edges", json!({"name": "ap-south"})).await;
    let (_, regions) = dev.get("/regions").await;
    let names: Vec<&str> = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["primary", "ap-south", "eu-central"]);
    assert_eq!(regions["regions"][0]["healthy"], true);
    assert_eq!(regions["regions"][0]["access_url"], "http://127.0.0.1");
    assert_eq!(
        owner.get("/edges").await.1["edges"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(dev.get("/edges").await.0, StatusCode::FORBIDDEN);

    assert_eq!(
        owner.delete("/edges/eu-central").await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &owner.get("/edges/eu-central").await,
        StatusCode::NOT_FOUND,
        "No edge",
    );
}

#[tokio::test]
async fn the_audit_log_records_who_did_what() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let _ = p
        .anon()
        .post(
            "/users/login",
            json!({"email": "owner", "password": "bad-password"}),
        )
        .await;
    owner.post("/users/me/keys", json!({"name": "k"})).await;
    owner.post("/edges", json!({"name": "eu"})).await;
    template(&owner, "byo").await;
    owner
        .post("/workspaces", json!({"name": "w", "template": "byo"}))
        .await;

    let (s, log) = owner.get("/audit").await;
    assert_eq!(s, StatusCode::OK);
    let entries: Vec<(String, String)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["resource_type"].as_str().unwrap().to_owned(),
            )
        })
        .rev()
        .collect();
    let expect = [
        ("create", "user"),
        ("login", "user"),
        ("login_failed", "user"),
        ("create", "api_key"),
        ("create", "edge"),
        ("create", "template"),
        ("create", "workspace"),
    ];
    let expect: Vec<(String, String)> = expect
        .iter()
        .map(|(a, r)| (a.to_string(), r.to_string()))
        .collect();
    assert_eq!(entries, expect);
    let first = &log["entries"].as_array().unwrap().last().unwrap();
    assert_eq!(first["username"], "owner");
    assert_eq!(first["ip"], "127.0.0.1");

    let (_, page) = owner.get("/audit?limit=2&action=create").await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    assert_eq!(page["entries"][0]["resource_type"], "workspace");
    assert_error(
        &owner.get("/audit?limit=lots").await,
        StatusCode::BAD_REQUEST,
        "limit: invalid digit",
    );
    let dev = p.member(&owner, "dev").await;
    assert_eq!(dev.get("/audit").await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn edges_register_heartbeat_and_deregister_with_their_token() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let (_, created) = owner.post("/edges", json!({"name": "eu-west"})).await;
    let token = created["edge_token"].as_str().unwrap().to_owned();
    let edge = |t: &str| {
        let mut a = Api::new(&p.url, None);
        a.http = reqwest::Client::builder()
            .default_headers(
                [("devmesh-edge-token".parse().unwrap(), t.parse().unwrap())]
                    .into_iter()
                    .collect(),
            )
            .build()
            .unwrap();
        a
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["evil.example.com".to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let replica = uuid::Uuid::new_v4();
    let register = |version: &str| {
        json!({
            "replica_id": replica, "version": version, "access_url": "https://eu.example.com",
            "wildcard_hostname": "*.eu.apps.example.com", "relay_address": "127.0.0.1:4433", "csr_pem": csr,
        })
    };
    // Nothing registers before the owner says where the edge is.
    assert_error(
        &edge(&token)
            .post("/edges/me/register", register(env!("CARGO_PKG_VERSION")))
            .await,
        StatusCode::CONFLICT,
        "no access URL",
    );
    let (s, set) = owner
        .patch(
            "/edges/eu-west",
            json!({"access_url": "https://eu.example.com/", "wildcard_hostname": "*.EU.apps.example.com",
                   "relay_hosts": ["127.0.0.1"]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{set}");
    assert_eq!(set["access_url"], "https://eu.example.com");
    assert_eq!(set["wildcard_hostname"], "*.eu.apps.example.com");
    for (field, value) in [
        ("access_url", "ftp://eu.example.com"),
        ("access_url", "https://eu.example.com/path"),
        ("wildcard_hostname", "eu.apps.example.com"),
        ("wildcard_hostname", "*.apps..example.com"),
        ("relay_hosts", "not a host"),
    ] {
        let value = if field == "relay_hosts" {
            json!([value])
        } else {
            json!(value)
        };
        assert_error(
            &owner.patch("/edges/eu-west", json!({ field: value })).await,
            StatusCode::BAD_REQUEST,
            field,
        );
    }
    let (s, reg) = edge(&token)
        .post("/edges/me/register", register(env!("CARGO_PKG_VERSION")))
        .await;
    assert_eq!(s, StatusCode::OK, "{reg}");
    assert_eq!(reg["edge_name"], "eu-west");
    assert!(
        reg["app_token_keys"]
            .as_array()
            .is_some_and(|k| !k.is_empty())
    );
    // The mesh certificate names the edge's relay, whatever the CSR asked for.
    let cert = reg["mesh_cert_pem"].as_str().unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'_>| c.to_vec())
        .unwrap();
    let text = String::from_utf8_lossy(&der);
    assert!(text.contains("eu-west.relay.devmesh.internal") && !text.contains("evil.example.com"));

    let (_, regions) = owner.get("/regions").await;
    let eu = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "eu-west")
        .unwrap()
        .clone();
    assert_eq!(
        (eu["status"].as_str(), eu["healthy"].as_bool()),
        (Some("ok"), Some(true))
    );
    assert_eq!(eu["access_url"], "https://eu.example.com");
    assert_eq!(eu["relay_address"], "127.0.0.1:4433");

    // Failure paths: another version line, a bad CSR, a wrong or regenerated token.
    assert_error(
        &edge(&token)
            .post("/edges/me/register", register("9.9.0"))
            .await,
        StatusCode::CONFLICT,
        "cannot join",
    );
    let mut bad = register(env!("CARGO_PKG_VERSION"));
    bad["csr_pem"] = json!("garbage");
    assert_error(
        &edge(&token).post("/edges/me/register", bad).await,
        StatusCode::BAD_REQUEST,
        "signing request",
    );
    let forged = format!("{}:{}", token.split(':').next().unwrap(), "x".repeat(32));
    assert_error(
        &edge(&forged)
            .post("/edges/me/register", register(env!("CARGO_PKG_VERSION")))
            .await,
        StatusCode::UNAUTHORIZED,
        "not valid",
    );
    assert_error(
        &edge("garbage")
            .post("/edges/me/register", register(env!("CARGO_PKG_VERSION")))
            .await,
        StatusCode::UNAUTHORIZED,
        "not valid",
    );

    // Deregistering the last replica makes the region unregistered again.
    let (s, _) = edge(&token)
        .post("/edges/me/deregister", json!({"replica_id": replica}))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, regions) = owner.get("/regions").await;
    let eu = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "eu-west")
        .unwrap()
        .clone();
    assert_eq!(eu["status"], "unregistered");

    let (_, new) = owner.post("/edges/eu-west/token", json!({})).await;
    assert!(new["edge_token"].is_string());
    assert_eq!(
        edge(&token)
            .post("/edges/me/register", register(env!("CARGO_PKG_VERSION")))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
}
