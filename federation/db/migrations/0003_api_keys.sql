-- API keys, their per-source failure accounting, strength history and quotas.
-- Every table is keyed by (tenant_id, key_id, ...). key_id is also unique on its
-- own because a presented key (fed_<key id>_...) must be found without knowing
-- its tenant; the tenant then comes from the row.
CREATE TABLE api_keys (
    tenant_id            text NOT NULL,
    key_id               text NOT NULL UNIQUE,
    scopes               text[] NOT NULL CHECK (cardinality(scopes) > 0),
    description          text NOT NULL DEFAULT '',
    state                text NOT NULL CHECK (state IN ('active', 'suspended', 'revoked')),
    -- SHA-256 of the full key string; the secret itself is never stored.
    secret_hash          bytea NOT NULL,
    old_secret_hash      bytea,
    old_secret_until     timestamptz,
    created_at           timestamptz NOT NULL,
    -- Strength decays from here: the issue time, reset by each rotation.
    strength_epoch       timestamptz NOT NULL,
    -- U(t) as a decayed accumulator: its value at usage_at.
    usage_value          double precision NOT NULL DEFAULT 0,
    usage_at             timestamptz NOT NULL,
    last_used_at         timestamptz,
    expires_at           timestamptz,
    revoked_at           timestamptz,
    requests_per_minute  integer CHECK (requests_per_minute > 0),
    token_quota          bigint CHECK (token_quota > 0),
    quota_period_seconds integer CHECK (quota_period_seconds > 0),
    PRIMARY KEY (tenant_id, key_id),
    CHECK ((token_quota IS NULL) = (quota_period_seconds IS NULL))
);

CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at, key_id);

-- Failed attempts per (key, source): F_s as a decayed accumulator, plus a
-- one-minute counter for burst detection. `verified` marks sources that have
-- presented the right secret at least once (failures from others count more).
CREATE TABLE api_key_sources (
    tenant_id       text NOT NULL,
    key_id          text NOT NULL,
    source          text NOT NULL,
    failure_value   double precision NOT NULL DEFAULT 0,
    failure_at      timestamptz NOT NULL,
    burst_value     double precision NOT NULL DEFAULT 0,
    burst_at        timestamptz NOT NULL,
    verified        boolean NOT NULL DEFAULT false,
    suspended_at    timestamptz,
    PRIMARY KEY (tenant_id, key_id, source),
    FOREIGN KEY (tenant_id, key_id) REFERENCES api_keys (tenant_id, key_id)
);

CREATE TABLE api_key_strength_history (
    tenant_id text NOT NULL,
    key_id    text NOT NULL,
    id        bigint GENERATED ALWAYS AS IDENTITY,
    at        timestamptz NOT NULL,
    strength  double precision NOT NULL,
    kind      text NOT NULL,
    source    text NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, key_id, id),
    FOREIGN KEY (tenant_id, key_id) REFERENCES api_keys (tenant_id, key_id)
);

-- Quota counters live apart from api_keys so that charging a quota (every
-- request) does not contend with strength updates on the key row.
CREATE TABLE api_key_quotas (
    tenant_id        text NOT NULL,
    key_id           text NOT NULL,
    minute_start     timestamptz NOT NULL,
    minute_requests  integer NOT NULL DEFAULT 0,
    period_start     timestamptz NOT NULL,
    period_tokens    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, key_id),
    FOREIGN KEY (tenant_id, key_id) REFERENCES api_keys (tenant_id, key_id)
);
