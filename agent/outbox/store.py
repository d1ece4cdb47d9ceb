"""Durable store-and-forward between the pipeline and the MQTT publisher.

A message is *accepted* once the SQLite transaction that holds it commits, or once the broker
acknowledged it before that commit; from then on it survives broker outages, restarts and
``kill -9``. A committed row is deleted only after the broker's PUBACK (or when the bounds policy
drops it, which is counted); a row acknowledged before its commit is never written.

``put`` seals a draft with the next ``seq`` and buffers it in memory; a commit happens every
``commit_interval_ms`` or as soon as ``commit_batch`` changes are pending, one transaction per
batch (one fsync per batch, not per reading). All SQLite work runs on one worker thread
(``agent.outbox.db``); the event loop only touches memory, and the sent marker's page.

Publish-through (``agent.outbox.release``): the publisher gets a message as soon as it is
sealed, while its batch commits, so latency is the network's, not the commit interval's. A
message published and then lost with the process before its commit was never accepted (the
cloud may still have it: a duplicate at worst, with the same seq); its seq is never reused.

Bounds (rows, bytes, age) are enforced inside each commit; when over, rows are dropped in
``DROP_ORDER`` (raw, health, inference, window), oldest first within a class, never a row the
publisher has in flight. The in-memory buffer is bounded too; if the disk stalls long enough
to fill it, the same policy applies there. Every drop is counted by class and reason.

Use: ``open()`` (blocking, at start: opens or repairs the file), ``put(kind, topic, draft)``,
``await run()`` (commits until cancelled), ``flush(); close()`` (blocking, at stop). The
publisher side (``add_listener``, ``fetch``, ``ack``, ``quarantine``) is for the uplink.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from agent.clock import Clock, SystemClock
from agent.config.schema import OutboxConfig
from agent.feed.messages import Draft, encode
from agent.logs import Throttle
from agent.outbox.db import SEQ_BLOCK, OutboxDB
from agent.outbox.export import export_file
from agent.outbox.recovery import OutboxPathError
from agent.outbox.release import Listener, Release
from agent.outbox.rows import (
    DROP_ORDER,
    KINDS,
    Batch,
    Dropped,
    Kind,
    Row,
    Snapshot,
    choose_victims,
)

__all__ = ["DROP_ORDER", "KINDS", "Kind", "Outbox", "OutboxError", "Row"]

log = logging.getLogger(__name__)

BUFFER_MIN_ROWS: Final = 1024
BUFFER_MAX_BYTES: Final = 32 * 1024 * 1024
OPEN_TIMEOUT_S: Final = 120.0  # the first open scans the file to count what it holds
FLUSH_TIMEOUT_S: Final = 4.0  # a stop must fit systemd's budget even with a stuck disk
CLOSE_TIMEOUT_S: Final = 2.0
SHED_LOG_EVERY_NS: Final = 10_000_000_000
COMMIT_ERROR_LOG_S: Final = 60.0  # a failing disk fails every commit: one ERROR line a minute

CommitResult = tuple[list[Dropped], Snapshot, float]  # drops, state after, milliseconds


class OutboxError(Exception):
    """The outbox cannot be used (not open, or its directory cannot be written)."""


class Outbox:
    def __init__(self, cfg: OutboxConfig, gateway: str, *, clock: Clock | None = None,
                 boot_id: str | None = None, buffer_rows: int | None = None) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.boot_id = boot_id or uuid.uuid4().hex[:12]
        self.clock: Clock = clock or SystemClock()
        self.buffer_rows = buffer_rows or max(4 * cfg.commit_batch, BUFFER_MIN_ROWS)
        max_age = None if cfg.max_age_s is None else round(cfg.max_age_s * 1e9)
        self._db = OutboxDB(Path(cfg.path), max_rows=cfg.max_rows, max_bytes=cfg.max_bytes,
                            max_age_ns=max_age, wall_ns=self.clock.wall_ns)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._open = False
        self._next_seq = 0
        self._skipped: tuple[int, int] | None = None
        self._snap = Snapshot()
        self._batch = Batch()
        self._pending_bytes = 0
        self._settled: set[int] = set()  # acked or quarantined, not yet committed
        self._pending_seqs: set[int] = set()  # the rows of self._batch
        self._early: set[int] = set()  # of those, acked by the broker: never written
        self._acc_idx = 0  # self._batch.rows[:this] are accepted
        self._acked_early = 0
        self._release = Release(self._db.sent, 0)
        self._first_pending_ns = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._committing: tuple[Batch, concurrent.futures.Future[CommitResult]] | None = None
        self._listeners: list[Listener] = []
        self._protect: Callable[[], Iterable[int]] | None = None
        self._drops: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._drops_by_reason: dict[str, int] = {"rows": 0, "bytes": 0, "age": 0, "buffer": 0}
        self._commits = 0
        self._commit_errors = 0
        self._last_commit_ms = 0.0
        self._max_commit_ms = 0.0
        self._quarantined = 0
        self._last_shed_log_ns = -SHED_LOG_EVERY_NS
        self._commit_log = Throttle(log, COMMIT_ERROR_LOG_S)

    # -- lifecycle ------------------------------------------------------------------------
    # open, flush and close block the caller: they run at start and stop only, and a stop
    # must not return before the last batch is on disk.

    def open(self) -> None:
        if self._open:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="outbox-db")
        try:
            info = self._executor.submit(self._db.open).result(timeout=OPEN_TIMEOUT_S)
        except (OSError, sqlite3.Error, concurrent.futures.TimeoutError,
                OutboxPathError) as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            what = "" if isinstance(exc, OutboxPathError) else "cannot open the outbox: "
            raise OutboxError(f"{self.cfg.path}: {what}{exc}") from exc
        self._next_seq = info.next_seq
        self._skipped = info.skipped
        self._snap = copy.deepcopy(info.snapshot)
        self._release.next = self._next_seq
        self._open = True
        log.info("outbox %s open: %d rows, next seq %d, boot %s", self.cfg.path,
                 sum(self._snap.rows.values()), self._next_seq, self.boot_id)

    async def run(self) -> None:
        """Commit pending changes on time or by batch size, until cancelled."""
        interval_s = self.cfg.commit_interval_ms / 1000
        while True:
            await self._wake.wait()
            if len(self._batch) < self.cfg.commit_batch:
                age_s = (self.clock.mono_ns() - self._first_pending_ns) / 1e9
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, interval_s - age_s)):
                        await self._full.wait()
            batch = self._take()
            if batch is None or self._executor is None:
                continue
            job = self._executor.submit(self._commit_job, batch)
            self._committing = (batch, job)
            # Shielded: cancelling this task (shutdown) must not cancel a commit that has not
            # started yet; flush() finishes it instead.
            try:
                result = await asyncio.shield(asyncio.wrap_future(job))
            except (OSError, sqlite3.Error) as exc:
                if self._committing is not None and self._committing[1] is job:
                    self._committing = None
                    self._failed(batch, exc)
                await asyncio.sleep(interval_s)  # the disk failed: retry later, not hot
                continue
            if self._committing is not None and self._committing[1] is job:
                self._committing = None
                self._applied(batch, *result)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Commit everything pending now; True when nothing is left pending."""
        if not self._open or self._executor is None:
            return not len(self._batch)
        self._settle(timeout_s)
        batch = self._take(final=True)
        if batch is None:
            return True
        try:
            result = self._executor.submit(self._commit_job, batch).result(timeout=timeout_s)
        except (OSError, sqlite3.Error, concurrent.futures.TimeoutError) as exc:
            self._failed(batch, exc)
            return False
        self._applied(batch, *result)
        return not len(self._batch)

    def close(self) -> None:
        """Flush, mark the file cleanly closed and stop the worker thread."""
        if not self._open or self._executor is None:
            return
        clean = self.flush()
        self._open = False
        try:
            self._executor.submit(self._db.close, clean=clean).result(timeout=CLOSE_TIMEOUT_S)
        except (sqlite3.Error, concurrent.futures.TimeoutError) as exc:
            log.error("outbox %s: close: %s", self.cfg.path, exc)
        self._executor.shutdown(wait=False)
        self._executor = None

    # -- producer side --------------------------------------------------------------------

    def put(self, kind: Kind, topic: str, draft: Draft[Any]) -> int:
        """Seal ``draft`` with the next seq and buffer it for the next commit; returns the seq.

        ``topic`` is relative to ``{prefix}/{gateway}/`` (``telemetry/<stream>``, ``health``):
        the publisher adds the prefix, so stored rows do not depend on it.
        """
        if not self._open:
            raise OutboxError("the outbox is not open")
        if kind not in KINDS:
            raise ValueError(f"{kind!r} is not an outbox class ({', '.join(KINDS)})")
        if not topic or topic.startswith("/") or any(c in topic for c in "+#\0"):
            raise ValueError(f"{topic!r} is not a topic below {{prefix}}/{{gateway}}/")
        now = self.clock.wall_ns()
        # Sealing validates; the seq is consumed only once the message exists.
        payload = encode(draft.seal(seq=self._next_seq, boot_id=self.boot_id, ts_ns=now))
        row = Row(self._next_seq, kind, topic, payload, now)
        self._next_seq += 1
        self._batch.rows.append(row)
        self._pending_seqs.add(row.seq)
        self._pending_bytes += row.size
        if (len(self._batch.rows) > self.buffer_rows
                or self._pending_bytes > BUFFER_MAX_BYTES):
            self._shed_buffer()
        self._changed()
        if row.seq in self._pending_seqs:  # not shed at once
            self._release.sealed(row, self._snap.reserved)
        return row.seq

    def _shed_buffer(self) -> None:
        rows = self._batch.rows
        self._acc_idx = 0
        if self._early:  # acknowledged already: they need no room
            rows = [r for r in rows if r.seq not in self._early]
            self._early.clear()
            self._batch.rows = rows
            self._pending_seqs = {r.seq for r in rows}
            self._pending_bytes = sum(r.size for r in rows)
            if len(rows) <= self.buffer_rows and self._pending_bytes <= BUFFER_MAX_BYTES:
                return
        # Shed a tenth more than needed so a stalled disk costs one scan per many puts.
        excess = max(len(rows) - self.buffer_rows, 0) + self.buffer_rows // 10
        gone = set(choose_victims(rows, excess))
        for i in gone:
            self._count_drop(rows[i].kind, "buffer", 1)
        self._batch.rows = [r for i, r in enumerate(rows) if i not in gone]
        self._pending_seqs = {r.seq for r in self._batch.rows}
        self._pending_bytes = sum(r.size for r in self._batch.rows)
        now = self.clock.mono_ns()
        if now - self._last_shed_log_ns > SHED_LOG_EVERY_NS:
            self._last_shed_log_ns = now
            log.warning("outbox buffer full (commits are not keeping up): %d rows dropped "
                        "from memory so far", self._drops_by_reason["buffer"])

    def _changed(self) -> None:
        if not self._wake.is_set():
            self._first_pending_ns = self.clock.mono_ns()
            self._wake.set()
        if len(self._batch) >= self.cfg.commit_batch:
            self._full.set()

    # -- publisher side -------------------------------------------------------------------

    def add_listener(self, fn: Listener, *, through: bool = False) -> None:
        """``fn(rows)`` is called on the event loop with the rows of every commit; with
        ``through``, with rows to publish: as soon as they are sealed, or at their commit
        (``agent.outbox.release``), and with every commit, if only with no rows."""
        (self._release.listeners if through else self._listeners).append(fn)

    def remove_listener(self, fn: Listener) -> None:
        for fns in (self._listeners, self._release.listeners):
            with contextlib.suppress(ValueError):
                fns.remove(fn)

    def protect(self, provider: Callable[[], Iterable[int]] | None) -> None:
        """Seqs the publisher has in flight; the bounds policy never drops them."""
        self._protect = provider

    async def fetch(self, after: int, upto: int, limit: int) -> list[Row]:
        """Committed rows with ``after < seq <= upto``, in seq order, not yet acked."""
        if not self._open:
            raise OutboxError("the outbox is not open")
        result: tuple[list[Row], Snapshot | None] = await self._in_worker(
            self._fetch_job, after, upto, limit, frozenset(self._settled))
        rows, snap = result
        if snap is not None and snap.version > self._snap.version:
            self._snap = snap  # the read found the file corrupt and started a new one
        return rows

    def ack(self, row: Row) -> None:
        """The broker has the message: delete its row with the next commit, or never write it
        if it is not committing yet."""
        if row.seq in self._settled or row.seq in self._early:
            return
        if row.seq in self._pending_seqs:
            self._early.add(row.seq)
            self._acked_early += 1
            return
        self._settled.add(row.seq)
        self._batch.acks.append(row)
        self._changed()

    def set_attempts(self, row: Row, attempts: int) -> None:
        self._batch.attempts[row.seq] = attempts
        self._changed()

    def quarantine(self, row: Row, reason: str) -> None:
        """Move a message the broker keeps refusing out of the queue, for inspection."""
        if row.seq in self._settled:
            return
        self._settled.add(row.seq)
        self._batch.quarantine.append((row, reason))
        self._quarantined += 1
        log.error("quarantined message seq %d on %s (%d bytes, %d attempts): %s",
                  row.seq, row.topic, len(row.payload), row.attempts, reason)
        self._changed()

    def is_settled(self, seq: int) -> bool:
        return seq in self._settled or seq in self._early

    # -- state ----------------------------------------------------------------------------

    @property
    def accepted_seq(self) -> int:
        """Every seq up to this one is accepted (committed, or acknowledged before its commit)
        or was dropped and counted; everything above it that exists is yet to be committed."""
        done = self._early, self._settled
        for r in self._committing[0].rows if self._committing is not None else ():
            if r.seq not in done[0] and r.seq not in done[1]:
                return r.seq - 1
        # The pending rows known accepted only grow until the next take: resume the scan.
        rows, i = self._batch.rows, self._acc_idx
        while i < len(rows) and (rows[i].seq in done[0] or rows[i].seq in done[1]):
            i += 1
        self._acc_idx = i
        return rows[i].seq - 1 if i < len(rows) else self._next_seq - 1

    @property
    def released_seq(self) -> int:
        """The highest seq handed to a publish-through listener, or passed while none was."""
        return self._release.released_seq

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def unsent_rows(self) -> int:
        """Committed rows not yet acked or quarantined (the publisher's work left)."""
        return max(0, sum(self._snap.rows.values()) - len(self._settled))

    @property
    def pending_rows(self) -> int:
        """Messages put but not yet committed (nor acknowledged before their commit)."""
        return len(self._batch.rows) - len(self._early)

    def stats(self) -> dict[str, Any]:
        oldest = self._snap.oldest_created_ns
        return {
            "path": self.cfg.path,
            "boot_id": self.boot_id,
            "accepted_seq": self.accepted_seq,
            "next_seq": self._next_seq,
            "rows": sum(self._snap.rows.values()),
            "bytes": sum(self._snap.bytes.values()),
            "depth": dict(self._snap.rows),
            "bytes_by_class": dict(self._snap.bytes),
            "oldest_age_s": (None if oldest is None
                             else max(0.0, (self.clock.wall_ns() - oldest) / 1e9)),
            "pending": self.pending_rows,
            "published_through": self._release.through,
            "acked_before_commit": self._acked_early,
            "drops": dict(self._drops),
            "drops_by_reason": dict(self._drops_by_reason),
            "quarantined": self._quarantined,
            "quarantine_rows": self._snap.quarantined,
            "corrupt_resets": self._snap.corrupt_resets,
            "salvaged": self._snap.salvaged,
            "unreadable": self._snap.unreadable,
            "commits": self._commits,
            "commit_errors": self._commit_errors,
            "last_commit_ms": round(self._last_commit_ms, 3),
            "max_commit_ms": round(self._max_commit_ms, 3),
            "seq_skipped": list(self._skipped) if self._skipped else None,
        }

    async def quarantined_rows(self, limit: int = 20) -> list[dict[str, Any]]:
        rows: list[tuple[int, str, str, int, str]] = await self._in_worker(
            self._db.quarantined_rows, limit)
        return [{"seq": s, "class": k, "topic": t, "attempts": a, "reason": r}
                for s, k, t, a, r in rows]

    async def export(self, path: str) -> int:
        """Write every stored message, then the quarantined ones, to the new file ``path`` as
        JSON lines; returns the number of rows. Works in chunks on the worker thread, so
        commits go on meanwhile."""
        return await export_file(self._in_worker, self._db.export_chunk, path)

    # -- internals ------------------------------------------------------------------------

    def _count_drop(self, kind: str, reason: str, n: int) -> None:
        self._drops[kind] = self._drops.get(kind, 0) + n
        self._drops_by_reason[reason] = self._drops_by_reason.get(reason, 0) + n

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            raise OutboxError("the outbox is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _commit_job(self, batch: Batch) -> CommitResult:
        t0 = time.perf_counter()
        dropped = self._db.commit(batch)
        return dropped, copy.deepcopy(self._db.snap), (time.perf_counter() - t0) * 1000

    def _fetch_job(self, after: int, upto: int, limit: int,
                   skip: frozenset[int]) -> tuple[list[Row], Snapshot | None]:
        before = self._db.snap.version
        rows = self._db.fetch(after, upto, limit, skip)
        changed = self._db.snap.version != before
        return rows, (copy.deepcopy(self._db.snap) if changed else None)

    def _take(self, *, final: bool = False) -> Batch | None:
        batch, self._batch = self._batch, Batch()
        self._acc_idx = 0
        self._pending_bytes = 0
        self._wake.clear()
        self._full.clear()
        if self._early:
            batch.rows = [r for r in batch.rows if r.seq not in self._early]
            self._early.clear()
        self._pending_seqs.clear()
        batch.top = self._next_seq - 1
        # Rows all acknowledged before their commit need no transaction: their seqs are in the
        # sent marker until a commit, the stop, or a reservation running low records them.
        if not len(batch) and batch.top + SEQ_BLOCK // 2 < self._snap.reserved and not (
                final and batch.top > self._snap.last_seq):
            return None
        batch.protect = frozenset(self._protect()) if self._protect else frozenset()
        return batch

    def _applied(self, batch: Batch, dropped: list[Dropped], snap: Snapshot, ms: float) -> None:
        if snap.version > self._snap.version:
            self._snap = snap
        self._commits += 1
        self._commit_log.recovered("outbox %s: commits work again", self.cfg.path)
        self._last_commit_ms = ms
        self._max_commit_ms = max(self._max_commit_ms, ms)
        for d in dropped:
            self._count_drop(d.kind, d.reason, d.count)
        if dropped:
            log.warning("outbox over its bounds: dropped %s",
                        ", ".join(f"{d.count} {d.kind} ({d.reason})" for d in dropped))
        for r in batch.acks:
            self._settled.discard(r.seq)
        for r, _ in batch.quarantine:
            self._settled.discard(r.seq)
        for fn in list(self._listeners):
            try:
                fn(batch.rows)
            except Exception:
                log.exception("outbox listener %r failed", fn)
        self._release.committed(batch.rows)

    def _settle(self, timeout_s: float) -> None:
        """See through a commit that run() started (it may have been cancelled since)."""
        if self._committing is None:
            return
        batch, job = self._committing
        self._committing = None
        try:
            result = job.result(timeout=timeout_s)
        except (OSError, sqlite3.Error, concurrent.futures.TimeoutError,
                concurrent.futures.CancelledError) as exc:
            self._failed(batch, exc)
            return
        self._applied(batch, *result)

    def _failed(self, batch: Batch, exc: BaseException) -> None:
        """Keep a batch that could not be written for the next attempt."""
        self._commit_errors += 1
        self._commit_log.log(logging.ERROR, "outbox commit of %d changes failed (kept for "
                             "retry): %s", len(batch), exc)
        nxt = self._batch
        batch.rows += nxt.rows
        batch.acks += nxt.acks
        batch.attempts.update(nxt.attempts)
        batch.quarantine += nxt.quarantine
        self._batch = batch
        self._acc_idx = 0
        self._pending_seqs = {r.seq for r in batch.rows}
        self._pending_bytes = sum(r.size for r in batch.rows)
        if len(batch.rows) > self.buffer_rows:
            self._shed_buffer()
        self._changed()
