"""The status page in a real headless Chromium against the agent on emulated devices."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Error as PlaywrightError

from agent.control.view import render_text
from tests.broker import Mosquitto
from tests.harness import running_agent
from tests.web import SENSORS, chromium, http_get, page_config

pytestmark = pytest.mark.slow


async def until_page(page: Any, js: str, arg: Any, ok: Callable[[Any], bool], what: str,
                     timeout_s: float = 30.0) -> None:
    """Poll ``js`` in the page until ``ok`` of its value (the page's CSP forbids the eval
    that Playwright's wait_for_function needs)."""
    deadline = time.monotonic() + timeout_s
    while not ok(await page.evaluate(js, arg)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)

BOUND_S = 30_000  # ms, Playwright's unit: a bound on every wait, never a sleep

POINTS = """(ch) => {
  const line = document.querySelector(`[data-channel="${ch}"] svg polyline`);
  return line ? line.getAttribute("points").split(" ").length : 0;
}"""


async def test_every_sensor_live_with_a_sparkline_and_the_panels(
        tmp_path: Path, broker: Mosquitto) -> None:
    async with running_agent(page_config(tmp_path, broker.port)) as agent, \
            chromium(tmp_path) as browser:
        assert agent.web is not None
        base = f"http://127.0.0.1:{agent.web.port}"
        page = await browser.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        response = await page.goto(base + "/")
        assert response is not None and response.status == 200

        for s in SENSORS:
            card = f'[data-sensor="{s["name"]}"]'
            await page.wait_for_selector(f"{card} .badge.up", timeout=BOUND_S)
            # attached: a constant series is a flat line, which has no height to be "visible"
            await page.wait_for_selector(f"{card} svg.spark polyline", state="attached",
                                         timeout=BOUND_S)
            values = await page.locator(f"{card} .value").all_inner_texts()
            assert values and all(v and v != "\u2013" for v in values), (s["name"], values)

        # Live: the sparkline of each sensor grows from server-sent events, without a reload.
        for ch in ("env.temperature", "lights.voltage", "air.pm2_5"):
            before = await page.evaluate(POINTS, ch)
            await until_page(page, POINTS, ch, lambda n, b=before: n > b, f"{ch} to grow")
        assert await page.locator("#live").inner_text() == "live"

        await page.wait_for_selector('[data-model="energy"] tr.output svg', state="attached",
                                     timeout=BOUND_S)
        assert "energy" in await page.locator("#models-panel").inner_text()
        # The forecast is drawn against the actual value of each window.
        await page.wait_for_selector(
            '[data-model="energy"] tr.forecast svg polyline.actual', state="attached",
            timeout=BOUND_S)
        assert "power_next_w vs actual" in await page.locator(
            '[data-model="energy"] tr.forecast').inner_text()
        rows = await page.locator("#outbox-rows").inner_text()
        assert rows.replace(".", "").isdigit()
        assert await page.locator("#uplink-state").inner_text() == "connected"
        await page.wait_for_selector("#windows table", timeout=BOUND_S)

        shot = tmp_path / "status-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("EDGE_AGENT_SCREENSHOT"):  # refresh the README's picture
            shutil.copy(shot, os.environ["EDGE_AGENT_SCREENSHOT"])

        # Everything came from the agent itself: no CDN, no font service, nothing else.
        assert requested and all(u.startswith(base + "/") for u in requested), requested
        assert agent.web.watchers == 1
        line = next(ln for ln in render_text(agent.snapshot()).splitlines()
                    if ln.startswith("web "))
        assert f"page + metrics on http://127.0.0.1:{agent.web.port}/, 1 watching" in line
        await page.close()


async def test_off_loopback_the_page_needs_the_token(tmp_path: Path, broker: Mosquitto) -> None:
    token = "s3cret-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    cfg = page_config(tmp_path, broker.port, bind="0.0.0.0",
                      token_file=str(tmp_path / "token"))
    async with running_agent(cfg) as agent:
        assert agent.web is not None
        port = agent.web.port
        url = f"http://127.0.0.1:{port}/"
        async with chromium(tmp_path / "a") as browser:
            page = await browser.new_page()
            statuses: list[int] = []
            page.on("response", lambda r: statuses.append(r.status))
            # Headless Chromium has nobody to ask for a password: it cancels the navigation.
            with contextlib.suppress(PlaywrightError):
                await page.goto(url)
            assert statuses == [401]
            assert await page.locator("[data-sensor]").count() == 0
        async with chromium(tmp_path / "b", http_credentials={
                "username": "technician", "password": token}) as browser:
            page = await browser.new_page()
            response = await page.goto(url)
            assert response is not None and response.status == 200
            await page.wait_for_selector('[data-sensor="env"] .badge.up', timeout=BOUND_S)
            await until_page(page, "() => document.querySelector('#live').textContent", None,
                             lambda text: text == "live", "the live badge")
        for path in ("/", "/events", "/api/status", "/metrics", "/static/app.js"):
            status, headers, _ = await http_get(port, path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith("Basic")
        status, _, _ = await http_get(port, "/metrics",
                                      {"Authorization": "Bearer wrong-token-0123456789"})
        assert status == 401
        status, _, body = await http_get(port, "/metrics", {"Authorization": f"Bearer {token}"})
        assert status == 200 and b"edge_agent_sensor_up" in body
        web = agent.snapshot()["web"]
        assert web["token"] is True and web["unauthorized"] >= 7
