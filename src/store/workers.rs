//! Worker pods: registration, heartbeats, and the fleet view. Workers belong to
//! the operator, not to a tenant, so these queries are not tenant-scoped.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::ids::WorkerId;

/// What a worker reports about itself and its ComfyUI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRegistration {
    pub id: WorkerId,
    pub pool: String,
    pub comfyui_url: String,
    pub comfyui_version: Option<String>,
    /// Node classes its ComfyUI offers (`/object_info` keys).
    pub node_classes: Vec<String>,
    /// Model files its ComfyUI lists.
    pub models: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub pool: String,
    pub comfyui_url: String,
    pub comfyui_version: Option<String>,
    pub node_classes: Vec<String>,
    pub models: Vec<String>,
    /// idle, busy, draining or offline.
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct WorkerRow {
    id: Uuid,
    pool: String,
    comfyui_url: String,
    comfyui_version: Option<String>,
    node_classes: Vec<String>,
    models: Vec<String>,
    status: String,
    started_at: DateTime<Utc>,
    last_heartbeat_at: DateTime<Utc>,
}

impl From<WorkerRow> for WorkerRecord {
    fn from(r: WorkerRow) -> Self {
        Self {
            id: WorkerId::from_uuid(r.id),
            pool: r.pool,
            comfyui_url: r.comfyui_url,
            comfyui_version: r.comfyui_version,
            node_classes: r.node_classes,
            models: r.models,
            status: r.status,
            started_at: r.started_at,
            last_heartbeat_at: r.last_heartbeat_at,
        }
    }
}

impl Store {
    /// Registers (or re-registers after a restart) a worker.
    pub async fn register_worker(&self, w: &WorkerRegistration) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO workers (id, pool, comfyui_url, comfyui_version, node_classes, models, status) \
             VALUES ($1, $2, $3, $4, $5, $6, 'idle') \
             ON CONFLICT (id) DO UPDATE SET pool = $2, comfyui_url = $3, comfyui_version = $4, \
               node_classes = $5, models = $6, status = 'idle', last_heartbeat_at = now()",
        )
        .bind(w.id.as_uuid())
        .bind(&w.pool)
        .bind(&w.comfyui_url)
        .bind(&w.comfyui_version)
        .bind(&w.node_classes)
        .bind(&w.models)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records the `/object_info` a worker's ComfyUI published. Kept apart from
    /// [`Store::register_worker`] because the document is large and only the
    /// ComfyUI-compatible surface reads it.
    pub async fn set_worker_object_info(
        &self,
        id: WorkerId,
        object_info: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET object_info = $2 WHERE id = $1")
            .bind(id.as_uuid())
            .bind(object_info)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The `/object_info` documents of workers seen within `fresh_secs`, newest
    /// worker first (so a newer ComfyUI's schema of a class wins a union).
    pub async fn fleet_object_info(
        &self,
        fresh_secs: i64,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let rows: Vec<(serde_json::Value,)> = sqlx::query_as(
            "SELECT object_info FROM workers WHERE status <> 'offline' \
               AND object_info IS NOT NULL \
               AND last_heartbeat_at > now() - make_interval(secs => $1) \
             ORDER BY started_at DESC",
        )
        .bind(fresh_secs as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(v,)| v).collect())
    }

    /// The schemas of `classes` in the fresh workers' `/object_info`, newest worker
    /// first; `None` when no fresh worker has published one. Reads only the classes
    /// asked for, so checking a prompt does not move whole catalogues.
    /// The fleet's node catalogue for these classes: each class's schema from the
    /// newest fresh worker that has it. `None` when no fresh worker reported a catalogue.
    pub async fn fleet_catalogue(
        &self,
        fresh_secs: i64,
        classes: &[String],
    ) -> Result<Option<crate::domain::node_catalogue::NodeCatalogue>, StoreError> {
        let Some(schemas) = self.fleet_node_schemas(fresh_secs, classes).await? else {
            return Ok(None);
        };
        let mut union = serde_json::Map::new();
        for (class, schema) in schemas {
            union.entry(class).or_insert(schema);
        }
        serde_json::from_value(serde_json::Value::Object(union))
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("a worker's node schema: {e}")))
    }

    /// Which fresh workers have a catalogue, as one string: it changes exactly when the
    /// union [`Store::fleet_object_info`] returns may, so a pod can cache that union.
    pub async fn fleet_object_info_version(&self, fresh_secs: i64) -> Result<String, StoreError> {
        let (version,): (String,) = sqlx::query_as(
            "SELECT coalesce(string_agg(id::text, ',' ORDER BY started_at DESC), '') \
             FROM workers WHERE status <> 'offline' AND object_info IS NOT NULL \
               AND last_heartbeat_at > now() - make_interval(secs => $1)",
        )
        .bind(fresh_secs as f64)
        .fetch_one(&self.pool)
        .await?;
        Ok(version)
    }

    pub async fn fleet_node_schemas(
        &self,
        fresh_secs: i64,
        classes: &[String],
    ) -> Result<Option<Vec<(String, serde_json::Value)>>, StoreError> {
        let rows: Vec<(Option<String>, Option<serde_json::Value>)> = sqlx::query_as(
            "SELECT e.key, e.value FROM workers w \
             LEFT JOIN LATERAL jsonb_each(w.object_info) e ON e.key = ANY($2) \
             WHERE w.status <> 'offline' AND w.object_info IS NOT NULL \
               AND w.last_heartbeat_at > now() - make_interval(secs => $1) \
             ORDER BY w.started_at DESC",
        )
        .bind(fresh_secs as f64)
        .bind(classes)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            rows.into_iter()
                .filter_map(|(k, v)| Some((k?, v?)))
                .collect(),
        ))
    }

    pub async fn worker_heartbeat(&self, id: WorkerId, status: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET last_heartbeat_at = now(), status = $2 WHERE id = $1")
            .bind(id.as_uuid())
            .bind(status)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn deregister_worker(&self, id: WorkerId) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE workers SET status = 'offline', last_heartbeat_at = now() WHERE id = $1",
        )
        .bind(id.as_uuid())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Workers seen within `fresh_secs`, newest first.
    pub async fn list_workers(&self, fresh_secs: i64) -> Result<Vec<WorkerRecord>, StoreError> {
        let rows: Vec<WorkerRow> = sqlx::query_as(
            "SELECT id, pool, comfyui_url, comfyui_version, node_classes, models, status, \
                    started_at, last_heartbeat_at \
             FROM workers WHERE status <> 'offline' \
               AND last_heartbeat_at > now() - make_interval(secs => $1) \
             ORDER BY started_at DESC",
        )
        .bind(fresh_secs as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }
}
