"""Helpers for the web tests: an agent config on emulated devices with the page on, a headless
Chromium (Debian's, driven by Playwright; never a downloaded browser), a raw HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.harness import make_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No sync, no component updates, no QUIC probes, no first-run pings: the browser talks to the
# agent on loopback and to nothing else.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]

SENSORS = [
    {"name": "env", "driver": "bme280", "bus": "emulated", "address": 0x76, "period_s": 0.5},
    {"name": "lights", "driver": "pzem004t", "port": "emulated", "address": 1,
     "period_s": 0.5, "options": {"emulator": {"profile": "street_lighting"}}},
    {"name": "air", "driver": "pms5003", "port": "emulated", "period_s": 1.0},
]


def page_config(tmp: Path, mqtt_port: int, **web: Any) -> dict[str, Any]:
    return make_config(
        tmp, mqtt_port, sensors=SENSORS,
        streams=[{"name": "energy", "sensors": ["lights"], "window_s": 2},
                 {"name": "environment", "sensors": ["env", "air"], "window_s": 2}],
        models=[{"name": "energy", "stream": "energy"}],
        web={"page": True, "metrics": True, "port": 0, **web})


@contextlib.asynccontextmanager
async def chromium(tmp: Path, **context: Any) -> AsyncIterator[Any]:
    """A fresh browser context (own user-data dir) of the system Chromium."""
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
            headless=True, viewport={"width": 1280, "height": 1000}, **context)
        try:
            yield browser
        finally:
            await browser.close()


async def http_get(port: int, path: str, headers: dict[str, str] | None = None,
                   raw: bytes | None = None, host: str = "127.0.0.1",
                   timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request (or ``raw`` bytes as the request); (status, headers, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        if raw is None:
            lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}",
                     *(f"{k}: {v}" for k, v in (headers or {}).items())]
            raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip() for k, _, v in
              (h.partition(":") for h in header_lines)}
    return int(status_line.split(" ")[1]), parsed, body
