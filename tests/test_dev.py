"""The README's first command, as a person runs it: deploy/dev.sh brings the
whole system up, a second run says it is already running and where, and
Ctrl-C leaves nothing behind. Its own directory and ports, so it runs beside
a developer's own copy."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests import services


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in services.children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


NEW_SESSION = {"start_new_session": True}


def _postgres_data(dir_: str) -> Path:
    """Where deploy/postgres.sh keeps a cluster meant for dir_."""
    digest = hashlib.sha256(dir_.encode()).hexdigest()[:16]
    return Path(f"/var/lib/postgresql/turnstream/{digest}")


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_dev_sh_runs_everything_says_when_it_already_runs_and_stops_clean(tmp_path):
    """tmp_path is private to root, as a checkout in root's home is: Postgres's
    data goes where the postgres account can reach it."""
    ports = {name: str(services.free_port()) for name in ("PORT", "FLOWER_PORT", "PG_PORT", "REDIS_PORT", "MODEL_PORT")}
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DEV_DIR": str(tmp_path / "local"), **ports}
    chat = f"http://127.0.0.1:{ports['PORT']}/"
    log = open(tmp_path / "dev.log", "wb")
    first = subprocess.Popen(
        ["bash", "deploy/dev.sh"],
        cwd=services.ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        answer = services.wait_until(
            lambda: httpx.post(f"{chat}api/chat", json={"message": "hi dev"}, timeout=20).json(), 90, "dev.sh's chat"
        )
        assert answer["status"] == "succeeded" and 'You said: "hi dev"' in answer["response"]
        assert httpx.get(f"http://127.0.0.1:{ports['FLOWER_PORT']}/").status_code == 200  # loopback, no password

        again = subprocess.run(["bash", "deploy/dev.sh"], cwd=services.ROOT, env=env, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert f"already running here (pid {first.pid})" in again.stdout and chat in again.stdout
        assert httpx.get(chat).status_code == 200  # the first one is untouched

        processes = _descendants(first.pid) | {first.pid}
        assert len(processes) >= 8  # honcho, Postgres, Redis, the model, web, worker, beat, Flower (and their children)
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in its terminal
        first.wait(30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(map(_alive, processes)):
            time.sleep(0.2)
        assert [pid for pid in processes if _alive(pid)] == []
        data = _postgres_data(env["DEV_DIR"] + "/postgres")
        assert (data / "PG_VERSION").exists() and not (data / "postmaster.pid").exists()  # shut down cleanly
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(_postgres_data(env["DEV_DIR"] + "/postgres"), ignore_errors=True)
    with socket.socket() as holder:  # a port another program holds is named
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", int(ports["PG_PORT"])))
        holder.listen()
        refused = subprocess.run(["bash", "deploy/dev.sh"], cwd=services.ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and f"port {ports['PG_PORT']} is taken" in refused.stderr
