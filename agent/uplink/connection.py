"""One MQTT connection of the uplink: paho's documented external-event-loop API on asyncio.

paho does the protocol; this module runs it on the event loop with paho's public hooks only:
``on_socket_open`` / ``on_socket_close`` / ``on_socket_register_write`` /
``on_socket_unregister_write`` tell it when to watch the socket, ``loop_read`` / ``loop_write``
/ ``loop_misc`` do the work, and the version 2 callbacks (``on_connect``, ``on_publish``,
``on_subscribe``, ``on_message``, ``on_disconnect``) report what happened, PUBACK reason codes
included (an MQTT 5 broker says "not authorized" or "quota exceeded" there). Each QoS 1 publish
gets a future resolved with its PUBACK reason code, so any number of publishes can be in
flight without a waiting coroutine each.

Liveness: paho declares a link dead only about two keepalives after the last byte in. The link
records when the broker last sent anything (``last_in_s``) and gives up once it has been
silent for 1.5 x the keepalive (paho sends its PINGREQ after one keepalive of silence, so a live
broker has half a keepalive to answer). A DISCONNECT from an MQTT 5 broker is kept: a reason
code that blames a packet (``BLAMING_REASONS``) is a refusal of what was just sent, any other
(server shutting down, session taken over, ...) is an outage.

``agent.uplink.connector`` opens the connection a ``Link`` runs.

Errors::

    LinkError            the connection broke, or a request on it failed
    └── ConnectFailed    the broker could not be reached, refused us, or TLS failed
        └── TlsFailed    the handshake failed (e.g. server certificate not trusted)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S: Final = 3.0
MISC_PERIOD_S: Final = 1.0  # paho's keepalive bookkeeping (PINGREQ, a missing PINGRESP)
INBOX_MAX: Final = 256  # received messages waiting for the uplink; beyond, the oldest go
IDLE_DEAD_KEEPALIVES: Final = 1.5
# DISCONNECT reason codes (MQTT 5.0, 3.14.2.1) that say what the last packet did wrong:
# malformed, protocol error, not authorized, topic name invalid, topic alias invalid, packet too
# large, payload format invalid, retain not supported, QoS not supported.
BLAMING_REASONS: Final = frozenset({0x81, 0x82, 0x87, 0x90, 0x94, 0x95, 0x99, 0x9A, 0x9B})


class LinkError(Exception):
    """The connection broke, or a publish or subscribe on it failed."""


class ConnectFailed(LinkError):
    """The connection could not be made; the message says where and why."""


class TlsFailed(ConnectFailed):
    """The TLS handshake failed. Never followed by a plaintext attempt."""


class Refused(ConnectFailed):
    """The broker answered CONNECT with a failure code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


class NoConnack(ConnectFailed):
    """The broker closed the connection, or said nothing, instead of answering CONNECT."""

    def __init__(self, text: str, *, silent: bool) -> None:
        super().__init__(text)
        self.silent = silent


def reason_value(rc: Any) -> int | None:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else None


@dataclass(frozen=True, slots=True)
class Message:
    """A message the broker delivered on one of our subscriptions."""

    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0


class Link:
    """An open connection: paho's client driven by the event loop."""

    def __init__(self, client: paho.Client, protocol: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.protocol = protocol
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._sock: Any = None
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._subs: dict[int, asyncio.Future[list[int]]] = {}
        self.connected: asyncio.Future[None] = loop.create_future()
        self.lost: LinkError | None = None
        self._closed = asyncio.Event()
        self._inbox: collections.deque[Message] = collections.deque()
        self._inbox_ready = asyncio.Event()
        self.dropped_messages = 0
        self.last_socket_error = ""
        self.last_in_s = time.monotonic()
        self.refusal: str | None = None  # a DISCONNECT reason that blames the last packet
        self.broker_said_bye = False  # the broker sent DISCONNECT (MQTT 5)
        self.session_present = False  # the broker kept our session from before (CONNACK)
        self._misc: asyncio.Task[None] | None = None
        self._released = False
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_log = self._on_log

    # -- paho's callbacks ------------------------------------------------------------------

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the loop thread (paho calls some hooks from the connecting thread)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._soon(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        if sock.fileno() < 0:
            return  # closed before the loop got to it (a refused TLS connection)
        if self._released:  # the connect finished after we gave up on it
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._sock = sock
        self._loop.add_reader(sock, self._read)
        if self._misc is None:
            self._misc = self._loop.create_task(self._misc_loop(), name="mqtt-keepalive")

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._unwatch, sock)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._want_write, sock)

    def _want_write(self, sock: Any) -> None:
        if sock.fileno() >= 0:
            self._loop.add_writer(sock, self._guarded, self.client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._no_write, sock)

    def _no_write(self, sock: Any) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    @property
    def keepalive_s(self) -> float:
        """As agreed with the broker (an MQTT 5 broker may override ours)."""
        return float(self.client.keepalive or 60)

    def _read(self) -> None:
        self.last_in_s = time.monotonic()
        self._guarded(self.client.loop_read)

    def _guarded(self, step: Callable[[], MQTTErrorCode]) -> None:
        try:
            step()
        except Exception as exc:  # a broken socket shows up here as OSError or SSLError
            self._lose(LinkError(f"connection lost: {exc}"))

    async def _misc_loop(self) -> None:
        while self.lost is None:
            limit_s = IDLE_DEAD_KEEPALIVES * self.keepalive_s
            due_s = self.last_in_s + limit_s - time.monotonic()
            await asyncio.sleep(max(0.01, min(MISC_PERIOD_S, due_s)))
            silent_s = time.monotonic() - self.last_in_s
            if self.connected.done() and silent_s >= limit_s:
                self._lose(LinkError(f"connection lost: nothing from the broker for "
                                     f"{silent_s:.1f} s (keepalive {self.keepalive_s:g} s)"))
                self.release()
                return
            try:
                self.client.loop_misc()
            except Exception as exc:
                self._lose(LinkError(f"connection lost: {exc}"))

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Any) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        self._soon(self._connack, reason_code)

    def _connack(self, reason_code: ReasonCode) -> None:
        if self.connected.done():
            return
        if reason_code.is_failure:
            self.connected.set_exception(Refused(int(reason_code.value), str(reason_code)))
        else:
            self.connected.set_result(None)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        why = self.last_socket_error or str(reason_code)
        if getattr(flags, "is_disconnect_packet_from_server", False):
            self.broker_said_bye = True
            code = reason_value(reason_code)
            why = f"the broker sent DISCONNECT: {reason_code}"
            if code in BLAMING_REASONS:
                self.refusal = f"DISCONNECT 0x{code:02x} {reason_code}"
        self._soon(self._lose, LinkError(f"connection lost: {why}"))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Any) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason_value(reason_code) or 0)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Any) -> None:
        fut = self._subs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([reason_value(rc) or 0 for rc in reason_codes])

    def _on_message(self, client: paho.Client, userdata: Any,
                    message: paho.MQTTMessage) -> None:
        # Whatever arrives, nothing may raise here: paho would pass it up through loop_read
        # and the connection would drop (a topic that is not UTF-8 does that to paho).
        try:
            received = Message(message.topic, bytes(message.payload), bool(message.retain),
                               int(message.mid), int(message.qos))
        except (UnicodeDecodeError, TypeError, ValueError):
            self.dropped_messages += 1
            log.debug("dropped a received message that cannot be decoded")
            self._ack(message.mid, message.qos)
            return
        if len(self._inbox) >= INBOX_MAX:
            dropped = self._inbox.popleft()
            self.dropped_messages += 1
            self.ack(dropped)
        self._inbox.append(received)
        self._inbox_ready.set()

    def _ack(self, mid: Any, qos: Any) -> None:
        with contextlib.suppress(Exception):  # a connection that is gone takes no PUBACK
            self.client.ack(int(mid), int(qos))

    def ack(self, msg: Message) -> None:
        """Acknowledge a delivered message once it is dealt with. Only a client made with
        ``manual_ack`` (the persistent command session) waits for this: the broker keeps a
        message that was never acknowledged and delivers it again on the next connection, and
        its receive maximum holds back the rest meanwhile, so nothing is lost to a full inbox
        or a crash. Otherwise paho acknowledged on receipt and this does nothing."""
        self._ack(msg.mid, msg.qos)

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        # paho reports socket and TLS failures only in its log ("failed to receive on socket:
        # [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] ..."); keep the text to explain the failure.
        if level == paho.MQTT_LOG_ERR:
            self.last_socket_error = buf

    # -- the connection's end --------------------------------------------------------------

    def _lose(self, exc: LinkError) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        if not self.connected.done():
            self.connected.set_exception(NoConnack(
                f"connection closed before CONNACK: {str(exc).removeprefix('connection lost: ')}",
                silent=False))
        pending: list[asyncio.Future[Any]] = [*self._acks.values(), *self._subs.values()]
        for fut in pending:
            if not fut.done():
                fut.cancel()
        self._acks.clear()
        self._subs.clear()
        self._inbox_ready.set()
        self._closed.set()
        if self._misc is not None and self._misc is not asyncio.current_task():
            self._misc.cancel()

    async def close(self) -> None:
        """Say DISCONNECT if the socket takes it, then make sure the socket is closed."""
        if self.lost is None:
            self.client.disconnect()  # paho closes the socket once DISCONNECT is written
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._closed.wait()
        self._lose(LinkError("connection closed"))
        self.release()

    def release(self) -> None:
        """Close the socket whatever state paho is in (a frozen peer never takes DISCONNECT)."""
        self._released = True
        sock = self._sock or self.client.socket()
        if sock is not None:
            self._unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()
        if self._misc is not None:
            self._misc.cancel()

    # -- what the uplink uses ----------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                qos: int = 1) -> asyncio.Future[int]:
        """Send a PUBLISH now; the future gets the PUBACK reason code (0 in 3.1.1; at QoS 0,
        0 once written) and is cancelled if the connection ends first."""
        if self.lost is not None:
            raise LinkError(f"could not publish on {topic}: {self.lost}")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(f"could not publish on {topic}: {paho.error_string(info.rc)}")
        fut: asyncio.Future[int] = self._loop.create_future()
        if qos == 0:  # nothing will acknowledge it: paho has it, and that is all there is
            fut.set_result(0)
            return fut
        self._acks[info.mid] = fut
        return fut

    async def subscribe(self, topic: str, timeout_s: float) -> None:
        if self.lost is not None:
            raise self.lost
        # MQTT 5: "retain as published", so a retained message forwarded to a subscription that
        # already exists still says it was retained (3.1.1 brokers always clear the flag then).
        opts = SubscribeOptions(qos=1, retainAsPublished=True) if self.protocol == "5" else None
        rc, mid = (self.client.subscribe(topic, options=opts) if opts is not None
                   else self.client.subscribe(topic, qos=1))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(f"could not subscribe to {topic}: {paho.error_string(rc)}")
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._subs[mid] = fut
        try:
            async with asyncio.timeout(timeout_s):
                codes = await fut
        except TimeoutError:
            raise LinkError(f"no SUBACK for {topic} within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            if self.lost is not None:
                raise self.lost from None
            raise
        if any(c >= 0x80 for c in codes):
            raise LinkError(f"subscription to {topic} refused: {codes}")

    @property
    def messages(self) -> AsyncIterator[Message]:
        """Delivered messages in order; raises ``LinkError`` when the connection is lost."""
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        while True:
            while self._inbox:
                yield self._inbox.popleft()
            if self.lost is not None:
                raise self.lost
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    def nodelay(self) -> bool:
        sock: Any = self.client.socket()
        if sock is None:
            return False
        try:
            return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except (OSError, AttributeError):
            return False


def puback_reason(code: int) -> str:
    """A human name for a PUBACK reason code, e.g. ``0x87 Not authorized``."""
    try:
        name = ReasonCode(PacketTypes.PUBACK, identifier=code).getName()
    except Exception:  # paho raises a plain Exception for codes it does not list
        name = "Packet too large" if code == 0x95 else "unknown"
    return f"0x{code:02x} {name}"
