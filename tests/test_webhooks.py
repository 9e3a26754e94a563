"""Webhooks through the shipped path: the Procfile's `webhooks` worker and
beat on a stack of their own, a real receiver (tests/receiver.py) that
verifies every signature with the `standardwebhooks` library."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import redis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.config import Settings
from tests import services
from tests.conftest import TEST_ENV, new_owner, wait_turn
from tests.receiver import Answer, Receiver

pytestmark = pytest.mark.broker  # run against RabbitMQ too (deploy/test.sh)

SETTINGS = {
    **TEST_ENV,
    "REDIS_PREFIX": "webhooks:",
    "WEBHOOK_ALLOW_PRIVATE": "on",  # the receiver is on this machine
    "WEBHOOK_RETRY_SCHEDULE": "1,2,1",
    "WEBHOOK_TIMEOUT_SECONDS": "2",
}


@pytest.fixture(scope="module")
def hooks_stack():
    with services.stack("turnstream-webhooks-", SETTINGS, ("--first-token-delay", "0"), mcp=False) as info:
        env = info["env"]
        worker = services.start_worker(info["logdir"], env, "turns", 4)
        hooks = services.Proc("webhooks", services.procfile_args("webhooks"), info["logdir"], env)
        beat = services.start_beat(info["logdir"], env)
        info["procs"] += [worker, hooks, beat]
        services.wait_for_worker(worker)
        services.wait_for_worker(hooks)
        info["hooks"] = hooks
        receiver = Receiver()
        info["receiver"] = receiver
        yield info
        receiver.close()


@pytest.fixture
def api(hooks_stack):
    from web import create_app

    return create_app().test_client(), new_owner("hooks")


def _endpoint(client, owner, receiver: Receiver, *types: str) -> tuple[dict, str]:
    path = f"/{uuid.uuid4().hex[:8]}"
    made = client.post(
        "/api/webhooks",
        json={"url": receiver.url + path, "event_types": list(types or ["turn.completed"])},
        headers=owner,
    )
    assert made.status_code == 201, made.get_json()
    return made.get_json(), path


def _turn(client, owner, message: str = "hello") -> str:
    sid = client.post("/api/sessions", json={}, headers=owner).get_json()["id"]
    made = client.post(f"/api/sessions/{sid}/turns", json={"message": message}, headers=owner)
    assert made.status_code == 202
    return made.get_json()["id"]


def _received(receiver: Receiver, path: str, count: int, timeout: float = 30) -> list:
    return services.wait_until(
        lambda: receiver.of(path) if len(receiver.of(path)) >= count else None, timeout, f"{count} deliveries"
    )


def _deliveries(client, owner, webhook_id: str) -> list[dict]:
    page = client.get(f"/api/webhooks/{webhook_id}/deliveries", headers=owner)
    assert page.status_code == 200, page.get_json()
    return page.get_json()["items"]


def test_a_turn_that_ends_is_delivered_once_signed_with_a_thin_payload(hooks_stack, api):
    client, owner = api
    receiver = hooks_stack["receiver"]
    endpoint, path = _endpoint(client, owner, receiver, "turn.completed", "turn.failed")
    assert endpoint["secret"].startswith("whsec_")
    assert client.get(f"/api/webhooks/{endpoint['id']}", headers=owner).get_json()["secret"] is None  # shown once
    turn_id = _turn(client, owner)
    assert wait_turn(client, owner, turn_id)["status"] == "succeeded"
    (got,) = _received(receiver, path, 1)
    payload = Webhook(endpoint["secret"]).verify(got.body, got.headers)
    assert payload["type"] == "turn.completed" and payload["timestamp"]
    assert payload["data"]["turn_id"] == turn_id and payload["data"]["status"] == "succeeded"
    assert payload["data"]["turn_url"] == f"/api/turns/{turn_id}"
    assert len(got.body) < 20_000
    time.sleep(2)  # nothing more comes: one event, one delivery
    assert len(receiver.of(path)) == 1
    (delivery,) = _deliveries(client, owner, endpoint["id"])
    assert delivery["id"] == got.headers["webhook-id"] and delivery["status"] == "delivered"
    assert [(a["number"], a["status_code"]) for a in delivery["attempts"]] == [(1, 200)]


def test_failed_attempts_are_retried_on_the_schedule_with_the_same_id_and_retry_after_is_honoured(hooks_stack, api):
    client, owner = api
    receiver = hooks_stack["receiver"]
    endpoint, path = _endpoint(client, owner, receiver)
    receiver.answer(Answer(500), Answer(503, {"Retry-After": "4"}), Answer(500))
    wait_turn(client, owner, _turn(client, owner))
    got = _received(receiver, path, 4, timeout=40)
    assert len({g.headers["webhook-id"] for g in got}) == 1
    for g in got:  # every attempt signed anew, each verifying
        Webhook(endpoint["secret"]).verify(g.body, g.headers)
    gaps = [b.at - a.at for a, b in zip(got, got[1:], strict=False)]
    print("gaps between attempts, s:", [round(g, 2) for g in gaps])
    assert gaps[0] >= 1 and gaps[1] >= 4 and gaps[2] >= 1  # schedule 1, then Retry-After 4 over the schedule's 2
    (delivery,) = _deliveries(client, owner, endpoint["id"])
    assert delivery["status"] == "delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 500, 200]


def test_retries_run_out_and_the_delivery_fails_then_a_redelivery_sends_it_again(hooks_stack, api):
    client, owner = api
    receiver = hooks_stack["receiver"]
    endpoint, path = _endpoint(client, owner, receiver)
    receiver.answer(*[Answer(500)] * 4)
    wait_turn(client, owner, _turn(client, owner))
    _received(receiver, path, 4, timeout=40)
    delivery = services.wait_until(
        lambda: next((d for d in _deliveries(client, owner, endpoint["id"]) if d["status"] == "failed"), None),
        20,
        "the delivery to fail",
    )
    assert len(delivery["attempts"]) == 4  # the first and the schedule's three retries
    again = client.post(f"/api/webhooks/{endpoint['id']}/deliveries/{delivery['id']}/redeliver", headers=owner)
    assert again.status_code == 202
    (last,) = _received(receiver, path, 5)[4:]
    assert last.headers["webhook-id"] == delivery["id"]


def test_a_410_disables_the_endpoint_and_nothing_more_is_recorded_for_it(hooks_stack, api):
    client, owner = api
    receiver = hooks_stack["receiver"]
    endpoint, path = _endpoint(client, owner, receiver)
    receiver.answer(Answer(410))
    wait_turn(client, owner, _turn(client, owner))
    _received(receiver, path, 1)
    shown = services.wait_until(
        lambda: (
            (e := client.get(f"/api/webhooks/{endpoint['id']}", headers=owner).get_json())["enabled"] is False and e
        ),
        20,
        "the endpoint to be disabled",
    )
    assert "410" in shown["disabled_reason"]
    wait_turn(client, owner, _turn(client, owner))
    time.sleep(2)
    assert len(receiver.of(path)) == 1 and len(_deliveries(client, owner, endpoint["id"])) == 1


def test_during_a_rotation_both_secrets_sign_and_after_it_only_the_new_one(hooks_stack, api):
    client, owner = api
    receiver = hooks_stack["receiver"]
    endpoint, path = _endpoint(client, owner, receiver)
    old = endpoint["secret"]
    rotated = client.post(
        f"/api/webhooks/{endpoint['id']}/rotate-secret", json={"overlap_seconds": 3600}, headers=owner
    )
    new = rotated.get_json()["secret"]
    assert new != old and rotated.get_json()["previous_secret_until"]
    wait_turn(client, owner, _turn(client, owner))
    (got,) = _received(receiver, path, 1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(got.body, got.headers)
    Webhook(new).verify(got.body, got.headers)
    newest = client.post(f"/api/webhooks/{endpoint['id']}/rotate-secret", json={"overlap_seconds": 0}, headers=owner)
    wait_turn(client, owner, _turn(client, owner))
    got = _received(receiver, path, 2)[1]
    Webhook(newest.get_json()["secret"]).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(got.body, got.headers)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://[::ffff:192.168.0.1]/hook",
        "ftp://example.com/hook",
        "http://user:pw@example.com/hook",
    ],
)
def test_private_loopback_link_local_and_metadata_addresses_are_refused(hooks_stack, url):
    from web import create_app

    strict = Settings.from_env({**os.environ, "WEBHOOK_ALLOW_PRIVATE": "off"})
    client, owner = create_app(strict).test_client(), new_owner("ssrf")
    made = client.post("/api/webhooks", json={"url": url, "event_types": ["turn.completed"]}, headers=owner)
    assert made.status_code == 422, made.get_json()
    assert made.get_json()["error"]["details"] == {"field": "url"}
    assert client.get("/api/webhooks", headers=owner).get_json()["items"] == []  # nothing written


def test_the_address_is_checked_again_when_an_attempt_connects(hooks_stack, monkeypatch):
    """A name that passed the check when saved (or a check skipped) still
    cannot reach a private address: the connection resolves and checks
    the host itself."""
    from shared import config, webhooks

    config.use_settings(Settings.from_env({**os.environ, "WEBHOOK_ALLOW_PRIVATE": "off"}))
    try:
        monkeypatch.setattr(webhooks, "check_url", lambda url: url)
        answer = webhooks.post(
            hooks_stack["receiver"].url.replace("127.0.0.1", "localhost") + "/x",
            "msg_1",
            b"{}",
            [webhooks.new_secret()],
        )
    finally:
        config.use_settings(None)
    assert answer.status is None and "private, loopback" in answer.error, answer
    assert not hooks_stack["receiver"].of("/x")


def test_a_webhook_worker_killed_mid_delivery_delivers_it_later_with_the_same_id(hooks_stack, api):
    client, owner = api
    receiver = hooks_stack["receiver"]
    endpoint, path = _endpoint(client, owner, receiver)
    receiver.answer(Answer(200, delay=5))  # the first attempt hangs until the worker is gone
    wait_turn(client, owner, _turn(client, owner))
    _received(receiver, path, 1)
    hooks = hooks_stack["hooks"]
    os.killpg(hooks.popen.pid, signal.SIGKILL)
    hooks.popen.wait()
    again = services.Proc("webhooks", services.procfile_args("webhooks"), hooks_stack["logdir"], hooks_stack["env"])
    hooks_stack["procs"].append(again)
    hooks_stack["hooks"] = again
    services.wait_for_worker(again)
    got = _received(receiver, path, 2, timeout=40)
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
    (delivery,) = services.wait_until(
        lambda: [d for d in _deliveries(client, owner, endpoint["id"]) if d["status"] == "delivered"] or None,
        20,
        "the delivery recorded",
    )
    assert json.loads(got[1].body)["data"]["status"] == "succeeded"
    assert [a["number"] for a in delivery["attempts"]] == [2]  # the killed attempt left no record, and nothing doubled


def test_deliveries_survive_redis_losing_its_data(hooks_stack, api):
    """The events are rows of Postgres: Redis emptied (the broker's queued
    deliveries with it) only delays them to the next dispatch."""
    client, owner = api
    receiver = hooks_stack["receiver"]
    endpoint, path = _endpoint(client, owner, receiver)
    receiver.answer(Answer(500))  # the first attempt fails: its retry waits in Postgres
    wait_turn(client, owner, _turn(client, owner))
    _received(receiver, path, 1)
    redis.Redis(port=hooks_stack["redis_port"]).flushall()
    got = _received(receiver, path, 2, timeout=40)
    Webhook(endpoint["secret"]).verify(got[1].body, got[1].headers)
    time.sleep(2)
    assert len(receiver.of(path)) == 2
    (delivery,) = _deliveries(client, owner, endpoint["id"])
    assert delivery["status"] == "delivered" and [a["status_code"] for a in delivery["attempts"]] == [500, 200]


def test_the_cli_adds_lists_and_shows_the_deliveries_of_an_endpoint(hooks_stack):
    from web import create_app

    runner = create_app().test_cli_runner()
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    url = hooks_stack["receiver"].url + "/cli"
    made = runner.invoke(args=["webhooks", "create", url, "--owner", owner, "--event", "turn.completed"])
    assert made.exit_code == 0, made.output
    shown = json.loads(made.output)
    assert shown["secret"].startswith("whsec_") and shown["event_types"] == ["turn.completed"]
    listed = runner.invoke(args=["webhooks", "list", "--owner", owner])
    assert shown["id"] in listed.output and "enabled" in listed.output and url in listed.output
    refused = runner.invoke(args=["webhooks", "create", url, "--owner", owner, "--event", "turn.exploded"])
    assert refused.exit_code != 0 and "event_types" in refused.output
    deliveries = runner.invoke(args=["webhooks", "deliveries", shown["id"]])
    assert deliveries.exit_code == 0 and deliveries.output == ""
