"""Child processes for the benchmarks: the agent with a notify socket, and bare baselines.

CPU time and memory come from ``/proc/<pid>/stat`` and ``/proc/<pid>/status`` (Linux only).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.config.schema import StreamConfig  # noqa: E402
from tests.harness import make_config, write_toml  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
GATEWAY = "gw-bench"


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raw_share() -> dict[str, Any]:
    """The stream key that publishes cleaned readings, whichever the config speaks."""
    if "share" in StreamConfig.model_fields:
        return {"share": "raw"}
    return {"raw": True}


def synthetic(name: str, period_s: float, burst: int = 1, **options: Any) -> dict[str, Any]:
    return {"name": name, "driver": "synthetic", "period_s": period_s,
            "options": {"burst": burst, "amplitude": 1.0, "cycle_s": 60.0, **options}}


def agent_config(tmp: Path, port: int, **sections: Any) -> Path:
    data = make_config(tmp, port, **sections)
    data["gateway"] = {"id": GATEWAY}
    return write_toml(tmp / "agent.toml", data)


class NotifySocket:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, timeout_s: float) -> float:
        """Block until a datagram with READY=1 arrives; return time.monotonic() then."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no READY=1 on {self.path} within {timeout_s} s")
            self.sock.settimeout(left)
            data = self.sock.recv(4096)
            if b"READY=1" in data.split(b"\n"):
                return time.monotonic()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class AgentProcess:
    """``python -m agent.cli.main run -c CONFIG`` with a notify socket; ``ready_s`` once READY.
    ``tree``: the source tree to run (another revision, extracted, for a baseline)."""

    def __init__(self, config: Path, log: Path, tree: Path = ROOT) -> None:
        self.config = config
        self.notify = NotifySocket(config.parent / "notify.sock")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path),
               "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli.main", "run", "-c", str(config),
             "--log-format", "text"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=tree)
        self.ready_s = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        try:
            self.ready_s = self.notify.wait_ready(timeout_s) - self.t0
        except TimeoutError:
            self.stop()
            raise
        return self.ready_s

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.notify.close()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def agent_running(config: Path, log: Path, timeout_s: float = 60.0,
                  tree: Path = ROOT) -> Iterator[AgentProcess]:
    a = AgentProcess(config, log, tree)
    try:
        a.wait_ready(timeout_s)
        yield a
    finally:
        a.stop()


def python_child(code: str) -> subprocess.Popen[bytes]:
    env = {**os.environ,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def bare_startup_s(repeat: int = 5) -> float:
    """Median wall time of ``python -c pass`` (start to exit)."""
    times = []
    for _ in range(repeat):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - t0)
    return sorted(times)[len(times) // 2]
