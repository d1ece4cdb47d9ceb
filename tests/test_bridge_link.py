"""The link and client over a lossy line against the emulated MCU: every request completes or
fails clearly, nothing stays pending, duplicates are not executed twice, versions negotiate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from drivers.base import ConfigurationError, DeviceNotReady
from firmware_bridge import framing
from firmware_bridge.client import BridgeClient, ClientConfig
from firmware_bridge.device import DeviceCore, DeviceSettings
from firmware_bridge.errors import LinkDown, Rejected, RequestTimeout, UnsupportedVersion
from firmware_bridge.frames import FLAG_RETRY, Frame
from firmware_bridge.link import Link, LinkConfig
from firmware_bridge.messages import (
    Ack,
    ConfigGet,
    ConfigKey,
    ConfigSet,
    ConfigValue,
    Connect,
    Hello,
    Message,
    MsgType,
    NakCode,
    Ping,
    Pong,
    Readings,
    Reboot,
    Stats,
    StatsGet,
    decode_message,
)
from tests.test_bridge_fakes import Impairment, LossyLine

FAST = LinkConfig(ack_timeout_s=0.05, ack_timeout_min_s=0.02, ack_timeout_max_s=0.2, retries=3,
                  window=8, max_consecutive_timeouts=1000)


@dataclass
class Rig:
    client: BridgeClient
    device: DeviceCore
    line: LossyLine


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    params = getattr(request, "param", {})
    device = DeviceCore(params.get("settings", DeviceSettings(report_interval_s=60)))
    link = Link("fake", params.get("link", FAST))
    client = BridgeClient(link, ClientConfig(link=link.config, sync_burst=0, sync_period_s=60))
    line = LossyLine(link, device, to_device=params.get("to_device"),
                     to_host=params.get("to_host"), seed=params.get("seed", 7))
    await line.start()
    yield Rig(client, device, line)
    await client.aclose()
    await line.stop()


async def _connect(rig: Rig) -> Hello:
    return await asyncio.wait_for(rig.client.connect(), 10)


async def test_handshake_and_requests_on_a_clean_line(rig: Rig) -> None:
    hello = await _connect(rig)
    assert hello.protocol == 1 and hello.firmware == (1, 0, 0)
    assert hello.channels == rig.device.settings.channels
    await rig.client.set_config(ConfigKey.REPORT_INTERVAL_MS, 250)
    assert await rig.client.get_config(ConfigKey.REPORT_INTERVAL_MS) == 250
    stats = await rig.client.stats()
    assert stats.rx_frames >= 3
    assert rig.client.link.pending == 0


async def test_nak_is_raised_with_code_and_detail(rig: Rig) -> None:
    await _connect(rig)
    with pytest.raises(Rejected, match=r"INVALID_VALUE: key 1: 5 is outside 10\.\.60000") as info:
        await rig.client.set_config(ConfigKey.REPORT_INTERVAL_MS, 5)
    assert info.value.code == NakCode.INVALID_VALUE
    with pytest.raises(Rejected, match="UNKNOWN_KEY"):
        await rig.client.get_config(99)


async def test_requests_before_connect_are_refused(rig: Rig) -> None:
    with pytest.raises(Rejected, match="NOT_CONNECTED"):
        await rig.client.link.request(Ping(), Pong)


@pytest.mark.parametrize("rate", [0.004, 0.03], ids=["light-loss", "heavy-loss"])
async def test_every_request_completes_or_times_out_on_a_lossy_line(rig: Rig,
                                                                    rate: float) -> None:
    link = rig.client.link
    await _connect(rig)
    # Every byte, both ways: lost with probability `rate`, else changed with `rate`.
    rig.line.to_device.impairment = Impairment(drop=rate, corrupt=rate, delay_s=0.001)
    rig.line.to_host.impairment = Impairment(drop=rate, corrupt=rate, delay_s=0.001)
    timeouts_before = link.counters.get("timeouts", 0)
    heavy = rate > 0.01
    requests: list[tuple[Message, type]] = []
    for i in range(60 if heavy else 120):
        match i % 3:
            case 0:
                requests.append((Ping(), Pong))
            case 1:
                requests.append((ConfigGet(ConfigKey.REPORT_INTERVAL_MS), ConfigValue))
            case _:
                requests.append((StatsGet(), Stats))
    results = await asyncio.wait_for(
        asyncio.gather(*(link.request(m, t) for m, t in requests), return_exceptions=True), 60)
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    for (_, expect), result in zip(requests, results, strict=True):
        if isinstance(result, BaseException):
            assert isinstance(result, RequestTimeout), repr(result)
            assert isinstance(result, DeviceNotReady)
            assert "after 4 attempts" in str(result) and result.attempts == 4
        else:
            assert isinstance(result, expect)
    assert link.pending == 0
    if heavy:
        assert failed, "a 3 % byte loss should defeat some requests"
    else:
        assert len(ok) > 100
    # The line did damage and the link repaired it.
    line_damage = (rig.line.to_device.counters["dropped"] + rig.line.to_device.counters["corrupted"]
                   + rig.line.to_host.counters["dropped"] + rig.line.to_host.counters["corrupted"])
    assert line_damage > 0
    assert link.counters.get("retransmits", 0) > 0
    host_rejects = sum(link.stats().get(k, 0) for k in ("crc_errors", "bad_frames", "cobs_errors"))
    device_rejects = rig.device.counters["rx_crc_errors"] + rig.device.counters["rx_bad_frames"]
    assert host_rejects + device_rejects > 0
    assert len(failed) == link.counters.get("timeouts", 0) - timeouts_before


@pytest.mark.parametrize("rig", [{"to_host": Impairment(drop=1.0)}], indirect=True)
async def test_a_mute_device_gives_a_clear_timeout_and_no_leak(rig: Rig) -> None:
    link = rig.client.link
    results = await asyncio.wait_for(asyncio.gather(
        *(link.request(Ping(), Pong) for _ in range(12)), return_exceptions=True), 10)
    assert all(isinstance(r, RequestTimeout) for r in results)
    assert "no answer to PING (seq" in str(results[0]) and "after 4 attempts" in str(results[0])
    assert "fake" in str(results[0])  # names the port
    assert link.pending == 0
    # 12 requests through a window of 8: the semaphore held the rest back.
    assert link.counters["tx_frames"] == 12 * 4


@pytest.mark.parametrize("rig", [{"to_host": Impairment(drop=1.0),
                                  "link": LinkConfig(ack_timeout_s=0.02, ack_timeout_min_s=0.02,
                                                     retries=1, max_consecutive_timeouts=3)}],
                         indirect=True)
async def test_consecutive_timeouts_take_the_link_down(rig: Rig) -> None:
    link = rig.client.link
    for _ in range(3):
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(link.request(Ping(), Pong), 5)
    assert not link.is_up
    with pytest.raises(LinkDown, match="3 requests in a row got no answer"):
        await link.request(Ping(), Pong)


@pytest.mark.parametrize("rig", [{"to_host": Impairment(drop=1.0)}], indirect=True)
async def test_unplug_fails_every_pending_request(rig: Rig) -> None:
    link = rig.client.link
    tasks = [asyncio.create_task(link.request(Ping(), Pong), name=f"ping-{i}") for i in range(20)]

    async def until_pending() -> None:
        while link.pending < 8:
            await asyncio.sleep(0)

    await asyncio.wait_for(until_pending(), 5)
    rig.line.disconnect(OSError("cable pulled"))
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(r, LinkDown) for r in results), results
    assert "cable pulled" in str(results[0])
    assert link.pending == 0
    waiter = asyncio.create_task(rig.client.wait_boot(5), name="wait-boot")
    await asyncio.sleep(0)
    with pytest.raises(LinkDown):
        await asyncio.wait_for(waiter, 5)


async def test_cancelled_request_leaves_nothing_pending(rig: Rig) -> None:
    await _connect(rig)
    rig.line.to_host.impairment.drop = 1.0
    task = asyncio.create_task(rig.client.link.request(Ping(), Pong), name="ping")

    async def until_pending() -> None:
        while rig.client.link.pending == 0:
            await asyncio.sleep(0)

    await asyncio.wait_for(until_pending(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.client.link.pending == 0


@pytest.mark.parametrize("rig", [{"settings": DeviceSettings(versions=(2, 3))}], indirect=True)
async def test_unsupported_version_is_a_configuration_error(rig: Rig) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        await _connect(rig)
    assert isinstance(info.value, ConfigurationError)
    assert "device speaks protocol 2..3, this host speaks 1..1" in str(info.value)
    assert info.value.device == (2, 3)


@pytest.mark.parametrize("rig", [{"settings": DeviceSettings(versions=(1, 3))}], indirect=True)
async def test_highest_common_version_is_chosen(rig: Rig) -> None:
    rig.client.config = ClientConfig(link=FAST, versions=(1, 2), sync_burst=0)
    hello = await _connect(rig)
    assert hello.protocol == 2
    assert rig.client.link.version == 2


@pytest.mark.parametrize("rig", [{"settings": DeviceSettings(report_interval_s=0.02,
                                                             ack_timeout_s=0.03)}],
                         indirect=True)
async def test_lost_acks_do_not_deliver_reports_twice(rig: Rig) -> None:
    got: list[Readings] = []
    rig.client.add_listener(lambda r, mono: got.append(r))
    await _connect(rig)
    # Lose the host's next two writes (ACKs of reports): the device retransmits them.
    rig.line.to_device.impairment.drop_writes = 2

    async def until() -> None:
        while len(got) < 8:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(until(), 10)
    times = [r.mcu_time_us for r in got]
    assert len(times) == len(set(times))
    assert times == sorted(times)
    assert rig.client.link.counters.get("duplicates", 0) >= 1
    assert rig.device.counters["retransmits"] >= 1


async def test_device_answers_a_retransmission_from_its_cache(rig: Rig) -> None:
    """Fed directly: a retried REBOOT is answered again but reboots once."""
    await _connect(rig)
    rig.line.disconnect(None)
    device = rig.device
    sent: list[bytes] = []
    device.attach(sent.append)
    device.feed(framing.encode(Frame(1, MsgType.CONNECT, 40, Connect().encode()).to_bytes()))
    boots = device.boot_count
    reboot = Frame(1, MsgType.REBOOT, 41, Reboot().encode())
    device.feed(framing.encode(reboot.to_bytes()))
    retry = Frame(1, MsgType.REBOOT, 41, b"", flags=FLAG_RETRY)
    device.feed(framing.encode(retry.to_bytes()))
    assert sent[-1] == sent[-2]
    body = next(iter(framing.Deframer().feed(sent[-1])))
    answer = Frame.from_bytes(body)
    assert answer.ack == 41 and isinstance(decode_message(answer.type, answer.payload), Ack)
    assert device.counters["duplicates"] == 1

    async def until_booted() -> None:
        while device.boot_count == boots or not device.running:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(until_booted(), 5)
    assert device.boot_count == boots + 1
    config_set = Frame(1, MsgType.CONFIG_SET, 42,
                       ConfigSet(ConfigKey.LOOP_HOLD_MS, 100).encode())
    device.feed(framing.encode(config_set.to_bytes()))
    last = Frame.from_bytes(list(framing.Deframer().feed(sent[-1]))[-1])
    assert decode_message(last.type, last.payload).TYPE == MsgType.NAK  # new boot: no session


async def test_reboot_is_seen_and_the_client_reconnects(rig: Rig) -> None:
    hello = await _connect(rig)
    boot = asyncio.create_task(rig.client.wait_boot(5), name="wait-boot")
    await rig.client.reboot()
    again = await asyncio.wait_for(boot, 5)
    assert again.boot_count == hello.boot_count + 1
    ready = await rig.client.wait_ready(5)
    assert ready.boot_count == again.boot_count
    assert await rig.client.ping() >= 0


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0

    def seconds(self) -> float:
        return self.t

    def mono_ns(self) -> int:
        return round(self.t * 1e9)


async def test_clock_mapping_finds_offset_and_drift() -> None:
    now = FakeTime()
    device = DeviceCore(DeviceSettings(report_interval_s=3600, clock_ppm=120.0), now.seconds)
    link = Link("fake", FAST, mono_ns=now.mono_ns)
    client = BridgeClient(link, ClientConfig(link=FAST, sync_burst=0, sync_period_s=3600))
    line = LossyLine(link, device)
    await line.start()
    try:
        await asyncio.wait_for(client.connect(), 5)
        now.t += 3.0
        for _ in range(10):
            await asyncio.wait_for(client.ping(), 5)
            now.t += 1.0
        # The device clock runs 120 ppm fast: host seconds per device second = 1 / 1.00012.
        assert client.clock.drift_ppm == pytest.approx(1e6 * (1 / 1.00012 - 1), abs=0.5)
        mcu_us = device.mcu_time_us()
        assert client.clock.to_host_ns(mcu_us) == pytest.approx(now.mono_ns(), abs=2_000)
        uptime = client.device_uptime_s()
        assert uptime is not None and uptime == pytest.approx(now.t - 1000.0, abs=1e-3)
    finally:
        await client.aclose()
        await line.stop()
