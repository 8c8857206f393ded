"""The web page in a real headless Chromium: load it, submit a prompt, watch tokens arrive,
open a token's output distribution. Runs wherever a Chromium is installed; in CI it must run
(scripts/test.sh installs Debian's `chromium` there), so it fails rather than skips."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.inference.serving import serving, train_run


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


def test_page_streams_tokens_and_shows_distributions(browser_path: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    run_dir = train_run(tmp_path)
    with serving(run_dir) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.base + "/")
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
        finally:
            browser.close()
