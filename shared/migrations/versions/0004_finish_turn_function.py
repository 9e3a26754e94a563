"""finish_turn(): a turn's end in one statement; next_queued_turn()

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:20:00

What tasks.turn.finish_turn did in six round trips (BEGIN, the session lock,
the guarded update, the answer, the next queued turn, COMMIT) as one
function call, in autocommit one round trip. next_queued_turn() is the one
definition of the session's next turn, for this function and for a cancel.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The session's turn to send now that one of its turns ended: its first
# queued turn, if none is running. Call with the session row locked.
NEXT_QUEUED_TURN = """
CREATE OR REPLACE FUNCTION next_queued_turn(p_session_id uuid) RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT t.id FROM turns t
    WHERE t.session_id = p_session_id AND t.status = 'queued'
      AND NOT EXISTS (SELECT FROM turns r WHERE r.session_id = p_session_id AND r.status = 'running')
    ORDER BY t.number
    LIMIT 1
$$
"""

# One row: `ended` is 'ended' (the answer and final state are written), 'lost'
# (this attempt no longer owns the turn: nothing written), or 'gone' (the
# session was deleted); for 'ended', the session's next turn to send and the
# turn's replay, if any.
FINISH_TURN = """
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
        WHERE id = p_turn_id AND status = 'running' AND attempts = p_attempt;
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
"""


def upgrade() -> None:
    op.execute(NEXT_QUEUED_TURN)
    op.execute(FINISH_TURN)


def downgrade() -> None:
    op.execute("DROP FUNCTION finish_turn(uuid, uuid, integer, text, text, jsonb, jsonb, jsonb, uuid)")
    op.execute("DROP FUNCTION next_queued_turn(uuid)")
