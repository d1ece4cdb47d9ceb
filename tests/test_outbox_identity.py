"""Whose file is at the outbox path: a WAL of another outbox is kept out, a damaged file is
salvaged row by row, and moved-aside files are deleted only within a budget, with a word."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from agent.outbox.db import CORRUPT_KEEP
from agent.outbox.recovery import OUTBOX_APP_ID
from agent.outbox.store import Outbox
from tests.test_outbox import GW, all_rows, cfg, put


def _filled(d: Path, n: int, *, close: bool = True) -> tuple[Outbox, list[int]]:
    d.mkdir(exist_ok=True)
    ob = Outbox(cfg(d), GW)
    ob.open()
    seqs = [put(ob, "window", i) for i in range(n)]
    assert ob.flush()
    if close:
        ob.close()
    return ob, seqs


async def test_a_wal_of_another_outbox_is_kept_aside_not_replayed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, our_seqs = _filled(tmp_path / "ours", 30)
    other, _ = _filled(tmp_path / "other", 14, close=False)  # its WAL holds its commits
    wal = tmp_path / "other" / "outbox.db-wal"
    stray = wal.read_bytes()
    assert len(stray) > 0
    target = tmp_path / "ours" / "outbox.db-wal"
    shutil.copyfile(wal, target)
    other.close()

    again = Outbox(cfg(tmp_path / "ours"), GW)
    again.open()
    assert await all_rows(again) == our_seqs  # all 30 of ours, none of the other's 14
    kept = list((tmp_path / "ours").glob("outbox.db.foreign-*-wal"))
    assert len(kept) == 1 and kept[0].read_bytes() == stray
    assert any(r.levelno == logging.ERROR and "not this outbox's" in r.getMessage()
               and str(kept[0]) in r.getMessage() for r in caplog.records)
    again.close()


async def test_our_own_wal_is_replayed(tmp_path: Path) -> None:
    """The check must not cost a killed agent its last commits."""
    ob, seqs = _filled(tmp_path, 20, close=False)
    wal = tmp_path / "outbox.db-wal"
    db = tmp_path / "outbox.db"
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copyfile(db, crashed / "outbox.db")  # what kill -9 leaves: the file and its WAL
    shutil.copyfile(wal, crashed / "outbox.db-wal")
    ob.close()
    again = Outbox(cfg(crashed), GW)
    again.open()
    assert await all_rows(again) == seqs
    assert not list(crashed.glob("*foreign*"))
    again.close()


async def test_one_damaged_page_costs_no_row(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    _, seqs = _filled(tmp_path, 30)
    db = tmp_path / "outbox.db"
    conn = sqlite3.connect(db)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'outbox_kind_seq'"
                        ).fetchone()[0]
    conn.close()
    with db.open("r+b") as f:  # smash the index page: every row is still in the table
        f.seek((root - 1) * page)
        f.write(b"\xa5" * page)
    again = Outbox(cfg(tmp_path), GW)
    again.open()
    st = again.stats()
    assert st["corrupt_resets"] == 1 and st["salvaged"] == 30 and st["unreadable"] == 0
    assert await all_rows(again) == seqs
    assert list(tmp_path.glob("outbox.db.corrupt-*")), "the damaged file is kept"
    assert any("salvaged 30 messages" in r.getMessage() for r in caplog.records)
    seq = put(again, "window", 99)
    assert again.flush() and seq > seqs[-1]
    again.close()


async def test_a_badly_damaged_file_gives_what_it_can_and_counts_the_rest(
        tmp_path: Path) -> None:
    ob = Outbox(cfg(tmp_path), GW)
    ob.open()
    seqs = [put(ob, "raw", i, pad=200) for i in range(3000)]
    ob.close()
    db = tmp_path / "outbox.db"
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(size // 3)
        f.write(b"\xa5" * (size // 3))
    again = Outbox(cfg(tmp_path), GW)
    again.open()
    st = again.stats()
    got = await all_rows(again)
    assert st["salvaged"] == len(got) > 0 and st["unreadable"] > 0
    assert set(got) <= set(seqs)
    again.close()


def _damage(d: Path) -> None:
    db = d / "outbox.db"
    with db.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * 8192)


async def test_moved_aside_files_are_bounded_and_each_deletion_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(CORRUPT_KEEP + 2):
        _filled(tmp_path, 40)
        _damage(tmp_path)
        ob = Outbox(cfg(tmp_path), GW)
        ob.open()
        assert ob.stats()["corrupt_resets"] == 1
        ob.close()
    sets = {p.name.removesuffix("-wal").removesuffix("-shm")
            for p in tmp_path.glob("outbox.db.corrupt-*")}
    assert len(sets) == CORRUPT_KEEP
    deleted = [r for r in caplog.records
               if r.levelno == logging.WARNING and "deleted the moved-aside file" in r.getMessage()]
    assert len(deleted) == 2


async def test_an_outbox_from_before_the_identity_is_adopted(tmp_path: Path) -> None:
    _, seqs = _filled(tmp_path, 10)
    db = tmp_path / "outbox.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA application_id = 0")  # as every outbox was written until now
    conn.commit()
    conn.close()
    again = Outbox(cfg(tmp_path), GW)
    again.open()
    assert await all_rows(again) == seqs
    again.close()
    with db.open("rb") as f:
        head = f.read(100)
    assert int.from_bytes(head[68:72], "big") == OUTBOX_APP_ID  # in the main file itself
    assert not [p for p in os.listdir(tmp_path) if "corrupt" in p or "foreign" in p]
