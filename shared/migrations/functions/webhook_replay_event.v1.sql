-- The outbox of webhooks for a replay's end: in the transaction that
-- finishes it, a delivery for each enabled endpoint of its owner that wants
-- `replay.finished`.
CREATE OR REPLACE FUNCTION webhook_replay_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (id, endpoint_id, event_type, payload)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), e.id, 'replay.finished',
           jsonb_build_object(
               'type', 'replay.finished',
               'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'data', jsonb_build_object('replay_id', NEW.id, 'replay_url', '/api/replays/' || NEW.id))
    FROM webhook_endpoints e
    WHERE e.owner_id = NEW.owner_id AND e.enabled AND 'replay.finished' = ANY (e.event_types);
    RETURN NULL;
END
$$
