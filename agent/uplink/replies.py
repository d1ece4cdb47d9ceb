"""Cloud commands on one connection: run each request, publish its reply, never raise.

Every request runs in a task of the session's task group, so it must end quietly whatever the
payload or the handler does: an exception that left such a task would end the session (and a
retained request would end every next one). ``run_command`` is that boundary: anything but
cancellation is logged, counted in ``failures`` and goes no further. The request is
acknowledged to the broker only after its reply (see ``Link.ack``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from agent.feed.messages import Topics
from agent.uplink.commands import CommandDispatcher, encode_result
from agent.uplink.connection import Link, LinkError, Message, puback_reason

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S: Final = 10.0


class CommandLane:
    def __init__(self, dispatcher: CommandDispatcher | None, topics: Topics,
                 gateway: str) -> None:
        self.dispatcher = dispatcher
        self.topics = topics
        self.gateway = gateway
        self.failures = 0

    async def receive(self, link: Link, tg: asyncio.TaskGroup) -> None:
        """Dispatch commands; ends (raising ``LinkError``) when the connection is lost."""
        async for msg in link.messages:
            name = self.topics.command_name(msg.topic)
            if name is None or self.dispatcher is None:
                link.ack(msg)
                continue
            tg.create_task(self.run_command(link, name, msg), name="command")

    async def run_command(self, link: Link, name: str, msg: Message) -> None:
        try:
            await self._command(link, name, msg)
        except asyncio.CancelledError:
            raise  # not acknowledged: the broker delivers it again, the id table decides
        except Exception:
            self.failures += 1
            log.exception("uplink: command %r could not be answered", name[:100])
        # After the reply (or its failure): a stop before this leaves the request with the
        # broker, and the redelivery is answered from the table of ids, never run twice.
        link.ack(msg)

    async def _command(self, link: Link, name: str, msg: Message) -> None:
        assert self.dispatcher is not None
        result = await self.dispatcher.handle(self.gateway, name, msg.payload,
                                              retained=msg.retain)
        try:
            fut = link.publish(self.topics.cmd_result(name), encode_result(result))
        except LinkError as exc:
            log.warning("uplink: reply to command %r (id %r) lost: %s", name, result.id, exc)
            return
        # asyncio.wait, not wait_for: the future is cancelled if the connection drops.
        await asyncio.wait({fut}, timeout=REPLY_TIMEOUT_S)
        if not fut.done() or fut.cancelled():
            log.warning("uplink: reply to command %r (id %r) not acknowledged", name, result.id)
        elif fut.result() >= 0x80:
            log.warning("uplink: reply to command %r refused: %s", name,
                        puback_reason(fut.result()))
