-- Token reservations: a request reserves its most tokens before generating
-- (api_key_quotas.period_tokens counts them at once) and settles to its real usage
-- afterwards, which deletes its row. A row therefore means "charged in full, not
-- settled yet"; period_start names the quota period the tokens were charged to, so
-- that a late settlement never gives tokens back to a later period.
CREATE TABLE api_key_quota_reservations (
    tenant_id      text NOT NULL,
    key_id         text NOT NULL,
    reservation_id text NOT NULL,
    period_start   timestamptz NOT NULL,
    tokens         bigint NOT NULL CHECK (tokens >= 0),
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key_id, reservation_id),
    FOREIGN KEY (tenant_id, key_id) REFERENCES api_keys (tenant_id, key_id)
);

-- The purge of reservations nobody settled (a gateway that crashed) walks by age.
CREATE INDEX api_key_quota_reservations_by_age ON api_key_quota_reservations (created_at);
