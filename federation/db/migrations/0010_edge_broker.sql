-- Edge broker: enrollment tokens, devices, the job queue, resumable uploads,
-- and the audit outbox that carries job events to thermal memory.
--
-- Devices belong to the federation, not to a tenant. Jobs and audit events
-- are tenant data: tenant_id leads their primary keys.

-- One-time enrollment tokens. Only the SHA-256 of a token is stored.
CREATE TABLE edge_enrollment_tokens (
    token_hash  bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    device_name text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

-- device_id is the name in the device's identity (spiffe://…/edge/<device_id>).
CREATE TABLE edge_devices (
    device_id           text PRIMARY KEY,
    display_name        text NOT NULL DEFAULT '',
    state               text NOT NULL DEFAULT 'enrolled'
                        CHECK (state IN ('enrolled', 'online', 'offline', 'revoked')),
    cpu_cores           integer NOT NULL DEFAULT 0,
    memory_bytes        bigint NOT NULL DEFAULT 0,
    network_type        smallint NOT NULL DEFAULT 0,
    sensors             text[] NOT NULL DEFAULT '{}',
    local_models        text[] NOT NULL DEFAULT '{}',
    battery_percent     integer NOT NULL DEFAULT 0,
    charging            boolean NOT NULL DEFAULT false,
    load                double precision NOT NULL DEFAULT 0,
    smoothed_latency_ms double precision,
    last_heartbeat_at   timestamptz,
    enrolled_at         timestamptz NOT NULL DEFAULT now(),
    revoked_at          timestamptz
);

CREATE INDEX edge_devices_online ON edge_devices (last_heartbeat_at) WHERE state = 'online';

-- The queue. A job is claimed with FOR UPDATE SKIP LOCKED; every lease bumps
-- fencing_token, and complete/fail/renew must present the current one.
CREATE TABLE edge_jobs (
    tenant_id         text NOT NULL,
    job_id            uuid NOT NULL UNIQUE,
    kind              text NOT NULL,
    job_type          smallint NOT NULL CHECK (job_type IN (1, 2)), -- JobType: 1 realtime, 2 batch
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'leased', 'succeeded', 'failed',
                                       'dead_letter', 'expired', 'cancelled')),
    min_cpu_cores     integer NOT NULL DEFAULT 0,
    min_memory_bytes  bigint NOT NULL DEFAULT 0,
    req_sensors       text[] NOT NULL DEFAULT '{}',
    req_local_models  text[] NOT NULL DEFAULT '{}',
    requires_charging boolean NOT NULL DEFAULT false,
    deadline          timestamptz,
    priority          integer NOT NULL DEFAULT 0,
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL CHECK (max_attempts >= 1),
    last_error        text NOT NULL DEFAULT '',
    available_at      timestamptz NOT NULL DEFAULT now(),
    leased_by         text,
    lease_id          uuid,
    fencing_token     bigint NOT NULL DEFAULT 0,
    lease_expires_at  timestamptz,
    inline_payload    bytea,
    payload_blob      text,
    inline_result     bytea,
    result_blob       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, job_id)
);

-- Claim order: earliest deadline, then priority, then realtime before batch.
CREATE INDEX edge_jobs_claimable ON edge_jobs
    (deadline ASC NULLS LAST, priority DESC, job_type, created_at)
    WHERE state IN ('pending', 'failed');
CREATE INDEX edge_jobs_leases ON edge_jobs (lease_expires_at) WHERE state = 'leased';
CREATE INDEX edge_jobs_holder ON edge_jobs (leased_by) WHERE state = 'leased';
CREATE INDEX edge_jobs_deadline ON edge_jobs (deadline)
    WHERE state IN ('pending', 'failed', 'leased') AND deadline IS NOT NULL;
CREATE INDEX edge_jobs_listing ON edge_jobs (tenant_id, created_at DESC, job_id DESC);

-- Resumable uploads, keyed by the uploader's identity and its chosen id.
-- committed_size only grows; writer_token is the one live stream allowed to
-- write (a second writer is refused with ABORTED).
CREATE TABLE edge_uploads (
    owner             text NOT NULL,
    upload_id         text NOT NULL,
    total_size        bigint NOT NULL CHECK (total_size >= 0),
    sha256            bytea NOT NULL CHECK (octet_length(sha256) = 32),
    committed_size    bigint NOT NULL DEFAULT 0 CHECK (committed_size <= total_size),
    complete          boolean NOT NULL DEFAULT false,
    blob_digest       text NOT NULL DEFAULT '',
    writer_token      uuid,
    writer_expires_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, upload_id)
);

CREATE INDEX edge_uploads_open ON edge_uploads (owner) WHERE NOT complete;

-- Job events waiting to be appended to thermal memory. Written in the same
-- transaction as the state change, so an event is never lost or invented;
-- drained by the broker in order.
CREATE TABLE edge_audit_outbox (
    tenant_id  text NOT NULL,
    id         bigint GENERATED ALWAYS AS IDENTITY,
    actor      text NOT NULL,
    action     text NOT NULL,
    subject    text NOT NULL,
    attributes jsonb NOT NULL DEFAULT '{}',
    request_id text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE INDEX edge_audit_outbox_order ON edge_audit_outbox (id);
