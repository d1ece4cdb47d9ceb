"""The Sparkplug store-and-forward backlog: bounded, kept across restarts, hostile files."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

from agent.readings import Reading
from agent.sparkplug.backlog import Backlog


def reading(i: int, value: float = 1.5, quality: str = "good") -> Reading:
    return Reading(sensor="env", quantity="temperature", value=value, unit="degC",
                   ts_ns=1_700_000_000_000_000_000 + i, mono_ns=i, quality=quality)  # type: ignore[arg-type]


def test_rows_survive_a_restart_in_order(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    b = Backlog(path, 100)
    b.append("env", [reading(1), reading(2, math.nan, "bad")])
    b.append("air", [reading(3)])
    b.close()
    b = Backlog(path, 100)
    assert len(b) == 2
    rows = b.oldest(10)
    assert [(d, [r.ts_ns % 10 for r in rs]) for _, d, rs in rows] == [("env", [1, 2]),
                                                                      ("air", [3])]
    env = rows[0][2]
    assert env[0].value == 1.5 and env[0].unit == "degC" and env[0].sensor == "env"
    assert math.isnan(env[1].value) and env[1].quality == "bad"
    assert rows[1][2][0].sensor == "air"
    b.remove([rows[0][0]])
    assert len(b) == 1 and b.oldest(10)[0][1] == "air"
    b.close()


def test_bounded_oldest_dropped_and_counted(tmp_path: Path) -> None:
    b = Backlog(tmp_path / "b.db", 5)
    for i in range(12):
        b.append("env", [reading(i)])
    assert len(b) == 5 and b.dropped == 7
    assert [rs[0].ts_ns % 100 for _, _, rs in b.oldest(10)] == [7, 8, 9, 10, 11]
    b.close()


def test_corrupt_file_moved_aside_and_bad_rows_skipped(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    b = Backlog(path, 10)
    assert len(b) == 0 and (tmp_path / "b.db.corrupt").exists()
    b.append("env", [reading(1)])
    b.close()
    with sqlite3.connect(path) as db:
        for text in ("not json", "[[1,2]]", '[["q", 1, "u", 5, "excellent"]]', "[" * 5000):
            db.execute("INSERT INTO backlog (device, readings) VALUES ('env', ?)", (text,))
    b = Backlog(path, 10)
    assert len(b) == 5
    rows = b.oldest(10)
    assert len(rows) == 1 and b.unreadable == 4 and len(b) == 1
    b.close()


async def test_pending_readings_chunked_and_kept_on_stop(tmp_path: Path) -> None:
    import asyncio

    from agent.config.schema import MqttConfig
    from agent.config.services import SparkplugConfig
    from agent.sparkplug.session import METRICS_PER_DDATA, SparkplugSession
    from tests.broker import free_port

    # No broker on this port: the session only ever waits to reconnect.
    mqtt = MqttConfig(port=free_port(), reconnect_max_s=60)
    s = SparkplugSession(SparkplugConfig(enabled=True, interval_s=3600), mqtt, "gw", "1",
                         tmp_path)
    for i in range(2 * METRICS_PER_DDATA + 10):
        s.on_reading(reading(i))
    s.on_reading(Reading(sensor="air", quantity="pm2_5", value=3.0, unit="ug/m3",
                         ts_ns=1, mono_ns=1))
    chunks = s._take()
    assert [(d, len(rs)) for d, rs in chunks] == [
        ("env", METRICS_PER_DDATA), ("env", METRICS_PER_DDATA), ("env", 10), ("air", 1)]
    for r in chunks[0][1]:
        s.on_reading(r)
    task = asyncio.create_task(s.run())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    kept = Backlog(tmp_path / "sparkplug-backlog.db", 100)
    assert sum(len(rs) for _, _, rs in kept.oldest(100)) == METRICS_PER_DDATA
    kept.close()
