"""A full disk fails every commit: the outbox keeps the changes for retry and says so once a
minute, not once a commit. Uses a real full filesystem (a small tmpfs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from agent.outbox.store import Outbox
from tests.test_chaos import small_tmpfs
from tests.test_outbox import GW, all_rows, cfg, put, wait_until


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    return filler


async def test_a_full_disk_logs_one_error_line_not_one_per_commit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        ob = Outbox(cfg(disk, commit_interval_ms=5), GW)
        ob.open()
        task = asyncio.create_task(ob.run(), name="outbox")
        try:
            first = put(ob, "window", 0)
            await wait_until(lambda: ob.accepted_seq == first)
            filler = _fill(disk)
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="agent.outbox.store"):
                i = 1
                while ob.stats()["commit_errors"] < 30:
                    last = put(ob, "raw", i, pad=4000)
                    i += 1
                    await wait_until(lambda i=i: ob.stats()["commit_errors"] >= min(30, i - 1)
                                     or ob.pending_rows == 0, timeout_s=10)
                errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
                assert len(errors) == 1, [r.getMessage() for r in errors]
                assert "disk is full" in errors[0].getMessage() or \
                    "No space left" in errors[0].getMessage()
                held = [r for r in caplog.records if r.levelno == logging.DEBUG
                        and "commit of" in r.getMessage()]
                assert len(held) >= 29  # held back from the journal, not lost from debug
                filler.unlink()
                await wait_until(lambda: ob.accepted_seq == last, timeout_s=10)
            recovered = [r.getMessage() for r in caplog.records if "work again" in r.getMessage()]
            assert len(recovered) == 1 and "failures)" in recovered[0]
            assert len(await all_rows(ob)) == i  # nothing accepted or pending was lost
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            ob.close()
