"""Is the broker's port open? A bare TCP connect, cheap enough to try every half second.

A broker that restarts is away for seconds, and a reconnect backoff that grew while it was away
would keep a gateway offline long after it came back. The uplink therefore separates two
failures: "the port takes no connection" (the broker is down or restarting: probe again soon,
no backoff) and "a full connect failed with the port open" (refused, TLS, no CONNACK: jittered
exponential backoff, so a fleet does not hammer a broker that is up but unhappy).

The probe interval is itself jittered, uniform in ``[PROBE_MIN_S, PROBE_INTERVAL_S]``, so a
fleet that lost the same broker comes back spread over that interval, not in one instant.
The probe sends nothing: the connection is closed as soon as it is made. A host name that does
not resolve is not "port closed": asking the resolver twice a second would load it, so the
uplink backs off on that as on a failed connect (``dns_failed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from typing import Final

PROBE_INTERVAL_S: Final = 0.5
PROBE_MIN_S: Final = 0.05
PROBE_TIMEOUT_S: Final = 2.0


class PortProbe:
    def __init__(self, host: str, port: int, *, timeout_s: float = PROBE_TIMEOUT_S,
                 rng: random.Random | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._rng = rng or random.Random()
        self.dns_failed = False

    def interval_s(self) -> float:
        return self._rng.uniform(PROBE_MIN_S, PROBE_INTERVAL_S)

    async def check(self) -> str | None:
        """None when the port took a connection; else why not."""
        self.dns_failed = False
        try:
            async with asyncio.timeout(self.timeout_s):
                _reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return f"no answer within {self.timeout_s:g} s"
        except ConnectionRefusedError:
            return "connection refused (nothing listens on the port)"
        except socket.gaierror as exc:
            self.dns_failed = True
            return f"{self.host}: {exc}"
        except (OSError, UnicodeError, ValueError) as exc:  # refused, unreachable, bad name
            return str(exc) or type(exc).__name__
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await writer.wait_closed()
        return None
