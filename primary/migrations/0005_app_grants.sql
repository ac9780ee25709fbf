-- One-time app sign-in grants already redeemed, kept until they expire, so
-- a grant is spent once across every primary replica and edge.
CREATE TABLE app_grant_uses (
    nonce TEXT PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX app_grant_uses_expires_at ON app_grant_uses (expires_at);
