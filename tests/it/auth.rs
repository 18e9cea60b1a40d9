//! Sessions and API keys at the door.

use comfyfleet::http::security::{StreamAuth, resolve_credentials};
use poem::{EndpointExt, Route};
use poem_openapi::payload::PlainText;
use poem_openapi::{OpenApi, OpenApiService};
use serde_json::{Value, json};

use crate::support::{expect_problem, session_cookie_of, spawn_app};

#[tokio::test]
async fn login_sets_a_strict_http_only_cookie_that_me_accepts() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;

    let resp = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": t.admin_email, "password": t.admin_password}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (cookie, raw) = session_cookie_of(&resp);
    assert!(cookie.starts_with("comfyfleet_session="), "{raw}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(raw.contains(attr), "cookie lacks {attr}: {raw}");
    }
    // Plain http on loopback: Secure would stop the browser from storing it.
    assert!(!raw.contains("Secure"), "{raw}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["tenant"]["name"], "acme");
    assert_eq!(body["auth_method"], "session");

    let me: Value = app
        .http
        .get(app.url("/api/auth/me"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"]["email"], t.admin_email.as_str());
    assert_eq!(me["tenant"]["id"], t.id.to_string());
    assert_eq!(me["is_admin"], true);
}

#[tokio::test]
async fn wrong_password_and_unknown_email_are_401_alike() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let wrong = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": t.admin_email, "password": "not-the-password"}))
        .send()
        .await
        .unwrap();
    assert!(wrong.headers().get("set-cookie").is_none());
    let wrong = expect_problem(wrong, 401).await;
    let unknown = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": "nobody@nowhere.example", "password": "whatever-123"}))
        .send()
        .await
        .unwrap();
    let unknown = expect_problem(unknown, 401).await;
    assert_eq!(
        wrong["detail"], unknown["detail"],
        "no hint which emails exist"
    );
}

#[tokio::test]
async fn malformed_login_body_is_400() {
    let app = spawn_app().await;
    let resp = app
        .http
        .post(app.url("/api/auth/login"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_problem(resp, 400).await;
}

#[tokio::test]
async fn logout_revokes_the_session_everywhere() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let resp = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": t.admin_email, "password": t.admin_password}))
        .send()
        .await
        .unwrap();
    let (cookie, _) = session_cookie_of(&resp);

    let out = app
        .http
        .post(app.url("/api/auth/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    let cleared = out.headers().get("set-cookie").unwrap().to_str().unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");

    // The browser may have kept the cookie; the server must not accept it.
    let again = app
        .http
        .get(app.url("/api/auth/me"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let body = expect_problem(again, 401).await;
    assert!(body["detail"].as_str().unwrap().contains("session"));
}

#[tokio::test]
async fn a_tampered_session_cookie_is_401() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let resp = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": t.admin_email, "password": t.admin_password}))
        .send()
        .await
        .unwrap();
    let (cookie, _) = session_cookie_of(&resp);
    let tampered = format!("{cookie}x");
    let resp = app
        .http
        .get(app.url("/api/auth/me"))
        .header("cookie", tampered)
        .send()
        .await
        .unwrap();
    expect_problem(resp, 401).await;
}

#[tokio::test]
async fn header_and_bearer_key_forms_are_accepted() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    for req in [
        app.http
            .get(app.url("/api/auth/me"))
            .header("X-API-Key", &t.admin_key),
        app.http
            .get(app.url("/api/auth/me"))
            .bearer_auth(&t.admin_key),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let me: Value = resp.json().await.unwrap();
        assert_eq!(me["auth_method"], "api_key");
        assert_eq!(me["tenant"]["name"], "acme");
    }
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_keys_are_401_with_reasons() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let plain = app.plain_key(&t).await;

    let none = app.http.get(app.url("/api/auth/me")).send().await.unwrap();
    let body = expect_problem(none, 401).await;
    assert!(body["detail"].as_str().unwrap().contains("X-API-Key"));

    let malformed = app
        .http
        .get(app.url("/api/auth/me"))
        .header("X-API-Key", "hunter2")
        .send()
        .await
        .unwrap();
    let body = expect_problem(malformed, 401).await;
    assert!(body["detail"].as_str().unwrap().contains("malformed"));

    let unknown = comfyfleet::auth::api_key::generate();
    let resp = app
        .http
        .get(app.url("/api/auth/me"))
        .bearer_auth(unknown.expose())
        .send()
        .await
        .unwrap();
    let body = expect_problem(resp, 401).await;
    assert!(body["detail"].as_str().unwrap().contains("not valid"));

    // Revoke through the API, then the key is refused on the very next request.
    let listed: Value = app
        .http
        .get(app.url("/api/keys"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let plain_id = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "plain key")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ok = app
        .http
        .get(app.url("/api/auth/me"))
        .header("X-API-Key", &plain)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let del = app
        .http
        .delete(app.url(&format!("/api/keys/{plain_id}")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    let revoked = app
        .http
        .get(app.url("/api/auth/me"))
        .header("X-API-Key", &plain)
        .send()
        .await
        .unwrap();
    expect_problem(revoked, 401).await;
}

#[tokio::test]
async fn query_key_is_refused_on_rest_endpoints() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let resp = app
        .http
        .get(app.url(&format!("/api/auth/me?api_key={}", t.admin_key)))
        .send()
        .await
        .unwrap();
    let body = expect_problem(resp, 401).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("WebSocket and SSE")
    );
}

/// A streaming-style endpoint built on the real [`StreamAuth`] scheme and the real
/// credential middleware, served over the test's database: the shape every
/// WebSocket and SSE route takes.
struct StreamProbe;

#[OpenApi]
impl StreamProbe {
    #[oai(path = "/probe", method = "get")]
    async fn probe(&self, auth: StreamAuth) -> PlainText<String> {
        PlainText(auth.principal().tenant_name.clone())
    }
}

#[tokio::test]
async fn query_key_form_is_accepted_by_the_stream_scheme() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let endpoint = Route::new()
        .nest("/", OpenApiService::new(StreamProbe, "probe", "1"))
        .around(resolve_credentials)
        .with(poem::middleware::CookieJarManager::new())
        .data(app.state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
    let server = tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(endpoint));
    let probe = format!("http://{addr}/probe");

    let resp = app
        .http
        .get(format!("{probe}?api_key={}", t.admin_key))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "acme");

    let resp = app
        .http
        .get(format!("{probe}?api_key=cf_x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let resp = app
        .http
        .get(&probe)
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    server.abort();
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let h: Value = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let resp = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["postgres"], "ok");
    assert_eq!(r["redis"], "ok");
}

#[tokio::test]
async fn unknown_routes_answer_problem_json() {
    let app = spawn_app().await;
    let resp = app
        .http
        .get(app.url("/api/nothing-here"))
        .send()
        .await
        .unwrap();
    expect_problem(resp, 404).await;
}
