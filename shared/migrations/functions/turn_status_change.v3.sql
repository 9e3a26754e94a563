-- Generated from shared/turn_states.py (python -m shared.turn_states): the
-- turn state machine. A new turn starts as the table says; a change of
-- status is one of its transitions, or the statement fails (check_violation).
CREATE OR REPLACE FUNCTION turn_status_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'queued' THEN
            RETURN NEW;
        END IF;
    ELSIF (OLD.status, NEW.status) IN (
            ('queued', 'cancelled'),
            ('queued', 'running'),
            ('running', 'cancelled'),
            ('running', 'failed'),
            ('running', 'interrupted'),
            ('running', 'queued'),
            ('running', 'succeeded'),
            ('running', 'waiting'),
            ('waiting', 'cancelled'),
            ('waiting', 'interrupted'),
            ('waiting', 'queued')
        ) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'turn %: % -> % is not a transition of the turn state machine', NEW.id, OLD.status, NEW.status
        USING ERRCODE = 'check_violation';
END
$$
