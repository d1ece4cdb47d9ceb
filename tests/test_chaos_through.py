"""``kill -9`` during publish-through: messages are on the wire before their commit, the broker
has not acknowledged them, and the agent dies.

The broker is frozen (SIGSTOP) so that PUBACKs stop while the agent goes on publishing what it
seals; the commit interval is long enough that those messages are still uncommitted when the
agent is killed. Such a message was never accepted (neither committed nor acknowledged); the
broker may still deliver it once it resumes. What must hold: every accepted seq (every seq up
to ``accepted_seq`` read just before the kill, and every row left in the file) is received
after a restart drains the outbox, and no seq is ever given to two different messages.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests import chaos_table
from tests.broker import Mosquitto
from tests.harness import running_agent, until, write_toml
from tests.test_chaos import (
    OPEN_LINE,
    RAW,
    N,
    _opened,
    _outbox,
    _spawn,
    _status,
    cloud,
    config,
    settle,
    summary_table,  # noqa: F401 - the module's summary table
    synthetic,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

COMMIT_MS = 2000  # longer than a round's frozen stretch: what is sent there stays uncommitted


def _stored(db: Path) -> set[int]:
    """Seqs of the rows in the outbox file (read-only; the agent that wrote it is dead)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {int(s) for (s,) in conn.execute("SELECT seq FROM outbox")}
    finally:
        conn.close()


async def _poll(sock: Path, ok: Any, what: str) -> dict[str, Any]:
    last: list[dict[str, Any]] = [{}]

    def check() -> bool:
        try:
            last[0] = _status(sock)
        except (OSError, ValueError, RuntimeError):
            return False
        return bool(ok(last[0]))

    await until(check, 30, what)
    return last[0]


async def test_agent_kill_9_during_publish_through(tmp_path: Path,
                                                   private_broker: Mosquitto) -> None:
    b = private_broker
    assert b.proc is not None
    data = config(tmp_path, b, sensors=[synthetic("s0", 0.02), synthetic("s1", 0.02)],
                  streams=[{"name": "fast", "sensors": ["s0", "s1"], "window_s": 1, **RAW}],
                  outbox={"commit_interval_ms": COMMIT_MS, "commit_batch": 100_000})
    cfg = write_toml(tmp_path / "agent.toml", data)
    log = tmp_path / "agent.log"
    sock = tmp_path / "control.sock"
    db = Path(data["outbox"]["path"])
    accepted: set[int] = set()
    firsts: list[int] = []
    in_flight: list[int] = []  # uncommitted and unacknowledged at each kill
    async with cloud(b) as c:
        for k in range(N):
            proc = _spawn(cfg, log)
            frozen = False
            try:
                first = await _opened(log, k)
                firsts.append(first)
                # Past the first commit (what was sealed before the uplink connected), and
                # publishing through.
                await _poll(sock, lambda s, f=first: s["outbox"]["accepted_seq"] >= f + 100
                            and s["outbox"]["published_through"] >= 50, "publishing")
                os.kill(b.proc.pid, signal.SIGSTOP)
                frozen = True
                st = await _poll(sock, lambda s: s["uplink"]["inflight"] >= 20
                                 and s["outbox"]["pending"] >= 20,
                                 "messages sent, neither acknowledged nor committed")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                if frozen:
                    os.kill(b.proc.pid, signal.SIGCONT)
            ob, up = st["outbox"], st["uplink"]
            in_flight.append(min(ob["pending"], up["inflight"]))
            assert ob["pending"] >= 20  # sent, unacknowledged, uncommitted
            accepted |= set(range(first, int(ob["accepted_seq"]) + 1))
            accepted |= {s for s in _stored(db) if s >= first}
        async with running_agent(config(tmp_path, b, outbox={"path": str(db)})) as agent:
            await until(lambda: _outbox(agent)["rows"] == 0, 30, "outbox drained")
        t = await settle(accepted, c)
        by_seq: dict[int, set[str]] = {}
        top_by_boot: dict[str, int] = {}
        for body in c.feed:
            seq, boot = int(body["seq"]), str(body["boot_id"])
            by_seq.setdefault(seq, set()).add(str(body["msg_id"]))
            top_by_boot[boot] = max(seq, top_by_boot.get(boot, 0))
    reused = sorted(s for s, ids in by_seq.items() if len(ids) > 1)
    extra = sorted(set(by_seq) - accepted - {s for s in by_seq if s < firsts[0]})
    chaos_table.add(f"kill -9 during publish-through x{N}", t.accepted, t.received, t.lost,
                    t.duplicated, "", f"sent, unacked and uncommitted at each kill {in_flight}; "
                                      f"received though never accepted {len(extra)}; "
                                      f"seqs reused {len(reused)}")
    assert t.lost == 0, t.missing
    assert reused == [], reused[:10]
    # Each restart began above everything the run before it had handed to the broker.
    boots = [m.group(2) for m in OPEN_LINE.finditer(log.read_text())][:N]
    for k in range(1, N):
        assert top_by_boot[boots[k - 1]] < firsts[k], (k, top_by_boot, firsts)
