//! The files layer against real parts: a temp directory as the object store, and
//! real HTTP servers on loopback for the URL fetcher.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::time::Duration;

use bytes::Bytes;
use comfyfleet::domain::ids::{JobId, TenantId};
use comfyfleet::files::{
    AddressPolicy, FetchError, FetchLimits, Files, FilesError, FilesLocation, Forbidden, ImageKind,
    MaxUploadBytes, ObjectKey, SafeFilename, SafeSubfolder, UrlFetcher, sniff_image,
};
use futures_util::{FutureExt, StreamExt};
use poem::http::StatusCode;
use poem::listener::TcpAcceptor;
use poem::web::Query;
use poem::{Body, EndpointExt, Response, Route, Server, get, handler};

/// A real 1×1 transparent PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

const BIG_LEN: usize = 10 * 1024;

fn name(s: &str) -> SafeFilename {
    SafeFilename::parse(s).unwrap()
}

fn limit(n: u64) -> MaxUploadBytes {
    MaxUploadBytes::new(NonZeroU64::new(n).unwrap())
}

// ---------------------------------------------------------------- object store

#[tokio::test]
async fn files_on_a_temp_dir_put_get_head_delete() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not/yet/there");
    let files = Files::open(&FilesLocation::LocalDir(root.clone()))
        .await
        .unwrap();
    let tenant = TenantId::new();
    let key = ObjectKey::input(tenant, &name("my photo (1).png"));

    files.put(&key, Bytes::from_static(PNG)).await.unwrap();
    assert_eq!(files.get(&key).await.unwrap(), PNG);
    assert_eq!(files.head(&key).await.unwrap().size, PNG.len() as u64);
    assert!(files.exists(&key).await.unwrap());
    let streamed = files.get_stream(&key).await.unwrap();
    assert_eq!(streamed.meta.size, PNG.len() as u64);
    let chunks: Vec<Bytes> = streamed.body.map(|c| c.unwrap()).collect::<Vec<_>>().await;
    assert_eq!(chunks.concat(), PNG);
    // It really is on disk, under the tenant's own folder.
    assert!(root.join(format!("tenants/{tenant}/inputs")).is_dir());

    // Same name, another tenant: a different file.
    let other = ObjectKey::input(TenantId::new(), &name("my photo (1).png"));
    assert!(files.get(&other).await.unwrap_err().is_not_found());

    files.delete(&key).await.unwrap();
    let err = files.get(&key).await.unwrap_err();
    assert!(matches!(err, FilesError::NotFound { .. }), "{err}");
    assert!(files.head(&key).await.unwrap_err().is_not_found());
    assert!(files.get_stream(&key).await.unwrap_err().is_not_found());
    assert!(!files.exists(&key).await.unwrap());
    // Deleting twice is fine: cleanup may be retried.
    files.delete(&key).await.unwrap();
}

#[tokio::test]
async fn outputs_in_subfolders_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::open(&FilesLocation::LocalDir(dir.path().to_path_buf()))
        .await
        .unwrap();
    let key = ObjectKey::output(
        TenantId::new(),
        JobId::new(),
        &SafeSubfolder::parse("previews/a").unwrap(),
        &name("ComfyUI_00001_.png"),
    );
    files.put(&key, Bytes::from_static(b"x")).await.unwrap();
    // Characters object stores advise against (and `#`, which the local store uses
    // for its staging files) are stored and read back under the same key.
    let odd = ObjectKey::input(TenantId::new(), &name("50% off [v2] #1?.png"));
    files.put(&odd, Bytes::from_static(b"odd")).await.unwrap();
    assert_eq!(files.get(&odd).await.unwrap(), "odd");
    assert_eq!(files.head(&odd).await.unwrap().size, 3);
    let back = ObjectKey::parse_url_path(&key.to_url_path()).unwrap();
    assert_eq!(files.get(&back).await.unwrap(), "x");
}

// ---------------------------------------------------------------- test servers

/// A real HTTP server on loopback; stops when dropped.
struct TestServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

#[handler]
fn image() -> Response {
    Response::builder().content_type("image/png").body(PNG)
}

#[handler]
fn big() -> Vec<u8> {
    vec![b'x'; BIG_LEN]
}

/// Chunked, with no Content-Length: only counting what arrives can stop it.
#[handler]
fn stream() -> Body {
    let chunks = futures_util::stream::iter(0..10_000)
        .map(|_| Ok::<_, std::io::Error>(Bytes::from_static(&[b'y'; 1024])));
    Body::from_bytes_stream(chunks)
}

/// Headers, then a body that never comes.
#[handler]
fn stall() -> Body {
    Body::from_bytes_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>())
}

#[handler]
fn redirect(Query(params): Query<HashMap<String, String>>) -> Response {
    let to = params.get("to").cloned().unwrap_or_default();
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", to)
        .finish()
}

#[handler]
fn forever() -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", "/forever")
        .finish()
}

async fn spawn_server() -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
    let app = Route::new()
        .at("/image.png", get(image))
        .at("/big", get(big))
        .at("/stream", get(stream))
        .at("/stall", get(stall))
        .at("/redirect", get(redirect))
        .at("/forever", get(forever))
        .map_to_response();
    let task = tokio::spawn(async move {
        let _ = Server::new_with_acceptor(acceptor).run(app).await;
    });
    TestServer { addr, task }
}

/// A fetcher that may reach exactly `server` (and public addresses).
fn fetcher_for(server: &TestServer, limits: FetchLimits) -> UrlFetcher {
    UrlFetcher::with_policy(limits, AddressPolicy::AlsoAllowForTests(server.addr)).unwrap()
}

fn quick_limits() -> FetchLimits {
    FetchLimits {
        timeout: Duration::from_secs(10),
        ..FetchLimits::default()
    }
}

fn assert_refused(err: &FetchError, want: Forbidden, message_start: &str) {
    match err {
        FetchError::Refused { reason, .. } => assert_eq!(*reason, want, "{err}"),
        other => panic!("expected a refusal, got {other:?} ({other})"),
    }
    assert!(
        err.to_string().starts_with(message_start),
        "{err} does not start with {message_start:?}"
    );
}

// ---------------------------------------------------------------- URL fetcher

#[tokio::test]
async fn fetches_from_the_allowed_test_server() {
    let server = spawn_server().await;
    let fetcher = fetcher_for(&server, quick_limits());
    let fetched = fetcher.fetch(&server.url("/image.png")).await.unwrap();
    assert_eq!(fetched.bytes, PNG);
    assert_eq!(fetched.content_type.as_deref(), Some("image/png"));
    assert_eq!(sniff_image(&fetched.bytes), Some(ImageKind::Png));
    assert_eq!(fetched.suggested_name(), Some("image.png"));

    // A redirect that stays on the allowed server is followed.
    let hop = server.url("/redirect?to=/image.png");
    let fetched = fetcher.fetch(&hop).await.unwrap();
    assert_eq!(fetched.bytes, PNG);
    assert_eq!(fetched.url.as_str(), server.url("/image.png"));
}

#[tokio::test]
async fn refuses_internal_addresses() {
    // A live server on loopback, so a refusal cannot be a connection failure.
    let server = spawn_server().await;
    let port = server.addr.port();
    let production = UrlFetcher::new(quick_limits()).unwrap();
    let cases = [
        (
            format!("http://127.0.0.1:{port}/image.png"),
            Forbidden::Loopback,
            "refusing to fetch from 127.0.0.1: loopback addresses are not allowed",
        ),
        (
            format!("http://localhost:{port}/image.png"),
            Forbidden::Loopback,
            "refusing to fetch from localhost (",
        ),
        (
            format!("http://[::1]:{port}/image.png"),
            Forbidden::Loopback,
            "refusing to fetch from ::1: loopback addresses are not allowed",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            Forbidden::LinkLocal,
            "refusing to fetch from 169.254.169.254: link-local addresses are not allowed",
        ),
        (
            "http://10.0.0.1/x.png".to_string(),
            Forbidden::Private,
            "refusing to fetch from 10.0.0.1: private addresses are not allowed",
        ),
    ];
    for (url, want, message) in &cases {
        let err = production.fetch(url).await.unwrap_err();
        assert_refused(&err, *want, message);
    }

    // The test exception is one literal address: the same server by name, or
    // another port on loopback, is still refused.
    let tests = fetcher_for(&server, quick_limits());
    let err = tests
        .fetch(&format!("http://localhost:{port}/image.png"))
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Forbidden::Loopback,
        "refusing to fetch from localhost (",
    );
    let err = tests
        .fetch(&format!("http://127.0.0.1:{}/", port.wrapping_add(1)))
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Forbidden::Loopback,
        "refusing to fetch from 127.0.0.1",
    );
}

#[tokio::test]
async fn redirects_are_checked_at_every_hop() {
    let server = spawn_server().await;
    // An internal service the redirect points at; it must never see a connection.
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let internal_url = format!("http://{}/secret", internal.local_addr().unwrap());
    let fetcher = fetcher_for(&server, quick_limits());

    let via = |to: &str| server.url(&format!("/redirect?to={}", urlencode(to)));

    let err = fetcher.fetch(&via(&internal_url)).await.unwrap_err();
    assert_refused(
        &err,
        Forbidden::Loopback,
        "refusing to fetch from 127.0.0.1",
    );
    assert!(
        internal.accept().now_or_never().is_none(),
        "the fetcher connected to the redirect target"
    );

    let by_name = format!("http://localhost:{}/image.png", server.addr.port());
    let err = fetcher.fetch(&via(&by_name)).await.unwrap_err();
    assert_refused(
        &err,
        Forbidden::Loopback,
        "refusing to fetch from localhost (",
    );

    let err = fetcher
        .fetch(&via("http://169.254.169.254/latest/meta-data/"))
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Forbidden::LinkLocal,
        "refusing to fetch from 169.254.169.254",
    );

    let err = fetcher.fetch(&via("file:///etc/passwd")).await.unwrap_err();
    assert!(matches!(err, FetchError::UnsupportedScheme { .. }), "{err}");

    let limited = fetcher_for(
        &server,
        FetchLimits {
            max_redirects: 3,
            ..quick_limits()
        },
    );
    let err = limited.fetch(&server.url("/forever")).await.unwrap_err();
    assert!(
        matches!(err, FetchError::TooManyRedirects { max: 3 }),
        "{err}"
    );
}

#[tokio::test]
async fn enforces_the_size_limit() {
    let server = spawn_server().await;
    let small = fetcher_for(
        &server,
        FetchLimits {
            max_bytes: limit(1024),
            ..quick_limits()
        },
    );
    // Declared too large by Content-Length.
    let err = small.fetch(&server.url("/big")).await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "the file is larger than the limit of 1024 bytes"
    );
    // Chunked, no length: stopped while counting (the body is ~10 MB).
    let err = small.fetch(&server.url("/stream")).await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err}");

    let exact = fetcher_for(
        &server,
        FetchLimits {
            max_bytes: limit(BIG_LEN as u64),
            ..quick_limits()
        },
    );
    assert_eq!(
        exact.fetch(&server.url("/big")).await.unwrap().bytes.len(),
        BIG_LEN
    );
}

#[tokio::test]
async fn gives_up_at_the_deadline() {
    // A server that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let limits = FetchLimits {
        timeout: Duration::from_millis(300),
        ..FetchLimits::default()
    };
    let fetcher =
        UrlFetcher::with_policy(limits, AddressPolicy::AlsoAllowForTests(silent_addr)).unwrap();
    let err = fetcher
        .fetch(&format!("http://{silent_addr}/x.png"))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::TimedOut { .. }), "{err}");
    holder.abort();

    // Headers arrive, the body never does: the same deadline covers the body.
    let server = spawn_server().await;
    let fetcher = fetcher_for(&server, limits);
    let err = fetcher.fetch(&server.url("/stall")).await.unwrap_err();
    assert!(matches!(err, FetchError::TimedOut { .. }), "{err}");
}

#[tokio::test]
async fn error_statuses_are_reported() {
    let server = spawn_server().await;
    let err = fetcher_for(&server, quick_limits())
        .fetch(&server.url("/nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Status { status } if status == 404),
        "{err}"
    );
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
