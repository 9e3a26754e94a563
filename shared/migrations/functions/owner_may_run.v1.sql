-- Whether the owner runs fewer than p_most turns: a claim's fairness check.
-- Claims of one owner take turns on an advisory lock held to the end of
-- their transaction, and this function (VOLATILE: its query takes a fresh
-- snapshot) counts after the lock is granted, so a burst of claims sees
-- each other's and no owner runs more than p_most at once.
CREATE OR REPLACE FUNCTION owner_may_run(p_owner_id uuid, p_most integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- 7117: this lock's class, apart from any other advisory lock.
    PERFORM pg_advisory_xact_lock(7117, hashtext(p_owner_id::text));
    RETURN (SELECT count(*) FROM turns WHERE owner_id = p_owner_id AND status = 'running') < p_most;
END
$$
