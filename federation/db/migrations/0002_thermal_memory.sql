-- Thermal memory: the append-only, hash-chained audit log.
--
-- One table. Every column covered by the hash (sequence .. hash) is immutable:
-- the trigger below refuses any UPDATE that changes one of them, and refuses
-- DELETE and TRUNCATE outright. Only the storage form may change: temperature
-- (reads warm a record, decay cools it) and `compressed` together with `body`
-- (the decay job compresses cold bodies). The hash covers the uncompressed
-- body, so rewriting a compressed body with other content is caught by
-- verify_chain even though the trigger lets the column change.
--
-- `sequence` is assigned by the writer under an advisory lock rather than by an
-- identity column: identities leave gaps when a transaction rolls back, and the
-- chain must be gapless so that a missing record is detectable.
CREATE TABLE memory_records (
    sequence    bigint PRIMARY KEY CHECK (sequence >= 1),
    tenant_id   text NOT NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    subject     text NOT NULL,
    request_id  text NOT NULL,
    created_at  timestamptz NOT NULL,
    attributes  jsonb NOT NULL,
    body        bytea NOT NULL,
    prev_hash   bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash        bytea NOT NULL CHECK (octet_length(hash) = 32),
    temperature smallint NOT NULL CHECK (temperature BETWEEN 0 AND 100),
    compressed  boolean NOT NULL DEFAULT false
);

CREATE INDEX memory_records_tenant_seq ON memory_records (tenant_id, sequence DESC);
CREATE INDEX memory_records_request ON memory_records (request_id) WHERE request_id <> '';
CREATE INDEX memory_records_compressible ON memory_records (temperature) WHERE NOT compressed;

CREATE FUNCTION memory_records_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'thermal memory is append-only: % is refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.sequence, NEW.tenant_id, NEW.actor, NEW.action, NEW.subject, NEW.request_id,
        NEW.created_at, NEW.attributes, NEW.prev_hash, NEW.hash)
       IS DISTINCT FROM
       (OLD.sequence, OLD.tenant_id, OLD.actor, OLD.action, OLD.subject, OLD.request_id,
        OLD.created_at, OLD.attributes, OLD.prev_hash, OLD.hash) THEN
        RAISE EXCEPTION 'thermal memory is append-only: only temperature and storage form may change'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.body IS DISTINCT FROM OLD.body AND NEW.compressed IS NOT DISTINCT FROM OLD.compressed THEN
        RAISE EXCEPTION 'thermal memory is append-only: a body changes only when it is (de)compressed'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER memory_records_no_update
    BEFORE UPDATE OR DELETE ON memory_records
    FOR EACH ROW EXECUTE FUNCTION memory_records_guard();

CREATE TRIGGER memory_records_no_truncate
    BEFORE TRUNCATE ON memory_records
    FOR EACH STATEMENT EXECUTE FUNCTION memory_records_guard();
