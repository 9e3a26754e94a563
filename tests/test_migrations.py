"""Migrations that move data, run on a database of their own: made at the
revision before, given rows as that schema had them, then upgraded (and
downgraded) as `flask --app web db upgrade` does it in a release."""

from __future__ import annotations

import subprocess

import psycopg

from tests import services


def _alembic(env: dict[str, str], command: str, revision: str) -> None:
    code = (
        "from alembic import command; from shared.migrate import alembic_config;"
        f" command.{command}(alembic_config(), {revision!r})"
    )
    run = subprocess.run(
        [str(services.VENV_BIN / "python"), "-c", code],
        cwd=services.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr


def test_0019_gives_a_replays_sessions_their_replay_and_leaves_chats_labelled_so_chats(fresh_database):
    url, env = fresh_database
    _alembic(env, "upgrade", "0018")
    with psycopg.connect(url, autocommit=True) as db:
        owner, stranger = (
            db.execute("INSERT INTO owners (id, name) VALUES (gen_random_uuid(), %s) RETURNING id", (n,)).fetchone()[0]
            for n in ("owner", "stranger")
        )
        replay = db.execute(
            "INSERT INTO replays (id, owner_id, concurrency) VALUES (gen_random_uuid(), %s, 4) RETURNING id", (owner,)
        ).fetchone()[0]

        def session(owner_id, metadata: str) -> str:
            return db.execute(
                "INSERT INTO sessions (id, owner_id, metadata) VALUES (gen_random_uuid(), %s, %s::jsonb) RETURNING id",
                (owner_id, metadata),
            ).fetchone()[0]

        labelled = f'{{"replay_id": "{replay}"}}'
        made = session(owner, labelled)  # made by the replay for its question
        named = session(owner, "{}")  # the owner's chat, a question of the replay asked in it
        forged = session(owner, labelled)  # labelled so by the owner (PATCH), no question of the replay's
        others = session(stranger, labelled)  # another owner's, naming this replay
        odd = [session(owner, m) for m in ('{"replay_id": "not-a-uuid"}', '{"replay_id": 7}', "[1]", '"x"')]
        for index, session_id in enumerate((made, named)):
            db.execute(
                "INSERT INTO replay_items (id, replay_id, index, message, session_id)"
                " VALUES (gen_random_uuid(), %s, %s, 'q', %s)",
                (replay, index, session_id),
            )

    _alembic(env, "upgrade", "head")
    with psycopg.connect(url, autocommit=True) as db:

        def replays() -> dict:
            return dict(db.execute("SELECT id, replay_id FROM sessions").fetchall())

        assert replays() == {made: replay, named: None, forged: None, others: None, **dict.fromkeys(odd)}
        # A replay deleted by hand leaves its sessions, as sessions of no replay.
        db.execute("DELETE FROM replays WHERE id = %s", (replay,))
        assert replays()[made] is None
        assert db.execute("SELECT metadata FROM sessions WHERE id = %s", (made,)).fetchone()[0] == {
            "replay_id": str(replay)
        }

    _alembic(env, "downgrade", "0018")
    with psycopg.connect(url, autocommit=True) as db:
        columns = {
            r[0] for r in db.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'sessions'")
        }
        indexes = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'sessions'")}
        assert "replay_id" not in columns and not {"ix_sessions_owner_chats", "ix_sessions_replay"} & indexes
