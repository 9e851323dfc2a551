-- The tenant vault (gateway side). One row per secret: the current version's
-- ciphertext (AES-256-GCM under a per-version data key), the key check value,
-- and the gateway's share of the data key wrapped under the gateway wrapping key
-- (a 0600 file, never in the database). The client's share is never stored; the
-- guardian's share is in schema `guardian`, which this role cannot read.
-- Destroying a secret clears the wrapped share and the ciphertext.
CREATE TABLE vault_secrets (
    id             text PRIMARY KEY,
    tenant_id      text NOT NULL CHECK (tenant_id <> ''),
    name           text NOT NULL CHECK (name <> ''),
    state          text NOT NULL CHECK (state IN ('active', 'destroyed')),
    version        bigint NOT NULL CHECK (version >= 1),
    key_id         text NOT NULL,
    nonce          bytea,
    ciphertext     bytea,
    kcv            bytea,
    wrapped_share  bytea,
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    destroyed_at   timestamptz,
    recoveries     integer NOT NULL DEFAULT 0,
    CHECK ((state = 'active') = (wrapped_share IS NOT NULL AND ciphertext IS NOT NULL))
);
CREATE UNIQUE INDEX vault_secrets_active_name ON vault_secrets (tenant_id, name)
    WHERE state = 'active';
CREATE INDEX vault_secrets_tenant ON vault_secrets (tenant_id, created_at, id);

REVOKE ALL ON vault_secrets FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON vault_secrets TO federation_gateway;
