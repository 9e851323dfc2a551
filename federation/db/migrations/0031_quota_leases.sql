-- Quota leases: a gateway holds a short lease of a key's budget, several requests and
-- tokens at once, and admits requests from it without a round trip. A lease is a row
-- of api_key_quota_reservations (a reservation is a lease of one request whose count
-- is never given back): `requests` were counted against the rate window that started
-- at `minute_start`, and settling the lease gives back those it did not serve, while
-- that window lasts. Existing rows are reservations: 0 requests to give back.
ALTER TABLE api_key_quota_reservations
    ADD COLUMN requests integer NOT NULL DEFAULT 0 CHECK (requests >= 0),
    ADD COLUMN minute_start timestamptz;
