//! Structured logs through tracing. `RUST_LOG` filters; `COMFYFLEET_LOG_FORMAT=json`
//! switches to one JSON object per line for log collectors. Logs go to stderr so
//! that commands whose stdout is captured by scripts (`apikey create`) stay clean.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,poem=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("COMFYFLEET_LOG_FORMAT").is_ok_and(|v| v == "json");
    // A second init (tests calling in) is harmless: keep the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
