"""One RS-485 line shared by every Modbus unit on it: one port, one transaction at a time.

The line serialises transactions with a FIFO lock, waits the inter-frame silence before each
request, and gives each transaction the timeout and retries of the device it addresses. The
lock is released between attempts, so a unit that has stopped answering costs the others at
most one timeout per request of theirs, never its whole retry budget; after its last retry the
sensor fails and the supervisor keeps it off the line for its backoff.

Modbus over serial line v1.02, 2.5.1.1: frames are separated by 3.5 character times of
silence; above 19200 baud a fixed 1.75 ms is recommended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from drivers.base import DeviceNotReady, DriverError, ProtocolError
from drivers.serial import modbus
from drivers.serial.port import SerialPort
from drivers.serial.rtu_line import SharedLine

log = logging.getLogger(__name__)

Count = Callable[[str, int], None]
FAST_BAUD = 19200
FAST_GAP_S = 1.75e-3


def bits_per_char(parity: str, stopbits: int) -> int:
    """Start bit + 8 data bits + parity bit (if any) + stop bits."""
    return 1 + 8 + (parity != "N") + stopbits


def frame_gap_s(baudrate: int, parity: str = "N", stopbits: int = 1) -> float:
    if baudrate > FAST_BAUD:
        return FAST_GAP_S
    return 3.5 * bits_per_char(parity, stopbits) / baudrate


class RtuLine(SharedLine):
    """A serial port with the units behind it; sensors share one through ``ctx.shared``."""

    def __init__(self, port: SerialPort, gap_s: float) -> None:
        super().__init__(port, gap_s)
        self.where = port.where

    async def read(self, unit: int, function: int, start: int, count: int, *,
                   timeout_s: float, retries: int,
                   on_count: Count = modbus.no_count) -> tuple[int, ...]:
        """Registers (or bits as 0/1) ``start .. start+count-1`` of ``unit``.

        Raises DeviceNotReady when nothing answered, ProtocolError when only bad replies came
        back: a CRC error, an exception, a reply from another unit or to another function, a
        truncated one, or noise.
        """
        where = f"{self.where} unit {unit}"
        bits = function in (modbus.FC_READ_COILS, modbus.FC_READ_DISCRETE)
        request = (modbus.read_bits_request(unit, start, count, function) if bits
                   else modbus.read_registers_request(unit, start, count, function))
        tally = modbus.Tally(on_count)
        parser = modbus.ReplyParser(unit, function, count, tally)
        last: DriverError | None = None
        for attempt in range(retries + 1):
            if attempt:
                on_count("retries", 1)
            parser.reset()
            crc_before = tally.crc_errors
            received = bytearray()
            async with self._lock:
                frame = await self.exchange(request, parser, timeout_s, received)
            if frame is None:
                if received and tally.crc_errors == crc_before:
                    key, why = modbus.describe_bad_reply(received, unit, function,
                                                         parser.normal_length)
                    on_count(key, 1)
                    last = ProtocolError(f"{why} to function {function:#04x} at {start:#06x}",
                                         where=where)
                elif tally.crc_errors > crc_before:
                    last = ProtocolError(f"reply to function {function:#04x} at {start:#06x} "
                                         "failed its CRC check", where=where)
                else:
                    on_count("timeouts", 1)
                    last = DeviceNotReady(f"no reply to function {function:#04x} at "
                                          f"{start:#06x} within {timeout_s:g} s", where=where)
                continue
            if frame.is_exception:
                on_count("exception_replies", 1)
                code = frame.exception_code
                last = ProtocolError(f"exception {code:#04x} ({modbus.exception_name(code)}) "
                                     f"to function {function:#04x} at {start:#06x}", where=where)
                if code in (0x01, 0x02, 0x03):
                    break  # the request itself is wrong for this device: retrying cannot help
                continue
            values = frame.bits(count) if bits else frame.registers()
            return tuple(int(v) for v in values)
        assert last is not None
        raise last
