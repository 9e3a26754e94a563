"""The SSE relay: the events of turns and replays, from Redis to clients.

- `hub.py`: one Pub/Sub connection per web process, shared by every
  stream of that process; its reader hands each message to the streams of
  its channel.
- `resume.py`: one client's stream (`Resume`): the log's backlog after the
  client's Last-Event-ID, then live events, with no gap and no duplicate.
- `frames.py`: events as SSE frames, and the streaming response.
- `snapshots.py`: the state of a turn or replay from Postgres, for a
  client whose events are gone.

docs/architecture.md ("The relay") says why it is built this way.
"""
