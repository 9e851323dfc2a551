-- A tenant's unfinished edge jobs, for the queue-depth limit
-- (edge.max_open_jobs_per_tenant): SubmitJob counts them without reading the
-- tenant's finished history.
CREATE INDEX edge_jobs_open_by_tenant ON edge_jobs (tenant_id)
    WHERE state IN ('pending', 'leased', 'failed');
