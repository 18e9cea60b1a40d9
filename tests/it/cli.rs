//! The binary as operators and scripts use it.

use tokio::process::Command;

use crate::support::{JWT_SECRET, TestDb, binary, spawn_app};

async fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("COMFYFLEET_JWT_SECRET")
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run the comfyfleet binary")
}

fn one_line_error(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line of error, got: {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_string()
}

#[tokio::test]
async fn tenant_and_apikey_commands_print_exactly_what_scripts_capture() {
    let app = spawn_app().await;
    let db_url = app.db.url.clone();
    let env = [("DATABASE_URL", db_url.as_str())];
    let out = run(
        &[
            "tenant",
            "create",
            "cli-co",
            "--admin-email",
            "ops@cli-co.example.com",
            "--admin-password",
            "ops-password-1",
        ],
        &env,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant_id = String::from_utf8(out.stdout).unwrap();
    assert!(
        tenant_id.trim().parse::<uuid::Uuid>().is_ok(),
        "{tenant_id:?}"
    );

    let out = run(
        &["apikey", "create", "--tenant", "cli-co", "--name", "deploy"],
        &env,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "exactly one line: {stdout:?}");
    assert!(stdout.ends_with('\n'));
    let key = stdout.trim_end();
    assert!(key.starts_with("cf_") && !key.contains(' '), "{key:?}");

    let me: serde_json::Value = app
        .http
        .get(app.url("/api/auth/me"))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["tenant"]["name"], "cli-co");
    assert_eq!(me["tenant"]["id"], tenant_id.trim());
    assert_eq!(me["is_admin"], false);

    // Revoke it with the CLI: refused at once.
    let key_id = me["api_key"]["id"].as_str().unwrap().to_string();
    let out = run(&["apikey", "revoke", &key_id], &env).await;
    assert!(out.status.success());
    let resp = app
        .http
        .get(app.url("/api/auth/me"))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn apikey_create_for_an_unknown_tenant_fails_cleanly() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let out = run(
        &["apikey", "create", "--tenant", "ghost"],
        &[("DATABASE_URL", url.as_str())],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "nothing a script would mistake for a key"
    );
    assert!(one_line_error(&out).contains("ghost"));
}

#[tokio::test]
async fn bad_database_url_gives_one_line_and_nonzero_exit() {
    // Port 1 on loopback: nothing listens there.
    let out = run(
        &["api"],
        &[
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nothing"),
            ("COMFYFLEET_JWT_SECRET", JWT_SECRET),
        ],
    )
    .await;
    assert!(!out.status.success());
    let line = one_line_error(&out);
    assert!(line.contains("DATABASE_URL"), "{line}");

    let out = run(
        &["api"],
        &[
            ("DATABASE_URL", "this is not a url"),
            ("COMFYFLEET_JWT_SECRET", JWT_SECRET),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(one_line_error(&out).contains("DATABASE_URL"));
}

#[tokio::test]
async fn missing_jwt_secret_gives_one_line_and_nonzero_exit() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let out = run(&["api"], &[("DATABASE_URL", url.as_str())]).await;
    assert!(!out.status.success());
    let line = one_line_error(&out);
    assert!(line.contains("COMFYFLEET_JWT_SECRET"), "{line}");
}

#[tokio::test]
async fn api_serves_and_stops_on_sigterm() {
    let db = TestDb::create().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let objects = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(binary())
        .arg("api")
        .env("COMFYFLEET_OBJECT_STORE", objects.path())
        .env("DATABASE_URL", &db.url)
        .env("COMFYFLEET_JWT_SECRET", JWT_SECRET)
        .env("COMFYFLEET_BIND", format!("127.0.0.1:{port}"))
        .env_remove("REDIS_URL")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    // Waiting for a child process to bind has no event to wait on; poll the port
    // with a deadline, pacing attempts with an interval rather than a bare sleep.
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        pace.tick().await;
        if let Ok(r) = client.get(&url).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "API did not come up"
        );
    }
    let pid = child.id().unwrap() as i32;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(std::time::Duration::from_secs(15), child.wait())
        .await
        .expect("API exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
}

#[tokio::test]
async fn dev_creates_its_database_and_prints_working_credentials() {
    use tokio::io::AsyncBufReadExt;
    // A database name that does not exist yet: dev must create it. TestDb's Drop
    // removes it afterwards.
    let db = TestDb {
        name: format!("cf_test_{}", uuid::Uuid::new_v4().simple()),
        url: String::new(),
    };
    let mut url = url::Url::parse(&crate::support::admin_database_url()).unwrap();
    url.set_path(&db.name);
    let fixed_key = comfyfleet::auth::api_key::generate();
    let objects = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(binary())
        .args(["dev", "--bind", "127.0.0.1:0"])
        .env("COMFYFLEET_OBJECT_STORE", objects.path())
        .env("DATABASE_URL", url.as_str())
        .env("COMFYFLEET_DEV_API_KEY", fixed_key.expose())
        .env_remove("COMFYFLEET_JWT_SECRET")
        .env_remove("REDIS_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = std::collections::HashMap::new();
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((k, v)) = line.trim().split_once(':') {
                banner.insert(k.trim().to_string(), v.trim().to_string());
            }
            if line.trim_start().starts_with("api key:") {
                break;
            }
        }
    })
    .await
    .expect("dev prints its banner");
    let base = banner["url"].clone();
    assert_eq!(banner["api key"], fixed_key.expose());
    let client = reqwest::Client::new();
    let me = client
        .get(format!("{base}/api/auth/me"))
        .header("X-API-Key", fixed_key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let login = client
        .post(format!("{base}/api/auth/login"))
        .json(&serde_json::json!({"email": banner["email"], "password": banner["password"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    child.kill().await.unwrap();
}
