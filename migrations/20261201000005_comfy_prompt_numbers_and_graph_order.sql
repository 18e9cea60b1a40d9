-- ComfyUI's `number` for prompts posted through the ComfyUI dialect: a per-tenant
-- counter, as a ComfyUI server keeps one per process (it starts at 0, counts every
-- POST /prompt — rejected ones too — and a client may send its own, even a float).
ALTER TABLE tenants ADD COLUMN comfy_prompt_count bigint NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN comfy_number double precision;

-- A prompt's node order decides which of ComfyUI's ready nodes runs first (it walks
-- the prompt as sent); jsonb re-sorts keys, json keeps the text as submitted.
ALTER TABLE jobs ALTER COLUMN graph TYPE json USING graph::json;
