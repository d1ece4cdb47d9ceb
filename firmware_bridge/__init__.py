"""The link to a sensor microcontroller: COBS frames with CRC-32, a reliable request/answer
layer, clock mapping, firmware update, and an emulated MCU (see PROTOCOL.md).

Layers, one module each: ``framing`` (bytes), ``frames`` (header + CRC), ``messages`` (typed
payloads), ``link`` (seq/ack, retransmission, window), ``client`` (handshake, clock, requests),
``update`` (firmware transfer). ``device`` and ``emulator`` are the MCU side; ``sensor`` is the
agent's ``bridge`` driver; ``cli`` the ``firmware`` commands.
"""

from firmware_bridge.client import BridgeClient, ClientConfig
from firmware_bridge.device import DeviceCore, DeviceSettings
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.errors import (
    BridgeError,
    CrcError,
    FrameError,
    LinkDown,
    MessageError,
    Rejected,
    RequestTimeout,
    RolledBack,
    UnsupportedVersion,
    UpdateError,
    VerifyFailed,
)
from firmware_bridge.image import build_image, check_image, parse_header
from firmware_bridge.link import Link, LinkConfig
from firmware_bridge.update import FlashResult, UpdateTimeouts, flash

__all__ = [
    "BridgeClient",
    "BridgeEmulator",
    "BridgeError",
    "ClientConfig",
    "CrcError",
    "DeviceCore",
    "DeviceSettings",
    "FlashResult",
    "FrameError",
    "Link",
    "LinkConfig",
    "LinkDown",
    "MessageError",
    "Rejected",
    "RequestTimeout",
    "RolledBack",
    "UnsupportedVersion",
    "UpdateError",
    "UpdateTimeouts",
    "VerifyFailed",
    "build_image",
    "check_image",
    "flash",
    "parse_header",
]
