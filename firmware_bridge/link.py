"""The reliable link: an asyncio protocol that turns frames into requests and answers.

Requests carry a sequence number; the answer names it in ``ack``. The sender keeps the request
in a pending table, retransmits it (same seq, RETRY flag) when no answer comes within the ack
timeout, and gives up after ``retries`` retransmissions with ``RequestTimeout``. The peer
answers a retransmission it already handled from a cache of recent answers instead of doing
the work twice, so REBOOT or FW_COMMIT are never executed twice.

- At most ``window`` requests are in flight (a semaphore); a firmware transfer keeps the window
  full instead of waiting for each chunk.
- The ack timeout adapts to measured round trips like EZSP-ASH: ``t = 7/8 t + 1/2 rtt``,
  clamped, sampled only from requests answered at the first attempt (Karn).
- After ``max_consecutive_timeouts`` unanswered requests the link declares itself down.
- Bad bytes are counted and dropped; nothing raises out of ``data_received``.
- On connection loss every pending request fails with ``LinkDown`` and the table is emptied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from drivers.base import ProtocolError
from firmware_bridge import framing
from firmware_bridge.errors import (
    BridgeError,
    CrcError,
    FrameError,
    LinkDown,
    MessageError,
    Rejected,
    RequestTimeout,
)
from firmware_bridge.frames import FLAG_ANSWER, FLAG_RETRY, Frame
from firmware_bridge.messages import (
    NOTICE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    Message,
    MsgType,
    Nak,
    NakCode,
    decode_message,
    type_name,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
RequestHandler = Callable[[Message], Message | None]
NoticeHandler = Callable[[Message], None]

# Frames of these types are understood in every protocol version (version negotiation).
_ANY_VERSION = frozenset({MsgType.CONNECT, MsgType.HELLO, MsgType.NAK})
_ANSWER_CACHE = 32  # recent peer requests whose answer is kept for their retransmissions


@dataclass(frozen=True, slots=True)
class LinkConfig:
    ack_timeout_s: float = 1.6  # before any round trip is measured
    ack_timeout_min_s: float = 0.4
    ack_timeout_max_s: float = 3.2
    retries: int = 3  # retransmissions after the first attempt
    window: int = 8  # requests in flight
    max_consecutive_timeouts: int = 5


class Link(asyncio.Protocol):
    def __init__(self, where: str, config: LinkConfig | None = None, *,
                 on_request: RequestHandler | None = None, on_notice: NoticeHandler | None = None,
                 mono_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.where = where
        self.config = config or LinkConfig()
        if not 1 <= self.config.window <= 64:
            raise ValueError(f"window {self.config.window} is outside 1..64")
        self.on_request = on_request
        self.on_notice = on_notice
        self.on_lost: Callable[[BridgeError], None] | None = None
        self.mono_ns = mono_ns
        self.version = PROTOCOL_VERSION
        self.ack_timeout_s = self.config.ack_timeout_s
        self.rtt_s: float | None = None
        self.counters: dict[str, int] = {}
        self._transport: asyncio.BaseTransport | None = None
        self._deframer = framing.Deframer()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._window = asyncio.Semaphore(self.config.window)
        self._seq = 0
        self._answered: OrderedDict[int, bytes] = OrderedDict()
        self._consecutive_timeouts = 0
        self._down: BridgeError | None = None
        self._lost = asyncio.Event()
        self._closed = asyncio.Event()

    # -- state -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests waiting for an answer (0 after every request has finished)."""
        return len(self._pending)

    @property
    def is_up(self) -> bool:
        return self._transport is not None and self._down is None

    @property
    def down_reason(self) -> BridgeError | None:
        return self._down

    async def wait_lost(self) -> None:
        """Until the link is down (requests fail from then on)."""
        await self._lost.wait()

    async def wait_closed(self) -> None:
        """Until the transport has reported ``connection_lost`` (the port is released)."""
        await self._closed.wait()

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in sorted(self.counters.items())}
        out.update({k: float(v) for k, v in self._deframer.counters.items()})
        out["ack_timeout_s"] = self.ack_timeout_s
        if self.rtt_s is not None:
            out["rtt_s"] = self.rtt_s
        return out

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._down = None
        self._lost.clear()
        self._closed.clear()
        self._deframer.reset()
        # A lone delimiter ends whatever partial frame the device may be holding.
        self._write(framing.DELIMITER)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"link closed: {exc}" if exc else "link closed"
        self._mark_down(LinkDown(reason, where=self.where))
        self._transport = None
        self._closed.set()

    def data_received(self, data: bytes) -> None:
        for body in self._deframer.feed(bytes(data)):
            try:
                self._on_body(body)
            except Exception:  # a callback must not kill the transport; count and go on
                self._count("handler_errors")
                log.exception("%s: error while handling a frame", self.where)

    # -- sending ---------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._down is not None:
            return
        transport.write(data)  # type: ignore[attr-defined]

    def _send(self, frame: Frame) -> bytes:
        wire = framing.encode(frame.to_bytes())
        self._write(wire)
        self._count("tx_frames")
        return wire

    def _next_seq(self) -> int:
        for _ in range(256):
            self._seq = (self._seq + 1) & 0xFF
            if self._seq not in self._pending:
                return self._seq
        raise RuntimeError("no free sequence number")  # window <= 64 makes this unreachable

    def _check_up(self) -> None:
        if self._down is not None:
            raise self._down
        if self._transport is None:
            raise LinkDown("link not connected", where=self.where)

    async def request(self, msg: Message, expect: type[T], *,
                      min_ack_timeout_s: float = 0.0) -> T:
        """Send ``msg`` and return its answer, which must be of type ``expect``.

        Raises Rejected on NAK, RequestTimeout after every retransmission went unanswered,
        LinkDown if the link is or goes down, ProtocolError for an answer of the wrong type.
        ``min_ack_timeout_s`` gives slow operations (erase, digest) more time per attempt.
        """
        self._check_up()
        async with self._window:
            self._check_up()
            seq = self._next_seq()
            fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            # Registered before the first byte goes out, so an instant answer is not missed.
            self._pending[seq] = fut
            try:
                answer = await self._exchange(msg, seq, fut, min_ack_timeout_s)
            finally:
                if self._pending.get(seq) is fut:
                    del self._pending[seq]
                if not fut.done():
                    fut.cancel()
        if isinstance(answer, Nak):
            self._count("naks")
            raise Rejected(f"{type_name(msg.TYPE)} refused: {_nak_name(answer.code)}"
                           f"{': ' + answer.detail if answer.detail else ''}",
                           where=self.where, code=answer.code, detail=answer.detail)
        if not isinstance(answer, expect):
            raise ProtocolError(f"{type_name(msg.TYPE)} answered with {type_name(answer.TYPE)}, "
                                f"expected {expect.__name__}", where=self.where)
        return answer

    async def _exchange(self, msg: Message, seq: int, fut: asyncio.Future[Message],
                        min_ack_timeout_s: float) -> Message:
        payload = msg.encode()
        attempts = 1 + self.config.retries
        for attempt in range(attempts):
            self._check_up()
            flags = FLAG_RETRY if attempt else 0
            self._send(Frame(self.version, msg.TYPE, seq, payload, flags=flags))
            sent = self.mono_ns()
            timeout = max(self.ack_timeout_s, min_ack_timeout_s)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
                # coincides with the answer, and a cancelled request must stop.
                async with asyncio.timeout(timeout):
                    answer = await asyncio.shield(fut)
            except TimeoutError:
                if attempt + 1 < attempts:
                    self._count("retransmits")
                    log.debug("%s: no answer to %s seq %d in %.3f s, retransmitting",
                              self.where, type_name(msg.TYPE), seq, timeout)
                continue
            if attempt == 0:
                self._observe_rtt((self.mono_ns() - sent) / 1e9)
            self._consecutive_timeouts = 0
            return answer
        self._count("timeouts")
        self._consecutive_timeouts += 1
        err = RequestTimeout(
            f"no answer to {type_name(msg.TYPE)} (seq {seq}) after {attempts} attempts",
            where=self.where, msg_type=type_name(msg.TYPE), seq=seq, attempts=attempts)
        if self._consecutive_timeouts >= self.config.max_consecutive_timeouts:
            self.abort(LinkDown(f"{self._consecutive_timeouts} requests in a row got no answer",
                                where=self.where))
        raise err

    def _observe_rtt(self, rtt_s: float) -> None:
        self.rtt_s = rtt_s if self.rtt_s is None else 0.875 * self.rtt_s + 0.125 * rtt_s
        t = 0.875 * self.ack_timeout_s + 0.5 * rtt_s
        self.ack_timeout_s = min(self.config.ack_timeout_max_s,
                                 max(self.config.ack_timeout_min_s, t))

    # -- receiving -------------------------------------------------------------------------

    def _on_body(self, body: bytes) -> None:
        try:
            frame = Frame.from_bytes(body)
        except CrcError as exc:
            self._count("crc_errors")
            log.debug("%s: dropping frame: %s", self.where, exc)
            return
        except FrameError as exc:
            self._count("bad_frames")
            log.debug("%s: dropping frame: %s", self.where, exc)
            return
        self._count("rx_frames")
        if frame.version != self.version and frame.type not in _ANY_VERSION:
            self._count("bad_version")
            log.debug("%s: dropping %s in protocol version %d (link speaks %d)", self.where,
                      type_name(frame.type), frame.version, self.version)
            return
        try:
            msg = decode_message(frame.type, frame.payload)
        except MessageError as exc:
            self._count("bad_messages")
            log.debug("%s: dropping frame seq %d: %s", self.where, frame.seq, exc)
            if not frame.is_answer and frame.type not in NOTICE_TYPES:
                self._answer(frame, Nak(NakCode.BAD_PAYLOAD, str(exc)))
            return
        if frame.is_answer:
            fut = self._pending.get(frame.ack)
            if fut is None or fut.done():
                self._count("stray_answers")
                log.debug("%s: answer to seq %d that nobody waits for", self.where, frame.ack)
            else:
                fut.set_result(msg)
        elif frame.type in NOTICE_TYPES:
            if self.on_notice is not None:
                self.on_notice(msg)
        else:
            self._on_peer_request(frame, msg)

    def _on_peer_request(self, frame: Frame, msg: Message) -> None:
        if frame.is_retry and frame.seq in self._answered:
            self._count("duplicates")
            self._write(self._answered[frame.seq])
            return
        answer: Message | None = None
        if self.on_request is not None:
            answer = self.on_request(msg)
        self._answer(frame, answer if answer is not None else Ack())

    def _answer(self, frame: Frame, answer: Message) -> None:
        wire = self._send(Frame(self.version, answer.TYPE, self._seq, answer.encode(),
                                ack=frame.seq, flags=FLAG_ANSWER))
        self._answered[frame.seq] = wire
        self._answered.move_to_end(frame.seq)
        while len(self._answered) > _ANSWER_CACHE:
            self._answered.popitem(last=False)

    def forget_peer(self) -> None:
        """The peer rebooted: its sequence numbers start again, old answers no longer apply."""
        self._answered.clear()

    # -- closing ---------------------------------------------------------------------------

    def _mark_down(self, exc: BridgeError) -> None:
        first = self._down is None
        if first:
            self._down = exc
        reason = self._down or exc
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(reason)
                # The requester sees the error; mark it retrieved so the loop does not warn.
                fut.exception()
        self._pending.clear()
        self._lost.set()
        if first and self.on_lost is not None:
            try:
                self.on_lost(exc)
            except Exception:
                log.exception("%s: on_lost callback failed", self.where)

    def abort(self, exc: BridgeError | None = None) -> None:
        """Drop the link now; every pending request fails with ``exc`` (or LinkDown)."""
        self._mark_down(exc or LinkDown("link aborted", where=self.where))
        transport = self._transport
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._mark_down(LinkDown("link closed by the host", where=self.where))
        transport = self._transport
        if transport is not None:
            transport.close()


def _nak_name(code: int) -> str:
    try:
        return NakCode(code).name
    except ValueError:
        return f"code {code}"
