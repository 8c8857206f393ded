"""The web page in a real headless Chromium: load it, submit a prompt, watch tokens arrive,
open a token's output distribution. Runs wherever a Chromium is installed; in CI it must run
(scripts/test.sh installs Debian's `chromium` there), so it fails rather than skips."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.inference.serving import Server, serving


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = _chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium in CI: scripts/test.sh should have installed it")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    return path


@contextlib.contextmanager
def _page(browser_path: str, run_dir: Path) -> Iterator[tuple[Server, Any]]:
    """`minigpt serve` on run_dir and a headless Chromium page on it, both stopped after."""
    from playwright.sync_api import sync_playwright

    with serving(run_dir) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.base + "/")
            yield server, page
        finally:
            browser.close()


def test_page_streams_tokens_and_shows_distributions(browser_path: str, served_run: Path,
                                                    tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with _page(browser_path, served_run) as (_, page):
        expect(page.locator("#model")).to_contain_text("tiny")
        page.fill("#prompt", "ROMEO:")
        page.fill("#max_tokens", "40")
        page.fill("#temperature", "0")
        page.click("#generate")
        tokens = page.locator("#output .tok")
        expect(tokens.first).to_be_visible(timeout=20_000)
        page.wait_for_function("document.body.dataset.done === '1'", timeout=30_000)
        n = tokens.count()
        assert n >= 10, n
        assert page.locator("#count").inner_text() == str(n)
        assert page.locator("#ttft").inner_text().endswith(" ms")
        assert page.locator("#tps").inner_text().endswith("tok/s")
        assert page.locator("#finish").inner_text() in ("length", "stop")
        text = page.locator("#output").inner_text()
        assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
        tokens.nth(3).click()
        bars = page.locator("#dist .bar")
        expect(bars.first).to_be_visible()
        assert bars.count() == 8  # the page asks for the top 8 at every step
        # Greedy: the chosen token is the top candidate, highlighted, with its probability.
        assert "chosen" in (bars.first.get_attribute("class") or "")
        assert bars.first.inner_text().strip().endswith("%")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_page_chats_with_a_run_that_has_a_template(browser_path: str, chat_run: Path) -> None:
    """A chat run: the page sends the conversation to /v1/chat/completions, shows each turn,
    and answers a second message with the first one in the history."""
    from playwright.sync_api import expect

    with _page(browser_path, chat_run) as (server, page):
        expect(page.locator("#model")).to_contain_text("chat")
        page.fill("#temperature", "0")
        for n, word in enumerate(("ab", "hi"), 1):  # both turns fit the 32-token context
            page.evaluate("document.body.dataset.done = ''")
            page.fill("#prompt", f"reverse {word}")
            page.click("#generate")
            page.wait_for_function("document.body.dataset.done === '1'", timeout=30_000)
            replies = page.locator("#output .assistant")
            assert replies.count() == n
            assert page.locator("#finish").inner_text() == "stop"
        first, second = (replies.nth(i).inner_text() for i in range(2))
        assert first == "ba"  # the run learned the task
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
        history = [{"role": "user", "content": "reverse ab"},
                   {"role": "assistant", "content": first},
                   {"role": "user", "content": "reverse hi"}]
        again = client.chat.completions.create(model="run", messages=history,
                                               temperature=0, max_tokens=200)
        assert second == again.choices[0].message.content  # the page sent the history
        assert page.locator("#output .user").nth(0).inner_text() == "reverse ab"
        assert page.locator("#prompt").input_value() == ""
        page.locator("#output .assistant .tok").first.click()
        expect(page.locator("#dist .bar").first).to_be_visible()
