"""The chat page in a real browser: Debian's Chromium driven by Playwright,
against the real stack (gunicorn, the worker, the offline model), with
authentication on."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's package (deploy/setup.sh): no browser download
HOSTILE = (
    '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
    "[click](javascript:window.pwned=3) ![remote](https://remote.example/x.png)"
)


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, web_server: str, owner: dict) -> Page:
    """The chat page, signed in with the owner's key."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(web_server)
    page.locator("#api-key").fill(owner["Authorization"].split()[1])
    page.locator("#login button").click()
    page.locator("#login").wait_for(state="hidden")
    yield page
    context.close()


def _ask(page: Page, text: str) -> None:
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")


def test_the_answer_appears_progressively_and_renders_markdown(page: Page):
    _ask(page, "**bold** and `code` [[tokens=40]] [[delay=0.03]]")
    answer = page.locator(".msg.assistant").last
    lengths = []
    deadline = time.monotonic() + 20
    while page.locator("#status").text_content() != "" or not lengths:
        lengths.append(len(answer.text_content() or ""))
        assert time.monotonic() < deadline, lengths
        time.sleep(0.05)
    assert len({n for n in lengths if n}) >= 3, lengths  # seen growing, not only whole
    assert answer.locator("strong").text_content() == "bold"
    assert answer.locator("code").text_content() == "code"
    assert page.locator(".msg.user").last.text_content().startswith("**bold**")  # people's text stays text


def test_stop_cancels_the_turn_and_the_page_says_so_within_a_second(page: Page):
    _ask(page, "a long answer [[tokens=400]] [[delay=0.05]]")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_contain_text("You said")  # streaming
    clicked = time.monotonic()
    page.locator("#stop").click()
    expect(page.locator("#status")).to_have_text("cancelled", timeout=5_000)
    assert time.monotonic() - clicked < 1.0
    assert page.locator("#stop").is_hidden()
    shown = answer.text_content()
    page.wait_for_timeout(500)
    assert answer.text_content() == shown  # nothing more comes
    assert len(shown) < 400 * 4  # stopped well before its end


def test_hostile_text_runs_no_script_and_loads_nothing_remote(page: Page):
    remote = []
    page.on("request", lambda request: remote.append(request.url) if "remote.example" in request.url else None)
    _ask(page, HOSTILE)
    answer = page.locator(".msg.assistant").last
    answer.locator("a").first.wait_for(timeout=20_000)
    expect(page.locator("#status")).to_have_text("", timeout=20_000)
    assert page.locator(".msg.user").last.text_content() == HOSTILE  # as typed, as text
    assert answer.locator("script").count() == 0
    assert answer.locator("[onerror]").count() == 0
    href = answer.locator("a").first.get_attribute("href")
    assert href is None or not href.startswith("javascript:")
    answer.locator("a").first.click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert remote == []
