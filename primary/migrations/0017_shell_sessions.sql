-- A shell session's end is recorded by finding its start: by session id.
CREATE INDEX audit_log_session_idx ON audit_log ((details->>'session'))
    WHERE details ? 'session';
-- And recorded once, however many times a region reports it.
CREATE UNIQUE INDEX audit_log_session_end_key ON audit_log ((details->>'session'))
    WHERE action IN ('ssh_end', 'terminal_end', 'port_forward_udp_end');
