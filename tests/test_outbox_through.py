"""Publish-through: messages reach the publisher before their commit, and nothing accepted is
lost or renumbered because of it (acked before commit, killed before commit, a broken marker,
the reservation boundary)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.config.schema import OutboxConfig
from agent.feed.messages import health_message
from agent.outbox.db import SEQ_BLOCK
from agent.outbox.rows import Row
from agent.outbox.store import Outbox
from agent.uplink.forwarder import Uplink
from agent.uplink.live import LiveQueue
from tests.broker import Mosquitto
from tests.test_uplink import mqtt, running, subscribed
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[1]
GW = "gw-test"
SLOW = 60_000  # a commit interval no test waits for: a commit that happens is a flush


def outbox(tmp: Path, **kw: int) -> Outbox:
    ob = Outbox(OutboxConfig(path=str(tmp / "outbox.db"), **kw), GW)
    ob.open()
    return ob


def put(ob: Outbox, i: int) -> int:
    return ob.put("health", "health", health_message(GW, {"i": i}))


async def stored(ob: Outbox) -> list[int]:
    return [r.seq for r in await ob.fetch(0, 2**62, 100_000)]


class Taker:
    """A publish-through listener that keeps what it is handed, and when."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.calls = 0

    def __call__(self, rows: Sequence[Row]) -> None:
        self.calls += 1
        self.rows += rows


async def test_rows_are_handed_over_before_their_commit_and_acked_ones_never_written(
        tmp_path: Path) -> None:
    ob = outbox(tmp_path, commit_interval_ms=SLOW)
    got = Taker()
    ob.add_listener(got, through=True)
    task = asyncio.create_task(ob.run(), name="outbox")
    try:
        seqs = [put(ob, i) for i in range(10)]
        await until(lambda: len(got.rows) == 10, 5, "rows handed over")
        assert [r.seq for r in got.rows] == seqs
        assert got.calls == 1  # one hand-over (one marker write) per turn of the loop
        assert ob.stats()["commits"] == 0 and ob.accepted_seq == seqs[0] - 1
        for r in got.rows[:6]:
            ob.ack(r)  # the broker acknowledged them before any commit
        assert ob.accepted_seq == seqs[5]  # acked before commit: accepted
        assert ob.pending_rows == 4 and ob.is_settled(seqs[0])
        assert ob.flush()
        assert await stored(ob) == seqs[6:]  # the acked six were never written
        st = ob.stats()
        assert st["acked_before_commit"] == 6 and st["published_through"] == 10
        assert ob.accepted_seq == seqs[-1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ob.close()
    again = outbox(tmp_path)
    assert again.next_seq == seqs[-1] + 1 and again.stats()["seq_skipped"] is None
    assert await stored(again) == seqs[6:]
    again.close()


async def test_a_row_acked_while_its_commit_runs_is_deleted_by_the_next(tmp_path: Path) -> None:
    ob = outbox(tmp_path, commit_interval_ms=SLOW)
    got = Taker()
    ob.add_listener(got, through=True)
    seqs = [put(ob, i) for i in range(3)]
    await until(lambda: len(got.rows) == 3, 5, "rows handed over")
    batch = ob._take()  # what run() hands to the worker: these rows are now committing
    assert batch is not None and [r.seq for r in batch.rows] == seqs
    ob._committing = (batch, asyncio.get_running_loop().create_future())  # type: ignore[assignment]
    ob.ack(got.rows[0])
    assert ob.pending_rows == 0
    assert ob._executor is not None
    result = await asyncio.wrap_future(ob._executor.submit(ob._commit_job, batch))
    ob._committing = None
    ob._applied(batch, *result)
    assert ob.stats()["rows"] == 3  # written, the acked one too...
    assert await stored(ob) == seqs[1:]  # ...but no longer offered to the publisher
    assert ob.flush()
    assert ob.stats()["rows"] == 2
    assert await stored(ob) == seqs[1:]
    assert ob.stats()["acked_before_commit"] == 0
    ob.close()


_KILL_SCRIPT = """
import asyncio, sys
from agent.config.schema import OutboxConfig
from agent.feed.messages import health_message
from agent.outbox.store import Outbox
async def main():
    ob = Outbox(OutboxConfig(path=sys.argv[1], commit_interval_ms=int(sys.argv[2]),
                             commit_batch=int(sys.argv[3])), "gw")
    ob.open()
    ob.add_listener(lambda rows: rows and print("sent", rows[-1].seq, ob.accepted_seq,
                                                 flush=True), through=True)
    print("open", ob.next_seq, flush=True)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(ob.run(), name="outbox")
        i = 0
        while True:
            for _ in range(20):
                ob.put("health", "health", health_message("gw", {"i": i}))
                i += 1
            await asyncio.sleep(0.002)
asyncio.run(main())
"""


async def test_kill_9_before_the_commit_never_reuses_a_published_seq(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    sent, committed = 0, 0
    # Nothing committed at all; then commits racing the sends.
    for interval_ms, batch in ((SLOW, 100_000), (5, 50)):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(db), str(interval_ms),
                                 str(batch)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        try:
            first = int(proc.stdout.readline().split()[1])
            for _ in range(30):
                line = proc.stdout.readline()
                assert line.startswith("sent"), line
                sent, committed = (int(x) for x in line.split()[1:])
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
        ob = Outbox(OutboxConfig(path=str(db)), GW)
        ob.open()
        seqs = [s for s in await stored(ob) if s >= first]
        # Everything known accepted is on disk; no seq handed to the publisher comes again.
        assert seqs[: committed - first + 1] == list(range(first, committed + 1))
        assert ob.next_seq > sent
        if interval_ms == SLOW:
            assert seqs == [] and sent >= first + 20 * 29  # all of it sent before any commit
        top = max([first - 1, *seqs])
        skipped = ob.stats()["seq_skipped"]
        if sent > top:
            assert skipped == [top + 1, ob.next_seq - 1]
        ob.close()


async def test_an_unreadable_marker_is_not_trusted(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    last = put(ob, 0)
    assert ob.flush()
    ob.close()
    reserved = json.loads((tmp_path / "outbox.db.seq").read_text())["reserved"]
    for junk in (b"\xff\xfe not a marker", b"edge-agent-sent 1 someone-else 99\n",
                 b"edge-agent-sent 1 x " + b"9" * 400 + b"\n"):
        (tmp_path / "outbox.db.sent").write_bytes(junk)
        again = outbox(tmp_path)
        # Not trusted: the fsynced reservation is the floor, not last_seq + 1.
        assert again.next_seq == reserved > last + 1
        assert again.stats()["seq_skipped"] == [last + 1, reserved - 1]
        again.close()
        last = reserved - 1
        reserved = json.loads((tmp_path / "outbox.db.seq").read_text())["reserved"]


async def test_without_a_marker_messages_wait_for_their_commit(tmp_path: Path) -> None:
    (tmp_path / "outbox.db.sent").mkdir()  # cannot be opened as a file
    ob = outbox(tmp_path, commit_interval_ms=20)
    got = Taker()
    ob.add_listener(got, through=True)
    task = asyncio.create_task(ob.run(), name="outbox")
    try:
        seq = put(ob, 0)
        await asyncio.sleep(0)
        assert got.rows == []  # not before its commit
        await until(lambda: [r.seq for r in got.rows] == [seq], 5, "handed over at commit")
        assert ob.stats()["commits"] >= 1 and ob.stats()["published_through"] == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ob.close()


async def test_seqs_at_the_reservation_wait_for_the_commit_that_moves_it(tmp_path: Path) -> None:
    ob = outbox(tmp_path, commit_interval_ms=20)
    got = Taker()
    ob.add_listener(got, through=True)
    ob._snap.reserved = ob.next_seq + 2  # as if the reservation were about to run out
    task = asyncio.create_task(ob.run(), name="outbox")
    try:
        seqs = [put(ob, i) for i in range(4)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [r.seq for r in got.rows] == seqs[:2]  # below the reservation: at once
        await until(lambda: [r.seq for r in got.rows] == seqs, 5, "the rest at commit")
        assert ob.stats()["commits"] >= 1
        assert ob._snap.reserved >= seqs[-1] + SEQ_BLOCK // 2
        seq = put(ob, 9)  # the reservation moved: publish-through again
        await until(lambda: got.rows[-1].seq == seq, 5, "handed over")
        assert ob.stats()["published_through"] == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ob.close()


async def test_live_messages_arrive_long_before_any_commit(
        tmp_path: Path, private_broker: Mosquitto) -> None:
    mosq = private_broker
    ob = outbox(tmp_path, commit_interval_ms=SLOW)  # no commit would come for a minute
    up = Uplink(mqtt(mosq), GW, ob)
    async with subscribed(mosq.host, mosq.port) as sub, running(ob, up):
        await until(lambda: up.status()["state"] == "connected", 10, "connected")
        seqs = [put(ob, i) for i in range(50)]
        await until(lambda: sorted(sub.seqs()) == seqs, 10, "every message received")
        await until(lambda: ob.stats()["acked_before_commit"] == 50, 5, "every PUBACK")
        st = ob.stats()
        assert st["commits"] == 0 and st["rows"] == 0 and ob.accepted_seq == seqs[-1]
        assert await up.drain(2)
    ob.close()
    again = outbox(tmp_path)
    assert await stored(again) == [] and again.next_seq == seqs[-1] + 1
    again.close()


async def test_a_fifo_in_place_of_the_side_files_does_not_hang_the_open(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    last = put(ob, 0)
    assert ob.flush()
    ob.close()
    (tmp_path / "outbox.db.sent").unlink()
    os.mkfifo(tmp_path / "outbox.db.sent")
    again = await asyncio.wait_for(asyncio.to_thread(outbox, tmp_path), 10)
    # Not trusted: the reservation is the floor; publish-through is off without a marker.
    assert again.next_seq > last + 1 and again.stats()["seq_skipped"] is not None
    got = Taker()
    again.add_listener(got, through=True)
    put(again, 1)
    await asyncio.sleep(0)
    assert got.rows == [] and again.stats()["published_through"] == 0
    again.close()
    (tmp_path / "outbox.db.seq").unlink()
    os.mkfifo(tmp_path / "outbox.db.seq")
    third = await asyncio.wait_for(asyncio.to_thread(outbox, tmp_path), 10)
    assert third.next_seq > last + 1
    third.close()


def test_the_live_queue_demotes_by_rows_bytes_and_age() -> None:
    def row(seq: int, size: int = 10, created_ns: int = 10**18) -> Row:
        return Row(seq, "raw", "raw/s", b"x" * size, created_ns)

    q = LiveQueue(max_rows=3, max_bytes=10_000, lag_s=5.0)
    assert q.push([row(1), row(2), row(3)]) == 0 and len(q) == 3
    assert q.push([row(4), row(5)]) == 2  # the two oldest go to the backlog
    assert [q.pop().seq for _ in range(3)] == [3, 4, 5]
    big = LiveQueue(max_rows=100, max_bytes=3 * row(1, 500).size)
    assert big.push([row(s, 500) for s in range(1, 5)]) == 1 and len(big) == 3
    old = LiveQueue(lag_s=5.0)
    now = 10**18 + 10 * 10**9
    old.push([row(1, created_ns=now - 6 * 10**9), row(2, created_ns=now - 4 * 10**9)])
    assert old.demote_stale(now) == 1 and old.demote_stale(now) == 0 and len(old) == 1
    old.clear()
    assert len(old) == 0 and old.demote_stale(now) == 0
