-- Guardian custody: the guardian's own schema, owned by its own role.
--
-- Two NOLOGIN roles are created (cluster-wide, so only if absent): the node
-- processes connect as the database owner and run every guardian statement
-- under `SET LOCAL ROLE federation_guardian`, and every vault statement of the
-- gateway under `SET LOCAL ROLE federation_gateway`. The gateway's role is never
-- granted anything on schema `guardian`: it cannot even look up a table there.
-- With an external cluster, give each node its own LOGIN role that is a member
-- of the matching role and the isolation holds the same way.
--
-- Signed audit checkpoints are deliberately NOT stored here: they must survive
-- a database owner rewriting the database, so the guardian keeps them in a file
-- under its home directory (see docs/guardian.md).
DO $$
BEGIN
    CREATE ROLE federation_guardian NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

DO $$
BEGIN
    CREATE ROLE federation_gateway NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- The migrating (owner) role must be able to SET ROLE to both.
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'federation_guardian', 'MEMBER') THEN
        EXECUTE format('GRANT federation_guardian TO %I', current_user);
    END IF;
    IF NOT pg_has_role(current_user, 'federation_gateway', 'MEMBER') THEN
        EXECUTE format('GRANT federation_gateway TO %I', current_user);
    END IF;
END $$;

CREATE SCHEMA guardian AUTHORIZATION federation_guardian;
REVOKE ALL ON SCHEMA guardian FROM PUBLIC;

SET LOCAL ROLE federation_guardian;

-- One row per deposited share. `wrapped` is the share wrapped (AES-256-GCM) under
-- the guardian's wrapping key, bound to (tenant, object, key id, index); it is
-- set to NULL when the share is destroyed (crypto-shredding), the record stays.
CREATE TABLE guardian.shares (
    id                bigserial UNIQUE,
    tenant_id         text NOT NULL CHECK (tenant_id <> ''),
    object_id         text NOT NULL CHECK (object_id <> ''),
    key_id            text NOT NULL CHECK (key_id <> ''),
    share_index       smallint NOT NULL CHECK (share_index BETWEEN 1 AND 3),
    wrapped           bytea,
    state             text NOT NULL CHECK (state IN ('held', 'destroyed')),
    deposited_by      text NOT NULL,
    deposit_time      timestamptz NOT NULL,
    destroy_time      timestamptz,
    release_count     integer NOT NULL DEFAULT 0,
    last_release_time timestamptz,
    PRIMARY KEY (tenant_id, object_id, key_id),
    CHECK ((state = 'held') = (wrapped IS NOT NULL))
);

-- Every release, for the per-tenant rate limit (and as a local trail next to
-- the authoritative one in thermal memory).
CREATE TABLE guardian.releases (
    id                  bigserial PRIMARY KEY,
    tenant_id           text NOT NULL,
    object_id           text NOT NULL,
    key_id              text NOT NULL,
    released_at         timestamptz NOT NULL,
    caller              text NOT NULL,
    requested_by_key_id text NOT NULL,
    reason              text NOT NULL
);
CREATE INDEX releases_tenant_time ON guardian.releases (tenant_id, released_at);

RESET ROLE;
