//! Users, sessions, keys: success and failure paths.

use devmesh_shared::secret::sha256;
use devmesh_tests::{TestPrimary, assert_error};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn first_user_setup_happens_once() {
    let p = TestPrimary::start().await;
    let anon = p.anon();
    assert_eq!(anon.get("/users/first").await.1["has_first_user"], false);

    let bad = anon
        .post(
            "/users/first",
            json!({"email": "nope", "username": "Bad--Name", "password": "short"}),
        )
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "Validation failed");
    let fields: Vec<&str> = bad.1["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["username", "email", "password"]);

    let (status, user) = anon
        .post(
            "/users/first",
            json!({"email": "Ada@Example.com", "username": "ada", "password": "lovelace-1815"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    assert_eq!(user["roles"], json!(["owner", "member"]));
    assert_eq!(user["status"], "active");

    let again = anon
        .post(
            "/users/first",
            json!({"email": "b@example.com", "username": "bob", "password": "password-2"}),
        )
        .await;
    assert_error(&again, StatusCode::CONFLICT, "already been created");
    assert_eq!(anon.get("/users/first").await.1["has_first_user"], true);

    // The password is stored as an argon2id hash, never in clear.
    let hash: String =
        sqlx::query_scalar("SELECT hashed_password FROM users WHERE username = 'ada'")
            .fetch_one(p.pool())
            .await
            .unwrap();
    assert!(hash.starts_with("$argon2id$") && !hash.contains("lovelace"));
}

#[tokio::test]
async fn concurrent_first_user_requests_create_exactly_one_owner() {
    let p = TestPrimary::start().await;
    let anon = p.anon();
    let tries = (0..4).map(|i| {
        let anon = anon.clone();
        async move {
            anon.post("/users/first", json!({"email": format!("u{i}@example.com"), "username": format!("u{i}"), "password": "password-123"}))
                .await
                .0
        }
    });
    let statuses = futures_join(tries).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        3,
        "{statuses:?}"
    );
}

async fn futures_join<F: std::future::Future<Output = StatusCode> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<StatusCode> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn login_accepts_email_or_username_and_every_token_carrier() {
    let p = TestPrimary::start().await;
    let _owner = p.owner().await;
    let anon = p.anon();

    assert_error(
        &anon
            .post(
                "/users/login",
                json!({"email": "owner@example.com", "password": "wrong-password"}),
            )
            .await,
        StatusCode::UNAUTHORIZED,
        "Incorrect email or password",
    );
    assert_error(
        &anon
            .post(
                "/users/login",
                json!({"email": "ghost@example.com", "password": "owner-password"}),
            )
            .await,
        StatusCode::UNAUTHORIZED,
        "Incorrect email or password",
    );

    // Username, case-insensitive email.
    let resp = anon
        .http
        .post(format!("{}/api/v2/users/login", p.url))
        .json(&json!({"email": "owner", "password": "owner-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("devmesh_session_token="), "{cookie}");
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Lax")
            && !cookie.contains("Secure"),
        "{cookie}"
    );
    let token = resp.json::<serde_json::Value>().await.unwrap()["session_token"]
        .as_str()
        .unwrap()
        .to_owned();
    anon.login("OWNER@example.com", "owner-password").await;

    let me = format!("{}/api/v2/users/me", p.url);
    let http = reqwest::Client::new();
    for req in [
        http.get(&me).header("Devmesh-Session-Token", &token),
        http.get(&me).bearer_auth(&token),
        http.get(&me).header(
            "Cookie",
            format!("theme=dark; devmesh_session_token={token}"),
        ),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["username"], "owner");
        assert_eq!(body["email"], "owner@example.com");
    }

    for bad in [
        "",
        "garbage",
        "aaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbb",
        &format!("{}x", token),
    ] {
        let got = anon.with_token(bad).get("/users/me").await;
        assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{bad:?}: {}", got.1);
    }
    assert_error(
        &anon.get("/users/me").await,
        StatusCode::UNAUTHORIZED,
        "signed in",
    );

    // Logout revokes the session at once.
    let session = anon.with_token(&token);
    let (status, _) = session.post("/users/logout", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_error(
        &session.get("/users/me").await,
        StatusCode::UNAUTHORIZED,
        "invalid",
    );
}

#[tokio::test]
async fn login_is_rate_limited_per_user_and_per_ip() {
    let p = TestPrimary::start().await;
    let _owner = p.owner().await;
    let anon = p.anon();
    for _ in 0..10 {
        let (s, _) = anon
            .post(
                "/users/login",
                json!({"email": "owner", "password": "guess-guess"}),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // The right password does not help once the user's budget is spent.
    let resp = anon
        .http
        .post(format!("{}/api/v2/users/login", p.url))
        .json(&json!({"email": "owner", "password": "owner-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));

    // Per IP: spraying many names from one address is limited too.
    let mut limited = false;
    for i in 0..25 {
        let (s, _) = anon
            .post(
                "/users/login",
                json!({"email": format!("user{i}"), "password": "guess-guess"}),
            )
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
    }
    assert!(limited, "30 attempts per minute per IP");
    let metrics = reqwest::get(format!("{}/metrics", p.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("devmesh_logins_total{result=\"rate_limited\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn api_keys_are_hashed_scoped_expiring_and_revocable() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;

    let (status, created) = owner.post("/users/me/keys", json!({"name": "ci"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["scope"], "all");
    let (kid, secret) = key.split_once('-').unwrap();
    assert_eq!(kid, id);

    // Only sha256(secret) is stored.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT hashed_secret FROM api_keys WHERE id = $1")
        .bind(&id)
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(stored, sha256(secret.as_bytes()).to_vec());

    let k = owner.with_token(&key);
    assert_eq!(k.get("/users/me").await.0, StatusCode::OK);
    let (_, list) = owner.get("/users/me/keys").await;
    let listed = list["keys"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|k| k["id"] == id.as_str() && k["login_type"] == "token" && k["name"] == "ci")
    );
    assert!(
        !list.to_string().contains(secret),
        "secrets are never listed"
    );
    assert_eq!(
        owner.get(&format!("/users/me/keys/{id}")).await.0,
        StatusCode::OK
    );

    // Revocation takes effect at once, although the key was just cached.
    assert_eq!(
        owner.delete(&format!("/users/me/keys/{id}")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &k.get("/users/me").await,
        StatusCode::UNAUTHORIZED,
        "invalid",
    );
    assert_error(
        &owner.delete(&format!("/users/me/keys/{id}")).await,
        StatusCode::NOT_FOUND,
        "No key",
    );

    // application_connect keys cannot use the API.
    let (_, app_key) = owner
        .post("/users/me/keys", json!({"scope": "application_connect"}))
        .await;
    let app = owner.with_token(app_key["key"].as_str().unwrap());
    assert_error(
        &app.get("/users/me").await,
        StatusCode::FORBIDDEN,
        "only open workspace apps",
    );

    // Expired keys are refused with a reason.
    let (_, short) = owner
        .post("/users/me/keys", json!({"lifetime_seconds": 3600}))
        .await;
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(short["id"].as_str().unwrap())
        .execute(p.pool())
        .await
        .unwrap();
    assert_error(
        &owner
            .with_token(short["key"].as_str().unwrap())
            .get("/users/me")
            .await,
        StatusCode::UNAUTHORIZED,
        "expired",
    );

    // Bad requests.
    assert_error(
        &owner
            .post("/users/me/keys", json!({"lifetime_seconds": 400 * 86400}))
            .await,
        StatusCode::BAD_REQUEST,
        "365 days",
    );
    assert_error(
        &owner
            .post("/users/me/keys", json!({"lifetime_seconds": -5}))
            .await,
        StatusCode::BAD_REQUEST,
        "positive",
    );
    assert_error(
        &owner.post("/users/me/keys", json!({"scope": "root"})).await,
        StatusCode::BAD_REQUEST,
        "unknown variant",
    );
    assert_error(
        &owner.post("/users/me/keys", json!({"nmae": "typo"})).await,
        StatusCode::BAD_REQUEST,
        "unknown field",
    );

    // Key ids are per user: another user cannot see or revoke mine.
    let member = p.member(&owner, "mallory").await;
    let (_, mine) = owner.post("/users/me/keys", json!({})).await;
    let mine_id = mine["id"].as_str().unwrap();
    assert_eq!(
        member.delete(&format!("/users/me/keys/{mine_id}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        owner
            .with_token(mine["key"].as_str().unwrap())
            .get("/users/me")
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn owners_manage_users_and_suspension_cuts_access_at_once() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let alice = p.member(&owner, "alice").await;
    assert_eq!(alice.get("/users/me").await.1["roles"], json!(["member"]));

    // Members cannot manage users.
    assert_error(
        &alice.get("/users").await,
        StatusCode::FORBIDDEN,
        "Only owners",
    );
    assert_error(
        &alice
            .post(
                "/users",
                json!({"email": "x@example.com", "username": "x", "password": "password-1"}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "Only owners",
    );
    assert_error(
        &alice.put("/users/owner/status/suspend").await,
        StatusCode::FORBIDDEN,
        "Only owners",
    );
    // …but may read themselves, not others.
    assert_eq!(alice.get("/users/alice").await.0, StatusCode::OK);
    assert_eq!(alice.get("/users/owner").await.0, StatusCode::FORBIDDEN);

    let dup = owner
        .post(
            "/users",
            json!({"email": "ALICE@example.com", "username": "alice2", "password": "password-1"}),
        )
        .await;
    assert_error(&dup, StatusCode::CONFLICT, "already exists");
    let (_, list) = owner.get("/users").await;
    let names: Vec<&str> = list["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "owner"]);

    // Suspension: the cached key stops working on the next request.
    let (s, u) = owner.put("/users/alice/status/suspend").await;
    assert_eq!(
        (s, u["status"].as_str()),
        (StatusCode::OK, Some("suspended"))
    );
    assert_error(
        &alice.get("/users/me").await,
        StatusCode::UNAUTHORIZED,
        "suspended",
    );
    assert_error(
        &p.anon()
            .post(
                "/users/login",
                json!({"email": "alice", "password": "member-password"}),
            )
            .await,
        StatusCode::UNAUTHORIZED,
        "suspended",
    );
    assert_eq!(
        owner.put("/users/alice/status/activate").await.0,
        StatusCode::OK
    );
    assert_eq!(alice.get("/users/me").await.0, StatusCode::OK);

    assert_error(
        &owner.put("/users/owner/status/suspend").await,
        StatusCode::BAD_REQUEST,
        "your own",
    );
    assert_error(
        &owner.put("/users/alice/status/frozen").await,
        StatusCode::NOT_FOUND,
        "suspend",
    );
    assert_error(
        &owner.delete("/users/owner").await,
        StatusCode::BAD_REQUEST,
        "yourself",
    );
    assert_error(
        &owner.delete("/users/nobody").await,
        StatusCode::NOT_FOUND,
        "No user",
    );

    // Deleting a user revokes their keys and frees the name.
    assert_eq!(owner.delete("/users/alice").await.0, StatusCode::NO_CONTENT);
    assert_eq!(alice.get("/users/me").await.0, StatusCode::UNAUTHORIZED);
    let again = owner
        .post(
            "/users",
            json!({"email": "alice@example.com", "username": "alice", "password": "password-1"}),
        )
        .await;
    assert_eq!(again.0, StatusCode::CREATED, "{}", again.1);

    let bob = owner
        .post("/users", json!({"email": "bob@example.com", "username": "bob", "password": "password-1", "roles": ["owner"]}))
        .await;
    assert_eq!(bob.1["roles"], json!(["owner", "member"]));
}

#[tokio::test]
async fn owners_set_others_roles_and_preferences_name_only_real_regions() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let (s, bob) = owner
        .post(
            "/users",
            json!({"email": "bob@example.com", "username": "bob", "password": "bob-password"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{bob}");
    let bob_api = p.anon().login("bob", "bob-password").await;
    let bob_id = bob["id"].as_str().unwrap();

    // A member cannot make anyone an owner, themselves included.
    let got = bob_api
        .put_json(
            &format!("/users/{bob_id}/roles"),
            json!({"roles": ["owner"]}),
        )
        .await;
    assert_error(&got, StatusCode::FORBIDDEN, "owners");
    // An owner can; the change applies to bob's next request at once.
    let (s, body) = owner
        .put_json(
            &format!("/users/{bob_id}/roles"),
            json!({"roles": ["owner"]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["roles"], json!(["owner", "member"]));
    let (s, _) = bob_api.get("/users").await;
    assert_eq!(s, StatusCode::OK, "bob lists users as an owner now");
    // Nobody changes their own roles (the last owner cannot lock everyone out).
    let (_, me) = owner.get("/users/me").await;
    let got = owner
        .put_json(
            &format!("/users/{}/roles", me["id"].as_str().unwrap()),
            json!({"roles": []}),
        )
        .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "own roles");
    let (s, body) = owner
        .put_json(&format!("/users/{bob_id}/roles"), json!({"roles": []}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _) = bob_api.get("/users").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a member again");
    let (_, log) = owner.get("/audit?action=set_roles").await;
    assert_eq!(log["entries"].as_array().unwrap().len(), 2, "{log}");

    // Preferences: a real region or none.
    let (s, body) = bob_api.get("/users/me/preferences").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["region"], serde_json::Value::Null);
    let got = bob_api
        .put_json("/users/me/preferences", json!({"region": "atlantis"}))
        .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "no region");
    let (s, _) = bob_api
        .put_json("/users/me/preferences", json!({"region": "primary"}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, body) = bob_api.get("/users/me/preferences").await;
    assert_eq!(body["region"], "primary");
    let (_, body) = owner.get("/users/me/preferences").await;
    assert_eq!(body["region"], serde_json::Value::Null, "per user");
}
