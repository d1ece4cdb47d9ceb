"""Stored messages as JSON lines, for `edge-agent outbox export` (runs on the outbox's worker
thread, like everything that touches the database)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from typing import IO, Any, Final

EXPORT_CHUNK_ROWS: Final = 2000

InWorker = Callable[..., Awaitable[Any]]


async def export_file(in_worker: InWorker, chunk: Callable[..., tuple[int, int]],
                      path: str) -> int:
    """Every stored message, then the quarantined ones, into the new file ``path``; each step
    through ``in_worker`` (the worker thread), in chunks; returns the number of rows."""
    fh: IO[str] = await in_worker(lambda: open(path, "x", encoding="utf-8"))  # noqa: SIM115
    total = 0
    try:
        for table in ("outbox", "quarantine"):
            after = 0
            while True:
                result: tuple[int, int] = await in_worker(chunk, fh, table, after,
                                                          EXPORT_CHUNK_ROWS)
                n, after = result
                total += n
                if n < EXPORT_CHUNK_ROWS:
                    break
    finally:
        await in_worker(fh.close)
    return total


def export_rows(conn: sqlite3.Connection, fh: IO[str], table: str, after: int,
                limit: int) -> tuple[int, int]:
    """Append up to ``limit`` rows of ``table`` after seq ``after`` to ``fh`` as JSON lines;
    returns (rows written, last seq)."""
    extra = ", reason" if table == "quarantine" else ", NULL"
    rows = conn.execute(
        f"SELECT seq, kind, topic, payload, created_ns, attempts{extra} FROM {table} "
        "WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)).fetchall()
    for seq, kind, topic, payload, created, attempts, reason in rows:
        try:
            message: Any = json.loads(payload)
        except ValueError:
            message = {"undecodable": bytes(payload).hex()}
        line = {"seq": seq, "class": kind, "topic": topic, "created_ns": created,
                "attempts": attempts, "message": message}
        if reason is not None:
            line["quarantined"] = reason
        fh.write(json.dumps(line, separators=(",", ":")) + "\n")
    return len(rows), (rows[-1][0] if rows else after)
