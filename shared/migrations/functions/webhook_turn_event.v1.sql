-- The outbox of webhooks: in the transaction that changes a turn's status,
-- a delivery for each enabled endpoint of its owner that wants the event
-- (shared/webhooks.py sends them). A thin payload: ids, status, where to
-- read the rest.
CREATE OR REPLACE FUNCTION webhook_turn_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_type text := CASE NEW.status
        WHEN 'succeeded' THEN 'turn.completed'
        WHEN 'failed' THEN 'turn.failed'
        WHEN 'cancelled' THEN 'turn.cancelled'
        WHEN 'interrupted' THEN 'turn.interrupted'
        WHEN 'waiting' THEN 'turn.waiting'
    END;
BEGIN
    IF v_type IS NOT NULL THEN
        INSERT INTO webhook_deliveries (id, endpoint_id, event_type, payload)
        SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), e.id, v_type,
               jsonb_build_object(
                   'type', v_type,
                   'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   'data', jsonb_build_object(
                       'turn_id', NEW.id,
                       'session_id', NEW.session_id,
                       'status', NEW.status,
                       'error_code', NEW.error ->> 'code',
                       'turn_url', '/api/turns/' || NEW.id,
                       'session_url', '/api/sessions/' || NEW.session_id))
        FROM webhook_endpoints e
        WHERE e.owner_id = NEW.owner_id AND e.enabled AND v_type = ANY (e.event_types);
    END IF;
    RETURN NULL;
END
$$
