-- A turn's submission in one statement (in autocommit, one round trip).
-- Returns no row: no such session for this owner. Otherwise one row: the
-- turn (the existing one for a known idempotency key; NULL if refused),
-- whether another turn of the session is active, and whether one was made.
-- p_origin: the request that sent it (its id, its trace), for the worker's
-- logs and traces whoever sends the task.
-- The turn runs with the session's assistant (its pinned version, else its
-- latest), or p_assistant_id's (a replay's) when given; the version is fixed
-- here. The assistant's row is key-share locked, so deleting it waits for
-- this turn to commit and then finds it active (web/assistants.py).
-- A session's turns form a tree (each turn's parent: the turn whose answer
-- it follows). A turn continues the session's active path (after its leaf,
-- `sessions.active_turn_id`) unless p_branch, when it follows p_parent_id
-- (NULL: a new first question), which must be a turn of the session
-- (`invalid_parameter_value` otherwise); either way it becomes the leaf.
-- Each statement of a VOLATILE function takes a fresh snapshot, so the busy
-- check after the lock sees a turn that ended while this one waited for it,
-- and compares `status || ''`, which only the session's index serves
-- (shared/turn_states.status_of says why).
CREATE OR REPLACE FUNCTION submit_turn(
    p_session_id uuid, p_owner_id uuid, p_turn_id uuid, p_message_id uuid, p_content text,
    p_idempotency_key text, p_request_hash text, p_reject_if_busy boolean, p_active text[], p_origin jsonb,
    p_assistant_id uuid, p_assistant_version integer, p_branch boolean, p_parent_id uuid
) RETURNS TABLE (turn turns, busy boolean, created boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_number integer;
    v_assistant uuid;
    v_version integer;
    v_parent uuid;
BEGIN
    -- Every change that starts or ends a turn takes its session's row lock.
    SELECT s.assistant_id, s.assistant_version, s.active_turn_id INTO v_assistant, v_version, v_parent
        FROM sessions s WHERE s.id = p_session_id AND s.owner_id = p_owner_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        RETURN QUERY SELECT t, false, false FROM turns t
            WHERE t.owner_id = p_owner_id AND t.idempotency_key = p_idempotency_key;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    busy := EXISTS (SELECT FROM turns t WHERE t.session_id = p_session_id AND (t.status || '') = ANY (p_active));
    IF p_branch THEN
        v_parent := p_parent_id;
        IF v_parent IS NOT NULL AND NOT EXISTS (
            SELECT FROM turns t WHERE t.id = v_parent AND t.session_id = p_session_id
        ) THEN
            RAISE EXCEPTION 'turn % is not one of session %', v_parent, p_session_id USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    created := NOT (busy AND p_reject_if_busy);
    IF created THEN
        IF p_assistant_id IS NOT NULL THEN
            v_assistant := p_assistant_id;
            v_version := p_assistant_version;
        END IF;
        IF v_assistant IS NOT NULL THEN
            SELECT coalesce(v_version, a.latest) INTO v_version
                FROM assistants a WHERE a.id = v_assistant AND a.owner_id = p_owner_id FOR KEY SHARE;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'assistant % belongs to no such owner', v_assistant USING ERRCODE = 'foreign_key_violation';
            END IF;
        END IF;
        UPDATE sessions SET turn_count = turn_count + 1, updated_at = now(), active_turn_id = p_turn_id
            WHERE id = p_session_id RETURNING turn_count INTO v_number;
        INSERT INTO turns (id, session_id, owner_id, number, status, idempotency_key, request_hash, origin,
                           assistant_id, assistant_version, parent_id)
            VALUES (p_turn_id, p_session_id, p_owner_id, v_number, 'queued', p_idempotency_key, p_request_hash,
                    p_origin, v_assistant, v_version, v_parent)
            RETURNING * INTO turn;
        INSERT INTO messages (id, session_id, turn_id, role, content)
            VALUES (p_message_id, p_session_id, p_turn_id, 'user', p_content);
    END IF;
    RETURN NEXT;
END
$$
