"""Firmware update over a real pty: pyserial on the host, the emulated MCU on the master."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator

import pytest

from drivers.base import DeviceNotReady
from firmware_bridge import update
from firmware_bridge.client import BridgeClient, ClientConfig
from firmware_bridge.device import DeviceSettings
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.errors import LinkDown, RolledBack, UpdateError, VerifyFailed
from firmware_bridge.image import HEADER_BYTES, build_image, check_image, parse_header
from firmware_bridge.link import LinkConfig
from firmware_bridge.messages import FwState, HelloFlag

IMAGE_KIB = 256
TIMEOUTS = update.UpdateTimeouts(erase_s=2.0, verify_s=2.0, boot_s=5.0)
LINK = LinkConfig(ack_timeout_s=0.5, ack_timeout_min_s=0.2)


def body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def new_image(version: tuple[int, int, int] = (1, 1, 0), *, boots: bool = True,
              seed: int = 5) -> bytes:
    return build_image(version, body(IMAGE_KIB * 1024 - HEADER_BYTES, seed), boots=boots)


@pytest.fixture
async def emu() -> AsyncIterator[BridgeEmulator]:
    settings = DeviceSettings(report_interval_s=0.2, trial_timeout_s=0.5)
    async with BridgeEmulator(settings=settings) as emulator:
        yield emulator


async def connect(emu: BridgeEmulator) -> BridgeClient:
    client = await BridgeClient.open_serial(emu.port, config=ClientConfig(link=LINK))
    try:
        await asyncio.wait_for(client.connect(), 5)
    except BaseException:
        await client.aclose()
        raise
    return client


async def test_image_format_round_trip() -> None:
    image = new_image()
    header = check_image(image)
    assert header.version == (1, 1, 0) and header.boots
    assert len(image) == IMAGE_KIB * 1024
    with pytest.raises(UpdateError, match="not a firmware image"):
        parse_header(b"XXXX" + image[4:])
    with pytest.raises(UpdateError, match="header says the body is"):
        parse_header(image[:-1])


async def test_flash_256k_image(emu: BridgeEmulator) -> None:
    image = new_image()
    seen: list[int] = []
    client = await connect(emu)
    try:
        result = await asyncio.wait_for(
            update.flash(client, image, progress=lambda held, total: seen.append(held),
                         timeouts=TIMEOUTS), 30)
        assert result.version == (1, 1, 0) and result.hello.firmware == (1, 1, 0)
        assert result.resumed_from == 0 and result.bytes_sent == len(image)
        assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == len(image)
        dev = emu.device
        assert dev.active_slot == 1 and dev.trial_slot is None
        assert dev.slots[1] == image
        assert dev.firmware == (1, 1, 0)
        assert client.link.pending == 0
        status = await update.query(client)
        assert status.state == FwState.IDLE
        assert await client.ping() >= 0  # the session came back after the reboot
    finally:
        await client.aclose()


async def test_interrupted_flash_resumes_from_the_reported_offset(emu: BridgeEmulator) -> None:
    image = new_image(seed=6)

    def pull_cable_at_half(held: int, total: int) -> None:
        if held >= total // 2 and emu.plugged:
            emu.unplug()

    client = await connect(emu)
    try:
        with pytest.raises(LinkDown) as info:
            await asyncio.wait_for(update.flash(client, image, progress=pull_cable_at_half,
                                                timeouts=TIMEOUTS), 30)
        assert isinstance(info.value, DeviceNotReady)
        assert client.link.pending == 0
    finally:
        await client.aclose()
    assert not os.path.exists(emu.port)
    emu.replug()
    client = await connect(emu)
    try:
        status = await update.query(client)
        assert status.state == FwState.RECEIVING
        assert len(image) // 2 <= status.offset < len(image)
        assert status.sha256 == hashlib.sha256(image).digest()
        result = await asyncio.wait_for(update.flash(client, image, timeouts=TIMEOUTS), 30)
        assert result.resumed_from == status.offset
        assert result.bytes_sent == len(image) - status.offset
        assert emu.device.firmware == (1, 1, 0)
        assert emu.device.slots[emu.device.active_slot] == image
    finally:
        await client.aclose()


async def test_resume_survives_a_power_cycle(emu: BridgeEmulator) -> None:
    image = new_image(seed=7)

    def cut_power_at_third(held: int, total: int) -> None:
        if held >= total // 3 and emu.plugged:
            emu.unplug(power_loss=True)

    client = await connect(emu)
    try:
        with pytest.raises(LinkDown):
            await asyncio.wait_for(update.flash(client, image, progress=cut_power_at_third,
                                                timeouts=TIMEOUTS), 30)
    finally:
        await client.aclose()
    emu.replug(power_on=True)
    client = await connect(emu)
    try:
        status = await update.query(client)
        assert status.offset >= len(image) // 3
        result = await asyncio.wait_for(update.flash(client, image, timeouts=TIMEOUTS), 30)
        assert result.resumed_from == status.offset
        assert emu.device.firmware == (1, 1, 0)
    finally:
        await client.aclose()


async def test_corrupted_image_is_refused_at_verify(emu: BridgeEmulator) -> None:
    image = bytearray(new_image(seed=8))
    image[HEADER_BYTES + 1000] ^= 0x40  # a bit flipped on disk after the build
    client = await connect(emu)
    try:
        with pytest.raises(VerifyFailed, match="body sha256 does not match"):
            await asyncio.wait_for(update.flash(client, bytes(image), timeouts=TIMEOUTS), 30)
        assert emu.device.firmware == (1, 0, 0)
        assert emu.device.receiver.pending is None  # aborted: the next attempt starts from zero
        assert emu.device.trial_slot is None
    finally:
        await client.aclose()


async def test_flash_write_fault_is_refused_at_verify(emu: BridgeEmulator) -> None:
    emu.device.receiver.flash_fault_at = 100_000
    client = await connect(emu)
    try:
        with pytest.raises(VerifyFailed, match="differs from FW_BEGIN"):
            await asyncio.wait_for(update.flash(client, new_image(seed=9), timeouts=TIMEOUTS), 30)
        assert emu.device.firmware == (1, 0, 0)
    finally:
        await client.aclose()


async def test_image_that_never_says_hello_is_rolled_back(emu: BridgeEmulator) -> None:
    client = await connect(emu)
    try:
        with pytest.raises(RolledBack, match=r"1\.1\.0 did not start; the device runs 1\.0\.0"):
            await asyncio.wait_for(
                update.flash(client, new_image(boots=False, seed=10), timeouts=TIMEOUTS), 30)
        hello = await client.wait_ready(5)
        assert hello.flags & HelloFlag.ROLLED_BACK
        assert hello.firmware == (1, 0, 0)
        assert emu.device.active_slot == 0 and emu.device.trial_slot is None
        assert await client.ping() >= 0
    finally:
        await client.aclose()


async def test_flash_of_a_device_that_is_gone_is_not_ready(emu: BridgeEmulator) -> None:
    emu.unplug()
    with pytest.raises(LinkDown, match="cannot open the port") as info:
        await BridgeClient.open_serial(emu.port)
    assert isinstance(info.value, DeviceNotReady)
    assert emu.port in str(info.value)
