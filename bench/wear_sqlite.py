"""Which SQLite settings would cut flash wear: a bare store-and-forward loop, by setting.

    python bench/wear_sqlite.py [--rate 1.0] [--size 3100] [--seconds 600]

Each variant runs in its own child process over ``--seconds`` of simulated time (no sleeping):
every commit tick inserts the messages sealed in it (``--rate`` messages/s of ``--size`` bytes,
the demo config's feed as ``bench/wear.py`` measures it) with the ``last_seq`` meta row in one
transaction, and the next tick deletes the rows the broker acknowledged, as the outbox does.
The child's ``write_bytes`` from ``/proc/self/io`` over the payload bytes is the write
amplification; the first row (the outbox's own settings) is the one to compare with the agent's
figure in ``bench/wear.py``. Nothing here changes the agent: it says what a setting would do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (label, page size, wal_autocheckpoint pages, commit interval ms)
VARIANTS: list[tuple[str, int, int, int]] = [
    ("outbox today: 4 KiB pages, checkpoint 1000 pages, 500 ms", 4096, 1000, 500),
    ("1 KiB pages", 1024, 4000, 500),
    ("checkpoint every 64 pages", 4096, 64, 500),
    ("commit every 2 s", 4096, 1000, 2000),
    ("1 KiB pages, commit every 2 s", 1024, 4000, 2000),
]

_CHILD = """
import json, sqlite3, sys
path, page, ckpt, tick_ms, rate, size, seconds = sys.argv[1:]
page, ckpt, tick_ms, size = int(page), int(ckpt), int(tick_ms), int(size)
rate, seconds = float(rate), float(seconds)
def io():
    return dict((k, int(v)) for k, v in (ln.split(":") for ln in open("/proc/self/io")))
c = sqlite3.connect(path, isolation_level=None)
c.execute(f"PRAGMA page_size={page}")
c.execute("PRAGMA journal_mode=WAL")
c.execute("PRAGMA synchronous=NORMAL")
c.execute(f"PRAGMA wal_autocheckpoint={ckpt}")
c.execute(f"PRAGMA journal_size_limit={ckpt * page}")
c.executescript('''
CREATE TABLE outbox (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, created_ns INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX outbox_kind_seq ON outbox(kind, seq);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
''')
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
before = io()
seq, due, payload, pending = 0, 0.0, 0, []
for tick in range(int(seconds * 1000 / tick_ms)):
    due += rate * tick_ms / 1000
    batch = []
    while due >= 1:
        due -= 1
        seq += 1
        batch.append((seq, "window", "city/gw/telemetry/s", bytes(size), tick))
    if batch:
        c.execute("BEGIN")
        c.executemany("INSERT INTO outbox(seq, kind, topic, payload, created_ns) "
                      "VALUES (?, ?, ?, ?, ?)", batch)
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_seq', ?)", (str(seq),))
        c.execute("COMMIT")
        payload += size * len(batch)
    if pending:
        c.execute("BEGIN")
        c.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in pending])
        c.execute("COMMIT")
    pending = [b[0] for b in batch]
after = io()
print(json.dumps({"payload": payload, "write_bytes": after["write_bytes"] - before["write_bytes"]}))
"""


def run(variant: tuple[str, int, int, int], rate: float, size: int, seconds: float
        ) -> dict[str, Any]:
    _, page, ckpt, tick_ms = variant
    with tempfile.TemporaryDirectory(prefix="bench-wear-sqlite-", dir=ROOT) as d:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(Path(d) / "o.db"), str(page), str(ckpt),
             str(tick_ms), str(rate), str(size), str(seconds)],
            check=True, capture_output=True, text=True, timeout=600).stdout
    r: dict[str, Any] = json.loads(out)
    r["amplification"] = r["write_bytes"] / r["payload"] if r["payload"] else float("nan")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rate", type=float, default=1.0, help="messages per second")
    ap.add_argument("--size", type=int, default=3100, help="payload bytes per message")
    ap.add_argument("--seconds", type=float, default=600.0, help="simulated seconds")
    args = ap.parse_args()
    print(f"{args.rate:g} messages/s of {args.size} bytes, {args.seconds:.0f} s simulated; "
          "write_bytes / payload bytes")
    for v in VARIANTS:
        r = run(v, args.rate, args.size, args.seconds)
        print(f"  {v[0]:58s} {r['amplification']:5.1f} x  ({r['write_bytes']:,d} B for "
              f"{r['payload']:,d} B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
