"""In-process figures: outbox commits, clean + fuse, inference; each beside its raw baseline."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from typing import Any

import numpy as np

from agent.config.schema import OutboxConfig
from agent.feed.messages import encode, reading_message
from agent.outbox.store import Outbox
from agent.readings import Reading
from bench import clean_fuse
from bench import infer as infer_bench
from bench.procs import GATEWAY
from models import SHIPPED

BATCH = 500  # the outbox's default commit_batch


def _drafts(n: int) -> list[Any]:
    t = time.time_ns()
    return [reading_message(GATEWAY, "fast",
                            Reading("s0", "temperature", 20.0 + i % 97 / 100, "degC", t + i, i))
            for i in range(n)]


def outbox_rate(n: int) -> float:
    """Messages/s committed through ``Outbox.put`` + one commit per ``BATCH``."""
    drafts = _drafts(n)
    with tempfile.TemporaryDirectory() as d:
        ob = Outbox(OutboxConfig(path=f"{d}/outbox.db", commit_batch=BATCH), GATEWAY)
        ob.open()
        try:
            t0 = time.perf_counter()
            for i, draft in enumerate(drafts):
                ob.put("raw", "raw/fast", draft)
                if i % BATCH == BATCH - 1:
                    ob.flush()
            ob.flush()
            elapsed = time.perf_counter() - t0
            if ob.accepted_seq != ob.next_seq - 1:
                raise RuntimeError(f"outbox did not commit everything: {ob.stats()}")
        finally:
            ob.close()
    return n / elapsed


def sqlite_rate(n: int) -> float:
    """Bare sqlite3: the same payloads, WAL, synchronous=NORMAL, one transaction per BATCH."""
    t = time.time_ns()
    payloads = [encode(dr.seal(seq=i + 1, boot_id="0123456789ab", ts_ns=t))
                for i, dr in enumerate(_drafts(n))]
    with tempfile.TemporaryDirectory() as d:
        c = sqlite3.connect(f"{d}/bare.db", isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("CREATE TABLE m (seq INTEGER PRIMARY KEY, kind TEXT, topic TEXT, "
                  "payload BLOB, created_ns INTEGER)")
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            c.execute("BEGIN IMMEDIATE")
            c.executemany("INSERT INTO m VALUES (?, ?, ?, ?, ?)",
                          [(i + 1, "raw", "raw/fast", payloads[i], t)
                           for i in range(start, min(n, start + BATCH))])
            c.execute("COMMIT")
        elapsed = time.perf_counter() - t0
        c.close()
    return n / elapsed


def outbox_vs_sqlite(n: int, repeat: int) -> dict[str, Any]:
    ob = max(outbox_rate(n) for _ in range(repeat))
    bare = max(sqlite_rate(n) for _ in range(repeat))
    return {"agent": ob, "baseline": bare, "unit": "msg/s", "batch": BATCH, "messages": n}


def clean_fuse_rate(n: int, repeat: int) -> dict[str, Any]:
    items = clean_fuse.workload(n)
    base = min(clean_fuse.baseline(items) for _ in range(repeat))
    best = min(clean_fuse.clean_fuse(items)[0] for _ in range(repeat))
    return {"agent": n / best, "baseline": n / base, "unit": "readings/s/core"}


async def inference(rounds: int) -> dict[str, Any]:
    """Per model, on the gateway's stream windows: whole stage vs bare session.run (ms)."""
    out: dict[str, Any] = {}
    for name in SHIPPED:
        stream, windows = infer_bench.windows_for(name, rounds,
                                                  infer_bench.STREAM_WINDOW_S[name])
        _build, bare, *_more = infer_bench.bench_bare(name, windows)
        staged, reported, *_info = await infer_bench.bench_stage(name, stream, windows)
        out[name] = {
            "agent": {"p50": float(np.percentile(staged, 50)),
                      "p99": float(np.percentile(staged, 99)), "n": len(staged)},
            "session_run_in_stage": {"p50": float(np.percentile(reported, 50)),
                                     "p99": float(np.percentile(reported, 99))},
            "baseline": {"p50": float(np.percentile(bare, 50)),
                         "p99": float(np.percentile(bare, 99)), "n": len(bare)},
            "unit": "ms",
        }
    return out
