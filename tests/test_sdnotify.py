"""sd_notify datagrams on a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from agent.sdnotify import Notifier


def _bound(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2.0)
    return s, path


def test_messages_arrive_on_notify_socket(tmp_path: Path) -> None:
    s, path = _bound(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_s == 4.0
    assert n.ready("up")
    assert n.watchdog()
    assert n.stopping()
    got = [s.recv(1024).decode() for _ in range(3)]
    assert got == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"]
    n.close()
    s.close()


def test_nothing_sent_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert n.watchdog_s is None


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": "1"})
    assert n.watchdog_s is None
