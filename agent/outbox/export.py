"""Stored messages as JSON lines, for `edge-agent outbox export` (runs on the outbox's worker
thread, like everything that touches the database)."""

from __future__ import annotations

import json
import sqlite3
from typing import IO, Any


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
