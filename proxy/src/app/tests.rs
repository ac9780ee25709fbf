use axum::http::{HeaderMap, HeaderValue, Request, header};

use super::*;

fn cookies(raw: &[&[u8]]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for r in raw {
        h.append(header::COOKIE, HeaderValue::from_bytes(r).unwrap());
    }
    h
}

#[test]
fn every_devmesh_cookie_is_stripped_whatever_its_domain_or_prefix() {
    let mut h = cookies(&[
        b"theme=dark; devmesh_app_token_0a1b2c3d=t1; devmesh_app_token_ffffffff=t2",
        b"devmesh_session_token=s; __Host-devmesh_session_token=s2; DEVMESH_APP_STATE=x",
        b"lang=en; devmesh_app_key_12345678=k; __Secure-devmesh_x=y; devmesh_nameless",
        b"caf\xc3\xa9=ol\xc3\xa9; devmesh_app_token_aa=\xc3\xa9",
    ]);
    strip_devmesh_cookies(&mut h);
    let all: Vec<&[u8]> = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert_eq!(
        all,
        vec![b"theme=dark; lang=en; caf\xc3\xa9=ol\xc3\xa9".as_slice()]
    );
}

#[test]
fn only_devmesh_cookies_gone_leaves_no_cookie_header() {
    let mut h = cookies(&[b"devmesh_session_token=s"]);
    strip_devmesh_cookies(&mut h);
    assert!(h.get(header::COOKIE).is_none());
}

#[test]
fn apps_cannot_set_devmesh_nameless_or_unparseable_cookies() {
    for bad in [
        b"devmesh_app_token_0a1b2c3d=mine; Domain=apps.example.com; Path=/".as_slice(),
        b" devmesh_session_token=x",
        b"__Host-devmesh_session_token=x; Secure; Path=/",
        b"DevMesh_App_State=x",
        b"devmesh_app_token_0a1b2c3d=x; Path=/caf\xc3\xa9",
        b"nameless-value",
        b"=devmesh_app_token_x=y",
        b"bad name=x",
        b"caf\xc3\xa9=x",
    ] {
        assert!(!app_may_set_cookie(bad), "{}", String::from_utf8_lossy(bad));
    }
    for good in [
        b"theme=dark; Path=/; HttpOnly".as_slice(),
        b"sid=abc; Path=/caf\xc3\xa9",
        b"a=",
    ] {
        assert!(
            app_may_set_cookie(good),
            "{}",
            String::from_utf8_lossy(good)
        );
    }
}

#[test]
fn devmesh_headers_and_devmesh_bearer_keys_are_stripped() {
    let mut h = HeaderMap::new();
    h.insert("devmesh-session-token", HeaderValue::from_static("k"));
    h.insert("devmesh-edge-token", HeaderValue::from_static("e"));
    h.insert("x-app", HeaderValue::from_static("1"));
    strip_devmesh_headers(&mut h);
    assert_eq!(h.len(), 1);
    let key = format!(
        "Bearer {}",
        devmesh_shared::token::new_api_key().token.expose()
    );
    h.insert(header::AUTHORIZATION, HeaderValue::from_str(&key).unwrap());
    strip_devmesh_headers(&mut h);
    assert!(h.get(header::AUTHORIZATION).is_none());
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer the-apps-own"),
    );
    strip_devmesh_headers(&mut h);
    assert!(h.get(header::AUTHORIZATION).is_some());
}

#[test]
fn host_and_authority_must_agree() {
    let req = |uri: &str, hosts: &[&str]| {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(axum::body::Body::empty()).unwrap()
    };
    assert_eq!(
        request_host(&req("/", &["A.example:80"])).unwrap(),
        "a.example:80"
    );
    assert_eq!(
        request_host(&req("http://a.example/x", &[])).unwrap(),
        "a.example"
    );
    assert_eq!(
        request_host(&req("http://a.example/x", &["A.EXAMPLE"])).unwrap(),
        "a.example"
    );
    assert!(request_host(&req("http://evil.example/x", &["a.example"])).is_err());
    assert!(request_host(&req("/", &["a.example", "b.example"])).is_err());
    assert!(request_host(&req("http://u:p@a.example/", &["u:p@a.example"])).is_err());
}

#[test]
fn return_paths_never_leave_the_host() {
    for (uri, want) in [
        ("//evil.example/x?devmesh_app_grant=g", "/evil.example/x"),
        ("/\\evil.example/", "/evil.example/"),
        ("/a/b?x=1&devmesh_app_grant=g", "/a/b?x=1"),
        ("/", "/"),
    ] {
        let uri: Uri = uri.parse().unwrap();
        assert_eq!(clean_return_path(&uri), want);
    }
}

#[test]
fn cookies_ride_only_on_documents_and_same_origin_requests() {
    let parts = |h: &[(&str, &str)]| {
        let mut b = Request::builder().uri("/");
        for (k, v) in h {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    };
    let host = "app--ws--u.apps.example.com";
    let top = parts(&[
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-dest", "document"),
        ("sec-fetch-site", "same-site"),
    ]);
    assert!(cookie_allowed(&top, host));
    let frame = parts(&[
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-dest", "iframe"),
        ("sec-fetch-site", "same-site"),
    ]);
    assert!(!cookie_allowed(&frame, host));
    let script = parts(&[
        ("sec-fetch-mode", "cors"),
        ("sec-fetch-dest", "empty"),
        ("sec-fetch-site", "same-site"),
    ]);
    assert!(!cookie_allowed(&script, host));
    let own = parts(&[
        ("sec-fetch-mode", "cors"),
        ("sec-fetch-site", "same-origin"),
    ]);
    assert!(cookie_allowed(&own, host));
}
