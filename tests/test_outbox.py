"""The SQLite outbox: batching, durability, sequence floor, bounds policy, corruption reset."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config.schema import OutboxConfig
from agent.feed.messages import health_message, reading_message, window_message
from agent.outbox.db import SEQ_BLOCK, OutboxDB
from agent.outbox.rows import Batch, Row
from agent.outbox.store import Outbox, OutboxError
from agent.readings import ChannelStats, Reading, Window

ROOT = Path(__file__).resolve().parents[1]
GW = "gw-test"


class SteppedClock:
    """Wall time set by the test; monotonic time real."""

    def __init__(self, wall_ns: int = 1_790_000_000_000_000_000) -> None:
        self.now = wall_ns

    def wall_ns(self) -> int:
        return self.now

    def mono_ns(self) -> int:
        return time.monotonic_ns()

    def synced(self) -> bool:
        return True


def _window(i: int = 0) -> Window:
    s = ChannelStats(3, 20.0 + i, 19.0, 21.0, 20.5, 0.2, "degC")
    return Window("climate", i * 10**10, (i + 1) * 10**10, {"bme.temperature": s})


def _reading(i: int = 0, pad: int = 0) -> Reading:
    return Reading("radar" + "x" * pad, "speed", float(i), "m/s", 10**18 + i, i)


def put(ob: Outbox, kind: str, i: int = 0, pad: int = 0) -> int:
    if kind == "window":
        return ob.put("window", "telemetry/climate", window_message(GW, _window(i)))
    if kind == "raw":
        return ob.put("raw", "raw/traffic", reading_message(GW, "traffic", _reading(i, pad)))
    if kind == "health":
        return ob.put("health", "health", health_message(GW, {"i": i}))
    if kind == "anomaly":
        return ob.put("anomaly", "anomaly/energy", health_message(GW, {"anomaly": i}))
    return ob.put("inference", "inference/m", health_message(GW, {"inference": i}))


def cfg(tmp_path: Path, **kw: object) -> OutboxConfig:
    return OutboxConfig(path=str(tmp_path / "outbox.db"), **kw)  # type: ignore[arg-type]


async def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def all_rows(ob: Outbox) -> list[int]:
    return [r.seq for r in await ob.fetch(0, 2**62, 1_000_000)]


async def test_commit_by_batch_size_then_by_interval(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path, commit_batch=100, commit_interval_ms=60_000), GW)
    ob.open()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(ob.run(), name="outbox")
        seqs = [put(ob, "window", i) for i in range(99)]
        assert ob.stats()["pending"] == 99 and ob.stats()["commits"] == 0
        seqs.append(put(ob, "window", 99))
        await wait_until(lambda: ob.stats()["commits"] == 1)
        st = ob.stats()
        # One transaction for the whole batch, and the batch is now accepted.
        assert st["pending"] == 0 and st["rows"] == 100
        assert ob.accepted_seq == seqs[-1]
        assert seqs == list(range(seqs[0], seqs[0] + 100))
        task.cancel()
    ob.close()

    fast = Outbox(OutboxConfig(path=str(tmp_path / "b.db"), commit_interval_ms=30), GW)
    fast.open()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(fast.run(), name="outbox")
        last = [put(fast, "health", i) for i in range(5)][-1]
        await wait_until(lambda: fast.accepted_seq == last)
        assert fast.stats()["commits"] == 1
        task.cancel()
    fast.close()


async def test_stopping_during_a_commit_loses_nothing(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path, commit_interval_ms=1), GW)
    ob.open()
    gate = threading.Event()
    assert ob._executor is not None
    ob._executor.submit(gate.wait, 5)  # the disk is slow: the worker is busy
    task = asyncio.create_task(ob.run(), name="outbox")
    seq = put(ob, "window")
    await wait_until(lambda: ob.stats()["pending"] == 0)  # run() has handed its batch over
    task.cancel()  # shutdown arrives while that commit is still queued
    with contextlib.suppress(asyncio.CancelledError):
        await task
    gate.set()
    assert ob.flush()
    assert await all_rows(ob) == [seq] and ob.accepted_seq == seq
    ob.close()


async def test_reopen_keeps_rows_and_continues_the_sequence(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    ob.open()
    seqs = [put(ob, "window", i) for i in range(10)]
    assert ob.flush()
    rows = await ob.fetch(0, ob.accepted_seq, 100)
    assert [r.seq for r in rows] == seqs
    ob.close()
    again = Outbox(cfg(tmp_path), GW)
    again.open()
    assert again.next_seq == seqs[-1] + 1
    assert again.stats()["seq_skipped"] is None
    assert again.stats()["depth"]["window"] == 10
    rows2 = await again.fetch(0, again.accepted_seq, 100)
    assert [(r.seq, r.payload) for r in rows2] == [(r.seq, r.payload) for r in rows]
    assert again.boot_id != ob.boot_id
    again.close()


async def test_ack_deletes_with_the_next_commit_and_fetch_skips_it(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    ob.open()
    seqs = [put(ob, "health", i) for i in range(5)]
    ob.flush()
    rows = await ob.fetch(0, ob.accepted_seq, 10)
    ob.ack(rows[0])
    ob.ack(rows[0])  # a second PUBACK for the same row changes nothing
    assert await all_rows(ob) == seqs[1:]
    ob.flush()
    assert ob.stats()["rows"] == 4
    ob.quarantine(rows[1], "test reason")
    ob.flush()
    st = ob.stats()
    assert st["rows"] == 3 and st["quarantined"] == 1 and st["quarantine_rows"] == 1
    q = await ob.quarantined_rows()
    assert q == [{"seq": seqs[1], "class": "health", "topic": "health", "attempts": 0,
                  "reason": "test reason"}]
    ob.close()


async def test_export_writes_every_stored_message(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    ob.open()
    seqs = []
    for i in range(4500):
        seqs.append(put(ob, "window", i))
        if i % 1000 == 999:
            ob.flush()
    ob.flush()
    rows = await ob.fetch(0, ob.accepted_seq, 2)
    ob.ack(rows[0])
    ob.quarantine(rows[1], "refused")
    ob.flush()
    target = tmp_path / "export.jsonl"
    assert await ob.export(str(target)) == 4500 - 1
    lines = [json.loads(x) for x in target.read_text().splitlines()]
    assert [x["seq"] for x in lines] == [*seqs[2:], seqs[1]]
    assert lines[0]["class"] == "window" and lines[0]["topic"] == "telemetry/climate"
    assert lines[0]["message"]["seq"] == seqs[2]
    assert lines[-1]["quarantined"] == "refused"
    with pytest.raises(FileExistsError):
        await ob.export(str(target))
    ob.close()


_KILL_SCRIPT = """
import asyncio, sys
from agent.config.schema import OutboxConfig
from agent.feed.messages import health_message
from agent.outbox.store import Outbox
async def main():
    ob = Outbox(OutboxConfig(path=sys.argv[1], commit_interval_ms=5, commit_batch=50), "gw")
    ob.open()
    ob.add_listener(lambda rows: print("accepted", ob.accepted_seq, flush=True))
    print("open", ob.next_seq, flush=True)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(ob.run(), name="outbox")
        i = 0
        while True:
            for _ in range(20):
                ob.put("health", "health", health_message("gw", {"i": i}))
                i += 1
            await asyncio.sleep(0.001)
asyncio.run(main())
"""


async def test_kill_9_loses_nothing_accepted(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(db)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        first = int(proc.stdout.readline().split()[1])
        accepted = 0
        for _ in range(30):
            line = proc.stdout.readline()
            assert line.startswith("accepted"), line
            accepted = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    ob = Outbox(OutboxConfig(path=str(db)), GW)
    ob.open()
    seqs = await all_rows(ob)
    assert seqs[: accepted - first + 1] == list(range(first, accepted + 1))
    # Same machine, same boot: the WAL kept everything, the sequence continues exactly.
    assert ob.next_seq == seqs[-1] + 1
    assert ob.stats()["seq_skipped"] is None
    ob.close()


@pytest.mark.parametrize("what", ["garbage", "text", "foreign-sqlite", "directory"])
async def test_a_file_that_is_not_an_outbox_is_refused_and_left_alone(
        tmp_path: Path, what: str) -> None:
    db = tmp_path / "outbox.db"
    if what == "garbage":
        db.write_bytes(os.urandom(8192))
    elif what == "text":
        db.write_text("precious notes\n")
    elif what == "foreign-sqlite":
        other = sqlite3.connect(db)
        other.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, data BLOB)")
        other.execute("INSERT INTO photos VALUES (1, x'00ff')")
        other.commit()
        other.close()
    else:
        db.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    content = db.read_bytes() if db.is_file() else None
    ob = Outbox(cfg(tmp_path), GW)
    with pytest.raises(OutboxError, match="not"):
        ob.open()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing renamed or created
    if content is not None:
        assert db.read_bytes() == content


async def test_damaged_pages_inside_a_valid_file_are_detected(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    ob.open()
    for i in range(3000):
        put(ob, "raw", i, pad=200)
    ob.close()
    db = tmp_path / "outbox.db"
    size = db.stat().st_size
    assert size > 200 * 4096
    with db.open("r+b") as f:  # leave the 100-byte header, smash pages in the middle
        f.seek(size // 3)
        f.write(b"\xa5" * (size // 3))
    again = Outbox(cfg(tmp_path), GW)
    again.open()
    assert again.stats()["corrupt_resets"] == 1
    assert list(tmp_path.glob("outbox.db.corrupt-*"))
    again.close()


async def test_corruption_found_while_running_resets_and_keeps_going(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    ob.open()
    for i in range(20_000):  # well beyond SQLite's page cache, so reads go to the file
        put(ob, "raw", i, pad=200)
        if i % 1000 == 999:
            ob.flush()
    last = ob.accepted_seq
    db = tmp_path / "outbox.db"
    size = db.stat().st_size
    with db.open("r+b") as f:  # the disk goes bad under the running agent
        f.seek(size // 3)
        f.write(b"\xa5" * (size // 3))
    salvaged = await all_rows(ob)
    st = ob.stats()
    assert st["corrupt_resets"] == 1
    # Every row the damaged file still had readable was copied over; the rest are counted.
    assert st["salvaged"] == len(salvaged) > 0 and st["unreadable"] > 0
    assert len(salvaged) + st["unreadable"] == 20_000
    assert set(salvaged) <= set(range(last - 20_000 + 1, last + 1))
    seq = put(ob, "window", 1)
    assert ob.flush() and seq > last
    assert await all_rows(ob) == [*salvaged, seq]
    ob.close()


async def test_seq_floor_survives_the_database_being_removed(tmp_path: Path) -> None:
    clock = SteppedClock()
    ob = Outbox(cfg(tmp_path), GW, clock=clock)
    ob.open()
    # A fresh gateway starts at wall-clock milliseconds.
    assert ob.next_seq == clock.now // 1_000_000
    last = [put(ob, "window", i) for i in range(3)][-1]
    ob.close()
    for p in tmp_path.glob("outbox.db*"):
        if not p.name.endswith(".seq"):
            p.unlink()
    again = Outbox(cfg(tmp_path), GW, clock=clock)
    again.open()
    assert again.next_seq > last
    assert again.next_seq <= last + SEQ_BLOCK + 1
    again.close()


async def test_unclean_stop_after_a_reboot_resumes_from_the_reservation(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    ob.open()
    last = [put(ob, "window", i) for i in range(3)][-1]
    ob.close()
    # What a power cut leaves: not marked clean, and another kernel boot id.
    with sqlite3.connect(tmp_path / "outbox.db") as c:
        c.execute("UPDATE meta SET value = '0' WHERE key = 'clean'")
        c.execute("UPDATE meta SET value = 'another-boot' WHERE key = 'kboot'")
    again = Outbox(cfg(tmp_path), GW)
    again.open()
    skipped = again.stats()["seq_skipped"]
    assert skipped is not None and skipped[0] == last + 1
    assert again.next_seq == skipped[1] + 1 > last + 1
    again.close()


def test_a_batch_committed_twice_is_counted_once(tmp_path: Path) -> None:
    # What a flush that timed out on a slow disk and was retried does.
    db = OutboxDB(tmp_path / "o.db", max_rows=100, max_bytes=10**6, max_age_ns=None,
                  wall_ns=time.time_ns)
    first = db.open().next_seq
    rows = [Row(first + i, "window", "telemetry/a", b"{}", 0) for i in range(3)]
    db.commit(Batch(rows=list(rows)))
    db.commit(Batch(rows=list(rows)))
    assert db.snap.rows["window"] == 3 and db.snap.last_seq == rows[-1].seq
    db.close(clean=True)


async def test_bounds_drop_by_class_policy_oldest_first(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path, max_rows=20), GW)
    ob.open()
    by_kind: dict[str, list[int]] = {k: [] for k in ("window", "inference", "health", "raw",
                                                     "anomaly")}
    for i in range(10):
        for kind, seqs in by_kind.items():
            seqs.append(put(ob, kind, i))
    ob.flush()
    st = ob.stats()
    # 50 rows into 20: raw, then health, then inference go; windows and anomaly events stay.
    assert st["drops"] == {"raw": 10, "health": 10, "inference": 10, "window": 0, "anomaly": 0}
    assert st["drops_by_reason"]["rows"] == 30
    assert st["depth"] == {"window": 10, "inference": 0, "health": 0, "raw": 0, "anomaly": 10}
    more = [put(ob, "window", 10 + i) for i in range(5)]
    ob.flush()
    left = set(await all_rows(ob))
    # Five more windows push out the five oldest windows: anomaly events go last of all.
    assert left == set(by_kind["window"][5:] + more + by_kind["anomaly"])
    assert ob.stats()["drops"]["window"] == 5
    ob.close()


async def test_byte_bound_and_rows_in_flight(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path, max_bytes=64 * 1024), GW)
    ob.open()
    first = put(ob, "raw", 0, pad=900)
    ob.protect(lambda: {first})
    seqs = [first] + [put(ob, "raw", i, pad=900) for i in range(1, 120)]
    ob.flush()
    st = ob.stats()
    assert st["bytes"] <= 64 * 1024
    assert st["drops_by_reason"]["bytes"] == st["drops"]["raw"] > 0
    left = await all_rows(ob)
    # The protected (in flight) row survives; the rest kept are the newest.
    assert left[0] == first
    assert left[1:] == seqs[len(seqs) - len(left) + 1:]
    ob.close()


async def test_age_bound_drops_expired_rows(tmp_path: Path) -> None:
    clock = SteppedClock()
    ob = Outbox(cfg(tmp_path, max_age_s=60), GW, clock=clock)
    ob.open()
    old = [put(ob, "window", i) for i in range(3)]
    ob.flush()
    clock.now += 61 * 10**9
    new = put(ob, "window", 9)
    ob.flush()
    assert await all_rows(ob) == [new]
    st = ob.stats()
    assert st["drops"]["window"] == len(old) and st["drops_by_reason"]["age"] == len(old)
    ob.close()


async def test_memory_buffer_is_bounded_and_sheds_by_policy(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW, buffer_rows=20)
    ob.open()
    windows = [put(ob, "window", i) for i in range(10)]
    for i in range(30):
        put(ob, "raw", i)
    st = ob.stats()
    assert st["pending"] <= 20
    assert st["drops_by_reason"]["buffer"] == st["drops"]["raw"] > 0
    ob.flush()
    left = await all_rows(ob)
    assert set(windows) <= set(left)
    ob.close()


async def test_bad_calls_are_refused_clearly(tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    with pytest.raises(OutboxError, match="not open"):
        put(ob, "window")
    ob.open()
    with pytest.raises(ValueError, match="not an outbox class"):
        ob.put("bogus", "health", health_message(GW, {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topic"):
        ob.put("health", "edge/#", health_message(GW, {}))
    seq = ob.next_seq
    with pytest.raises(ValueError):
        ob.put("health", "health", health_message(GW, {"x": float("nan")}))
    assert ob.next_seq == seq  # a message that failed to build uses no seq
    ob.close()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = Outbox(OutboxConfig(path=str(blocker / "outbox.db")), GW)
    with pytest.raises(OutboxError, match=str(blocker)):
        bad.open()
