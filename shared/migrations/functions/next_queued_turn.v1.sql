-- The session's turn to run next: its first queued turn, if none is running.
CREATE OR REPLACE FUNCTION next_queued_turn(p_session_id uuid) RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT t.id FROM turns t
    WHERE t.session_id = p_session_id AND t.status = 'queued'
      AND NOT EXISTS (SELECT FROM turns r WHERE r.session_id = p_session_id AND r.status = 'running')
    ORDER BY t.number
    LIMIT 1
$$
