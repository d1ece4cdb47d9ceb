"""Signed firmware: every refusal happens before the first byte of the image reaches the MCU.

The emulated MCU runs on a real pty on this event loop; `edge-agent firmware flash` runs as the
CLI does (its own event loop, in a thread) against the pty's path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.fleet.signing import SigningKey, TrustedKeys
from firmware_bridge.authorize import (
    REFUSALS,
    FirmwareRefused,
    FirmwareState,
    FlashPolicy,
    approve,
    sign_image,
)
from firmware_bridge.cli import register
from firmware_bridge.device import DeviceSettings
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.image import HEADER_BYTES, build_image
from firmware_bridge.messages import Version3

BOARD = "ea-bridge-rp2040"
INSTALLED: Version3 = (1, 2, 0)
HOSTILE_SIGNATURES = [
    b"", b"\xff\xfe not utf-8", b"{" * 10_000, b"[" * 100 + b"]" * 100,
    b'{"body": {"size": 1e999}, "signature": {}}',
    b'{"body": {"size": ' + b"9" * 5000 + b'}, "signature": {}}',
    b'{"body": NaN, "signature": {}}', b'{"body": {}, "signature": null}',
    b'{"body": [], "signature": {}}', b"[]", b'{"body": {}}',
    b'{"body": {"kind": "firmware-image", "sha256": "00", "size": -1, "version": "x", '
    b'"board": "../../etc"}, "signature": {"key": 1, "alg": "ed25519", "sig": "AA=="}}',
]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def settings(firmware: Version3 = INSTALLED) -> DeviceSettings:
    return DeviceSettings(firmware=firmware, report_interval_s=0.2, trial_timeout_s=0.5)


@pytest.fixture
async def emu() -> AsyncIterator[BridgeEmulator]:
    async with BridgeEmulator(settings=settings()) as emulator:
        yield emulator


@pytest.fixture
def keys(tmp_path: Path) -> tuple[SigningKey, Path]:
    """The operator's key (its file) and the gateway's trusted-keys file."""
    key = SigningKey.generate("fleet-2026")
    key.save(tmp_path / "fleet.key")
    (tmp_path / "trusted.keys").write_text(f"# fleet keys\n{key.key_id} {key.public}\n")
    return key, tmp_path / "trusted.keys"


def image_of(version: Version3, seed: int = 7) -> bytes:
    return build_image(version, random.Random(seed).randbytes(16 * 1024 - HEADER_BYTES))


def write_image(tmp: Path, name: str, image: bytes, signature: bytes | None) -> Path:
    path = tmp / name
    path.write_bytes(image)
    if signature is not None:
        (tmp / (name + ".sig")).write_bytes(signature)
    return path


async def flash(emu: BridgeEmulator, image: Path, trusted: Path, *extra: str) -> int:
    return await asyncio.to_thread(run, ["firmware", "flash", emu.port, str(image),
                                         "--trusted-keys", str(trusted), "--board", BOARD,
                                         "--boot-timeout", "5", *extra])


def nothing_sent(emu: BridgeEmulator) -> bool:
    rx = emu.device.receiver
    return rx.begins == 0 and rx.chunk_bytes_received == 0 and rx.pending is None


async def test_a_correctly_signed_image_flashes_and_raises_the_floor(
        emu: BridgeEmulator, keys: tuple[SigningKey, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    key, trusted = keys
    raw = tmp_path / "app.bin"
    raw.write_bytes(random.Random(1).randbytes(20_000))
    img = tmp_path / "app.img"
    assert run(["firmware", "pack", str(raw), str(img), "--version", "1.3.0", "--sign",
                str(tmp_path / "fleet.key"), "--board", BOARD]) == 0
    assert json.loads((tmp_path / "app.img.sig").read_text())["body"]["board"] == BOARD
    state = tmp_path / "state"
    assert await flash(emu, img, trusted, "--state-dir", str(state)) == 0
    out = capsys.readouterr().out
    assert "signed by fleet-2026" in out and "ok: the device runs 1.3.0" in out
    assert emu.device.firmware == (1, 3, 0)
    assert json.loads((state / "firmware-state.json").read_text())["floors"] == {
        emu.device.uid.hex(): "1.3.0"}

    # The same device, later found running 1.0.0 (re-flashed by hand): a signed 1.2.5 is
    # newer than what it runs, but older than what this gateway installed there.
    older = image_of((1, 2, 5))
    path = write_image(tmp_path, "older.img", older, sign_image(older, BOARD, key))
    async with BridgeEmulator(settings=settings((1, 0, 0))) as old_device:
        assert await flash(old_device, path, trusted, "--state-dir", str(state)) == 2
        assert nothing_sent(old_device)
    assert "refused: downgrade:" in capsys.readouterr().out
    assert FirmwareState(state / "firmware-state.json").refusals() == {"downgrade": 1}


@pytest.mark.parametrize("case", ["untrusted_key", "forged_with_trusted_id", "unsigned",
                                  "downgrade", "wrong_board", "other_image"])
async def test_refused_before_the_first_byte(case: str, emu: BridgeEmulator,
                                             keys: tuple[SigningKey, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    key, trusted = keys
    attacker = SigningKey.generate("mallory")
    image = image_of((9, 9, 9))
    signature: bytes | None
    if case == "untrusted_key":
        signature, reason = sign_image(image, BOARD, attacker), "unknown_key"
    elif case == "forged_with_trusted_id":
        signature = sign_image(image, BOARD, SigningKey(key.key_id, attacker.private))
        reason = "bad_signature"
    elif case == "unsigned":  # the header's sha256 is right: only a signature can tell
        signature, reason = None, "unsigned"
    elif case == "downgrade":
        image = image_of((0, 0, 1))
        signature, reason = sign_image(image, BOARD, key), "downgrade"
    elif case == "wrong_board":
        signature, reason = sign_image(image, "ea-bridge-stm32", key), "wrong_board"
    else:  # a genuine signature, moved beside a different image
        signature, reason = sign_image(image_of((9, 9, 9), seed=8), BOARD, key), "mismatch"
    before = REFUSALS[reason]
    path = write_image(tmp_path, "evil.img", image, signature)
    assert await flash(emu, path, trusted) == 2
    out = capsys.readouterr().out
    assert f"refused: {reason}:" in out and "flashing" not in out
    assert nothing_sent(emu), "part of a refused image reached the device"
    assert emu.device.firmware == INSTALLED
    assert REFUSALS[reason] == before + 1


async def test_unsigned_needs_the_technicians_flag_and_is_logged(
        emu: BridgeEmulator, keys: tuple[SigningKey, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    _, trusted = keys
    path = write_image(tmp_path, "lab.img", image_of((1, 4, 0)), None)
    with caplog.at_level(logging.WARNING, logger="firmware_bridge.authorize"):
        assert await flash(emu, path, trusted, "--allow-unsigned") == 0
    assert emu.device.firmware == (1, 4, 0)
    assert any("UNSIGNED firmware 1.4.0" in r.getMessage() for r in caplog.records)
    # The flag lifts the signature requirement only: a downgrade stays refused.
    old = write_image(tmp_path, "old.img", image_of((1, 0, 0)), None)
    assert await flash(emu, old, trusted, "--allow-unsigned") == 2
    assert emu.device.firmware == (1, 4, 0)


@pytest.mark.parametrize("payload", HOSTILE_SIGNATURES)
def test_a_hostile_signature_file_is_refused_with_a_reason(
        payload: bytes, keys: tuple[SigningKey, Path]) -> None:
    key, _ = keys
    policy = FlashPolicy(TrustedKeys({key.key_id: key.public}), BOARD)
    with pytest.raises(FirmwareRefused) as info:
        approve(image_of((2, 0, 0)), payload, policy, INSTALLED)
    assert info.value.reason in ("malformed_signature", "unsigned")


async def test_a_damaged_state_file_stops_the_flash_with_its_name(
        emu: BridgeEmulator, keys: tuple[SigningKey, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    key, trusted = keys
    image = image_of((1, 5, 0))
    path = write_image(tmp_path, "ok.img", image, sign_image(image, BOARD, key))
    state = tmp_path / "state"
    state.mkdir()
    (state / "firmware-state.json").write_bytes(b'{"floors": {"zz": 1e999}}')
    # The floor cannot be read, so a downgrade cannot be ruled out: nothing is flashed.
    assert await flash(emu, path, trusted, "--state-dir", str(state)) == 1
    out = capsys.readouterr().out
    assert "firmware-state.json: not a firmware state file" in out and "Traceback" not in out
    assert nothing_sent(emu)


async def test_the_agent_config_supplies_the_trusted_keys_and_the_state_dir(
        emu: BridgeEmulator, keys: tuple[SigningKey, Path], tmp_path: Path) -> None:
    key, _ = keys
    state = tmp_path / "var"
    state.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        '[gateway]\nid = "gw-1"\n\n'
        f'[outbox]\npath = "{state / "outbox.db"}"\n\n'
        f'[[commands.trusted_keys]]\nid = "{key.key_id}"\npublic_key = "{key.public}"\n')
    image = image_of((1, 6, 0))
    path = write_image(tmp_path, "app.img", image, sign_image(image, BOARD, key))
    code = await asyncio.to_thread(run, ["firmware", "flash", emu.port, str(path), "-c",
                                         str(config), "--board", BOARD])
    assert code == 0 and emu.device.firmware == (1, 6, 0)
    assert FirmwareState(state / "firmware-state.json").floor(emu.device.uid) == (1, 6, 0)
    # A key the config does not list: refused before FW_BEGIN, and counted beside the outbox.
    begins = emu.device.receiver.begins
    other = SigningKey.generate("other")
    path = write_image(tmp_path, "b.img", image_of((1, 7, 0)),
                       sign_image(image_of((1, 7, 0)), BOARD, other))
    code = await asyncio.to_thread(run, ["firmware", "flash", emu.port, str(path), "-c",
                                         str(config), "--board", BOARD])
    assert code == 2 and emu.device.firmware == (1, 6, 0)
    assert emu.device.receiver.begins == begins
    assert FirmwareState(state / "firmware-state.json").refusals() == {"unknown_key": 1}
