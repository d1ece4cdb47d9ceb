"""Errors raised by the bridge, each carrying where it happened (port, message type, seq).

Exceptions::

    DriverError (drivers.base)
    └── BridgeError                     root of this package
        ├── LinkDown                    port missing, unplugged or closed (also DeviceNotReady)
        ├── RequestTimeout              no answer after every retransmission (also DeviceNotReady)
        ├── Rejected                    the device answered NAK: ``code`` and ``detail``
        ├── FrameError                  bytes that are not a valid frame (also ProtocolError)
        │   └── CrcError                the CRC does not match the content
        ├── MessageError                a valid frame whose payload does not parse (ProtocolError)
        ├── UnsupportedVersion          no protocol version both sides speak (ConfigurationError)
        └── UpdateError                 a firmware update did not complete
            ├── VerifyFailed            the device refused the image at FW_END
            └── RolledBack              the new image did not boot; the old one runs again

``LinkDown`` and ``RequestTimeout`` are ``DeviceNotReady`` so that the agent's supervisor backs
off and reconnects; ``UnsupportedVersion`` is a ``ConfigurationError`` because retrying cannot
fix it.
"""

from __future__ import annotations

from drivers.base import ConfigurationError, DeviceNotReady, DriverError, ProtocolError


class BridgeError(DriverError):
    """Root of the firmware bridge errors."""


class LinkDown(BridgeError, DeviceNotReady):
    """The serial link is gone (port missing, unplugged, closed); reconnect later."""


class RequestTimeout(BridgeError, DeviceNotReady):
    """A request got no answer although it was sent ``attempts`` times."""

    def __init__(self, message: str, *, where: str = "", msg_type: str = "", seq: int = -1,
                 attempts: int = 0) -> None:
        super().__init__(message, where=where)
        self.msg_type = msg_type
        self.seq = seq
        self.attempts = attempts


class Rejected(BridgeError, ProtocolError):
    """The device answered a request with NAK."""

    def __init__(self, message: str, *, where: str = "", code: int = 0, detail: str = "") -> None:
        super().__init__(message, where=where)
        self.code = code
        self.detail = detail


class FrameError(BridgeError, ProtocolError):
    """Bytes between two delimiters that are not a valid frame (COBS, length, CRC, header)."""


class CrcError(FrameError):
    """The frame's CRC does not match its content (line noise, lost bytes)."""


class MessageError(BridgeError, ProtocolError):
    """A frame whose payload does not match the layout of its message type."""


class UnsupportedVersion(BridgeError, ConfigurationError):
    """Host and device share no protocol version."""

    def __init__(self, message: str, *, where: str = "", device: tuple[int, int] = (0, 0),
                 host: tuple[int, int] = (0, 0)) -> None:
        super().__init__(message, where=where)
        self.device = device
        self.host = host


class UpdateError(BridgeError):
    """A firmware update did not complete; the device keeps running its current image."""


class VerifyFailed(UpdateError):
    """The device refused the received image at FW_END (digest or image header)."""


class RolledBack(UpdateError):
    """The committed image did not say HELLO in time and the device went back to the old one."""
