//! `/healthz` (the process is up) and `/readyz` (its dependencies answer).

use std::time::Duration;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::{ApiTags, AppState};

pub struct HealthApi;

#[derive(Debug, Object)]
pub struct Health {
    /// Always `ok` when the process answers.
    pub status: String,
}

#[derive(Debug, Object)]
pub struct Readiness {
    /// `ok` or `unavailable`.
    pub status: String,
    /// `ok` or the reason Postgres did not answer.
    pub postgres: String,
    /// `ok`, `not configured`, or the reason Redis did not answer.
    pub redis: String,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Postgres and Redis (if configured) answered.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// A dependency did not answer; the body says which.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness: the process is up.
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness: Postgres and Redis are reachable.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self, state: Data<&AppState>) -> ReadyResponse {
        let postgres = match tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()).await {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "timed out".to_string(),
        };
        let redis = match &state.redis {
            None => "not configured".to_string(),
            Some(client) => match tokio::time::timeout(CHECK_TIMEOUT, ping_redis(client)).await {
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(e)) => format!("error: {e}"),
                Err(_) => "timed out".to_string(),
            },
        };
        let ready = postgres == "ok" && (redis == "ok" || redis == "not configured");
        let body = Readiness {
            status: if ready { "ok" } else { "unavailable" }.into(),
            postgres,
            redis,
        };
        if ready {
            ReadyResponse::Ready(Json(body))
        } else {
            ReadyResponse::NotReady(Json(body))
        }
    }
}

async fn ping_redis(client: &redis::Client) -> redis::RedisResult<()> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING").query_async::<()>(&mut conn).await
}
