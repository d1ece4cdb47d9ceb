"""Debian's Prometheus server on a loopback port, scraping given targets, storage in a temp
directory; nothing remote (no remote write/read, no alertmanager), nothing else listening."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.broker import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@contextlib.contextmanager
def prometheus(workdir: Path, targets: list[str], *, scrape_ms: int = 1000,
               headers_file: Path | None = None) -> Iterator[str]:
    """Run Prometheus scraping ``targets`` (host:port); yield its base URL."""
    if not Path(PROMETHEUS).exists():
        raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    auth = (f"    authorization:\n      credentials_file: {headers_file}\n"
            if headers_file else "")
    conf = workdir / "prometheus.yml"
    conf.write_text(
        f"global:\n  scrape_interval: {scrape_ms}ms\n  evaluation_interval: {scrape_ms}ms\n"
        "scrape_configs:\n  - job_name: edge-agent\n"
        f"    scrape_interval: {scrape_ms}ms\n    scrape_timeout: {scrape_ms}ms\n{auth}"
        f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "log", "wb"))  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + (workdir / "log").read_text()[-2000:])
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(base + "/-/ready", timeout=1) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus not ready within 30 s")
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    """The instant-vector result of ``promql`` (blocking: call it on a worker thread)."""
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result
