-- The outbox of webhooks for a replay's end: in the transaction that
-- finishes it, a delivery for each enabled endpoint of its owner that wants
-- `replay.finished`, and, for a run of a schedule, `schedule.run_finished`
-- (with the schedule, the set and how many of its questions passed).
CREATE OR REPLACE FUNCTION webhook_replay_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (id, endpoint_id, event_type, payload)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), e.id, t.type,
           jsonb_build_object(
               'type', t.type,
               'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'data', jsonb_build_object('replay_id', NEW.id, 'replay_url', '/api/replays/' || NEW.id)
                       || CASE WHEN t.type = 'schedule.run_finished' THEN jsonb_build_object(
                              'schedule_id', NEW.schedule_id, 'set_id', NEW.set_id,
                              'schedule_url', '/api/schedules/' || NEW.schedule_id,
                              'total', (SELECT count(*) FROM replay_items i WHERE i.replay_id = NEW.id),
                              'passed', NEW.passed)
                          ELSE '{}'::jsonb END)
    FROM webhook_endpoints e
    CROSS JOIN (VALUES ('replay.finished'), ('schedule.run_finished')) AS t (type)
    WHERE e.owner_id = NEW.owner_id AND e.enabled AND t.type = ANY (e.event_types)
      AND (t.type = 'replay.finished' OR NEW.schedule_id IS NOT NULL);
    RETURN NULL;
END
$$
