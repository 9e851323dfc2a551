-- Per-tenant settings, changed only by operators (`federation tenants ...`); every
-- change is written to thermal memory in the same transaction, so a change that
-- cannot be audited does not happen. A tenant without a row has the defaults.
--
-- store_transcripts: the tenant opted in to keeping its chat prompts and
-- completions. They are then stored as vault objects (AES-256-GCM under a fresh
-- data key, split 2-of-3, gateway + guardian shares kept, no client share
-- issued), never in plaintext; see docs/guardian.md "Tenant transcripts".
CREATE TABLE tenant_settings (
    tenant_id          text PRIMARY KEY CHECK (tenant_id <> ''),
    store_transcripts  boolean NOT NULL DEFAULT false,
    updated_by         text NOT NULL,
    updated_at         timestamptz NOT NULL
);

REVOKE ALL ON tenant_settings FROM PUBLIC;
-- The gateway reads the settings (under its role); it never changes them.
GRANT SELECT ON tenant_settings TO federation_gateway;
