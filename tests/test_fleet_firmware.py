"""``firmware.flash`` over a real mosquitto, into the running agent's bridge sensor.

The agent runs a ``bridge`` sensor on the emulated MCU (a real pty). The cloud sends the image
and its signature file in chunks; the gateway checks signature, board id (the sensor's
``options.board``) and the anti-rollback floor before FW_BEGIN, then flashes through the link
the sensor holds. The device's own counters (``begins``, ``chunk_bytes_received``) prove that
nothing of a refused image reached it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.fleet.deploy_client import MqttCommander, plain_envelope, signed_envelope
from agent.fleet.firmware_client import begin_args, flash_firmware
from agent.fleet.signing import SigningKey
from agent.runtime import Agent
from firmware_bridge.authorize import FirmwareState, sign_image
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.image import HEADER_BYTES, build_image
from firmware_bridge.messages import Version3
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until
from tests.test_fleet_model import KEY

GW = "gw-test"
BOARD = "ea-bridge-rp2040"
INSTALLED: Version3 = (1, 2, 0)
ENVELOPE = signed_envelope(KEY)  # firmware.flash is state-changing: it runs only signed


def config(tmp: Path, port: int, key: SigningKey) -> dict[str, Any]:
    return make_config(
        tmp, port,
        sensors=[{"name": "loops", "driver": "bridge", "port": "emulated", "period_s": 0.2,
                  "timeout_s": 1.0,
                  "options": {"channel": 0, "board": BOARD,
                              "emulator": {"firmware": "1.2.0", "trial_timeout_s": 0.5}}}],
        commands={"require_signature": True,
                  "trusted_keys": [{"id": key.key_id, "public_key": key.public}]},
        runtime={"stop_timeout_s": 1.0},
        mqtt={"reconnect_max_s": 0.5})


def image_of(version: Version3, seed: int = 7) -> bytes:
    return build_image(version, random.Random(seed).randbytes(12 * 1024 - HEADER_BYTES))


def emulator(agent: Agent) -> BridgeEmulator:
    p = agent.pipeline
    assert p is not None and p.ctx is not None
    emu = p.ctx.shared["firmware_bridge:emulator"]
    assert isinstance(emu, BridgeEmulator)
    return emu


def nothing_sent(emu: BridgeEmulator) -> bool:
    rx = emu.device.receiver
    return rx.begins == 0 and rx.chunk_bytes_received == 0 and rx.pending is None


@pytest.fixture
async def agent(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[Agent]:
    async with running_agent(config(tmp_path, broker.port, KEY)) as a:
        def ready() -> bool:
            p = a.pipeline
            return (p is not None and p.uplink.status()["state"] == "connected"
                    and p.ctx is not None and "firmware_bridge:emulator" in p.ctx.shared
                    and emulator(a).device.firmware == INSTALLED)

        await until(ready, 20, "the agent connected and its bridge sensor built")
        yield a


async def send(port: int, image: bytes, signature: bytes | None, version: str,
               deploy_id: str, sensor: str = "loops") -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"cloud-{deploy_id}") as client, \
            MqttCommander(client, "t", ENVELOPE) as commander:
        return await flash_firmware(commander, GW, image, signature, sensor=sensor,
                                    version=version, deploy_id=deploy_id, chunk_size=4096,
                                    timeout_s=10.0, commit_timeout_s=15.0)


async def test_a_signed_image_is_flashed_through_the_running_sensor(
        agent: Agent, broker: Mosquitto, tmp_path: Path) -> None:
    image = image_of((1, 3, 0))
    reply = await send(broker.port, image, sign_image(image, BOARD, KEY), "1.3.0", "fw-130")
    assert reply["ok"] is True, reply
    result = reply["result"]
    assert result["state"] == "flashed" and result["version"] == "1.3.0"
    assert result["previous"] == "1.2.0" and result["signed_by"] == KEY.key_id
    assert result["bytes_sent"] == len(image)
    emu = emulator(agent)
    assert emu.device.firmware == (1, 3, 0)
    state = json.loads((tmp_path / "firmware-state.json").read_text())
    assert state["floors"] == {emu.device.uid.hex(): "1.3.0"}
    p = agent.pipeline
    assert p is not None
    assert p.snapshot()["firmware"]["flashed"] == 1
    assert not (tmp_path / "firmware-deploys" / "fw-130").exists()

    # The sensor keeps reading after the device rebooted into the new image.
    def readings() -> int:
        return int(p.snapshot()["sensors"][0]["readings"])

    after = readings()
    await until(lambda: readings() >= after + 4, 15, "readings after the flash")


@pytest.mark.parametrize("case", ["unsigned", "untrusted_key", "forged_with_trusted_id",
                                  "wrong_board", "downgrade", "other_image"])
async def test_refused_before_the_first_byte(case: str, agent: Agent, broker: Mosquitto,
                                             tmp_path: Path) -> None:
    attacker = SigningKey.generate("mallory")
    image, version = image_of((9, 9, 9)), "9.9.9"
    signature: bytes | None
    if case == "unsigned":  # the header's sha256 is right: only a signature can tell
        signature, reason = None, "unsigned"
    elif case == "untrusted_key":
        signature, reason = sign_image(image, BOARD, attacker), "unknown_key"
    elif case == "forged_with_trusted_id":
        signature = sign_image(image, BOARD, SigningKey(KEY.key_id, attacker.private))
        reason = "bad_signature"
    elif case == "wrong_board":
        signature, reason = sign_image(image, "ea-bridge-stm32", KEY), "wrong_board"
    elif case == "downgrade":
        image, version = image_of((0, 0, 1)), "0.0.1"
        signature, reason = sign_image(image, BOARD, KEY), "downgrade"
    else:  # a genuine signature, sent beside a different image
        signature, reason = sign_image(image_of((9, 9, 9), seed=8), BOARD, KEY), "mismatch"
    reply = await send(broker.port, image, signature, version, f"fw-{case}"[:64])
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "failed"
    assert reply["error"]["message"].startswith(f"{reason}:"), reply
    emu = emulator(agent)
    assert nothing_sent(emu), "part of a refused image reached the device"
    assert emu.device.firmware == INSTALLED
    p = agent.pipeline
    assert p is not None
    assert p.snapshot()["firmware"]["refused"] == {reason: 1}
    assert FirmwareState(tmp_path / "firmware-state.json").refusals() == {reason: 1}
    # A refused image is not kept: it would never pass.
    assert not (tmp_path / "firmware-deploys" / f"fw-{case}").exists()


async def test_a_repeated_commit_gets_the_result_without_flashing_again(
        agent: Agent, broker: Mosquitto) -> None:
    image = image_of((1, 4, 0))
    reply = await send(broker.port, image, sign_image(image, BOARD, KEY), "1.4.0", "fw-140")
    assert reply["ok"] is True, reply
    begins = emulator(agent).device.receiver.begins
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-again") as client, \
            MqttCommander(client, "t", ENVELOPE) as commander:
        again = await commander.request(GW, "firmware.flash",
                                        {"op": "commit", "deploy_id": "fw-140"}, 10.0)
    assert again["ok"] is True and again["result"] == reply["result"]
    assert emulator(agent).device.receiver.begins == begins


@pytest.mark.parametrize(("change", "expected"), [
    ({"gateway": "gw-other"}, "wrong_gateway:"),
    ({"sensor": "meter"}, "no enabled bridge sensor named 'meter'"),
])
async def test_a_flash_for_another_gateway_or_sensor_is_refused_at_begin(
        change: dict[str, Any], expected: str, agent: Agent, broker: Mosquitto) -> None:
    image = image_of((1, 5, 0))
    signature = sign_image(image, BOARD, KEY)
    args = begin_args(image, signature, sensor="loops", version="1.5.0", deploy_id="fw-x",
                      target=GW)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-x") as client, \
            MqttCommander(client, "t", ENVELOPE) as commander:
        reply = await commander.request(GW, "firmware.flash", {**args, **change}, 10.0)
    assert reply["ok"] is False and reply["error"]["code"] == "failed"
    assert expected in reply["error"]["message"]
    assert nothing_sent(emulator(agent))


@pytest.mark.parametrize("change", [
    {"version": "1.5"}, {"size": 2**40}, {"size": True}, {"size": 1.5}, {"sensor": "../x"},
    {"signature_size": 10**9}, {"chunk_size": 1}, {"deploy_id": "é" * 10}, {"extra": 1},
])
async def test_hostile_begin_args_are_refused_by_name(change: dict[str, Any], agent: Agent,
                                                      broker: Mosquitto) -> None:
    image = image_of((1, 5, 0))
    args = begin_args(image, sign_image(image, BOARD, KEY), sensor="loops", version="1.5.0",
                      deploy_id="fw-h", target=GW)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-h") as client, \
            MqttCommander(client, "t", ENVELOPE) as commander:
        reply = await commander.request(GW, "firmware.flash", {**args, **change}, 10.0)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_args", reply
    assert next(iter(change)) in reply["error"]["message"]
    assert nothing_sent(emulator(agent))


async def test_hostile_chunks_are_refused_and_the_transfer_still_completes(
        agent: Agent, broker: Mosquitto) -> None:
    image = image_of((1, 6, 0))
    signature = sign_image(image, BOARD, KEY)
    args = begin_args(image, signature, sensor="loops", version="1.6.0", deploy_id="fw-160",
                      target=GW, chunk_size=4096)
    good = image[:4096]
    sha = hashlib.sha256(good).hexdigest()
    data = base64.b64encode(good).decode()
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-c") as client, \
            MqttCommander(client, "t", ENVELOPE) as commander:
        began = await commander.request(GW, "firmware.flash", args, 10.0)
        assert began["ok"] is True and began["result"]["missing_count"] == 4  # 12 KiB + .sig
        for bad, code, says in [
                ({"index": True}, "bad_args", "index"),
                ({"index": 99}, "failed", "outside 0..3"),
                ({"sha256": "0" * 64}, "failed", "does not match its sha256"),
                ({"data": base64.b64encode(good[:-1]).decode(),
                  "sha256": hashlib.sha256(good[:-1]).hexdigest()}, "failed", "4095 bytes"),
                ({"data": "@@@@"}, "bad_args", "data")]:
            chunk = {"op": "chunk", "deploy_id": "fw-160", "index": 0, "sha256": sha,
                     "data": data, **bad}
            reply = await commander.request(GW, "firmware.flash", chunk, 10.0)
            assert reply["ok"] is False and reply["error"]["code"] == code, (bad, reply)
            assert says in reply["error"]["message"], (bad, reply)
        status = await commander.request(GW, "firmware.flash",
                                         {"op": "status", "deploy_id": "fw-160"}, 10.0)
        assert status["result"]["missing"] == [0, 1, 2, 3]  # nothing bad was stored
    assert nothing_sent(emulator(agent))
    reply = await send(broker.port, image, signature, "1.6.0", "fw-160")
    assert reply["ok"] is True and emulator(agent).device.firmware == (1, 6, 0)


async def test_the_floor_this_gateway_recorded_refuses_an_older_image(
        agent: Agent, broker: Mosquitto, tmp_path: Path) -> None:
    # The device runs 1.2.0, but this gateway once installed 2.0.0 there (re-flashed by hand
    # since): 1.3.0 is newer than what runs and still refused.
    emu = emulator(agent)
    FirmwareState(tmp_path / "firmware-state.json").raise_floor(emu.device.uid, (2, 0, 0))
    image = image_of((1, 3, 0))
    reply = await send(broker.port, image, sign_image(image, BOARD, KEY), "1.3.0", "fw-floor")
    assert reply["ok"] is False and reply["error"]["message"].startswith("downgrade:"), reply
    assert "2.0.0" in reply["error"]["message"]
    assert nothing_sent(emu) and emu.device.firmware == INSTALLED


async def test_an_image_whose_body_was_changed_is_refused_before_the_first_byte(
        agent: Agent, broker: Mosquitto) -> None:
    image = image_of((1, 3, 0))
    signature = sign_image(image, BOARD, KEY)
    tampered = image[:-1] + bytes([image[-1] ^ 0xFF])  # its header still names the old body
    reply = await send(broker.port, tampered, signature, "1.3.0", "fw-tampered")
    assert reply["ok"] is False and "not a firmware image" in reply["error"]["message"], reply
    emu = emulator(agent)
    assert nothing_sent(emu) and emu.device.firmware == INSTALLED


async def test_a_commit_that_outlasts_the_command_timeout_goes_on_and_is_asked_again(
        agent: Agent, broker: Mosquitto) -> None:
    p = agent.pipeline
    assert p is not None
    image = image_of((1, 7, 0))
    signature = sign_image(image, BOARD, KEY)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-slow") as client, \
            MqttCommander(client, "t", ENVELOPE) as commander:
        began = await commander.request(GW, "firmware.flash", begin_args(
            image, signature, sensor="loops", version="1.7.0", deploy_id="fw-170",
            target=GW, chunk_size=4096), 10.0)
        whole = image + signature
        for i in began["result"]["missing"]:
            data = whole[i * 4096:(i + 1) * 4096]
            stored = await commander.request(GW, "firmware.flash", {
                "op": "chunk", "deploy_id": "fw-170", "index": i,
                "sha256": hashlib.sha256(data).hexdigest(),
                "data": base64.b64encode(data).decode()}, 10.0)
            assert stored["ok"] is True, stored
        p.commands.timeout_s = 0.05  # far shorter than a flash and the device's reboot
        replies: list[dict[str, Any]] = []

        async def committed() -> bool:
            replies.append(await commander.request(
                GW, "firmware.flash", {"op": "commit", "deploy_id": "fw-170"}, 10.0))
            return replies[-1]["ok"] is True

        for _ in range(400):
            if await committed():
                break
            assert replies[-1]["error"]["code"] == "timeout", replies[-1]
        else:
            pytest.fail("the commit never finished")
    assert replies[0]["ok"] is False  # the first commit did run out of time
    assert replies[-1]["result"]["version"] == "1.7.0"
    emu = emulator(agent)
    assert emu.device.firmware == (1, 7, 0)
    assert emu.device.receiver.begins == 1  # one transfer, never restarted by the repeats


async def test_an_unsigned_firmware_flash_command_never_runs(agent: Agent,
                                                             broker: Mosquitto) -> None:
    image = image_of((1, 3, 0))
    args = begin_args(image, sign_image(image, BOARD, KEY), sensor="loops", version="1.3.0",
                      deploy_id="fw-u", target=GW)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-u") as client, \
            MqttCommander(client, "t", plain_envelope) as commander:
        for step in (args, {"op": "commit", "deploy_id": "fw-u"}):
            reply = await commander.request(GW, "firmware.flash", step, 10.0)
            assert not reply["ok"] and reply["error"]["code"] == "unsigned", reply
    assert nothing_sent(emulator(agent))
