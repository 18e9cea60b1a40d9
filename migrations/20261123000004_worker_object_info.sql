-- The whole `GET /object_info` a worker's ComfyUI published at registration. The
-- ComfyUI-compatible `/object_info` and the validation of `/prompt` at the door serve
-- the union over fresh workers, so a client sees the fleet's node catalogue.
ALTER TABLE workers ADD COLUMN object_info jsonb;
