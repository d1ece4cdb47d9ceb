"""An in-process MQTT broker (amqtt) for ``edge-agent demo`` when no broker is given.

It speaks MQTT 3.1.1 only, listens on loopback, and is never used on a real gateway. amqtt comes
with the ``demo`` extra.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType
from typing import Any


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedBroker:
    def __init__(self, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_loopback_port()
        self._broker: Any = None

    async def __aenter__(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise RuntimeError(
                "the embedded demo broker needs amqtt: pip install 'edge-agent-gateway[demo]', "
                "or pass --broker HOST:PORT") from exc
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {
                "allow_anonymous": True}},
        })
        await self._broker.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
