-- A turn's end in one statement (in autocommit, one round trip). One row:
-- `ended` is 'ended' (the answer and final state are written), 'lost' (this
-- attempt no longer owns the turn: nothing written), or 'gone' (the session
-- was deleted); for 'ended', the session's next turn to send and the turn's
-- replay, if any.
-- The turn is found by its id, its status compared as `status || ''`
-- (shared/turn_states.status_of says why); the state machine's trigger
-- (turn_status_change()) refuses a p_status that running cannot become.
CREATE OR REPLACE FUNCTION finish_turn(
    p_turn_id uuid, p_session_id uuid, p_attempt integer, p_status text, p_answer text,
    p_usage jsonb, p_tools jsonb, p_error jsonb, p_message_id uuid
) RETURNS TABLE (ended text, next_turn uuid, replay uuid)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Every change that starts or ends a turn takes its session's row lock.
    PERFORM FROM sessions WHERE id = p_session_id FOR UPDATE;
    IF NOT FOUND THEN
        ended := 'gone';
        RETURN NEXT;
        RETURN;
    END IF;
    UPDATE turns SET status = p_status, finished_at = now(), usage = p_usage, tools = p_tools, error = p_error,
            answer = CASE WHEN p_status <> 'failed' THEN p_answer END
        WHERE id = p_turn_id AND (status || '') = 'running' AND attempts = p_attempt;
    IF NOT FOUND THEN
        ended := 'lost';
        RETURN NEXT;
        RETURN;
    END IF;
    UPDATE sessions SET updated_at = now() WHERE id = p_session_id;
    IF p_answer <> '' AND p_status <> 'failed' THEN
        INSERT INTO messages (id, session_id, turn_id, role, content, tool_calls)
            VALUES (p_message_id, p_session_id, p_turn_id, 'assistant', p_answer,
                    CASE WHEN jsonb_array_length(p_tools) > 0 THEN p_tools END);
    END IF;
    ended := 'ended';
    next_turn := next_queued_turn(p_session_id);
    replay := (SELECT i.replay_id FROM replay_items i WHERE i.turn_id = p_turn_id);
    RETURN NEXT;
END
$$
