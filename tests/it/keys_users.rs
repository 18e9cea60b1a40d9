//! Key and user management, and the wall between tenants.

use serde_json::{Value, json};

use crate::support::{expect_problem, spawn_app};

#[tokio::test]
async fn admin_creates_a_key_that_is_shown_once_and_works() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let resp = app
        .http
        .post(app.url("/api/keys"))
        .header("X-API-Key", &t.admin_key)
        .json(&json!({"name": "ci"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(created["is_admin"], false);

    let me = app
        .http
        .get(app.url("/api/auth/me"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);

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
    let text = listed.to_string();
    assert!(text.contains("\"ci\""));
    assert!(!text.contains(&key), "a listing never shows a secret");
}

#[tokio::test]
async fn non_admin_keys_cannot_manage_keys_or_users() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let plain = app.plain_key(&t).await;
    let resp = app
        .http
        .get(app.url("/api/keys"))
        .header("X-API-Key", &plain)
        .send()
        .await
        .unwrap();
    expect_problem(resp, 403).await;
    let resp = app
        .http
        .post(app.url("/api/users"))
        .header("X-API-Key", &plain)
        .json(&json!({"email": "x@acme.example.com", "password": "long-enough-1"}))
        .send()
        .await
        .unwrap();
    expect_problem(resp, 403).await;
}

#[tokio::test]
async fn create_key_rejects_bad_bodies() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    for body in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "x".repeat(101)}),
        json!({"name": "   "}),
    ] {
        let resp = app
            .http
            .post(app.url("/api/keys"))
            .header("X-API-Key", &t.admin_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_problem(resp, 400).await;
    }
}

#[tokio::test]
async fn users_are_created_validated_listed_and_deleted() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let bad = app
        .http
        .post(app.url("/api/users"))
        .header("X-API-Key", &t.admin_key)
        .json(&json!({"email": "not-an-email", "password": "short"}))
        .send()
        .await
        .unwrap();
    let body = expect_problem(bad, 400).await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "password"], "every bad field is named");

    let created = app
        .http
        .post(app.url("/api/users"))
        .header("X-API-Key", &t.admin_key)
        .json(&json!({"email": "bob@acme.example.com", "password": "bobs-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let bob: Value = created.json().await.unwrap();

    let dup = app
        .http
        .post(app.url("/api/users"))
        .header("X-API-Key", &t.admin_key)
        .json(&json!({"email": "BOB@acme.example.com", "password": "bobs-password"}))
        .send()
        .await
        .unwrap();
    expect_problem(dup, 409).await;

    // Bob can sign in.
    let login = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": "bob@acme.example.com", "password": "bobs-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);

    let url = app.url(&format!("/api/users/{}", bob["id"].as_str().unwrap()));
    let del = app
        .http
        .delete(&url)
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    let gone = app
        .http
        .get(&url)
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    expect_problem(gone, 404).await;
}

#[tokio::test]
async fn another_tenants_keys_and_users_are_404_and_absent() {
    let app = spawn_app().await;
    let a = app.tenant("tenant-a").await;
    let b = app.tenant("tenant-b").await;

    let b_keys: Value = app
        .http
        .get(app.url("/api/keys"))
        .header("X-API-Key", &b.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b_key_id = b_keys[0]["id"].as_str().unwrap().to_string();
    let b_users: Value = app
        .http
        .get(app.url("/api/users"))
        .header("X-API-Key", &b.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b_user_id = b_users[0]["id"].as_str().unwrap().to_string();

    // A's listings do not contain B's objects.
    for path in ["/api/keys", "/api/users"] {
        let listed = app
            .http
            .get(app.url(path))
            .header("X-API-Key", &a.admin_key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!listed.contains(&b_key_id) && !listed.contains(&b_user_id));
        assert!(!listed.contains(&b.admin_email));
    }
    // Reading or deleting B's objects with A's key is 404, never 403.
    for (method, path) in [
        ("GET", format!("/api/keys/{b_key_id}")),
        ("DELETE", format!("/api/keys/{b_key_id}")),
        ("GET", format!("/api/users/{b_user_id}")),
        ("DELETE", format!("/api/users/{b_user_id}")),
    ] {
        let req = match method {
            "GET" => app.http.get(app.url(&path)),
            _ => app.http.delete(app.url(&path)),
        };
        let resp = req.header("X-API-Key", &a.admin_key).send().await.unwrap();
        let body = expect_problem(resp, 404).await;
        assert!(!body.to_string().contains(&b.name));
    }
    // And B's key and user are untouched.
    let still = app
        .http
        .get(app.url("/api/auth/me"))
        .header("X-API-Key", &b.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 200);
    let users: Value = app
        .http
        .get(app.url("/api/users"))
        .header("X-API-Key", &b.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn malformed_ids_are_404() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    for path in ["/api/keys/not-a-uuid", "/api/users/..%2F..%2Fetc"] {
        let resp = app
            .http
            .get(app.url(path))
            .header("X-API-Key", &t.admin_key)
            .send()
            .await
            .unwrap();
        expect_problem(resp, 404).await;
    }
}
