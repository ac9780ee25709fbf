-- What the dashboard remembers per user: the region app links go through
-- (NULL: the nearest).
ALTER TABLE users ADD COLUMN preferred_region text;
