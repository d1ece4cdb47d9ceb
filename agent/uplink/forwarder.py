"""The publisher: outbox rows -> MQTT (QoS 1), deleted only after the broker's PUBACK.

Two lanes share one bounded in-flight window (``max_inflight``):

* **live**: rows sealed while connected are handed over by the outbox as soon as they are sealed,
  while their batch commits (publish-through, ``agent.outbox.release``), and sent at once, in seq
  order. A live row that waits too long or overflows the live queue becomes backlog
  (``agent.uplink.live``).
* **backlog**: everything older than the connection (or demoted from live) is read from the
  outbox in seq order once committed, and replayed at a rate that follows link health
  (``ReplayPacer``: AIMD on PUBACK latency), only while no live row waits, and never filling the
  whole window. Replayed messages carry ``"replayed": true``; their ``msg_id`` is unchanged.

Within a lane, messages of one topic are sent in seq order over one connection, so the broker
keeps them in order. Across lanes and reconnects the cloud restores order by ``seq``.

Poison messages: a payload over ``max_payload_bytes`` is quarantined without sending; the
broker's refusals are counted by ``agent.uplink.poison``. A connection lost within
``BLAME_WINDOW_S`` of a send makes the messages in flight *suspects*: the next connections
replay one message at a time until every suspect is acknowledged, so a message that breaks the
connection on its own is identified. A drop during an outage never counts.

Reconnecting (``agent.uplink.reach``): while the broker's port takes no TCP connection the
uplink probes it every ``PROBE_INTERVAL_S`` (jittered) and connects as soon as it does; the
first connect after a connection that held was lost waits a random time in
``[0, reconnect_spread_s]`` once the port is open, so a fleet does not reconnect in one burst; the
jittered exponential backoff applies to full connects that fail with the port open, and to
connections that end within ``STABLE_S``. A dead link is noticed by an overdue PUBACK while
nothing at all comes back from the broker (``DEAD_LINK_S``), and by silence past 1.5 x the
keepalive when idle (``agent.uplink.connection``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import Sequence
from typing import Any, Final

from agent.aio import within
from agent.config.schema import MqttConfig
from agent.feed.messages import Topics, mark_replayed
from agent.outbox.store import Outbox, Row
from agent.uplink.backoff import Backoff, ReplayPacer
from agent.uplink.commands import CommandDispatcher
from agent.uplink.connection import ConnectFailed, Link, LinkError, TlsFailed, puback_reason
from agent.uplink.connector import Connector
from agent.uplink.live import Flight, LiveQueue
from agent.uplink.poison import PoisonLedger
from agent.uplink.replies import CommandLane
from agent.uplink.tls import UplinkConfigError

__all__ = ["Uplink"]

log = logging.getLogger(__name__)

BACKLOG_FETCH: Final = 256
BLAME_WINDOW_S: Final = 2.0  # a broker that rejects a packet drops us at once, not later
RETRY_BASE_S: Final = 0.2
RETRY_MAX_S: Final = 30.0
SETUP_TIMEOUT_S: Final = 10.0  # birth message and command subscription
OFFLINE_TIMEOUT_S: Final = 1.0
PUBACK_TIMEOUT_S: Final = 30.0  # at least; twice the keepalive when that is longer
# A PUBACK this overdue while nothing at all came from the broker for as long: the link is dead.
DEAD_LINK_S: Final = 6.0
STABLE_S: Final = 3.0  # a connection that lasted this long was no flap: reconnect at once


class Uplink:
    def __init__(self, cfg: MqttConfig, gateway: str, outbox: Outbox,
                 commands: CommandDispatcher | None = None, *,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.outbox = outbox
        self.commands = commands
        self.topics = Topics(cfg.topic_prefix, gateway)
        self.connector = Connector(cfg, gateway, will_topic=self.topics.status, rng=rng,
                                   session_expiry_s=cfg.session_expiry_s)
        self.backoff = Backoff(cfg.reconnect_max_s, rng=rng)
        self.pacer = ReplayPacer(cfg.replay_rate)
        self._rng = rng or random.Random()
        self._spread_due = False  # a link that held was lost: spread the next connect
        self.puback_timeout_s = max(PUBACK_TIMEOUT_S, 2.0 * cfg.keepalive_s)
        self.lane = CommandLane(commands, self.topics, gateway)
        if commands is not None:
            commands.provide("outbox.stats", self._outbox_stats)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._state = "idle"
        self._link: Link | None = None
        self._inflight: dict[int, Flight] = {}
        self._live = LiveQueue()
        self._live_enabled = False
        self._backlog: collections.deque[Row] = collections.deque()
        self._retry: list[tuple[float, Row]] = []
        self._retry_seqs: set[int] = set()
        self._cursor = 0
        self._ceiling = 0
        self._suspects: set[int] = set()
        self._latency_s: float | None = None
        self._refused_s: float | None = None
        self._gave_up = False
        self._stable = False  # the last connection lasted STABLE_S
        self._blame_if_up: tuple[Row, float] | None = None  # a silent drop right after a send
        self._last_puback_s: float | None = None
        self._connected_s: float | None = None
        self._last_error = ""
        self._last_error_s = 0.0  # monotonic, when _last_error was set
        self._logged_error = ""
        self._nodelay = False
        self.counts: dict[str, int] = {
            "published": 0, "replayed": 0, "acked": 0, "refused": 0, "quarantined": 0,
            "connects": 0, "reconnects": 0, "connect_failures": 0, "blamed": 0,
            "probes_refused": 0,
        }
        self.poison = PoisonLedger(outbox, cfg.poison_attempts, self.counts,
                                   self._suspects.discard)

    # -- public ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, publish, reconnect with jittered backoff; forever, until cancelled."""
        try:
            while True:
                self._state = "probing"
                if not await self._reachable():
                    if not self.connector.failover():  # else the next broker, at once
                        await self.backoff.sleep(self.connector.probe_wait_s(self.backoff))
                    continue
                if self._spread_due:
                    self._spread_due = False
                    self._state = "waiting"
                    await asyncio.sleep(self._rng.uniform(0.0, self.cfg.reconnect_spread_s))
                self._state = "connecting"
                self._stable = False
                try:
                    await self._session()
                except (ConnectFailed, UplinkConfigError) as exc:
                    self.counts["connect_failures"] += 1
                    self._fail(exc, tls=isinstance(exc, TlsFailed))
                except (LinkError, OSError) as exc:
                    self._fail(exc)
                except Exception as exc:
                    log.exception("uplink session failed unexpectedly")
                    self._fail(exc)
                if self._stable or self.connector.failover():
                    continue  # a link that held and broke, or the next broker to try
                delay = self.backoff.next_delay()
                self._state = "waiting"
                log.debug("uplink: next connection attempt in %.2f s", delay)
                await self.backoff.sleep(delay)
        finally:
            self._state = "stopped"

    async def _reachable(self) -> bool:
        """Does the broker's port take a TCP connection? Settles a pending silent-drop blame:
        a broker that is up at once dropped the message; one that is away had an outage."""
        error = await self.connector.probe.check()
        pending, self._blame_if_up = self._blame_if_up, None
        if error is not None:
            self.counts["probes_refused"] += 1
            self._fail(ConnectFailed(f"{self.connector.where}: the port takes no connection: "
                                     f"{error}"))
            return False
        if pending is not None and time.monotonic() - pending[1] <= 2 * BLAME_WINDOW_S:
            self.poison.silent_drop(pending[0])
        return True

    async def send_reply(self, name: str, payload: bytes, timeout_s: float = 10.0) -> bool:
        """Publish a late reply on ``cmd/{name}/result`` (a deployment's outcome, decided long
        after its command was answered); True once the broker acknowledged it."""
        link = self._link
        if link is None:
            return False
        try:
            fut = link.publish(self.topics.cmd_result(name), payload)
        except LinkError:
            return False
        await asyncio.wait({fut}, timeout=timeout_s)
        if not fut.done() or fut.cancelled() or fut.exception() is not None:
            return False
        return fut.result() < 0x80

    async def drain(self, timeout_s: float) -> bool:
        """Wait until everything committed has its PUBACK; False on timeout."""
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "state": self._state,
            "broker": self.connector.where,
            "protocol": self._link.protocol if self._link else None,
            "tls": self.cfg.tls_enabled(),
            "nodelay": self._nodelay,
            "connected_for_s": (round(now - self._connected_s, 3)
                                if self._connected_s is not None else None),
            "last_puback_age_s": (round(now - self._last_puback_s, 3)
                                  if self._last_puback_s is not None else None),
            "puback_latency_ms": (round(self._latency_s * 1000, 3)
                                  if self._latency_s is not None else None),
            "inflight": len(self._inflight),
            "live_queue": len(self._live),
            "backlog_pending": max(0, self.outbox.unsent_rows - len(self._inflight)
                                   - len(self._live)),
            "careful": bool(self._suspects),
            "suspects": len(self._suspects),
            "replay_rate": round(self.pacer.rate, 1),
            **self.counts,
            "last_error": self._last_error,
            "last_error_age_s": round(now - self._last_error_s, 3) if self._last_error else None,
            "next_attempt_in_s": self.backoff.remaining_s(),
            "commands": self.commands.stats() if self.commands else None,
        }

    # -- connection -----------------------------------------------------------------------

    def _fail(self, exc: BaseException, *, tls: bool = False) -> None:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, LinkError) and not isinstance(exc, ConnectFailed):
            lost = text if text.startswith("connection lost") else f"connection lost: {text}"
            text = f"{self.connector.where}: {lost}"
        # The same failure repeated while the broker is away is logged once.
        if text != self._logged_error:
            (log.error if tls else log.warning)("uplink: %s", text)
            self._logged_error = text
        self._last_error, self._last_error_s = text, time.monotonic()

    async def _session(self) -> None:
        async with self.connector.connect() as link:
            self._link = link
            self._connected_s = time.monotonic()
            self.counts["connects"] += 1
            if self.counts["connects"] > 1:
                self.counts["reconnects"] += 1
            self._nodelay = link.nodelay()
            self._state = "connected"
            self._logged_error = ""
            log.info("uplink connected to %s (MQTT %s, TLS %s)", self.connector.where,
                     link.protocol, "on" if self.cfg.tls_enabled() else "off")
            self._begin()
            try:
                try:
                    rc = await within(link.publish(self.topics.status, b"online", retain=True),
                                      SETUP_TIMEOUT_S)
                except TimeoutError:
                    raise LinkError("no PUBACK for the birth message within "
                                    f"{SETUP_TIMEOUT_S:g} s") from None
                if rc >= 0x80:
                    log.warning("uplink: birth message refused: %s", puback_reason(rc))
                if self.commands is not None:
                    await link.subscribe(self.topics.cmd_filter, SETUP_TIMEOUT_S)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(link), name="uplink-pump")
                    tg.create_task(self.lane.receive(link, tg), name="uplink-receive")
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await within(link.publish(self.topics.status, b"offline",
                                                        retain=True), OFFLINE_TIMEOUT_S)
                raise
            except BaseExceptionGroup as eg:
                raise _first(eg) from None
            finally:
                self._end(link)

    def _begin(self) -> None:
        self.outbox.add_listener(self._on_commit, through=True)
        self.outbox.protect(self._inflight.keys)
        # Registered first, read second: every later hand-over reaches _on_commit.
        self._ceiling = self.outbox.released_seq
        self._cursor = 0
        self._backlog.clear()
        self._live_enabled = not self._suspects
        self._drained.clear()

    def _end(self, link: Link) -> None:
        now = time.monotonic()
        lasted_s = now - self._connected_s if self._connected_s is not None else 0.0
        self.outbox.remove_listener(self._on_commit)
        self.outbox.protect(None)
        flights = list(self._inflight.values())
        self._inflight.clear()
        self._live.clear()
        self._live_enabled = False
        self._backlog.clear()
        self._retry.clear()
        self._retry_seqs.clear()
        self._link = None
        self._connected_s = None
        self._state = "disconnected"
        self._drained.clear()
        window = max(BLAME_WINDOW_S, 4 * (self._latency_s or 0.0))
        recent = [f for f in flights if now - f.sent_s <= window]
        # Some brokers (mosquitto 2.0) close the connection right after a refusing PUBACK:
        # that drop is the refused message's doing, already counted, not the next one's.
        just_refused = self._refused_s is not None and now - self._refused_s <= window
        if just_refused or self._gave_up:
            recent = []
        self._gave_up = False
        if len(flights) == 1 and recent:
            if link.refusal is not None:
                self.poison.blame(recent[0].row, "the broker closed the connection right after "
                                                 f"it was sent: {link.refusal}")
            elif not link.broker_said_bye:
                # Silent: an outage or this message; the next probe tells which.
                self._blame_if_up = (recent[0].row, now)
        for f in recent:
            if not self.outbox.is_settled(f.row.seq):
                self._suspects.add(f.row.seq)
        if flights:
            self.pacer.on_failure(now)
        self._stable = lasted_s >= STABLE_S
        if self._stable:
            self.backoff.reset()  # a connection that held was a success: start over
            self._spread_due = self.cfg.reconnect_spread_s > 0

    # -- lanes ----------------------------------------------------------------------------

    def _on_commit(self, rows: Sequence[Row]) -> None:
        fresh = [r for r in rows if r.seq > self._ceiling]
        if not fresh:
            self._wake.set()  # a commit: backlog rows may be readable now
            return
        if not self._live_enabled:
            self._ceiling = max(self._ceiling, fresh[-1].seq)
        else:
            self._ceiling = max(self._ceiling, self._live.push(fresh))
        self._drained.clear()
        self._wake.set()

    async def _pump(self, link: Link) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            careful = bool(self._suspects)
            if not careful and not self._live_enabled:
                self._live_enabled = True
            cap = 1 if careful else self.cfg.max_inflight
            self._ceiling = max(self._ceiling, self._live.demote_stale(time.time_ns()))
            while self._live and len(self._inflight) < cap:
                self._send(link, self._live.pop(), "live")
            timeout: float | None = None
            if not self._live:
                timeout = await self._fill_backlog(link, now, cap if careful else max(
                    1, cap - max(1, cap // 4)))
            if (not self._inflight and not self._live and not self._backlog
                    and not self._retry and self._cursor >= self._ceiling
                    and self.outbox.pending_rows == 0):
                self._drained.set()
            if self._inflight:
                left = self._overdue(link)
                timeout = left if timeout is None else min(timeout, left)
            # asyncio.timeout, not wait_for: no extra task per wake-up, and no lost
            # cancellation when the task group cancels the pump mid-wait (Python 3.11).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _overdue(self, link: Link) -> float:
        """Raise ``LinkError`` if the oldest PUBACK is overdue; else the time left to wait."""
        oldest = next(iter(self._inflight.values()))
        now = time.monotonic()
        # A broker that keeps the connection alive but never acknowledges would hold the
        # window forever: past the deadline the connection is treated as broken.
        left = oldest.sent_s + self.puback_timeout_s - now
        # Sooner when nothing at all comes back: a frozen broker or a silent partition.
        dead_left = max(oldest.sent_s, link.last_in_s) + DEAD_LINK_S - now
        if left <= 0 or dead_left <= 0:
            self._gave_up = True  # our decision, not something a message did
            if left <= 0:
                raise LinkError(
                    f"no PUBACK for seq {oldest.row.seq} within {self.puback_timeout_s:g} s")
            raise LinkError(f"no PUBACK for seq {oldest.row.seq} and nothing from the broker "
                            f"for {now - link.last_in_s:.1f} s")
        return min(left, dead_left)

    async def _fill_backlog(self, link: Link, now: float, cap: int) -> float | None:
        """Send retries and backlog within ``cap``; returns how long to wait for a token."""
        wait: float | None = None
        if self._retry:
            self._retry.sort(key=lambda t: t[0])
            while self._retry and len(self._inflight) < cap:
                due, row = self._retry[0]
                if due > now:
                    wait = due - now
                    break
                if not self.pacer.take(now):
                    return self.pacer.wait_s(now)
                self._retry.pop(0)
                self._retry_seqs.discard(row.seq)
                self._send(link, row, "backlog")
        while len(self._inflight) < cap:
            if not self._backlog:
                # Only as far as committed: a row handed over before its commit is read once
                # its commit is applied (which wakes the pump).
                if self._cursor >= self._ceiling or self._cursor >= self.outbox.accepted_seq:
                    break
                await self._refill()
                continue
            now = time.monotonic()
            if not self.pacer.take(now):
                w = self.pacer.wait_s(now)
                return w if wait is None else min(w, wait)
            row = self._backlog.popleft()
            if row.seq not in self._retry_seqs:
                self._send(link, row, "backlog")
        return wait

    async def _refill(self) -> None:
        start, upto = self._cursor, min(self._ceiling, self.outbox.accepted_seq)
        rows = await self.outbox.fetch(start, upto, BACKLOG_FETCH)
        end = upto if len(rows) < BACKLOG_FETCH else rows[-1].seq
        self._cursor = max(self._cursor, end)
        self._backlog.extend(rows)
        # Suspects the scan passed without finding are gone (acked, dropped, quarantined).
        found = {r.seq for r in rows} | set(self._inflight)
        for seq in [s for s in self._suspects if start < s <= end and s not in found]:
            self._suspects.discard(seq)
            self.poison.forget(seq)

    def _send(self, link: Link, row: Row, lane: str) -> None:
        if row.seq in self._inflight or self.outbox.is_settled(row.seq):
            return
        try:
            payload = row.payload if lane == "live" else mark_replayed(row.payload)
        except ValueError:
            self.poison.quarantine(row, "not a feed message (not a JSON object)")
            return
        if len(payload) > self.cfg.max_payload_bytes:
            self.poison.quarantine(row, f"{len(payload)} bytes is over max_payload_bytes "
                                  f"({self.cfg.max_payload_bytes})")
            return
        fut = link.publish(f"{self.topics.base}/{row.topic}", payload)
        flight = Flight(row, lane, time.monotonic(), fut)
        self._inflight[row.seq] = flight
        fut.add_done_callback(functools.partial(self._on_puback, flight))
        self.counts["published"] += 1
        if lane != "live":
            self.counts["replayed"] += 1

    def _on_puback(self, flight: Flight, fut: asyncio.Future[int]) -> None:
        seq = flight.row.seq
        if self._inflight.get(seq) is not flight or fut.cancelled() or fut.exception():
            return
        del self._inflight[seq]
        rc = fut.result()
        now = time.monotonic()
        self._wake.set()
        if rc >= 0x80:
            self._refused(flight.row, rc, now)
            return
        latency = now - flight.sent_s
        self._latency_s = latency if self._latency_s is None else (
            0.9 * self._latency_s + 0.1 * latency)
        self._last_puback_s = now
        self.counts["acked"] += 1
        self.outbox.ack(flight.row)
        self._suspects.discard(seq)
        self.poison.forget(seq)
        if flight.lane != "live":
            self.pacer.on_ack(latency, now)

    # -- poison ---------------------------------------------------------------------------

    def _refused(self, row: Row, rc: int, now: float) -> None:
        self.counts["refused"] += 1
        self._refused_s = now
        retry = self.poison.attempt(row, f"the broker refused it: PUBACK {puback_reason(rc)}")
        if retry is not None:
            delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (retry.attempts - 1))
            self._retry.append((now + delay, retry))
            self._retry_seqs.add(retry.seq)

    # -- commands -------------------------------------------------------------------------

    async def _outbox_stats(self, _args: dict[str, Any]) -> dict[str, Any]:
        return self.outbox.stats()


def _first(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first non-cancellation error of a task group (where the session really ended)."""
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return eg.exceptions[0]
