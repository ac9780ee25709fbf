-- Keys are stored encrypted under the secrets key (nonce and tag make them
-- longer than the 32 bytes a plain key has).
ALTER TABLE app_encryption_keys DROP CONSTRAINT IF EXISTS app_encryption_keys_key_check;
