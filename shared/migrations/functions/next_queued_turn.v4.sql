-- The session's turn to run next: its first queued turn, if none is running
-- or waiting for a person's decision.
-- The one definition of a session's run order: finish_turn() sends it, a
-- cancel sends it, a claim runs only it, the sweeper re-sends only it.
--
-- A set of at most one row, so that a query calling it in FROM has it
-- inlined (a scalar SQL function with a FROM of its own is not): a claim's
-- plan then holds it, instead of planning it again on every call.
--
-- The status is compared as `status || ''`, which only the session's index
-- (ix_turns_session_number) can serve: with `t.status = 'queued'` the planner
-- served it from ix_turns_status_created whenever its statistics said few
-- turns were queued, walking every queued turn of every session
-- (tests/test_queue_plans.py).
CREATE OR REPLACE FUNCTION next_queued_turn(p_session_id uuid) RETURNS SETOF uuid
LANGUAGE sql STABLE AS $$
    SELECT t.id FROM turns t
    WHERE t.session_id = p_session_id AND (t.status || '') = 'queued'
      AND NOT EXISTS (
          SELECT FROM turns r WHERE r.session_id = p_session_id AND (r.status || '') IN ('running', 'waiting')
      )
    ORDER BY t.number
    LIMIT 1
$$
