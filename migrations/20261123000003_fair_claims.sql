-- Claiming serves the tenant served least recently first; this finds each tenant's
-- latest start without scanning old jobs.
CREATE INDEX jobs_tenant_started ON jobs (tenant_id, started_at DESC) WHERE started_at IS NOT NULL;
