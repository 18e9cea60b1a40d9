-- Files a job needs in ComfyUI's input folder before it runs, and the moment a
-- cancel of a running job was asked for (the worker turns it into an interrupt).
ALTER TABLE jobs ADD COLUMN input_files text[] NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN cancel_requested_at timestamptz;

-- queue_number: a job's position among its tenant's queued jobs, in claim order.
CREATE INDEX jobs_tenant_queue ON jobs (tenant_id, priority DESC, queued_at, id)
    WHERE status = 'queued';
