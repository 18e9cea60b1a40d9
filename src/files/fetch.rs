//! [`UrlFetcher`]: downloads a URL input (`POST /inputs {"url": …}`) without
//! becoming a way into the operator's network.
//!
//! Every hop is checked before a connection is made:
//! - only `http` and `https`;
//! - a host written as an IP address is checked by [`AddressPolicy::check_literal`];
//! - a host name is resolved by [`CheckedResolver`], which refuses the whole name if
//!   any of its addresses is internal and hands reqwest only the addresses it
//!   checked, so a second, rebinding DNS answer is never consulted;
//! - redirects are followed here, one at a time, so each `Location` goes through the
//!   same checks;
//! - proxies from the environment are ignored (a proxy would resolve the name
//!   itself, out of our sight).
//!
//! Size and time are bounded too: the body is read chunk by chunk and abandoned once
//! it passes the limit, and one deadline covers every hop and the body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, LOCATION};
use url::{Host, Url};

use super::address::{AddressPolicy, Forbidden};
use super::upload::MaxUploadBytes;

/// How much a single fetch may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchLimits {
    pub max_bytes: MaxUploadBytes,
    /// One deadline for the whole fetch: connecting, every redirect, and the body.
    pub timeout: Duration,
    pub max_redirects: u32,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            max_bytes: MaxUploadBytes::default(),
            timeout: Duration::from_secs(60),
            max_redirects: 5,
        }
    }
}

/// Why a URL was not fetched. Every message is meant for the person who gave the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url:?} is not a valid URL: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("only http and https URLs can be fetched, not {scheme}")]
    UnsupportedScheme { scheme: String },
    #[error("the URL has no host")]
    MissingHost,
    #[error("refusing to fetch from {host}: {reason}")]
    Refused { host: String, reason: Forbidden },
    #[error("could not resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} has no addresses")]
    NoAddresses { host: String },
    #[error("gave up after {max} redirects")]
    TooManyRedirects { max: u32 },
    #[error("the server redirected without a valid Location header")]
    BadRedirect,
    #[error("the server answered {status}")]
    Status { status: reqwest::StatusCode },
    #[error("the file is larger than the limit of {limit}")]
    TooLarge { limit: MaxUploadBytes },
    #[error("the fetch did not finish within {}s", after.as_secs_f64())]
    TimedOut { after: Duration },
    #[error("could not fetch {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// The HTTP client could not be built (TLS initialisation).
#[derive(Debug, thiserror::Error)]
#[error("could not build the URL-input HTTP client")]
pub struct FetcherSetupError(#[source] reqwest::Error);

/// A downloaded file.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// Where the bytes finally came from, after redirects.
    pub url: Url,
    pub bytes: Bytes,
    /// What the server said it is; only a hint (sniff the bytes).
    pub content_type: Option<String>,
}

impl Fetched {
    /// The last path segment of the final URL, as a hint for naming the input.
    pub fn suggested_name(&self) -> Option<&str> {
        self.url
            .path_segments()
            .and_then(|mut s| s.next_back())
            .filter(|s| !s.is_empty())
    }
}

/// Fetches URL inputs under an [`AddressPolicy`] and [`FetchLimits`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct UrlFetcher {
    client: reqwest::Client,
    limits: FetchLimits,
    policy: AddressPolicy,
}

impl UrlFetcher {
    /// The production fetcher: public addresses only.
    pub fn new(limits: FetchLimits) -> Result<Self, FetcherSetupError> {
        Self::with_policy(limits, AddressPolicy::PublicOnly)
    }

    /// A fetcher with an explicit policy; see [`AddressPolicy::AlsoAllowForTests`],
    /// which only tests use.
    pub fn with_policy(
        limits: FetchLimits,
        policy: AddressPolicy,
    ) -> Result<Self, FetcherSetupError> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver { policy }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!(
                "comfyfleet/",
                env!("CARGO_PKG_VERSION"),
                " (URL input)"
            ))
            .build()
            .map_err(FetcherSetupError)?;
        Ok(Self {
            client,
            limits,
            policy,
        })
    }

    pub fn limits(&self) -> FetchLimits {
        self.limits
    }

    /// Downloads `url`, following at most `max_redirects` redirects, within the limits.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchError> {
        let url = Url::parse(url).map_err(|source| FetchError::InvalidUrl {
            url: url.to_string(),
            source,
        })?;
        let timeout = self.limits.timeout;
        tokio::time::timeout(timeout, self.fetch_within_deadline(url))
            .await
            .unwrap_or(Err(FetchError::TimedOut { after: timeout }))
    }

    async fn fetch_within_deadline(&self, mut url: Url) -> Result<Fetched, FetchError> {
        let mut redirects = 0;
        loop {
            self.check_before_connecting(&url)?;
            let response = self
                .client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| request_error(&url, e))?;
            let status = response.status();
            if status.is_redirection() {
                if redirects == self.limits.max_redirects {
                    return Err(FetchError::TooManyRedirects {
                        max: self.limits.max_redirects,
                    });
                }
                redirects += 1;
                url = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|location| url.join(location).ok())
                    .ok_or(FetchError::BadRedirect)?;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status { status });
            }
            return self.read_body(url, response).await;
        }
    }

    /// Scheme and literal-address checks; host names are checked by the resolver.
    fn check_before_connecting(&self, url: &Url) -> Result<(), FetchError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::UnsupportedScheme {
                scheme: url.scheme().to_string(),
            });
        }
        let ip = match url.host() {
            None => return Err(FetchError::MissingHost),
            Some(Host::Domain(_)) => return Ok(()),
            Some(Host::Ipv4(ip)) => ip.into(),
            Some(Host::Ipv6(ip)) => ip.into(),
        };
        let port = url.port_or_known_default().unwrap_or(80);
        match self.policy.check_literal(SocketAddr::new(ip, port)) {
            None => Ok(()),
            Some(reason) => Err(FetchError::Refused {
                host: ip.to_string(),
                reason,
            }),
        }
    }

    async fn read_body(
        &self,
        url: Url,
        mut response: reqwest::Response,
    ) -> Result<Fetched, FetchError> {
        let limit = self.limits.max_bytes;
        if response.content_length().is_some_and(|n| n > limit.get()) {
            return Err(FetchError::TooLarge { limit });
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = BytesMut::new();
        // Content-Length can lie or be absent (chunked), so count what arrives.
        while let Some(chunk) = response.chunk().await.map_err(|e| request_error(&url, e))? {
            if body.len() as u64 + chunk.len() as u64 > limit.get() {
                return Err(FetchError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            url,
            bytes: body.freeze(),
            content_type,
        })
    }
}

/// Turns a reqwest error back into the resolver's refusal when that is what it was.
fn request_error(url: &Url, source: reqwest::Error) -> FetchError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(err) = cause {
        if let Some(refusal) = err.downcast_ref::<ResolveRefusal>() {
            return refusal.to_fetch_error();
        }
        cause = err.source();
    }
    FetchError::Request {
        url: url.to_string(),
        source,
    }
}

/// Resolves host names with the system resolver and refuses any name with an
/// address the policy forbids. reqwest connects only to the addresses returned.
struct CheckedResolver {
    policy: AddressPolicy,
}

/// The resolver's answer when it will not resolve; travels inside reqwest's error.
#[derive(Debug, thiserror::Error)]
enum ResolveRefusal {
    #[error("refusing to fetch from {host}: {reason}")]
    Forbidden { host: String, reason: Forbidden },
    #[error("{host} has no addresses")]
    NoAddresses { host: String },
    #[error("could not resolve {host}")]
    Lookup {
        host: String,
        // Kept as text: io::Error is not Clone and the refusal is read by reference.
        problem: String,
    },
}

impl ResolveRefusal {
    fn to_fetch_error(&self) -> FetchError {
        match self {
            Self::Forbidden { host, reason } => FetchError::Refused {
                host: host.clone(),
                reason: *reason,
            },
            Self::NoAddresses { host } => FetchError::NoAddresses { host: host.clone() },
            Self::Lookup { host, problem } => FetchError::Resolve {
                host: host.clone(),
                source: std::io::Error::other(problem.clone()),
            },
        }
    }
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port on whatever we return.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| ResolveRefusal::Lookup {
                    host: host.clone(),
                    problem: e.to_string(),
                })?
                .collect();
            if addrs.is_empty() {
                return Err(ResolveRefusal::NoAddresses { host }.into());
            }
            // All or nothing: a name with one internal address is refused outright,
            // rather than filtered, so that behaviour does not depend on which
            // address a connection attempt happens to pick.
            for addr in &addrs {
                if let Some(reason) = policy.check_resolved(addr.ip()) {
                    return Err(ResolveRefusal::Forbidden {
                        host: format!("{host} ({})", addr.ip()),
                        reason,
                    }
                    .into());
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher() -> UrlFetcher {
        UrlFetcher::new(FetchLimits::default()).unwrap()
    }

    #[tokio::test]
    async fn refuses_other_schemes_before_any_io() {
        for url in ["file:///etc/passwd", "ftp://example.com/x", "gopher://x/"] {
            let err = fetcher().fetch(url).await.unwrap_err();
            assert!(
                matches!(err, FetchError::UnsupportedScheme { .. }),
                "{url}: {err}"
            );
        }
        assert!(matches!(
            fetcher().fetch("not a url").await.unwrap_err(),
            FetchError::InvalidUrl { .. }
        ));
    }

    #[tokio::test]
    async fn refuses_numeric_spellings_of_loopback() {
        // The URL parser normalises these to 127.0.0.1 before our check sees them.
        for url in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
            "http://[::ffff:7f00:1]/",
        ] {
            let err = fetcher().fetch(url).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    FetchError::Refused {
                        reason: Forbidden::Loopback,
                        ..
                    }
                ),
                "{url}: {err}"
            );
        }
    }
}
