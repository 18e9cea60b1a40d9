-- The whole comfyfleet schema. Every tenant-owned table carries tenant_id, and every
-- index that serves a tenant's reads leads with it.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    -- Login is by email alone, so an email names one user across all tenants.
    email          text NOT NULL,
    password_hash  text NOT NULL,
    is_admin       boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email ON users (lower(email));
CREATE INDEX users_tenant ON users (tenant_id, created_at);

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name          text NOT NULL,
    -- The first characters of the key, shown in listings so a person can tell keys apart.
    prefix        text NOT NULL,
    -- SHA-256 of the whole key: keys are 256-bit random, so a fast digest is enough
    -- and a lookup costs one index probe instead of an argon2 hash.
    digest        bytea NOT NULL UNIQUE,
    is_admin      boolean NOT NULL DEFAULT false,
    created_by    uuid REFERENCES users(id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);

CREATE TABLE sessions (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    -- Set by logout; every pod checks it, so a revoked cookie is refused everywhere.
    revoked_at  timestamptz
);
CREATE INDEX sessions_user ON sessions (tenant_id, user_id);

CREATE TABLE workers (
    id                 uuid PRIMARY KEY,
    pool               text NOT NULL DEFAULT 'default',
    comfyui_url        text NOT NULL,
    comfyui_version    text,
    node_classes       text[] NOT NULL DEFAULT '{}',
    models             text[] NOT NULL DEFAULT '{}',
    status             text NOT NULL DEFAULT 'idle',
    started_at         timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inputs (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    status        text NOT NULL CHECK (status IN ('pending', 'ready', 'failed')),
    filename      text NOT NULL,
    content_type  text,
    object_key    text,
    size_bytes    bigint,
    source_url    text,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inputs_tenant ON inputs (tenant_id, created_at);
CREATE UNIQUE INDEX inputs_tenant_filename ON inputs (tenant_id, filename);

CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    status            text NOT NULL CHECK (status IN (
                          'accepted', 'uploaded', 'queued', 'running',
                          'completed', 'failed', 'cancelled', 'invalid')),
    -- The manifest the job came from; NULL for a raw graph.
    workflow_id       text,
    graph             jsonb NOT NULL,
    params            jsonb NOT NULL DEFAULT '{}',
    seeds             jsonb NOT NULL DEFAULT '{}',
    client_id         text,
    extra_data        jsonb NOT NULL DEFAULT '{}',
    priority          integer NOT NULL DEFAULT 0,
    required_nodes    text[] NOT NULL DEFAULT '{}',
    required_models   text[] NOT NULL DEFAULT '{}',
    idempotency_key   text,
    request_digest    bytea,
    cause             jsonb,
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 3,
    worker_id         uuid REFERENCES workers(id) ON DELETE SET NULL,
    lease_expires_at  timestamptz,
    time_limit_secs   integer,
    created_at        timestamptz NOT NULL DEFAULT now(),
    queued_at         timestamptz,
    started_at        timestamptz,
    completed_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- Claiming: the oldest, highest-priority queued job, found without scanning the rest.
CREATE INDEX jobs_claimable ON jobs (priority DESC, queued_at, id) WHERE status = 'queued';
-- Leases to reap.
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
-- A tenant's listings, by status and age.
CREATE INDEX jobs_tenant_status ON jobs (tenant_id, status, created_at DESC);
CREATE INDEX jobs_tenant_created ON jobs (tenant_id, created_at DESC, id DESC);
CREATE UNIQUE INDEX jobs_tenant_idempotency ON jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE job_outputs (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    job_id        uuid NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    node_id       text NOT NULL,
    kind          text NOT NULL,
    filename      text NOT NULL,
    subfolder     text NOT NULL DEFAULT '',
    content_type  text NOT NULL,
    object_key    text NOT NULL,
    size_bytes    bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_outputs_job ON job_outputs (tenant_id, job_id);

-- The durable event log. `id` only grows, so a client resumes with the last id it saw.
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    type        text NOT NULL,
    severity    text NOT NULL CHECK (severity IN ('info', 'success', 'warning', 'error')),
    message     text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    job_id      uuid,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_tenant_id ON events (tenant_id, id);
CREATE INDEX events_tenant_job ON events (tenant_id, job_id, id) WHERE job_id IS NOT NULL;
