-- Appending a tenant's events takes the tenant's log lock, held to commit (so that
-- within a tenant ids become visible in increasing order; see src/store/events.rs).
-- Taken in a statement of its own, the lock was also held across that statement's
-- round trip to the client: on a busy machine a wake-up of the client and of the
-- backend, which every other writer of the tenant waited through. Here the lock and
-- the append are one call. The function is VOLATILE, so under READ COMMITTED its read
-- of the newest id takes its snapshot after the lock is granted: it sees every append
-- that committed before, and that id is the first new event's predecessor.
CREATE FUNCTION append_events(
    p_tenant uuid,
    p_types text[],
    p_severities text[],
    p_messages text[],
    p_data jsonb[],
    p_jobs uuid[]
) RETURNS TABLE (
    id bigint,
    tenant_id uuid,
    type text,
    severity text,
    message text,
    data jsonb,
    job_id uuid,
    created_at timestamptz,
    prev_id bigint
) LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    newest bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant::text, 7));
    SELECT coalesce(max(e.id), 0) INTO newest FROM events e WHERE e.tenant_id = p_tenant;
    -- Rows are produced in `n` order, so the identity hands out ids in that order.
    RETURN QUERY
        INSERT INTO events AS ev (tenant_id, type, severity, message, data, job_id)
        SELECT p_tenant, x.type, x.severity, x.message, x.data, x.job_id
        FROM unnest(p_types, p_severities, p_messages, p_data, p_jobs)
             WITH ORDINALITY AS x(type, severity, message, data, job_id, n)
        ORDER BY x.n
        RETURNING ev.id, ev.tenant_id, ev.type, ev.severity, ev.message, ev.data,
                  ev.job_id, ev.created_at, newest;
END
$$;
