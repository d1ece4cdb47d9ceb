"""One MQTT connection of the uplink: paho's documented external-event-loop API on asyncio.

paho does the protocol; this module runs it on the event loop with paho's public hooks only:
``on_socket_open`` / ``on_socket_close`` / ``on_socket_register_write`` /
``on_socket_unregister_write`` tell it when to watch the socket, ``loop_read`` / ``loop_write``
/ ``loop_misc`` do the work, and the version 2 callbacks (``on_connect``, ``on_publish``,
``on_subscribe``, ``on_message``, ``on_disconnect``) report what happened, PUBACK reason codes
included (an MQTT 5 broker says "not authorized" or "quota exceeded" there). Each QoS 1 publish
gets a future resolved with its PUBACK reason code, so any number of publishes can be in
flight without a waiting coroutine each.

``Connector.connect`` opens a connection: TLS from ``agent.uplink.tls``, credentials from the
configured file, last will ``offline`` (retained) on the status topic, TCP_NODELAY (paho does
not set it, and Nagle plus delayed ACK stalls small publishes by ~40 ms), MQTT 5 with a fall
back to 3.1.1 when the broker refuses the protocol version (remembered). paho's blocking
``connect`` (TCP and TLS handshakes) runs on a worker thread; everything after it runs on the
event loop thread.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config.schema import MqttConfig
from agent.uplink.tls import ClientContext, read_credentials, tls_context

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0  # CONNACK after the TCP and TLS handshakes
PROBE_TIMEOUT_S: Final = 5.0  # CONNACK to a first MQTT 5 CONNECT, before trying 3.1.1
CLOSE_TIMEOUT_S: Final = 3.0
MISC_PERIOD_S: Final = 1.0  # paho's keepalive bookkeeping (PINGREQ, a missing PINGRESP)
INBOX_MAX: Final = 256  # received messages waiting for the uplink; beyond, the oldest go
# CONNACK codes that mean "speak an older protocol": 3.1.1 "unacceptable protocol version"
# and MQTT 5 0x84 "unsupported protocol version" (amqtt answers an MQTT 5 CONNECT with it).
FALLBACK_CODES: Final = frozenset({1, 0x84})
V5: Final = MQTTProtocolVersion.MQTTv5
V311: Final = MQTTProtocolVersion.MQTTv311


class LinkError(Exception):
    """The connection broke, or a publish or subscribe on it failed."""


class ConnectFailed(LinkError):
    """The connection could not be made; the message says where and why."""


class TlsFailed(ConnectFailed):
    """The TLS handshake failed. Never followed by a plaintext attempt."""


class _Refused(ConnectFailed):
    """The broker answered CONNECT with a failure code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


class _NoConnack(ConnectFailed):
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


# How a peer that does not speak TLS answers a ClientHello.
_HANDSHAKE_HINTS: Final = ("reset by peer", "EOF occurred", "WRONG_VERSION_NUMBER",
                           "UNEXPECTED_EOF")


def _is_tls_text(text: str) -> bool:
    return any(k in text for k in ("SSL", "TLS", "tls", "certificate"))


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
        self._loop.add_reader(sock, self._guarded, self.client.loop_read)
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

    def _guarded(self, step: Callable[[], MQTTErrorCode]) -> None:
        try:
            step()
        except Exception as exc:  # a broken socket shows up here as OSError or SSLError
            self._lose(LinkError(f"connection lost: {exc}"))

    async def _misc_loop(self) -> None:
        while self.lost is None:
            await asyncio.sleep(MISC_PERIOD_S)
            try:
                self.client.loop_misc()
            except Exception as exc:
                self._lose(LinkError(f"connection lost: {exc}"))

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Any) -> None:
        self._soon(self._connack, reason_code)

    def _connack(self, reason_code: ReasonCode) -> None:
        if self.connected.done():
            return
        if reason_code.is_failure:
            self.connected.set_exception(_Refused(int(reason_code.value), str(reason_code)))
        else:
            self.connected.set_result(None)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        why = self.last_socket_error or str(reason_code)
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
            received = Message(message.topic, bytes(message.payload), bool(message.retain))
        except (UnicodeDecodeError, TypeError, ValueError):
            self.dropped_messages += 1
            log.debug("dropped a received message that cannot be decoded")
            return
        if len(self._inbox) >= INBOX_MAX:
            self._inbox.popleft()
            self.dropped_messages += 1
        self._inbox.append(received)
        self._inbox_ready.set()

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
            self.connected.set_exception(_NoConnack(
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
        rc, mid = self.client.subscribe(topic, qos=1)
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


class Connector:
    def __init__(self, cfg: MqttConfig, gateway: str, *, will_topic: str,
                 will: Callable[[], bytes] | None = None, will_retain: bool = True,
                 client_id: str | None = None) -> None:
        """``will`` makes the last-will payload for each new connection (default
        ``offline``), e.g. a Sparkplug NDEATH with that connection's bdSeq."""
        self.cfg = cfg
        self.client_id = client_id or cfg.client_id or gateway
        self.will_topic = will_topic
        self.will = will
        self.will_retain = will_retain
        self.learned: MQTTProtocolVersion | None = None
        self.where = f"{cfg.host}:{cfg.port}"
        self.probe_timeout_s = PROBE_TIMEOUT_S
        self.gateway = gateway
        self._warned_identity = False

    def _candidates(self) -> list[MQTTProtocolVersion]:
        if self.cfg.protocol == "5":
            return [V5]
        if self.cfg.protocol == "3.1.1":
            return [V311]
        return [self.learned] if self.learned is not None else [V5, V311]

    def _client(self, proto: MQTTProtocolVersion, tls: ClientContext | None,
                creds: tuple[str, str | None] | None) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=True if proto != V5 else None, protocol=proto,
                             reconnect_on_failure=False)
        if creds:
            client.username_pw_set(creds[0], creds[1])
        client.will_set(self.will_topic, self.will() if self.will else b"offline", qos=1,
                        retain=self.will_retain)
        if tls is not None:
            client.tls_set_context(tls)
        # The uplink bounds what is in flight itself; paho's own cap (default 20) must not
        # queue behind it. Room is left for command replies and the birth message.
        client.max_inflight_messages_set(self.cfg.max_inflight + 16)
        client.enable_logger(log.getChild("paho"))
        return client

    def _describe(self, exc: BaseException) -> ConnectFailed:
        text = str(exc)
        if isinstance(exc, _Refused):
            return ConnectFailed(f"{self.where}: the broker refused the connection: {text}")
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return TlsFailed(f"{self.where}: TLS: the server certificate was not accepted "
                             f"(ca_file={self.cfg.ca_file or 'system store'}): {text}")
        if _is_tls_text(text):
            return TlsFailed(f"{self.where}: TLS failed (client certificate "
                             f"{self.cfg.cert_file or 'none'}): {text}")
        if self.cfg.tls_enabled() and any(k in text for k in _HANDSHAKE_HINTS):
            return TlsFailed(f"{self.where}: TLS handshake failed (is this port a TLS "
                             f"listener?): {text}")
        return ConnectFailed(f"{self.where}: {text or type(exc).__name__}")

    async def _open(self, proto: MQTTProtocolVersion, tls: ClientContext | None,
                    creds: tuple[str, str | None] | None, timeout_s: float) -> Link:
        loop = asyncio.get_running_loop()
        client = self._client(proto, tls, creds)
        link = Link(client, "5" if proto == V5 else "3.1.1", loop)
        client.connect_timeout = timeout_s
        try:
            await loop.run_in_executor(
                None, lambda: client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive_s,
                                             clean_start=True if proto == V5 else
                                             paho.MQTT_CLEAN_START_FIRST_ONLY))
            try:
                async with asyncio.timeout(timeout_s):
                    await link.connected
            except TimeoutError:
                raise _NoConnack("no CONNACK within "
                                 f"{timeout_s:g} s", silent=True) from None
        except BaseException:
            link.release()
            if tls is not None:
                tls.close_wrapped()
            raise
        if tls is not None:
            tls.forget_wrapped()  # the live socket is the link's now
        return link

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Link]:
        tls = tls_context(self.cfg)
        creds = read_credentials(self.cfg.credentials_file)
        if creds and creds[0] != self.gateway and not self._warned_identity:
            # The broker ACL recipe (docs/sharing.md) grants `{prefix}/%u/#`: a user name that is
            # not the gateway id is refused on every topic this gateway writes.
            log.warning("MQTT user name %r is not the gateway id %r: a per-gateway ACL will "
                        "refuse its publishes", creds[0], self.gateway)
            self._warned_identity = True
        candidates = self._candidates()
        for proto in candidates:
            probing = proto == V5 and len(candidates) > 1
            try:
                link = await self._open(proto, tls, creds,
                                        self.probe_timeout_s if probing else CONNECT_TIMEOUT_S)
            except _Refused as exc:
                if probing and exc.code in FALLBACK_CODES:
                    log.info("%s refuses MQTT 5 (code %s): using MQTT 3.1.1", self.where,
                             exc.code)
                    continue
                raise self._describe(exc) from exc
            except _NoConnack as exc:
                # Some 3.1.1-only brokers choke on an MQTT 5 CONNECT (amqtt stalls parsing one
                # with a will, or hangs up) instead of refusing it: no CONNACK also means
                # "older", unless TLS is what failed.
                if probing and not _is_tls_text(str(exc)):
                    log.info("%s did not answer an MQTT 5 CONNECT (%s): trying MQTT 3.1.1",
                             self.where, exc)
                    continue
                raise self._describe(exc) from exc
            except (OSError, ValueError) as exc:
                raise self._describe(exc) from exc
            self.learned = proto
            try:
                yield link
            finally:
                await link.close()
            return
        raise ConnectFailed(f"{self.where}: no protocol version was accepted")


def puback_reason(code: int) -> str:
    """A human name for a PUBACK reason code, e.g. ``0x87 Not authorized``."""
    try:
        name = ReasonCode(PacketTypes.PUBACK, identifier=code).getName()
    except Exception:  # paho raises a plain Exception for codes it does not list
        name = "Packet too large" if code == 0x95 else "unknown"
    return f"0x{code:02x} {name}"
