//! The built-in pages end to end, in Debian's headless Chromium driven over WebDriver
//! (chromedriver, started here on a free port). Every step saves a screenshot under
//! `target/e2e-screenshots/` so a person can look at what the browser saw.
//!
//! The browser is required: without `/usr/bin/chromium` and `/usr/bin/chromedriver`
//! (Debian's `chromium` and `chromium-driver`, which `.ci/run` installs) this test
//! fails with a message saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TestApp, TestTenant, session_cookie_of, spawn_app};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Longest wait for any page state.
const DEADLINE: Duration = Duration::from_secs(45);

// ------------------------------------------------------------ a small WebDriver client

/// A chromedriver process in a process group of its own; the group (Chromium
/// included, even if a session was never closed) is killed when dropped.
struct Driver {
    url: String,
    http: reqwest::Client,
    _process: tokio::process::Child,
    group: Option<u32>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(group) = self.group.and_then(|g| i32::try_from(g).ok()) {
            // SAFETY: killpg only sends a signal; the group is the one started here.
            unsafe { libc::killpg(group, libc::SIGKILL) };
        }
    }
}

impl Driver {
    async fn start() -> Driver {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "the e2e test needs Debian's headless Chromium: {bin} is missing \
                 (apt-get install -y chromium chromium-driver)"
            );
        }
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let process = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let group = process.id();
        let driver = Driver {
            group,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            _process: process,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = driver
                .http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .map(|r| r.json::<Value>());
            if let Some(body) = ready
                && let Ok(body) = body.await
                && body["value"]["ready"] == true
            {
                return driver;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new browser with a profile of its own (its own cookies).
    async fn browser(&self, name: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let resp: Value = self
            .http
            .post(format!("{}/session", self.url))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--autoplay-policy=no-user-gesture-required",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }}}))
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .unwrap();
        let id = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromium did not start: {resp}"));
        let browser = Browser {
            name: name.into(),
            session: format!("{}/session/{id}", self.url),
            http: self.http.clone(),
            _profile: profile,
        };
        browser.set_width(1280, 900).await;
        browser
    }
}

struct Browser {
    name: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("chromedriver answers");
        let ok = resp.status().is_success();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(ok, "WebDriver {path}: {body}");
        body["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn set_width(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height}))
            .await;
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    async fn current_url(&self) -> String {
        let v = self.call(reqwest::Method::GET, "/url", None).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Runs `body` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, body: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({"script": body, "args": args}))
            .await
    }

    /// Waits until the expression is truthy in the page; returns its value.
    async fn wait_for(&self, what: &str, expression: &str) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let script =
            format!("try {{ return ({expression}) || null; }} catch (e) {{ return null; }}");
        loop {
            let v = self.js(&script, json!([])).await;
            if !v.is_null() {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                self.screenshot(&format!("FAILED-{}", what.replace(' ', "-")))
                    .await;
                panic!(
                    "[{}] timed out waiting for {what}; at {}\nbrowser console:\n{}",
                    self.name,
                    self.current_url().await,
                    self.console().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        self.wait_for(
            &format!("element {css}"),
            &format!("document.querySelector({css:?})"),
        )
        .await;
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("an element reference")
            .to_string()
    }

    async fn click(&self, css: &str) {
        // A live page may re-render the element between finding and clicking it.
        for _ in 0..3 {
            let id = self.element(css).await;
            let resp = self
                .http
                .post(format!("{}/element/{id}/click", self.session))
                .json(&json!({}))
                .send()
                .await
                .expect("chromedriver answers");
            if resp.status().is_success() {
                return;
            }
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!(
                body["value"]["error"], "stale element reference",
                "click {css}: {body}"
            );
        }
        panic!("[{}] {css} kept being replaced while clicked", self.name);
    }

    /// Clears the field, then types into it as a person would.
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/clear"), json!({})).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text }))
            .await;
    }

    async fn screenshot(&self, step: &str) {
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{}-{step}.png", self.name)), png).unwrap();
    }

    async fn console(&self) -> String {
        let resp = self
            .http
            .post(format!("{}/se/log", self.session))
            .json(&json!({"type": "browser"}))
            .send()
            .await;
        match resp {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes Chromium; chromedriver itself goes with the Driver.
        let (http, session) = (self.http.clone(), self.session.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async { http.delete(session).send().await.ok() });
        })
        .join();
    }
}

fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-screenshots")
}

// ------------------------------------------------------------ the journey

/// A 96×64 gradient, a recognisable input image.
fn input_png(dir: &Path) -> PathBuf {
    let img = image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 4) as u8, 160])
    });
    let path = dir.join("e2e-input.png");
    img.save(&path).unwrap();
    path
}

async fn sign_in(b: &Browser, app: &TestApp, t: &TestTenant, start: &str) {
    b.goto(&app.url(start)).await;
    b.wait_for("the login page", "location.pathname === '/login'")
        .await;
    b.type_into("#email", &t.admin_email).await;
    b.type_into("#password", &t.admin_password).await;
    b.screenshot("01-login").await;
    b.click("#login-form button[type=submit]").await;
    b.wait_for(
        "the page asked for before signing in",
        &format!("location.pathname === {start:?}"),
    )
    .await;
}

#[tokio::test]
async fn a_person_runs_a_workflow_watches_it_and_cancels_another_in_the_browser() {
    let driver = Driver::start().await;
    let app = spawn_app().await;
    let acme = app.tenant("acme").await;
    let other = app.tenant("other").await;
    // Slow enough steps that progress and previews are seen moving frame by frame.
    let _worker = app
        .start_worker(comfyfleet::sim::SimConfig {
            step_time: Duration::from_millis(200),
            node_time: Duration::from_millis(30),
            preview_size: 128,
            ..Default::default()
        })
        .await;
    let files = tempfile::tempdir().unwrap();
    let image = input_png(files.path());

    // Only this test writes there: start from an empty folder.
    let _ = std::fs::remove_dir_all(screenshot_dir());
    let b = driver.browser("acme").await;

    // A signed-out visit lands on the login page and comes back after signing in.
    sign_in(&b, &app, &acme, "/run/wan-i2v-14b").await;
    b.wait_for("the runner form", "document.querySelector('#in-steps')")
        .await;

    // The Workflows page lists the catalogue and says what the fleet can run.
    b.click("nav a[data-nav=run]").await;
    let ready = b
        .wait_for(
            "workflow cards with readiness",
            "document.querySelector('[data-id=\"wan-i2v-14b\"] .readiness.ok')?.textContent",
        )
        .await;
    assert_eq!(ready, "Ready");
    b.screenshot("02-workflows").await;
    b.click("[data-id=\"wan-i2v-14b\"] h2 a").await;

    // Fill the form: an uploaded image, a prompt, fewer steps, a random seed.
    let file_input = b.element("#in-image").await;
    b.post(
        &format!("/element/{file_input}/value"),
        json!({ "text": image.display().to_string() }),
    )
    .await;
    let uploaded = b
        .wait_for(
            "the uploaded image's name and thumbnail",
            "document.querySelector('#earlier-image').value && \
             document.querySelector('.drop img.thumb').complete && \
             document.querySelector('.drop img.thumb').naturalWidth > 0 && \
             document.querySelector('#earlier-image').value",
        )
        .await;
    assert!(uploaded.as_str().unwrap().ends_with(".png"), "{uploaded}");
    b.type_into("#in-prompt", "a lighthouse at dusk, waves")
        .await;
    b.type_into("#in-steps", "20").await;
    b.click("button.dice").await;
    b.screenshot("03-form").await;

    // A bad value is refused beside its field, not run.
    b.type_into("#in-steps", "500").await;
    b.click("#run").await;
    let error = b
        .wait_for(
            "the steps error",
            "document.querySelector('#err-steps').textContent",
        )
        .await;
    assert!(error.as_str().unwrap().contains("100"), "{error}");
    b.screenshot("04-validation").await;
    b.type_into("#in-steps", "20").await;
    b.click("#run").await;

    // Watch it run: the bar moves and the preview changes frame by frame.
    let first = b
        .wait_for(
            "the run to start",
            "document.querySelector('.run').dataset.promptId",
        )
        .await;
    let first = first.as_str().unwrap().to_string();
    let mut percents = std::collections::BTreeSet::new();
    let mut frames = std::collections::BTreeSet::new();
    let mut shot_running = false;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let s = b
            .js(
                "const run = document.querySelector('.run'); \
                 const img = document.querySelector('#preview'); \
                 return { status: run.dataset.status, percent: document.querySelector('#progress').value, \
                          preview: img.hidden ? '' : img.src, steps: document.querySelector('#steps').textContent };",
                json!([]),
            )
            .await;
        if let Some(p) = s["percent"].as_f64() {
            percents.insert(p as i64);
        }
        if let Some(src) = s["preview"].as_str().filter(|s| !s.is_empty()) {
            frames.insert(src.to_string());
        }
        if !shot_running && frames.len() >= 2 && s["status"] == "running" {
            b.screenshot("05-running").await;
            shot_running = true;
        }
        if s["status"] == "completed" {
            break;
        }
        assert!(s["status"] != "failed", "the run failed: {s}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not finish: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        percents.iter().any(|p| *p > 0 && *p < 100),
        "the progress bar moved through the middle: {percents:?}"
    );
    assert!(
        frames.len() >= 3,
        "the preview changed at least twice: {} frames",
        frames.len()
    );

    // The result loads and plays inline; the seeds used and a download are shown.
    b.wait_for(
        "the result video to load",
        "document.querySelector('#result-media')?.readyState >= 2",
    )
    .await;
    let seeds = b
        .wait_for(
            "the seeds used",
            "document.querySelector('#seeds')?.textContent",
        )
        .await;
    assert!(
        seeds.as_str().unwrap().starts_with("Seeds: seed = "),
        "{seeds}"
    );
    assert!(
        !seeds.as_str().unwrap().contains("-1"),
        "the random seed is reported: {seeds}"
    );
    b.wait_for(
        "a download link",
        "document.querySelector('#download')?.href",
    )
    .await;
    b.wait_for(
        "the completion in the Activity panel",
        &format!("document.querySelector('#activity-list li[data-type=\"job.completed\"][data-job=\"{first}\"]')"),
    )
    .await;
    b.screenshot("06-result").await;

    // Phone width: the page reflows, nothing sticks out sideways.
    b.set_width(390, 844).await;
    b.wait_for("the phone-width viewport", "innerWidth < 500")
        .await;
    let sticking_out = b
        .js(
            "return [...document.querySelectorAll('body *')] \
               .filter(e => e.getBoundingClientRect().right > innerWidth + 1) \
               .map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className);",
            json!([]),
        )
        .await;
    assert_eq!(sticking_out, json!([]), "nothing wider than a phone screen");
    b.screenshot("07-phone").await;
    b.set_width(1280, 900).await;

    // The address names the run, so a reload comes back to it.
    let here = b.current_url().await;
    assert!(here.ends_with(&format!("?prompt_id={first}")), "{here}");
    b.goto(&here).await;
    b.wait_for(
        "the finished run shown again after a reload",
        "document.querySelector('.run')?.dataset.status === 'completed' && \
         document.querySelector('#result-media')?.readyState >= 2",
    )
    .await;

    // The Queue page shows it finished, with a duration.
    b.click("nav a[data-nav=queue]").await;
    b.wait_for(
        "the finished job on the Queue page",
        &format!(
            "document.querySelector('#recent [data-id=\"{first}\"][data-status=\"completed\"]')"
        ),
    )
    .await;
    b.screenshot("08-queue").await;

    // A second run, re-using the earlier upload, long enough to cancel from the queue.
    b.goto(&app.url("/run/wan-i2v-14b")).await;
    b.wait_for(
        "the earlier upload offered again",
        &format!("[...document.querySelectorAll('#earlier-image option')].some(o => o.value === {uploaded})"),
    )
    .await;
    b.js(
        "const s = document.querySelector('#earlier-image'); s.value = arguments[0]; \
         s.dispatchEvent(new Event('change'));",
        json!([uploaded]),
    )
    .await;
    b.type_into("#in-steps", "100").await;
    b.click("#run").await;
    let second = b
        .wait_for(
            "the second run to start",
            "document.querySelector('.run').dataset.promptId",
        )
        .await;
    let second = second.as_str().unwrap().to_string();
    assert_ne!(second, first);
    b.click("nav a[data-nav=queue]").await;
    let cancel = format!("[data-id=\"{second}\"] button.cancel");
    b.wait_for(
        "the second job's live card",
        &format!("document.querySelector('#running [data-id=\"{second}\"] progress')?.value > 0"),
    )
    .await;
    b.screenshot("09-queue-running").await;

    // The socket drops: the page says it is reconnecting, then resumes the feed.
    b.js(
        "const conn = document.querySelector('#conn'); window.sawReconnecting = false; \
         new MutationObserver(() => { if (!conn.hidden && /reconnecting/i.test(conn.textContent)) \
           window.sawReconnecting = true; }).observe(conn, { attributes: true, childList: true }); \
         window.comfyfleet.stream.socket.close();",
        json!([]),
    )
    .await;
    b.wait_for(
        "\"reconnecting…\" shown, then the socket back",
        "window.sawReconnecting && document.querySelector('#conn').hidden && \
         window.comfyfleet.stream.socket.readyState === 1",
    )
    .await;
    b.click(&cancel).await;
    b.wait_for(
        "the cancelled job among the finished",
        &format!(
            "document.querySelector('#recent [data-id=\"{second}\"][data-status=\"cancelled\"]')"
        ),
    )
    .await;
    b.wait_for(
        "the cancellation in the Activity panel",
        &format!("document.querySelector('#activity-list li[data-type=\"job.cancelled\"][data-job=\"{second}\"]')"),
    )
    .await;
    b.screenshot("10-cancelled").await;
    // History, then live, across the drop: each event once, newest on top.
    let ids = b
        .js(
            "return [...document.querySelectorAll('#activity-list li')] \
               .map(li => Number(li.dataset.id.replace('evt_', '')));",
            json!([]),
        )
        .await;
    let ids: Vec<i64> = serde_json::from_value(ids).unwrap();
    assert!(ids.len() >= 8, "the panel shows both jobs' events: {ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "no duplicates, newest first: {ids:?}"
    );
    let job = app.job(&acme.admin_key, &second).await;
    assert_eq!(job["status"], "cancelled");

    // Another tenant, in a browser of its own, sees none of it.
    let o = driver.browser("other").await;
    sign_in(&o, &app, &other, "/admin/queue").await;
    o.wait_for(
        "an empty queue",
        "['#running', '#queued', '#recent'].every(s => document.querySelector(s + ' li.empty'))",
    )
    .await;
    let leaked = o
        .js(
            "return [...document.querySelectorAll('[data-id], #activity-list li')] \
               .map(e => e.outerHTML).filter(h => h.includes(arguments[0]) || h.includes(arguments[1]));",
            json!([first, second]),
        )
        .await;
    assert_eq!(leaked, json!([]), "tenant B's pages show tenant A's jobs");
    let code = o
        .post(
            "/execute/async",
            json!({
                "script": "const done = arguments[1]; \
                           fetch('/api/run/status/' + arguments[0]).then(r => done(r.status));",
                "args": [first],
            }),
        )
        .await;
    assert_eq!(code, 404, "another tenant's job is not found");
    o.screenshot("11-other-tenant").await;
}

// ------------------------------------------------------------ the pages over plain HTTP

#[tokio::test]
async fn a_signed_out_visit_is_sent_to_login_and_a_signed_in_one_gets_the_page() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let resp = http
        .get(app.url("/run/wan-i2v-14b?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/login?next=%2Frun%2Fwan-i2v-14b%3Fx%3D1"
    );
    let home = http.get(app.url("/")).send().await.unwrap();
    assert_eq!(home.status(), 303);
    assert_eq!(home.headers()["location"], "/run");
    let login = http.get(app.url("/login")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    assert!(login.text().await.unwrap().contains("/assets/login.js"));

    let signed_in = http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": t.admin_email, "password": t.admin_password}))
        .send()
        .await
        .unwrap();
    let (cookie, _) = session_cookie_of(&signed_in);
    for (path, script) in [
        ("/run", "workflows.js"),
        ("/run/wan-i2v-14b", "runner.js"),
        ("/admin/queue", "queue.js"),
    ] {
        let resp = http
            .get(app.url(path))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let html = resp.text().await.unwrap();
        assert!(html.contains(&format!("/assets/{script}")), "{path}");
        assert!(
            html.contains("id=\"activity\""),
            "{path} has the Activity panel"
        );
    }
    // A refused cookie is treated as none.
    let stale = http
        .get(app.url("/admin/queue"))
        .header("cookie", "comfyfleet_session=not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 303);
}

#[tokio::test]
async fn assets_have_their_content_type_and_revalidate_by_etag() {
    let app = spawn_app().await;
    for (name, ct) in [
        ("app.css", "text/css; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("runner.js", "text/javascript; charset=utf-8"),
    ] {
        let resp = app
            .http
            .get(app.url(&format!("/assets/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(resp.headers()["content-type"], ct, "{name}");
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
        let etag = resp.headers()["etag"].to_str().unwrap().to_string();
        assert!(!resp.bytes().await.unwrap().is_empty());
        let again = app
            .http
            .get(app.url(&format!("/assets/{name}")))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{name}");
        assert_eq!(again.headers()["etag"], etag.as_str());
    }
    let missing = app
        .http
        .get(app.url("/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}
