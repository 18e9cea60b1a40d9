-- Every claim and queue read is per tenant since 0002/0003 (jobs_tenant_queue): this
-- index had no scans in a `jobs` bench, and each queued job paid for an entry in it.
DROP INDEX IF EXISTS jobs_claimable;
