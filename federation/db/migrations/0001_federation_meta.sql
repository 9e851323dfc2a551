-- Facts about this federation that every node may read: when it was created
-- and which schema it runs. Rows are only ever inserted.
CREATE TABLE federation_meta (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO federation_meta (key, value) VALUES ('federation_id', gen_random_uuid()::text);
