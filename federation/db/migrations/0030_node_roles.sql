-- One role per node role: what each node's own login may touch, and nothing more.
--
-- These are NOLOGIN group roles (cluster-wide, created only if absent, like the two
-- of 0020). `federation db init-roles` creates a LOGIN role per node that is a member
-- of exactly one of them (federation_<role>_login IN ROLE federation_<role>), so the
-- isolation holds at the login itself, not only after a SET ROLE: the gateway's login
-- is not a member of federation_guardian and cannot read, or SET ROLE into, the
-- guardian's schema. Tables are owned by the migrating role (the database owner);
-- a later migration that adds a table grants it here, role by role.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['federation_keys', 'federation_memory', 'federation_broker']
    LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', name);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END LOOP;
END $$;

GRANT USAGE ON SCHEMA public TO federation_keys, federation_memory, federation_broker,
    federation_guardian, federation_gateway;
-- Every node checks, at start, that the schema is as new as its code.
GRANT SELECT ON schema_migrations TO federation_keys, federation_memory, federation_broker,
    federation_guardian, federation_gateway;

-- The key authority: keys, their sources, strength history and quotas.
GRANT SELECT, INSERT, UPDATE, DELETE ON api_keys, api_key_sources, api_key_strength_history,
    api_key_quotas, api_key_quota_reservations TO federation_keys;

-- Thermal memory: append and read the chain (UPDATE only reaches temperature and the
-- compressed body; the trigger of 0002 refuses anything else, DELETE is not granted).
GRANT SELECT, INSERT, UPDATE ON memory_records TO federation_memory;

-- The edge broker: devices, tokens, jobs, uploads and its audit outbox.
GRANT SELECT, INSERT, UPDATE, DELETE ON edge_devices, edge_enrollment_tokens, edge_jobs,
    edge_uploads, edge_audit_outbox TO federation_broker;

GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO federation_keys, federation_memory,
    federation_broker;
