-- A shell session's end is recorded by finding its start: by session id.
CREATE INDEX audit_log_session_idx ON audit_log ((details->>'session'))
    WHERE details ? 'session';
