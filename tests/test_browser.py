"""The chat page in a real browser: Debian's Chromium driven by Playwright,
against the real stack (gunicorn, the worker, the offline model), with
authentication on."""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests import services
from tests.proxy import Proxy

CHROMIUM = "/usr/bin/chromium"  # Debian's package (deploy/setup.sh): no browser download
ECHO = "[[echo=setup]]"  # the offline model answers with what it was given: "System: [...]. Model: …"
HOSTILE = (
    '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
    "[click](javascript:window.pwned=3) ![remote](https://remote.example/x.png)"
)
# A set's questions for the evaluations page: with the instructions "Refunds
# take 30 days." the first passes, with others it fails; the second passes
# whoever answers (tests/test_evaluations.py).
REFUND = {"key": "refund", "message": f"{ECHO} How long do refunds take?", "expect": {"contains": "30 days"}}
CALM = {"key": "calm", "message": "Hello there", "expect": {"not_contains": "sorry"}}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context()
    yield context
    context.close()


def _signed_in(context: BrowserContext, url: str, owner: dict) -> Page:
    """The chat page at `url`, signed in with the owner's key."""
    page = context.new_page()
    page.goto(url)
    page.locator("#api-key").fill(owner["Authorization"].split()[1])
    page.locator("#login button").click()
    page.locator("#login").wait_for(state="hidden")
    return page


@pytest.fixture
def page(context: BrowserContext, web_server: str, owner: dict) -> Page:
    return _signed_in(context, web_server, owner)


def _ask(page: Page, text: str) -> None:
    """Send a question; return once the page has drawn its turn, so that
    `_ended` waits on it, not on the turn before (ended already)."""
    turns = page.locator(".turn").count()
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")
    expect(page.locator(".turn")).to_have_count(turns + 1)


def _last_turn(page: Page):
    return page.locator(".turn").last


def _ended(page: Page, status: str = "succeeded", timeout: float = 20_000):
    turn = _last_turn(page)
    expect(turn).to_have_attribute("data-status", status, timeout=timeout)
    return turn


def _page_turn_text(page: Page, turn_id: str) -> str:
    return page.locator(f'.turn[data-turn="{turn_id}"] .msg.assistant').text_content() or ""


def _make_assistant(client, owner: dict, name: str, instructions: str) -> dict:
    response = client.post("/api/assistants", json={"name": name, "instructions": instructions}, headers=owner)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_the_answer_appears_progressively_renders_markdown_and_says_what_it_cost(page: Page, context: BrowserContext):
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    _ask(page, "**bold** and `code` [[tokens=40]] [[delay=0.03]]")
    turn = _last_turn(page)
    answer = turn.locator(".msg.assistant")
    lengths = []
    deadline = time.monotonic() + 20
    while turn.get_attribute("data-status") != "succeeded":
        lengths.append(len(answer.text_content() or ""))
        assert time.monotonic() < deadline, lengths
        time.sleep(0.05)
    assert len({n for n in lengths if n}) >= 3, lengths  # seen growing, not only whole
    # Asked at once after signing in: the page's own start must not open the
    # new session a second time and draw its turn twice.
    expect(page.locator(".turn")).to_have_count(1)
    assert answer.locator("strong").text_content() == "bold"
    assert answer.locator("code").first.text_content() == "code"
    assert turn.locator(".msg.user").text_content().startswith("**bold**")  # people's text stays text
    expect(turn.locator(".state .meta")).to_have_text(re.compile(r"turnstream-offline · \d+ tokens in, \d+ out"))

    # A code block has a copy button that copies the code.
    _ask(page, "look:\n```\nSELECT 1;\n```\nend")
    block = _ended(page).locator(".code")
    block.locator("button.copy").click()
    expect(block.locator("button.copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == block.locator("pre").text_content()
    assert "SELECT 1;" in block.locator("pre").text_content()


def test_stop_cancels_the_turn_and_the_page_says_so_within_a_second(page: Page):
    _ask(page, "a long answer [[tokens=400]] [[delay=0.05]]")
    turn = _last_turn(page)
    expect(turn.locator(".msg.assistant")).to_contain_text("You said")  # streaming
    clicked = time.monotonic()
    page.locator("#stop").click()
    expect(turn).to_have_attribute("data-status", "cancelled", timeout=5_000)
    assert time.monotonic() - clicked < 1.0
    expect(turn.locator(".state")).to_contain_text("Cancelled")
    assert page.locator("#stop").is_hidden()
    shown = turn.locator(".msg.assistant").text_content()
    page.wait_for_timeout(500)
    assert turn.locator(".msg.assistant").text_content() == shown  # nothing more comes
    assert len(shown) < 400 * 4  # stopped well before its end


def test_a_turn_sent_while_one_runs_says_it_waits_then_runs(page: Page):
    _ask(page, "the first [[tokens=40]] [[delay=0.03]]")
    _ask(page, "the second")
    first, second = page.locator(".turn").nth(0), page.locator(".turn").nth(1)
    expect(second.locator(".state .label")).to_have_text("Queued behind the turn before it…")
    expect(first).to_have_attribute("data-status", "running")
    assert second.get_attribute("data-status") == "queued"
    expect(second).to_have_attribute("data-status", "succeeded", timeout=20_000)
    assert first.get_attribute("data-status") == "succeeded"
    expect(second.locator(".msg.assistant")).to_contain_text('Before that you said: "the first".')


def test_a_failed_turn_says_why_and_retry_answers_it_again_in_its_place(page: Page, stack):
    control = f"http://127.0.0.1:{stack['model_port']}/control"
    before = httpx.post(control, json={}).json()
    try:
        httpx.post(control, json={"fault_rate": 1.0, "faults": ["400"]})
        _ask(page, "try this [[tokens=4]]")
        failed = _ended(page, "failed")
    finally:
        httpx.post(control, json={"fault_rate": before["fault_rate"], "faults": before["faults"]})
    expect(failed.locator(".state")).to_contain_text("Failed: ")
    assert len(failed.locator(".state .label").text_content()) > len("Failed: ") + 5  # with its reason
    expect(failed.locator("button.regenerate")).to_have_count(0)  # one button for the one action
    failed_id = failed.get_attribute("data-turn")
    failed.locator("button.retry").click()
    expect(page.locator(f'.turn[data-turn="{failed_id}"]')).to_have_count(0)  # a new version in its place
    expect(page.locator(".turn")).to_have_count(1)
    retried = _ended(page)
    assert retried.locator(".msg.user").text_content() == "try this [[tokens=4]]"
    expect(retried.locator(".msg.assistant")).to_contain_text('You said: "try this".')
    expect(_versions(retried).locator(".count")).to_have_text("2 / 2")


def test_a_turn_whose_model_endpoint_fails_says_it_waits_in_the_queue_and_until_when(page: Page, stack):
    settings = {"MODEL_WAIT_SECONDS": "60", "BREAKER_COOLDOWN_SECONDS": "30"}
    with services.sole_worker(stack, "worker-delayed", settings, concurrency=2):
        _ask(page, "is anyone there [[fault=503]]")
        turn = _last_turn(page)
        expect(turn.locator(".state")).to_contain_text(
            "Model endpoint default unavailable; waiting in the queue, retrying at", timeout=20_000
        )
        expect(turn).to_have_attribute("data-status", "queued")
        page.locator("#stop").click()  # it can be taken out of the queue meanwhile
        expect(turn).to_have_attribute("data-status", "cancelled", timeout=5_000)


def test_hostile_text_from_people_models_and_tools_runs_no_script_and_loads_nothing_remote(page: Page):
    remote = []
    page.on("request", lambda request: remote.append(request.url) if "remote.example" in request.url else None)
    _ask(page, HOSTILE)
    answer = _ended(page).locator(".msg.assistant")
    assert _last_turn(page).locator(".msg.user").text_content() == HOSTILE  # as typed, as text
    # A tool's output (the explode tool fails with the reason it is given)
    # is shown as text, and the model's answer quoting it is sanitised.
    _ask(page, "[[call=kit__explode " + json.dumps({"reason": HOSTILE}) + "]]")
    tool = _ended(page).locator(".tool")
    expect(tool).to_have_count(1)
    tool.locator("summary").click()
    assert HOSTILE in tool.locator("pre").text_content()
    for place in (answer, _last_turn(page)):
        assert place.locator("script").count() == 0
        assert place.locator("[onerror]").count() == 0
        assert place.locator("img[src^='https:']").count() == 0
        for link in place.locator(".msg.assistant a").all():
            href = link.get_attribute("href")
            assert href is None or not href.startswith("javascript:")
    answer.locator("a").first.click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert remote == []


def test_a_network_drop_mid_answer_resumes_with_no_gap_or_duplicate(context, web_server, owner, client):
    proxy = Proxy([("127.0.0.1", int(web_server.rsplit(":", 1)[1]))])
    warnings: list[str] = []
    try:
        page = _signed_in(context, f"http://127.0.0.1:{proxy.port}", owner)
        page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
        _ask(page, "through a bad network [[tokens=120]] [[delay=0.04]]")
        turn = _last_turn(page)
        answer = turn.locator(".msg.assistant")
        expect(answer).to_contain_text("You said")
        samples = [answer.text_content().strip()]
        proxy.cut(2.5)
        expect(page.locator("#connection")).to_have_text("Reconnecting…", timeout=2_000)
        while turn.get_attribute("data-status") != "succeeded":
            samples.append(answer.text_content().strip())
            time.sleep(0.05)
        expect(page.locator("#connection")).to_be_hidden()
        final = client.get(f"/api/turns/{turn.get_attribute('data-turn')}", headers=owner).get_json()["answer"]
        assert answer.text_content().strip() == final
        assert all(final.startswith(s) for s in samples)  # never a gap nor a repeat, mid-answer either
        assert not [w for w in warnings if "differs from its answer" in w]  # the stream itself was whole
    finally:
        proxy.close()


def test_two_tabs_on_one_session_see_each_others_turns_and_list_changes(context, web_server, owner):
    first = _signed_in(context, web_server, owner)
    _ask(first, "hello from the first tab [[tokens=3]]")
    _ended(first)
    second = context.new_page()
    second.goto(first.url)  # the session's address: #<session id>
    expect(second.locator(".turn")).to_have_count(1)

    _ask(first, "streamed to both [[tokens=60]] [[delay=0.05]]")
    mirror = second.locator(".turn").nth(1)
    expect(mirror.locator(".msg.user")).to_have_text("streamed to both [[tokens=60]] [[delay=0.05]]")
    expect(mirror.locator(".msg.assistant")).to_contain_text("You said")
    assert mirror.get_attribute("data-status") == "running"  # live, not after the fact
    expect(mirror).to_have_attribute("data-status", "succeeded", timeout=20_000)
    assert mirror.locator(".msg.assistant").text_content() == _page_turn_text(first, mirror.get_attribute("data-turn"))

    _ask(second, "and back [[tokens=3]]")
    expect(first.locator(".turn")).to_have_count(3)
    expect(first.locator(".turn").nth(2)).to_have_attribute("data-status", "succeeded", timeout=20_000)
    expect(first.locator(".turn").nth(2).locator(".msg.user")).to_have_text("and back [[tokens=3]]")

    # The list of chats follows too: a rename in one tab, a deletion in the other.
    item = first.locator("#sessions li.active")
    item.locator("button[aria-label^='Rename']").click()
    first.locator("input.rename").fill("Renamed here")
    first.locator("input.rename").press("Enter")
    expect(second.locator("#sessions li.active a")).to_have_text("Renamed here")
    second.on("dialog", lambda dialog: dialog.accept())
    second.locator("#sessions li.active button[aria-label^='Delete']").click()
    expect(first.locator("#sessions li")).to_have_count(0)
    expect(first.locator(".turn")).to_have_count(0)  # the open session went with it


def test_sessions_are_searched_by_title_and_a_replays_session_is_not_listed_but_opens_by_address(
    page: Page, client, owner
):
    # A replay's question, its session made before the chats: not one of them.
    replay = client.post("/api/replays", json={"questions": [{"message": "replayed invoices"}]}, headers=owner)
    deadline = time.monotonic() + 30
    while client.get(f"/api/replays/{replay.get_json()['id']}", headers=owner).get_json()["status"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for question in ("about invoices [[tokens=2]]", "about holidays [[tokens=2]]", "more INVOICES [[tokens=2]]"):
        page.locator("#new-session").click()
        _ask(page, question)
        _ended(page)
    expect(page.locator("#sessions li")).to_have_count(3)
    page.locator("#search").fill("invoices")
    expect(page.locator("#sessions li a")).to_have_text(["more INVOICES [[tokens=2]]", "about invoices [[tokens=2]]"])
    page.locator("#search").fill("nothing like it")
    expect(page.locator("#no-sessions")).to_be_visible()
    page.locator("#search").fill("")
    expect(page.locator("#sessions li")).to_have_count(3)
    page.locator("#notices .dismiss").first.click()
    expect(page.locator("#notices p")).to_have_count(0)
    page.locator("#sessions li a", has_text="holidays").click()
    expect(page.locator(".turn .msg.user")).to_have_text(["about holidays [[tokens=2]]"])
    # Its address opens the replay's session, still out of the list.
    replayed = client.get(f"/api/sessions?origin=replay&replay_id={replay.get_json()['id']}", headers=owner)
    page.goto(f"{page.url.split('#')[0]}#{replayed.get_json()['items'][0]['id']}")
    expect(page.locator(".turn .msg.user")).to_have_text(["replayed invoices"])
    expect(_last_turn(page)).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#sessions li")).to_have_count(3)
    expect(page.locator("#sessions li.active")).to_have_count(0)


def test_a_new_chat_is_answered_by_the_assistant_chosen_and_its_session_says_which(context, web_server, owner, client):
    instructions = "You are the order desk and speak of parcels only."
    desk = _make_assistant(client, owner, "Order desk", instructions)
    page = _signed_in(context, web_server, owner)  # lists the caller's assistants once signed in
    choice = page.get_by_label("Assistant")
    expect(choice).to_have_value("")  # Default
    choice.select_option(label="Order desk")
    _ask(page, ECHO)
    expect(_ended(page).locator(".msg.assistant")).to_contain_text(f'System: ["{instructions}"]. Model: ')
    expect(page.locator("#assistant-shown")).to_have_text("Assistant: Order desk")
    expect(choice).to_be_hidden()  # an open session's assistant is said, not chosen
    first = page.url.split("#", 1)[1]
    assert client.get(f"/api/sessions/{first}", headers=owner).get_json()["assistant_id"] == desk["id"]

    page.locator("#new-session").click()
    expect(page.locator("#assistant-shown")).to_be_hidden()
    expect(choice).to_be_visible()
    expect(choice).to_have_value("")  # a new chat starts with Default again
    _ask(page, ECHO)
    expect(_ended(page).locator(".msg.assistant")).to_contain_text("System: []. Model: ")
    expect(page.locator("#assistant-shown")).to_have_text("Assistant: Default")
    second = page.url.split("#", 1)[1]
    assert second != first
    assert client.get(f"/api/sessions/{second}", headers=owner).get_json()["assistant_id"] is None

    # Reopened from the list, the first chat still says who answers it.
    page.locator(f'#sessions li[data-id="{first}"] a').click()
    expect(page.locator(".turn .msg.assistant")).to_contain_text(f'System: ["{instructions}"]')
    expect(page.locator("#assistant-shown")).to_have_text("Assistant: Order desk")


def test_a_session_pinned_to_a_version_says_it_and_one_whose_assistant_is_deleted_says_default(
    context, web_server, owner, client
):
    desk = _make_assistant(client, owner, "Order desk", "The first instructions.")
    newer = {"name": "Order desk", "instructions": "The second instructions."}
    assert client.put(f"/api/assistants/{desk['id']}", json=newer, headers=owner).status_code == 200
    pinned = client.post(
        "/api/sessions", json={"title": "pinned", "assistant_id": desk["id"], "assistant_version": 1}, headers=owner
    ).get_json()
    page = _signed_in(context, f"{web_server}/#{pinned['id']}", owner)
    expect(page.locator("#assistant-shown")).to_have_text("Assistant: Order desk v1")
    _ask(page, ECHO)
    expect(_ended(page).locator(".msg.assistant")).to_contain_text('System: ["The first instructions."]')

    assert client.delete(f"/api/assistants/{desk['id']}", headers=owner).status_code == 204
    page.reload()
    expect(page.locator(".turn")).to_have_count(1)
    expect(page.locator("#assistant-shown")).to_have_text("Assistant: Default")
    expect(page.locator("#assistant option")).to_have_text(["Default"])  # gone from the choice too


def test_a_phone_sized_dark_screen_used_with_the_keyboard_alone(browser, web_server, owner):
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark", has_touch=True)
    try:
        page = context.new_page()
        page.goto(web_server)
        expect(page.locator("#api-key")).to_be_focused()  # asked for a key, ready to type it
        page.keyboard.type(owner["Authorization"].split()[1])
        page.keyboard.press("Enter")
        page.locator("#login").wait_for(state="hidden")
        expect(page.locator("#message")).to_be_focused()  # then ready for a question
        page.keyboard.type("first line")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("second line [[tokens=30]]")
        page.keyboard.press("Enter")
        turn = _ended(page)
        assert turn.locator(".msg.user").text_content() == "first line\nsecond line [[tokens=30]]"
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width  # nothing runs off a phone's screen
        assert page.locator("#composer").bounding_box()["width"] <= 390
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert sum(int(c) for c in background[4:-1].split(",")[:3]) < 3 * 60, background  # dark

        # The chats list is behind the menu button, out of the tab order until opened.
        assert not page.locator("#sessions a").first.is_visible()
        page.locator("#menu").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#new-session")).to_be_focused()
        expect(page.locator("#sessions a").first).to_be_visible()
        page.keyboard.press("Tab")  # the search field
        page.keyboard.press("Tab")  # the first chat
        expect(page.locator("#sessions a").first).to_be_focused()
        page.keyboard.press("Escape")
        expect(page.locator("#menu")).to_be_focused()
        expect(page.locator("#sessions a").first).to_be_hidden()
        for control in ("#message", "#search", "#new-session", "#menu"):  # every control says what it is
            label = page.locator(control).get_attribute("aria-label") or page.locator(control).text_content()
            assert label and label.strip(), control
    finally:
        context.close()


def test_a_wrong_key_is_refused_with_a_reason(context, web_server):
    page = context.new_page()
    page.goto(web_server)
    page.locator("#api-key").fill("ts_not_a_key")
    page.locator("#login button").click()
    expect(page.locator("#login-error")).not_to_be_empty()
    expect(page.locator("#login")).to_be_visible()


def _approving_session(web_server: str, owner: dict, title: str) -> str:
    """A session whose assistant has a person approve every tool call."""
    body = {"name": f"careful-{time.monotonic_ns()}", "tools": {"kit": ["shout"]}, "approval": {"policy": "always"}}
    assistant = httpx.post(f"{web_server}/api/assistants", json=body, headers=owner).json()
    made = httpx.post(
        f"{web_server}/api/sessions", json={"title": title, "assistant_id": assistant["id"]}, headers=owner
    )
    return made.json()["id"]


def test_the_approval_card_allows_edits_and_declines_each_call_of_a_step(page: Page, web_server, owner):
    page.goto(f"{web_server}/#{_approving_session(web_server, owner, 'approvals')}")
    _ask(page, " ".join(f'[[call=kit__shout {{"text": "{w}"}}]]' for w in ("one", "two", "three")))
    turn = _last_turn(page)
    expect(turn).to_have_attribute("data-status", "waiting", timeout=20_000)
    expect(turn.locator(".state")).to_have_text("Waiting for your approval…")
    cards = turn.locator(".approval")
    expect(cards).to_have_count(3)
    one, two, three = (cards.nth(i) for i in range(3))  # in the order the model called them
    for card, word in ((one, "one"), (two, "two"), (three, "three")):
        expect(card.locator("pre")).to_contain_text(f'"{word}"')
    expect(one.locator(".ask")).to_have_text("Allow kit › shout?")

    one.get_by_role("button", name="Run kit__shout this time").click()
    expect(one.locator(".outcome")).to_have_text("Allowed.")
    assert turn.get_attribute("data-status") == "waiting"  # two still to decide

    edit = two.get_by_role("button", name="Change the arguments of kit__shout before it runs")
    edit.click()
    two.locator("textarea").fill("{not json")
    edit.click()
    expect(two.locator(".outcome")).to_have_text("The arguments are not valid JSON.")
    two.locator("textarea").fill('{"text": "edited"}')
    edit.click()
    expect(two.locator(".outcome")).to_have_text("Allowed.")
    expect(two.locator("pre")).to_contain_text('"edited"')

    decline = three.get_by_role("button", name="Do not run kit__shout; the model is told")
    decline.click()
    three.locator("input.reason").fill("not that one")
    decline.click()
    expect(three.locator(".outcome")).to_have_text("Declined: not that one")

    expect(turn).to_have_attribute("data-status", "succeeded", timeout=20_000)
    answer = turn.locator(".msg.assistant")
    expect(answer).to_contain_text("kit__shout returned: ONE.")
    expect(answer).to_contain_text("kit__shout returned: EDITED.")
    expect(answer).to_contain_text("the person declined it: not that one")
    expect(turn.locator(".approval .choices:visible")).to_have_count(0)

    # "Always for this chat": the next call of that tool in this chat runs without a card
    _ask(page, '[[call=kit__shout {"text": "ask once"}]]')
    second = _last_turn(page)
    expect(second).to_have_attribute("data-status", "waiting", timeout=20_000)
    second.get_by_role("button", name="Run kit__shout without asking for the rest of this chat").click()
    expect(second).to_have_attribute("data-status", "succeeded", timeout=20_000)
    _ask(page, '[[call=kit__shout {"text": "never asked"}]]')
    third = _ended(page)
    expect(third.locator(".msg.assistant")).to_contain_text("kit__shout returned: NEVER ASKED.")
    expect(third.locator(".approval")).to_have_count(0)


def test_a_tab_not_looked_at_is_told_a_turn_waits_and_a_reload_draws_the_card(context, web_server, owner):
    context.grant_permissions(["notifications"])
    # A tab in the background, with the browser's notifications recorded.
    context.add_init_script(
        "Object.defineProperty(document, 'hidden', {get: () => true});"
        "window.shown = []; window.Notification = class { constructor(title, options) {"
        " window.shown.push(options.body); } static permission = 'granted';"
        " static requestPermission() { return Promise.resolve('granted'); } };"
    )
    session_id = _approving_session(web_server, owner, "background")
    page = _signed_in(context, f"{web_server}/#{session_id}", owner)
    _ask(page, '[[call=kit__shout {"text": "psst"}]]')
    turn = _last_turn(page)
    expect(turn).to_have_attribute("data-status", "waiting", timeout=20_000)
    page.wait_for_function("window.shown.length > 0")
    assert page.evaluate("window.shown") == ["A tool call waits for your approval."]
    expect(page.locator("#announce")).to_have_text("A tool call waits for your approval.")

    page.reload()  # the card comes back from the log, or from Postgres
    card = page.locator(".turn").last.locator(".approval")
    expect(card).to_have_count(1)
    card.get_by_role("button", name="Run kit__shout this time").click()
    expect(page.locator(".turn").last).to_have_attribute("data-status", "succeeded", timeout=20_000)


def test_a_turn_interrupted_stays_with_its_answer_and_one_rolled_back_leaves_the_page(page: Page, web_server, owner):
    _ask(page, "the first [[tokens=200]] [[delay=0.05]]")
    first = page.locator(".turn").nth(0)
    expect(first.locator(".msg.assistant")).to_contain_text("You said")  # streaming
    session_id = page.url.rsplit("#", 1)[1]
    sent = httpx.post(
        f"{web_server}/api/sessions/{session_id}/turns",
        json={"message": "instead, this", "multitask": "interrupt"},
        headers=owner,
    )
    assert sent.status_code == 202
    expect(first).to_have_attribute("data-status", "interrupted", timeout=10_000)
    expect(first.locator(".state .label")).to_have_text("Interrupted by a newer message.")
    kept = first.locator(".msg.assistant").text_content()
    assert kept.startswith("You said")
    second = page.locator(".turn").nth(1)
    expect(second).to_have_attribute("data-status", "succeeded", timeout=20_000)
    expect(second.locator(".msg.user")).to_have_text("instead, this")

    _ask(page, "a third [[tokens=200]] [[delay=0.05]]")
    third = page.locator(".turn").nth(2)
    expect(third.locator(".msg.assistant")).to_contain_text("You said")
    httpx.post(
        f"{web_server}/api/sessions/{session_id}/turns",
        json={"message": "start that over", "multitask": "rollback"},
        headers=owner,
    )
    expect(page.locator(".turn")).to_have_count(3)  # the third went, the fourth came
    expect(page.locator(".turn").nth(2).locator(".msg.user")).to_have_text("start that over")
    expect(page.locator(".turn").nth(2)).to_have_attribute("data-status", "succeeded", timeout=20_000)
    expect(page.locator(".turn").nth(2).locator(".msg.assistant")).to_contain_text(
        'Before that you said: "instead, this".'
    )
    assert first.locator(".msg.assistant").text_content() == kept


def test_the_queue_of_a_chat_cancels_a_question_and_sends_another_now(page: Page):
    _ask(page, "the first [[tokens=300]] [[delay=0.05]]")
    first = page.locator(".turn").nth(0)
    expect(first.locator(".msg.assistant")).to_contain_text("You said")
    _ask(page, "the second")
    _ask(page, "the third")
    second, third = page.locator(".turn").nth(1), page.locator(".turn").nth(2)
    expect(second.locator(".state .label")).to_have_text("Queued behind the turn before it…")
    second.get_by_role("button", name="Take this question out of the queue").click()
    expect(second).to_have_attribute("data-status", "cancelled")
    third.get_by_role("button", name=re.compile("^Send this question now")).click()
    turns = page.locator(".turn")
    expect(turns.nth(0)).to_have_attribute("data-status", "interrupted", timeout=10_000)
    expect(turns.nth(2).locator(".msg.user")).to_have_text("the third")
    expect(turns.nth(2)).to_have_attribute("data-status", "succeeded", timeout=20_000)
    # the question taken out of the queue is no part of the conversation the model reads
    expect(turns.nth(2).locator(".msg.assistant")).to_contain_text('Before that you said: "the first".')
    expect(turns).to_have_count(3)


def _csp_refusals(context: BrowserContext) -> list[str]:
    """What any page of `context` is refused by its content security policy,
    as the browser reports it (securitypolicyviolation) or logs it."""
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation', (e) =>"
        " console.error(`CSP refused: ${e.violatedDirective} ${e.blockedURI}`));"
    )
    refused: list[str] = []

    def heard(message) -> None:
        if message.type == "error" and ("CSP refused" in message.text or "Content Security Policy" in message.text):
            refused.append(message.text)

    context.on("console", heard)
    return refused


def _make_set(client, owner: dict, name: str, questions: list[dict]) -> dict:
    response = client.post("/api/sets", json={"name": name, "questions": questions}, headers=owner)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _counts(run) -> list[str]:
    return [run.locator(f"td.{name}").text_content() for name in ("total", "succeeded", "failed", "passed", "repeats")]


def test_the_evaluations_page_runs_a_set_and_opens_the_comparison_of_two_of_its_runs(
    context, web_server, owner, client
):
    refused = _csp_refusals(context)
    desk = _make_assistant(client, owner, "Refund desk", "Refunds take 30 days.")
    qset = _make_set(client, owner, "refunds", [REFUND, CALM])
    # The baseline: version 1, run through the API before the page is opened.
    made = client.post("/api/replays", json={"set_id": qset["id"], "assistant_id": desk["id"]}, headers=owner)
    assert made.status_code == 202, made.get_json()
    baseline = made.get_json()["id"]
    newer = {"name": "Refund desk", "instructions": "Refunds take a while."}
    assert client.put(f"/api/assistants/{desk['id']}", json=newer, headers=owner).status_code == 200

    page = _signed_in(context, f"{web_server}/evals", owner)
    page.locator("#sets a", has_text="refunds").click()
    expect(page.locator("#set-name")).to_have_text("refunds")
    expect(page.locator("#set-size")).to_have_text("2 questions")
    runs = page.locator("#run-rows tr")
    expect(runs).to_have_count(1)
    assert runs.first.get_attribute("data-run") == baseline

    # The candidate: run from the page, by the assistant's latest version
    # (v2); at the top of the list, followed until it finishes.
    page.get_by_label("Assistant").select_option(desk["id"])
    page.get_by_role("button", name="Run now").click()
    expect(runs).to_have_count(2)
    candidate = runs.first.get_attribute("data-run")
    assert candidate != baseline and runs.nth(1).get_attribute("data-run") == baseline  # newest first
    expect(runs.first.locator("td.status")).to_have_text("running")
    for run in (runs.first, runs.nth(1)):
        expect(run).to_have_attribute("data-status", "finished", timeout=60_000)
        expect(run.locator("td.status")).to_have_text("finished")
    expect(runs.first.locator("td.assistant")).to_have_text("Refund desk v2")
    expect(runs.nth(1).locator("td.assistant")).to_have_text("Refund desk v1")
    assert _counts(runs.nth(1)) == ["2", "2", "0", "2", "1"]  # both passed
    assert _counts(runs.first) == ["2", "2", "0", "1", "1"]  # refund failed

    # Picked with the pointer and with the keyboard; the links follow.
    links = page.locator("#compare a")
    assert [link.get_attribute("href") for link in links.all()] == [None, None, None]  # nothing to compare yet
    runs.nth(1).get_by_role("radio", name=re.compile("^Baseline")).check()
    runs.first.get_by_role("radio", name=re.compile("^Candidate")).focus()
    page.keyboard.press("Space")
    query = f"/api/comparisons?baseline={baseline}&candidate={candidate}"
    expect(page.get_by_role("link", name="Open comparison")).to_have_attribute("href", f"{query}&format=html")
    expect(page.get_by_role("link", name="JSON")).to_have_attribute("href", f"{query}&format=json")
    with page.expect_download() as download:
        page.get_by_role("link", name="CSV").click()
    with open(download.value.path(), newline="") as f:
        assert {row["key"]: row["change"] for row in csv.DictReader(f)} == {"refund": "regressed", "calm": "same"}

    with page.expect_popup() as opened:
        page.get_by_role("link", name="Open comparison").click()
    report = opened.value
    report.wait_for_load_state()
    regressed = report.locator("#questions tbody tr.regressed")
    expect(regressed).to_have_count(1)
    expect(regressed.locator("td").first).to_have_text("refund")
    others = report.locator("#questions tbody tr:not(.regressed)")
    expect(others).to_have_count(1)
    expect(others).to_be_visible()
    report.locator("#regressions-only").check()
    expect(others).to_be_hidden()
    expect(regressed).to_be_visible()
    for chart in ("#chart-latency", "#chart-tokens"):  # drawn by Plotly, its script allowed by the report's nonce
        expect(report.locator(f"{chart}.js-plotly-plot")).to_have_count(1)
        expect(report.locator(f"{chart} svg.main-svg").first).to_be_visible()
    assert refused == []


def test_the_evaluations_page_is_linked_both_ways_shows_names_as_text_and_turns_a_schedule_off(
    context, web_server, owner, client
):
    refused = _csp_refusals(context)
    name = '<img src=x onerror="window.pwned=1">'
    qset = _make_set(client, owner, name, [CALM])
    body = {"set_id": qset["id"], "cron": "30 6 * * 1", "timezone": "Europe/Paris"}
    made = client.post("/api/schedules", json=body, headers=owner)
    assert made.status_code == 201, made.get_json()
    schedule = made.get_json()

    page = _signed_in(context, web_server, owner)  # the chat page
    page.get_by_role("link", name="Evaluations").click()
    expect(page).to_have_url(f"{web_server}/evals")
    item = page.locator("#sets li")
    expect(item).to_have_count(1)
    expect(item.locator("a")).to_have_text(name)  # as typed, as text
    expect(item.locator(".size")).to_have_text("1 question")
    item.locator("a").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#set-name")).to_have_text(name)
    expect(page.locator("#no-runs")).to_be_visible()
    expect(page.locator("#compare-hint")).to_contain_text("Pick a finished run as the baseline")

    row = page.locator(f'#schedule-rows tr[data-schedule="{schedule["id"]}"]')
    expect(row.locator("td.cron")).to_have_text("30 6 * * 1")
    expect(row.locator("td.timezone")).to_have_text("Europe/Paris")
    expect(row.locator("td.assistant")).to_have_text("Default")
    expect(row.locator("td.next-run time")).to_have_attribute("datetime", schedule["next_run_at"])
    toggle = row.get_by_role("checkbox", name=re.compile("^Enabled"))
    expect(toggle).to_be_checked()
    toggle.focus()
    page.keyboard.press("Space")
    expect(row.locator("td.next-run")).to_have_text("—")  # a disabled schedule never runs
    expect(toggle).not_to_be_checked()
    expect(toggle).to_be_enabled()
    assert client.get(f"/api/schedules/{schedule['id']}", headers=owner).get_json()["enabled"] is False
    assert page.locator("img").count() == 0
    assert page.evaluate("window.pwned") is None

    # A login that ended: the page asks for a key again, then shows the set it was on.
    assert page.evaluate("fetch('/api/logout', {method: 'POST'}).then((r) => r.status)") == 200
    page.reload()
    expect(page.locator("#api-key")).to_be_focused()
    page.keyboard.type(owner["Authorization"].split()[1])
    page.keyboard.press("Enter")
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#set-name")).to_have_text(name)
    expect(page.locator("#schedule-rows tr")).to_have_count(1)

    page.get_by_role("link", name="Chats").click()
    expect(page).to_have_url(f"{web_server}/")
    expect(page.locator("#message")).to_be_visible()
    assert refused == []


# ---- branches: versions of a question, sharing and exporting the path shown ----


def _turn_ids(page: Page) -> list[str]:
    return page.locator(".turn").evaluate_all("turns => turns.map((t) => t.dataset.turn)")


def _versions(turn):
    """A turn's "‹ 2 / 3 ›": its group of controls."""
    return turn.get_by_role("group", name="Versions of this question")


def _said(last: str, before: str | None, n: int) -> str:
    """The offline model's answer to `last` with this history."""
    earlier = f' Before that you said: "{before}".' if before else ""
    return f'You said: "{last}".{earlier} This is message {n} of our conversation.'


def test_a_regenerated_answer_is_a_second_version_the_arrows_step_between_and_a_reload_keeps(
    page: Page, context: BrowserContext
):
    refused = _csp_refusals(context)
    _ask(page, "hello")
    _ended(page)
    # The first request of this conversation fails (a 400 is not retried), a second succeeds.
    question = f"a second question {time.monotonic_ns()} [[faults=400]]"
    _ask(page, question)
    failed = _ended(page, "failed")
    first_id = failed.get_attribute("data-turn")
    expect(_versions(failed)).to_be_hidden()  # one version: no arrows

    failed.get_by_role("button", name=re.compile("^Retry")).click()
    expect(page.locator(f'.turn[data-turn="{first_id}"]')).to_have_count(0)  # replaced, not added to
    expect(page.locator(".turn")).to_have_count(2)
    again = _ended(page)
    second_id = again.get_attribute("data-turn")
    assert second_id != first_id
    expect(again.locator(".msg.user")).to_have_text(question)
    expect(again.locator(".msg.assistant")).to_have_text(_said(question.split(" [[")[0], "hello", 2))
    expect(_versions(again).locator(".count")).to_have_text("2 / 2")
    expect(again.get_by_role("button", name="Next version")).to_be_disabled()

    # Back to the first version with the keyboard; the focus stays on the arrows.
    again.get_by_role("button", name="Previous version").focus()
    page.keyboard.press("Enter")
    shown = page.locator(".turn").last
    expect(shown).to_have_attribute("data-turn", first_id)
    expect(page.locator(".turn")).to_have_count(2)
    expect(_versions(shown).locator(".count")).to_have_text("1 / 2")
    expect(shown).to_have_attribute("data-status", "failed")
    expect(shown.locator(".state .label")).to_contain_text("Failed: ")
    expect(shown.get_by_role("button", name="Next version")).to_be_focused()  # Previous is disabled at 1

    page.reload()  # the branch chosen is the server's: a reload shows it
    expect(page.locator(".turn")).to_have_count(2)
    shown = page.locator(".turn").last
    expect(shown).to_have_attribute("data-turn", first_id)
    expect(_versions(shown).locator(".count")).to_have_text("1 / 2")
    shown.get_by_role("button", name="Next version").click()
    expect(page.locator(".turn").last).to_have_attribute("data-turn", second_id)
    expect(page.locator(".turn").last.locator(".msg.assistant")).to_contain_text("You said")
    assert refused == []


def test_an_edited_question_drops_the_later_turns_from_view_and_is_answered_with_its_path_only(page: Page):
    for question in ("alpha", "beta", "gamma"):
        _ask(page, question)
        _ended(page)
    old = _turn_ids(page)
    beta = page.locator(".turn").nth(1)

    # Escape leaves a question as it was.
    first = page.locator(".turn").first
    first.get_by_role("button", name="Edit this question").click()
    editor = first.get_by_role("textbox", name=re.compile("^Your question, edited"))
    expect(editor).to_be_focused()
    expect(editor).to_have_value("alpha")
    page.keyboard.type(" and more")
    page.keyboard.press("Escape")
    expect(editor).to_have_count(0)
    expect(first.locator(".msg.user")).to_have_text("alpha")
    expect(first.get_by_role("button", name="Edit this question")).to_be_focused()
    expect(page.locator(".turn")).to_have_count(3)

    beta.get_by_role("button", name="Edit this question").click()
    editor = beta.get_by_role("textbox", name=re.compile("^Your question, edited"))
    editor.fill("beta, asked again")
    editor.press("Enter")
    expect(page.locator(".turn")).to_have_count(2)  # gamma stays on the old version, out of view
    edited = page.locator(f'.turn[data-turn="{_ended(page).get_attribute("data-turn")}"]')
    assert edited.get_attribute("data-turn") not in old
    expect(edited.locator(".msg.user")).to_have_text("beta, asked again")
    # the model was sent this path only: alpha, then the edited question (message 2, no gamma)
    expect(edited.locator(".msg.assistant")).to_have_text(_said("beta, asked again", "alpha", 2))
    expect(_versions(edited).locator(".count")).to_have_text("2 / 2")
    expect(page.locator(".turn").first).to_have_attribute("data-turn", old[0])
    expect(_versions(page.locator(".turn").first)).to_be_hidden()

    # A new message continues the path shown.
    _ask(page, "delta")
    expect(_ended(page).locator(".msg.assistant")).to_have_text(_said("delta", "beta, asked again", 3))

    # The arrows on the question switch between the two questions' lines.
    edited.get_by_role("button", name="Previous version").click()
    expect(page.locator(".turn").nth(1).locator(".msg.user")).to_have_text("beta")
    assert _turn_ids(page) == old  # the same three turns as before (delta is on the other line)
    expect(_versions(page.locator(".turn").nth(1)).locator(".count")).to_have_text("1 / 2")
    expect(page.locator(".turn").nth(2).locator(".msg.assistant")).to_have_text(_said("gamma", "beta", 3))
    page.locator(".turn").nth(1).get_by_role("button", name="Next version").click()
    expect(page.locator(".turn")).to_have_count(3)
    expect(page.locator(".turn").nth(1).locator(".msg.user")).to_have_text("beta, asked again")
    expect(page.locator(".turn").nth(2).locator(".msg.user")).to_have_text("delta")  # its newest line


def test_a_second_tab_follows_a_version_chosen_or_made_in_the_first_or_elsewhere(context, web_server, owner):
    first = _signed_in(context, web_server, owner)
    _ask(first, "one")
    _ended(first)
    original = first.locator(".turn").last.get_attribute("data-turn")
    second = context.new_page()
    second.goto(first.url)
    expect(second.locator(".turn")).to_have_count(1)

    # A regeneration in the first tab: the second shows the new version, in
    # the turn's place, streamed (its stream carries every branch's turns).
    first.locator(".turn").last.get_by_role("button", name=re.compile("^Regenerate")).click()
    made = _ended(first).get_attribute("data-turn")
    expect(second.locator(".turn")).to_have_count(1)
    expect(second.locator(".turn")).to_have_attribute("data-turn", made)
    expect(second.locator(".turn")).to_have_attribute("data-status", "succeeded", timeout=20_000)
    expect(_versions(second.locator(".turn")).locator(".count")).to_have_text("2 / 2")
    expect(second.locator(".turn .msg.assistant")).to_have_text(_said("one", None, 1))

    # A switch in the first tab: the second follows at once.
    first.locator(".turn").get_by_role("button", name="Previous version").click()
    expect(first.locator(".turn")).to_have_attribute("data-turn", original)
    expect(second.locator(".turn")).to_have_attribute("data-turn", original)
    expect(_versions(second.locator(".turn")).locator(".count")).to_have_text("1 / 2")
    expect(second.locator(".turn")).to_have_count(1)

    # A version made elsewhere (another device: only the session's stream
    # tells these tabs) is shown in the turn's place, not after it.
    session_id = first.url.rsplit("#", 1)[1]
    third = httpx.post(f"{web_server}/api/turns/{original}/regenerate", json={}, headers=owner)
    assert third.status_code == 202, third.text
    for tab in (first, second):
        expect(tab.locator(".turn")).to_have_attribute("data-turn", third.json()["id"])
        expect(tab.locator(".turn")).to_have_attribute("data-status", "succeeded", timeout=20_000)
        expect(_versions(tab.locator(".turn")).locator(".count")).to_have_text("3 / 3")
        expect(tab.locator(".turn")).to_have_count(1)
    listed = httpx.get(f"{web_server}/api/sessions/{session_id}/turns", headers=owner).json()["items"]
    assert [t["id"] for t in listed] == [third.json()["id"]]


def test_a_share_link_shows_the_path_without_tool_calls_to_anyone_until_revoked(
    browser: Browser, context: BrowserContext, page: Page, client, owner
):
    refused = _csp_refusals(context)
    _ask(page, "list tables")  # the offline model calls the SQL tool
    expect(_ended(page).locator(".tool")).to_have_count(1)
    _ask(page, "beta")
    _ended(page)
    page.locator(".turn").last.get_by_role("button", name="Edit this question").click()
    page.keyboard.press("Control+A")
    page.keyboard.type("beta, edited")
    page.keyboard.press("Enter")
    expect(page.locator(".turn").last.locator(".msg.user")).to_have_text("beta, edited")
    _ended(page)
    session_id = page.url.rsplit("#", 1)[1]
    path = client.get(f"/api/sessions/{session_id}/turns", headers=owner).get_json()["items"]
    assert [t["message"] for t in path] == ["list tables", "beta, edited"]

    page.get_by_role("button", name="Share…").click()
    dialog = page.get_by_role("dialog", name="Share this chat")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#no-shares")).to_be_visible()
    tools = dialog.get_by_role("checkbox", name="Include tool calls")
    expect(tools).not_to_be_checked()  # off unless chosen
    dialog.get_by_role("button", name="Create link").click()
    link = dialog.get_by_role("textbox", name="The new link")
    expect(link).to_be_focused()
    url = link.input_value()
    assert url.startswith(page.url.split("#")[0].rstrip("/") + "/shared/"), url
    expect(dialog.locator("#shares li")).to_have_count(1)
    expect(dialog.locator("#shares li")).to_contain_text("without tool calls")

    anyone = browser.new_context()  # no key, no login
    try:
        shared = anyone.new_page()
        assert shared.goto(url).status == 200
        expect(shared.locator(".message.user .content")).to_have_text(["list tables", "beta, edited"])
        assert shared.locator(".message.assistant .content").all_text_contents() == [t["answer"] for t in path]
        expect(shared.locator(".tool")).to_have_count(0)  # made without tool calls

        dialog.get_by_role("button", name=re.compile("^Revoke the link made")).click()
        expect(dialog.locator("#shares li")).to_have_count(0)
        expect(dialog.locator("#no-shares")).to_be_visible()
        expect(link).to_be_hidden()
        assert shared.goto(url).status == 404
    finally:
        anyone.close()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert refused == []


def test_the_export_links_download_the_tree_with_the_path_shown_and_its_markdown(page: Page):
    for question in ("alpha", "beta"):
        _ask(page, question)
        _ended(page)
    beta = page.locator(".turn").last
    beta.get_by_role("button", name="Edit this question").click()
    beta.get_by_role("textbox", name=re.compile("^Your question, edited")).fill("beta, edited")
    beta.get_by_role("button", name="Send").click()
    expect(page.locator(".turn").last.locator(".msg.user")).to_have_text("beta, edited")
    _ended(page)
    page.locator(".turn").last.get_by_role("button", name="Previous version").click()  # back to "beta"
    expect(page.locator(".turn").last.locator(".msg.user")).to_have_text("beta")
    shown = _turn_ids(page)

    with page.expect_download() as download:
        page.get_by_role("link", name="JSON").click()
    assert download.value.suggested_filename.endswith(".json")
    with open(download.value.path()) as f:
        data = json.load(f)
    assert data["active_path"] == shown
    assert sorted(t["question"] for t in data["turns"]) == ["alpha", "beta", "beta, edited"]  # the whole tree

    with page.expect_download() as download:
        page.get_by_role("link", name="Markdown").click()
    assert download.value.suggested_filename.endswith(".md")
    with open(download.value.path()) as f:
        text = f.read()
    assert "**You:**\n\nalpha\n" in text and "**You:**\n\nbeta\n" in text
    assert "beta, edited" not in text  # another version, not the path shown
