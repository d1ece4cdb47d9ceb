"""Opening the uplink's MQTT connection: TLS, credentials, will, protocol version.

``Connector.connect`` opens a connection: TLS from ``agent.uplink.tls``, credentials from the
configured file, last will ``offline`` (retained) on the status topic, TCP_NODELAY (paho does
not set it, and Nagle plus delayed ACK stalls small publishes by ~40 ms), MQTT 5 with a fall
back to 3.1.1 when the broker refuses the protocol version (remembered). paho's blocking
``connect`` (TCP and TLS handshakes) runs on a worker thread; everything after it runs on the
event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.schema import MqttConfig
from agent.uplink.backoff import Backoff
from agent.uplink.connection import ConnectFailed, Link, NoConnack, Refused, TlsFailed
from agent.uplink.reach import PortProbe
from agent.uplink.tls import ClientContext, read_credentials, tls_context

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0  # CONNACK after the TCP and TLS handshakes
PROBE_TIMEOUT_S: Final = 5.0  # CONNACK to a first MQTT 5 CONNECT, before trying 3.1.1
RECEIVE_MAXIMUM: Final = 32  # unacknowledged messages the broker may send a persistent session
# CONNACK codes that mean "speak an older protocol": 3.1.1 "unacceptable protocol version"
# and MQTT 5 0x84 "unsupported protocol version" (amqtt answers an MQTT 5 CONNECT with it).
FALLBACK_CODES: Final = frozenset({1, 0x84})
V5: Final = MQTTProtocolVersion.MQTTv5
V311: Final = MQTTProtocolVersion.MQTTv311

# How a peer that does not speak TLS answers a ClientHello.
_HANDSHAKE_HINTS: Final = ("reset by peer", "EOF occurred", "WRONG_VERSION_NUMBER",
                           "UNEXPECTED_EOF")


def _is_tls_text(text: str) -> bool:
    return any(k in text for k in ("SSL", "TLS", "tls", "certificate"))



class Connector:
    def __init__(self, cfg: MqttConfig, gateway: str, *, will_topic: str,
                 will: Callable[[], bytes] | None = None, will_retain: bool = True,
                 client_id: str | None = None, session_expiry_s: int = 0,
                 rng: random.Random | None = None) -> None:
        """``will`` makes the last-will payload for each new connection (default
        ``offline``), e.g. a Sparkplug NDEATH with that connection's bdSeq.

        ``session_expiry_s`` > 0 asks the broker to keep the session (subscriptions and the
        QoS 1 messages that arrive for them) that long after a disconnect: MQTT 5 session
        expiry with clean start off, or clean session off on 3.1.1 (where the broker decides
        how long). The client id must then be the same on every connection."""
        self.cfg = cfg
        self.client_id = client_id or cfg.client_id or gateway
        self.will_topic = will_topic
        self.will = will
        self.will_retain = will_retain
        self.learned: MQTTProtocolVersion | None = None
        # Every broker of `[mqtt]`, tried in order; the probe of each tells whether its port
        # is open, so a dead primary costs one refused TCP connect, not a connect timeout.
        self.addresses = cfg.addresses()
        self.probes = [PortProbe(h, p, rng=rng) for h, p in self.addresses]
        self.index = 0
        self._failed_in_round = 0
        self.probe_timeout_s = PROBE_TIMEOUT_S
        self.gateway = gateway
        self.session_expiry_s = session_expiry_s
        self.session_present = False  # the broker kept our session (the last CONNACK)
        self._warned_identity = False

    @property
    def host(self) -> str:
        return self.addresses[self.index][0]

    @property
    def port(self) -> int:
        return self.addresses[self.index][1]

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def probe(self) -> PortProbe:
        return self.probes[self.index]

    def probe_wait_s(self, backoff: Backoff) -> float:
        """Until the next probe of a port that took no connection: soon (a restarting broker),
        but backed off when its name did not resolve (asking the resolver twice a second would
        load it)."""
        return backoff.next_delay() if self.probe.dns_failed else self.probe.interval_s()

    def failover(self) -> bool:
        """The current broker failed: move to the next. True when that one has not failed in
        this round yet (try it now); False once every broker failed (wait before the next
        round: the caller's backoff)."""
        if len(self.addresses) == 1:
            return False
        self.index = (self.index + 1) % len(self.addresses)
        self._failed_in_round += 1
        if self._failed_in_round >= len(self.addresses):
            self._failed_in_round = 0
            return False
        log.info("uplink: trying the next broker, %s", self.where)
        return True

    def _candidates(self) -> list[MQTTProtocolVersion]:
        if self.cfg.protocol == "5":
            return [V5]
        if self.cfg.protocol == "3.1.1":
            return [V311]
        return [self.learned] if self.learned is not None else [V5, V311]

    def _client(self, proto: MQTTProtocolVersion, tls: ClientContext | None,
                creds: tuple[str, str | None] | None) -> paho.Client:
        persistent = self.session_expiry_s > 0
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=(not persistent) if proto != V5 else None,
                             protocol=proto, reconnect_on_failure=False,
                             manual_ack=persistent)
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
        if isinstance(exc, Refused):
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
        persistent = self.session_expiry_s > 0
        props: Properties | None = None
        if proto == V5 and persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry_s
            # Requests in flight to us at once: the rest wait at the broker, not in our inbox.
            props.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            await loop.run_in_executor(
                None, lambda: client.connect(self.host, self.port, self.cfg.keepalive_s,
                                             clean_start=(not persistent) if proto == V5 else
                                             paho.MQTT_CLEAN_START_FIRST_ONLY,
                                             properties=props))
            try:
                async with asyncio.timeout(timeout_s):
                    await link.connected
            except TimeoutError:
                raise NoConnack("no CONNACK within "
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
            except Refused as exc:
                if probing and exc.code in FALLBACK_CODES:
                    log.info("%s refuses MQTT 5 (code %s): using MQTT 3.1.1", self.where,
                             exc.code)
                    continue
                raise self._describe(exc) from exc
            except NoConnack as exc:
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
            self._failed_in_round = 0
            self.session_present = link.session_present
            try:
                yield link
            finally:
                await link.close()
            return
        raise ConnectFailed(f"{self.where}: no protocol version was accepted")
