//! The built-in pages (issue 9): Login, Workflows, Runner, Queue, and the Activity
//! panel on each. Plain HTML/CSS/JS modules embedded in the binary, so an API pod
//! serves them with no front-end server and no build step.
//!
//! The pages talk only to the public API and the session stream (`/api/run/ws`);
//! this module just serves files. A signed-out visit to a page is sent to
//! `/login?next=<where it was going>`.

use std::sync::LazyLock;

use poem::http::{Method, StatusCode, header};
use poem::web::Path;
use poem::{Endpoint, IntoResponse, Request, Response, Route, get, handler};
use sha2::{Digest, Sha256};

use crate::http::security::{StreamCredential, stream_credential};

/// An embedded file and its validator.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/app.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        name: "login.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/login.js"),
    },
    Asset {
        name: "workflows.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/workflows.js"),
    },
    Asset {
        name: "runner.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/runner.js"),
    },
    Asset {
        name: "queue.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/queue.js"),
    },
];

const SHELL: &str = include_str!("assets/shell.html");

/// One strong ETag per asset, computed once from its bytes: a browser revalidates
/// (`Cache-Control: no-cache`) and gets a 304 until a new binary changes the file.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let digest = Sha256::digest(a.body.as_bytes());
            format!("\"{}\"", hex::encode(&digest[..12]))
        })
        .collect()
});

/// Adds the page routes to `route` (mounted inside the credential middleware, so a
/// page can tell whether the visitor is signed in).
pub fn routes(route: Route) -> Route {
    route
        .at("/login", get(login))
        .at("/run", get(workflows))
        .at("/run/:workflow_id", get(runner))
        .at("/admin/queue", get(queue))
        .at("/assets/:name", get(asset))
}

/// `GET /` → `/run`, as a middleware around the router: the API's catch-all nest at
/// `/` outranks an exact `/` route in poem's route tree.
pub async fn home<E: Endpoint>(ep: E, req: Request) -> poem::Result<Response> {
    if req.uri().path() == "/" && req.method() == Method::GET {
        return Ok(redirect("/run"));
    }
    ep.call(req).await.map(IntoResponse::into_response)
}

#[handler]
fn login() -> Response {
    page("Sign in", "login.js", false)
}

#[handler]
fn workflows(req: &Request) -> Response {
    signed_in_page(req, "Workflows", "workflows.js")
}

#[handler]
fn runner(req: &Request, Path(_workflow_id): Path<String>) -> Response {
    // The script reads the id from the address; an unknown one gets its 404 from the API.
    signed_in_page(req, "Run", "runner.js")
}

#[handler]
fn queue(req: &Request) -> Response {
    signed_in_page(req, "Queue", "queue.js")
}

#[handler]
fn asset(req: &Request, Path(name): Path<String>) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == name) else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .content_type("text/plain; charset=utf-8")
            .body("no such asset");
    };
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let builder = Response::builder()
        .header(header::ETAG, etag.as_str())
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-content-type-options", "nosniff");
    if fresh {
        return builder.status(StatusCode::NOT_MODIFIED).finish();
    }
    builder.content_type(asset.content_type).body(asset.body)
}

/// The page, or a redirect to the login page that comes back here afterwards.
fn signed_in_page(req: &Request, title: &str, script: &str) -> Response {
    match stream_credential(req) {
        StreamCredential::Accepted(..) => page(title, script, true),
        StreamCredential::Refused(_) | StreamCredential::Missing => {
            let here = req.uri().path_and_query().map_or("/run", |pq| pq.as_str());
            let next: String = url::form_urlencoded::byte_serialize(here.as_bytes()).collect();
            redirect(&format!("/login?next={next}"))
        }
    }
}

fn page(title: &str, script: &str, chrome: bool) -> Response {
    let html = SHELL
        .replace("{{title}}", title)
        .replace("{{script}}", script)
        .replace("{{chrome}}", if chrome { "" } else { "hidden" });
    Response::builder()
        .content_type("text/html; charset=utf-8")
        // Pages carry no data of their own (the scripts fetch it), but a signed-out
        // visitor must not be shown a cached signed-in page.
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-content-type-options", "nosniff")
        .body(html)
}

fn redirect(to: &str) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_the_shell_can_name_is_an_asset() {
        for script in [
            "login.js",
            "workflows.js",
            "runner.js",
            "queue.js",
            "app.js",
        ] {
            assert!(ASSETS.iter().any(|a| a.name == script), "{script}");
        }
        assert_eq!(ETAGS.len(), ASSETS.len());
        assert!(ETAGS.iter().all(|e| e.starts_with('"') && e.len() == 26));
    }
}
