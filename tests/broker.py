"""A real mosquitto broker on a free loopback port, for tests and benchmarks.

It can be stopped, killed and restarted within a test on the same port, with its persistence
kept, so a subscriber's persistent session survives a broker outage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "",
                 listeners: str | None = None) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        workdir.mkdir(parents=True, exist_ok=True)
        listener = listeners if listeners is not None else (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.conf.write_text(
            f"{listener}"
            # As root mosquitto would drop to the mosquitto user and then fail to write its
            # persistence into the test's directory: stay root (ignored when not root).
            "user root\n"
            f"persistence true\npersistence_location {workdir}/\n"
            "autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\n"
            f"{extra_conf}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited at start: {err} {self._log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port),
                                                                        0.2):
                return
            time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout_s} s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""
