"""The /admin/ page in a real headless Chromium (Debian's ``chromium``, driven by Playwright
with its executable path: no browser download). llmd runs as `llmd serve` in a child process,
its replica a supervised fake llama-server, so the test can kill the replica and watch the
page follow it live (READY -> BACKOFF -> READY) over /admin/events.

Screenshots go to $LLMD_TEST_ARTIFACTS (default tests/artifacts/, git-ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.conftest import LlmdProc, base_config, llmd_process, write_config
from tests.fakeproc import FAKE_LLAMA, free_port
from tests.test_admin import ADMIN, ALICE, BOB, SEEDED, TIERS, keys_section, seed

CHROMIUM = os.environ.get("LLMD_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LLMD_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
RESTART_DELAY_S = 4.0  # long enough for the page to show BACKOFF before the restart, even on a busy CI


def config(tmp_path: Path, port: int = 0) -> Path:
    launchers = {"llama-server": {
        "command": [sys.executable, str(FAKE_LLAMA)], "start_timeout_s": 15, "stop_timeout_s": 2,
        "health_interval_s": 0.2, "health_failures": 2, "restart_delay_s": RESTART_DELAY_S,
        "restart_max_delay_s": RESTART_DELAY_S,
    }}  # fmt: skip
    # One slot and slow tokens: a few requests at once make a queue the page can show.
    model = {"backend": "llama-server", "model": str(tmp_path / "fake.gguf"),
             "args": ["-np", "1", "--load-delay-s", "0.1", "--token-delay-ms", "100"]}  # fmt: skip
    doc = base_config(tmp_path, {"m": model}, keys=keys_section(), tiers=TIERS, launchers=launchers,
                      routing={"queue_timeout_s": 60})
    doc["server"]["port"] = port
    return write_config(tmp_path / "config.yaml", doc)


@pytest.fixture
async def llmd(tmp_path: Path) -> AsyncIterator[LlmdProc]:
    await seed(tmp_path / "usage.sqlite3", SEEDED)
    async with llmd_process(config(tmp_path)) as proc:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                async with http.get(proc.url + "/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
        yield proc
        # Whatever the test did, the key never reached llmd's log (access log included).
        for line in proc.lines:
            assert ADMIN not in line and ALICE not in line and BOB not in line


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM}: install Debian's chromium (apt-get install chromium)"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


class Watched:
    """A page, every URL it asked for and every console error it raised."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda req: self.urls.append(req.url))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))


@contextlib.asynccontextmanager
async def opened(browser: Browser, llmd: LlmdProc) -> AsyncIterator[Watched]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page = await ctx.new_page()
    w = Watched(page)
    await page.goto(llmd.url + "/admin/")
    try:
        yield w
    finally:
        for secret in (ADMIN, ALICE, BOB):
            assert not any(secret in u for u in w.urls), "a key in a URL"
            assert secret not in await page.content(), "a key in the page's HTML"
        await ctx.close()


async def sign_in(page: Page, secret: str) -> None:
    await page.fill("#key", secret)
    await page.click("#login-form button[type=submit]")


def shot(name: str) -> dict[str, Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return {"path": str(ARTIFACTS / name), "full_page": True}


async def test_non_admin_key_is_refused(browser: Browser, llmd: LlmdProc) -> None:
    async with opened(browser, llmd) as w:
        page = w.page
        await sign_in(page, ALICE)
        await expect(page.locator("#login-error")).to_have_text("Refused: This route needs an admin key.")
        await expect(page.locator("#tabs")).to_be_hidden()
        await expect(page.locator("#usage")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0
        await page.screenshot(**shot("admin-refused.png"))
        await sign_in(page, "sk-not-a-key")
        await expect(page.locator("#login-error")).to_have_text("Refused: Incorrect API key provided.")
        assert await page.locator("#usage-table tbody tr").count() == 0
    # Every admin route the page would call answered 401/403: nothing reached the page.
    assert [u for u in w.urls if "/admin/usage" in u or "/admin/keys" in u or "/admin/events" in u] == []


async def test_usage_chart_totals_filters_and_csv(browser: Browser, llmd: LlmdProc) -> None:
    async with opened(browser, llmd) as w:
        page = w.page
        await sign_in(page, ADMIN)
        # The seeded ledger: 222 tokens in 5 requests, 1 failed (tests/test_admin.py SEEDED).
        await expect(page.locator("#total-tokens")).to_have_text("222")
        await expect(page.locator("#total-requests")).to_have_text("5")
        await expect(page.locator("#total-errors")).to_have_text("1")
        assert await page.locator("#usage-table tbody tr").count() == 3
        # Bars: by key, day 1 is alice's only (175 + 33), day 2 bob's (14): one bar each.
        titles = await page.locator("#chart-key rect title").all_text_contents()
        assert sorted(t.split(" ", 1)[1] for t in titles) == ["alice: 208 tokens", "bob: 14 tokens"]
        titles = await page.locator("#chart-model rect title").all_text_contents()
        assert sorted(t.split(" ", 1)[1] for t in titles) == ["m: 14 tokens", "m: 175 tokens", "other: 33 tokens"]
        await expect(page.locator("#live")).to_have_text("live")
        await page.screenshot(**shot("admin-usage.png"))
        await page.select_option("#f-tier", "free")
        await expect(page.locator("#total-tokens")).to_have_text("14")
        await page.select_option("#f-tier", "")
        await page.select_option("#f-model", "other")
        await expect(page.locator("#total-tokens")).to_have_text("33")
        await page.select_option("#f-model", "")
        async with page.expect_download() as dl:
            await page.click("#csv")
        table = list(csv.DictReader(io.StringIO(Path(await (await dl.value).path()).read_text())))
        assert sum(int(r["total_tokens"]) for r in table) == 222 and len(table) == 3
        # Keys: ids and tiers, never a hash; a new key's YAML as `llmd keys new` prints it.
        await page.click("#tabs button[data-tab=keys]")
        await expect(page.locator("#key-table tbody tr")).to_have_count(4)
        assert "revoked" in await page.locator("#key-table tbody tr").nth(3).inner_text()
        await page.fill("#new-id", "carol")
        await page.select_option("#new-tier", "team")
        await page.click("#new-key-form button[type=submit]")
        await expect(page.locator("#new-yaml")).to_contain_text("- id: carol\n    tier: team\n    sha256: ")
        await page.screenshot(**shot("admin-keys.png"))
        # Signing out forgets the key.
        await page.click("#logout")
        await expect(page.locator("#login")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0
    assert w.errors == []


async def _chat(url: str, secret: str) -> int:
    body = {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        await r.read()
        return r.status


async def test_replica_goes_backoff_and_back_live(browser: Browser, llmd: LlmdProc) -> None:
    async with opened(browser, llmd) as w:
        page = w.page
        await sign_in(page, ADMIN)
        # Queues: four requests on one slot (2 s each); the others wait, and the page shows them live.
        chats = [asyncio.create_task(_chat(llmd.url, s)) for s in (ALICE, ALICE, BOB, ADMIN)]
        await page.click("#tabs button[data-tab=queues]")
        queue_row = page.locator("#queue-table tbody tr").first
        await expect(queue_row.locator("td").nth(1)).to_have_text(re.compile(r"^[1-3] / 256$"))
        await expect(queue_row.locator("td").nth(4)).to_have_text("1 / 1")
        await page.screenshot(**shot("admin-queues.png"))
        assert await asyncio.gather(*chats) == [200, 200, 200, 200]
        alice = page.locator("#limit-table tbody tr", has_text="alice")
        await expect(alice.locator("td").nth(3)).to_contain_text("58 of 60 left")
        # Replicas: kill the one child; the page follows the supervisor over /admin/events.
        await page.click("#tabs button[data-tab=replicas]")
        row = page.locator("#replica-table tbody tr[data-replica='m/0']")
        state = row.locator("td").nth(2)
        await expect(state).to_have_text("ready")
        pid = int(await row.locator("td").nth(3).inner_text())
        await page.screenshot(**shot("admin-replicas.png"))
        os.kill(pid, signal.SIGKILL)
        await expect(state).to_have_text("backoff", timeout=10000)
        await page.screenshot(**shot("admin-replicas-backoff.png"))
        await expect(state).to_have_text("ready", timeout=15000)
        assert int(await row.locator("td").nth(3).inner_text()) != pid
        await expect(row.locator("td").nth(9)).to_have_text("1")  # restarts
        await expect(page.locator("#live")).to_have_text("live")
    assert w.errors == []


async def test_events_reconnect_after_llmd_restarts(browser: Browser, tmp_path: Path) -> None:
    """SIGTERM ends the event stream at once (the drain does not wait for it); the page says
    so and reconnects by itself to the next llmd on the same port, without a reload."""
    port = free_port()
    path = config(tmp_path, port)
    async with llmd_process(path) as first:
        ctx = await browser.new_context(viewport={"width": 1280, "height": 860})
        page = await ctx.new_page()
        await page.goto(first.url + "/admin/")
        await sign_in(page, ADMIN)
        await page.click("#tabs button[data-tab=replicas]")
        state = page.locator("#replica-table tbody tr[data-replica='m/0'] td").nth(2)
        await expect(state).to_have_text("ready")
        first.proc.send_signal(signal.SIGTERM)
        await expect(page.locator("#live")).to_have_text("reconnecting")
        assert await asyncio.wait_for(first.proc.wait(), 10) == 0
    async with llmd_process(path) as second:
        await expect(page.locator("#live")).to_have_text("live", timeout=15000)
        await expect(state).to_have_text("ready", timeout=15000)
        assert second.port == port
    await ctx.close()
