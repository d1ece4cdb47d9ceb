"""One MQTT connection of the uplink: aiomqtt underneath, PUBACK reason codes on top.

aiomqtt's ``publish`` waits for the PUBACK but drops its reason code (an MQTT 5 broker says
"not authorized" or "quota exceeded" there), and it costs one waiting coroutine per message in
flight. ``AckingClient`` adds ``publish_nowait``: a future per QoS 1 publish, resolved with the
PUBACK reason code and cancelled when the connection ends. It relies on aiomqtt 2.x internals
(the paho client and its ``on_publish`` hook), which is why aiomqtt is pinned below 3.

``Connector.connect`` opens a connection: TLS from ``agent.uplink.tls``, credentials from the
configured file, last will ``offline`` (retained) on the status topic, TCP_NODELAY (neither
aiomqtt nor paho set it, and Nagle plus delayed ACK stalls small publishes by ~40 ms), MQTT 5
with a fall back to 3.1.1 when the broker refuses the protocol version (remembered).

Errors::

    ConnectFailed        the broker could not be reached, refused us, or TLS failed
    └── TlsFailed        the handshake failed (e.g. server certificate not trusted)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.aio import within
from agent.config.schema import MqttConfig
from agent.uplink.tls import ClientContext, read_credentials, tls_context

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0  # CONNACK after the TCP and TLS handshakes
PROBE_TIMEOUT_S: Final = 5.0  # CONNACK to a first MQTT 5 CONNECT, before trying 3.1.1
NO_CONNACK: Final = "Operation timed out"  # aiomqtt's message when CONNACK does not come
CLOSE_TIMEOUT_S: Final = 3.0
# CONNACK codes that mean "speak an older protocol": 3.1.1 "unacceptable protocol version"
# and MQTT 5 0x84 "unsupported protocol version" (amqtt answers an MQTT 5 CONNECT with it).
FALLBACK_CODES: Final = frozenset({1, 0x84})
V5: Final = aiomqtt.ProtocolVersion.V5
V311: Final = aiomqtt.ProtocolVersion.V311
NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ConnectFailed(Exception):
    """The connection could not be made; the message says where and why."""


class TlsFailed(ConnectFailed):
    """The TLS handshake failed. Never followed by a plaintext attempt."""


def reason_value(rc: Any) -> int | None:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else None


class ClosedBeforeConnack(aiomqtt.MqttError):
    """The broker (or a TLS peer) closed the connection before answering CONNECT."""


# How a peer that does not speak TLS answers a ClientHello.
_HANDSHAKE_HINTS: Final = ("reset by peer", "EOF occurred", "WRONG_VERSION_NUMBER",
                           "UNEXPECTED_EOF")


def _is_tls_text(text: str) -> bool:
    return any(k in text for k in ("SSL", "TLS", "tls", "certificate"))


class AckingClient(aiomqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[int]] = {}
        self.last_socket_error = ""
        self._client.on_log = self._on_paho_log

    def _on_paho_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        # paho reports socket and TLS failures only in its log ("failed to receive on socket:
        # [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] ..."); keep the text to explain the failure.
        if level == paho.MQTT_LOG_ERR:
            self.last_socket_error = buf

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None = None) -> None:
        if not self._connected.done():
            # aiomqtt ignores a disconnect before CONNACK and waits for its timeout; a TLS 1.3
            # peer refusing our certificate says so only after the handshake, so fail now.
            why = self.last_socket_error or str(reason_code)
            self._loop.call_soon_threadsafe(self._fail_connect, why)
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _fail_connect(self, why: str) -> None:
        if not self._connected.done():
            self._connected.set_exception(
                ClosedBeforeConnack(f"connection closed before CONNACK: {why}"))

    def _on_socket_register_write(self, client: paho.Client, userdata: Any,
                                  sock: Any) -> None:
        # As aiomqtt does, but skip a socket paho closed before the loop got to it (a refused
        # TLS connection), instead of letting add_writer fail on a dead descriptor.
        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            fd = sock.fileno()
            if fd >= 0:
                self._loop.add_writer(fd, write)

        self._loop.call_soon_threadsafe(register)

    def publish_nowait(self, topic: str, payload: bytes, *,
                       retain: bool = False) -> asyncio.Future[int]:
        """Send a QoS 1 PUBLISH now; the future gets the PUBACK reason code (0 in 3.1.1)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, f"could not publish on {topic}")
        fut: asyncio.Future[int] = self._loop.create_future()
        self._acks[info.mid] = fut
        return fut

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties) -> None:
        fut = self._acks.pop(mid, None)
        if fut is None:
            super()._on_publish(client, userdata, mid, reason_code, properties)
        elif not fut.done():
            fut.set_result(reason_value(reason_code) or 0)

    def cancel_pending(self) -> int:
        """Cancel every future still waiting for a PUBACK; returns how many there were."""
        n = 0
        for fut in self._acks.values():
            if not fut.done():
                fut.cancel()
                n += 1
        self._acks.clear()
        return n

    def close_socket(self, tls: ClientContext | None = None) -> None:
        """Release the socket and paho's wake-up socket pair, whatever state paho is in.

        aiomqtt leaves them open when the CONNACK never comes or the connection breaks, and
        paho leaves the socket of a failed TLS handshake to the context that made it.
        """
        with contextlib.suppress(OSError):
            self._client._reset_sockets()
        if tls is not None:
            tls.close_wrapped()

    def nodelay(self) -> bool:
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            return False
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class Link:
    """An open connection, as the uplink sees it."""

    def __init__(self, client: AckingClient, protocol: str) -> None:
        self.client = client
        self.protocol = protocol

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[int]:
        return self.client.publish_nowait(topic, payload, retain=retain)

    async def subscribe(self, topic: str, timeout_s: float) -> None:
        await self.client.subscribe(topic, qos=1, timeout=timeout_s)

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self.client.messages

    def nodelay(self) -> bool:
        return self.client.nodelay()


class Connector:
    def __init__(self, cfg: MqttConfig, gateway: str, *, will_topic: str) -> None:
        self.cfg = cfg
        self.client_id = cfg.client_id or gateway
        self.will_topic = will_topic
        self.learned: aiomqtt.ProtocolVersion | None = None
        self.where = f"{cfg.host}:{cfg.port}"
        self.probe_timeout_s = PROBE_TIMEOUT_S
        self.gateway = gateway
        self._warned_identity = False

    def _candidates(self) -> list[aiomqtt.ProtocolVersion]:
        if self.cfg.protocol == "5":
            return [V5]
        if self.cfg.protocol == "3.1.1":
            return [V311]
        return [self.learned] if self.learned is not None else [V5, V311]

    def _client(self, proto: aiomqtt.ProtocolVersion, tls: ClientContext | None,
                creds: tuple[str, str | None] | None, timeout_s: float) -> AckingClient:
        client = AckingClient(
            self.cfg.host, self.cfg.port,
            username=creds[0] if creds else None, password=creds[1] if creds else None,
            identifier=self.client_id, protocol=proto,
            will=aiomqtt.Will(self.will_topic, b"offline", qos=1, retain=True),
            clean_session=True if proto != V5 else None,
            clean_start=True if proto == V5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=self.cfg.keepalive_s, timeout=timeout_s,
            # The uplink bounds what is in flight itself; paho's own cap (default 20) must not
            # queue behind it. Room is left for command replies and the birth message.
            max_inflight_messages=self.cfg.max_inflight + 16,
            tls_context=tls, socket_options=[NODELAY], logger=log.getChild("paho"),
        )
        # aiomqtt warns on every call past this many pending; the uplink pipelines up to
        # max_inflight publishes on purpose (its own publish path does not count here, but
        # subscribe and replies do).
        client.pending_calls_threshold = self.cfg.max_inflight + 64
        return client

    def _describe(self, exc: BaseException) -> ConnectFailed:
        text = str(exc)
        if isinstance(exc, MqttConnectError):
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
            client = self._client(proto, tls, creds,
                                  self.probe_timeout_s if probing else CONNECT_TIMEOUT_S)
            try:
                await client.__aenter__()
            except MqttConnectError as exc:
                client.close_socket(tls)
                code = reason_value(exc.rc)
                if probing and code in FALLBACK_CODES:
                    log.info("%s refuses MQTT 5 (code %s): using MQTT 3.1.1", self.where, code)
                    continue
                raise self._describe(exc) from exc
            except aiomqtt.MqttError as exc:
                client.close_socket(tls)
                # Some 3.1.1-only brokers choke on an MQTT 5 CONNECT (amqtt stalls parsing one
                # with a will, or hangs up) instead of refusing it: no CONNACK also means
                # "older", unless TLS is what failed.
                no_answer = str(exc) == NO_CONNACK or isinstance(exc, ClosedBeforeConnack)
                if probing and no_answer and not _is_tls_text(str(exc)):
                    log.info("%s did not answer an MQTT 5 CONNECT (%s): trying MQTT 3.1.1",
                             self.where, exc)
                    continue
                raise self._describe(exc) from exc
            self.learned = proto
            if tls is not None:
                tls.forget_wrapped()  # the live socket is the client's now
            try:
                yield Link(client, "5" if proto == V5 else "3.1.1")
            finally:
                client.cancel_pending()
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    await within(client.__aexit__(None, None, None), CLOSE_TIMEOUT_S)
                client.close_socket()
            return
        raise ConnectFailed(f"{self.where}: no protocol version was accepted")


def puback_reason(code: int) -> str:
    """A human name for a PUBACK reason code, e.g. ``0x87 Not authorized``."""
    try:
        name = ReasonCode(PacketTypes.PUBACK, identifier=code).getName()
    except Exception:  # paho raises a plain Exception for codes it does not list
        name = "Packet too large" if code == 0x95 else "unknown"
    return f"0x{code:02x} {name}"
