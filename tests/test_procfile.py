"""The shipped path: the Procfile run as a platform runs it, and what it
refuses to start with on a public address.

The platform's environment only: the commands on PATH, the add-ons' URLs as
they hand them out (`postgres://`, `rediss://` with a password and a
self-signed certificate), the variables an operator sets; no PYTHONPATH, no
virtualenv activated, and the working directory the project's root.
"""

from __future__ import annotations

import base64
import subprocess

import httpx
import pytest

from tests import services
from tests.sse import read_events

FLOWER_USER, FLOWER_PASSWORD = "ops", "pass,word:with both"  # a comma and a colon stay in the password


def _platform_env(stack: dict, **extra: str) -> dict[str, str]:
    env = stack["env"]
    return {
        "PATH": f"{services.VENV_BIN}:/usr/bin:/bin",
        "HOME": str(stack["workdir"]),
        "LANG": "C.UTF-8",
        "DATABASE_URL": env["DATABASE_URL"],
        "REDIS_URL": env["REDIS_URL"],
        "OPENAI_BASE_URL": env["OPENAI_BASE_URL"],
        "OPENAI_API_KEY": "sk-platform",
        "SECRET_KEY": "platform-" + "k" * 40,
        **extra,
    }


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=services.ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def platform(stack):
    """Postgres and Redis as add-ons hand them out, and the offline model;
    nothing migrated: the Procfile's release step does that. (After the
    session's stack, whose environment this one's end restores.)"""
    test_process = {"TURNSTREAM_ENV": "development", "REDIS_TLS_VERIFY": "none"}  # this process's own settings
    with services.stack(
        "turnstream-procfile-",
        test_process,
        ("--token-delay", "0.005"),
        mcp=False,
        migrate=False,
        redis_tls_password="s3cret",
    ) as info:
        yield info


def test_the_procfile_serves_a_turn_end_to_end_as_a_platform_runs_it(platform):
    env = _platform_env(
        platform,
        REDIS_TLS_VERIFY="none",  # Heroku Redis's self-signed certificate
        FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}",
        WEB_CONCURRENCY="1",
        WORKER_CONCURRENCY="4",
        SWEEP_SECONDS="1",
    )
    assert env["DATABASE_URL"].startswith("postgres://") and env["REDIS_URL"].startswith("rediss://:s3cret@")
    honcho = [str(services.VENV_BIN / "honcho"), "-f", "Procfile"]

    release = _run([*honcho, "start", "release"], env)  # the release phase, before the new code serves
    assert release.returncode == 0, release.stdout + release.stderr

    base = services.free_port_block(4, step=100)
    formation = services.Proc(
        "procfile", [*honcho, "start", "-p", str(base), "web", "worker", "beat", "flower"], platform["logdir"], env
    )
    try:
        web, flower = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 300}"
        services.wait_until(lambda: httpx.get(f"{web}/api/health", timeout=2).json()["checks"]["workers"], 60, "web")

        made = _run(["flask", "--app", "web", "keys", "create", "platform-owner"], env)  # a one-off dyno
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert key.startswith("ts_") and "Authorization: Bearer" in made.stderr
        auth = {"Authorization": f"Bearer {key}"}

        assert httpx.post(f"{web}/api/chat", json={"message": "hello"}).status_code == 401  # auth on by default
        answer = httpx.post(f"{web}/api/chat", json={"message": "hello platform"}, headers=auth, timeout=30).json()
        assert answer["status"] == "succeeded" and 'You said: "hello platform"' in answer["response"], answer
        with httpx.Client(base_url=web, headers=auth, timeout=30) as client:
            _, events = read_events(client, "/api/chat", method="POST", json_body={"message": "hi", "stream": True})
        assert events[-1].event == "turn.completed"  # relayed through Redis over TLS
        assert "".join(e.data["delta"] for e in events if e.event == "message.delta") == events[-1].data["answer"]

        assert httpx.get(f"{flower}/api/tasks").status_code == 401
        assert httpx.get(f"{flower}/api/tasks", headers={"Authorization": "Basic ="}).status_code == 401
        assert httpx.get(f"{flower}/api/tasks", headers=_basic(FLOWER_USER, "pass")).status_code == 401

        def flower_saw_the_turns():
            tasks = httpx.get(f"{flower}/api/tasks", headers=_basic(FLOWER_USER, FLOWER_PASSWORD), timeout=5).json()
            return [t["state"] for t in tasks.values() if t["name"] == "tasks.run_turn"] == ["SUCCESS"] * 2

        services.wait_until(flower_saw_the_turns, 30, "Flower showing the worker's turns")
        # beat sends the sweeper, and a worker runs it (out of Flower's list)
        services.wait_until(lambda: "Task tasks.sweep_turns[" in formation.log_path.read_text(), 30, "the sweeper")
        log = formation.log_path.read_text()
        assert "s3cret" not in log and "platform-kkk" not in log  # no password in any process's output
    finally:
        formation.stop()


def test_web_refuses_authentication_off_on_a_public_address(stack):
    port = services.free_port()
    env = _platform_env(stack, TURNSTREAM_ENV="development", AUTH="off", PORT=str(port))
    refused = _run(services.procfile_args("web"), env)
    assert refused.returncode != 0 and f"AUTH=off is refused on 0.0.0.0:{port}" in refused.stderr, refused.stderr
    allowed = services.Proc(
        "web-loopback", services.procfile_args("web", "-b", f"127.0.0.1:{port}"), stack["logdir"], env
    )
    try:  # local development binds to loopback, as deploy/dev.sh does
        services.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/api/info").json()["auth"] is False, 30, "web")
    finally:
        allowed.stop()


def test_a_forgotten_environment_is_not_an_open_server(stack):
    """No TURNSTREAM_ENV, no SECRET_KEY: production's rules, and a sentence
    from web, which signs cookies with it."""
    env = _platform_env(stack, PORT=str(services.free_port()))
    del env["SECRET_KEY"]
    refused = _run(services.procfile_args("web"), env)
    assert refused.returncode != 0 and "SECRET_KEY must be at least 32" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    # the worker signs nothing: it loads its app without one
    report = _run(["celery", "-A", "tasks", "report"], env)
    assert report.returncode == 0 and "software -> celery" in report.stdout, report.stderr


@pytest.mark.parametrize("credential", [None, ""])
def test_flower_refuses_to_listen_publicly_without_a_password(stack, credential):
    env = _platform_env(stack, FLOWER_PORT=str(services.free_port()))
    if credential is not None:
        env["FLOWER_BASIC_AUTH"] = credential
    refused = _run(services.procfile_args("flower"), env)
    assert refused.returncode != 0 and "set FLOWER_BASIC_AUTH=user:password" in refused.stderr, refused.stderr


def test_flower_without_a_password_listens_on_loopback_only(stack):
    port = services.free_port()
    env = _platform_env(stack, FLOWER_PORT=str(port), FLOWER_ADDRESS="127.0.0.1")
    flower = services.Proc("flower-loopback", services.procfile_args("flower"), stack["logdir"], env)
    try:
        services.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthcheck").text == "OK", 30, "Flower")
        # no credential, so its API stays shut unless opened on purpose (Flower's own rule)
        assert httpx.get(f"http://127.0.0.1:{port}/api/workers").status_code == 401
    finally:
        flower.stop()
