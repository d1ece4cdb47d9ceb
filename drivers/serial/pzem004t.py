"""Peacefair PZEM-004T v3.0 AC energy meter on a Modbus-RTU line (9600 8N1).

Input registers 0x0000..0x0009 (PZEM-004T v3.0 user manual, section 2.3)::

    0x0000 voltage        0.1 V          0x0005/0x0006 energy low/high   1 Wh
    0x0001/0x0002 current low/high 0.001 A   0x0007 frequency          0.1 Hz
    0x0003/0x0004 power low/high   0.1 W     0x0008 power factor        0.01
                                              0x0009 alarm               0xFFFF on, 0x0000 off

Several meters share one RS-485/TTL line by address, so one ``PzemBus`` per port lives in
``ctx.shared`` and serialises requests with a lock. A reply that fails its CRC, arrives as an
exception, or does not arrive is counted on the sensor and the request is retried; a value is
only ever produced from a CRC-checked reply of the expected shape.

Options (``[sensors.options]``): ``retries`` (default 2), ``baudrate`` (default 9600),
``emulator`` (table, with ``port = "emulated"``: ``profile``, ``seed``, ``bus``; see
``drivers.emulated.pzem004t``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.clock import Clock
from agent.readings import Reading
from drivers.base import (
    BuildContext,
    ConfigurationError,
    DeviceNotReady,
    DriverError,
    PolledSensor,
    ProtocolError,
)
from drivers.serial import modbus
from drivers.serial.port import SerialPort, option, port_key, shared
from drivers.serial.rtu_line import SharedLine

log = logging.getLogger(__name__)

BAUDRATE = 9600
INPUT_REGISTERS = 10
ALARM_ON = 0xFFFF
# Modbus RTU needs 3.5 character times of silence between frames: 11 bits/char at 9600 baud.
FRAME_GAP_S = 3.5 * 11 / BAUDRATE


@dataclass(frozen=True, slots=True)
class Measurement:
    voltage_v: float
    current_a: float
    power_w: float
    energy_wh: float
    frequency_hz: float
    power_factor: float
    alarm: bool


def decode_registers(regs: Sequence[int]) -> Measurement:
    """The ten input registers as physical values (32-bit values are low word first)."""
    if len(regs) != INPUT_REGISTERS:
        raise ValueError(f"expected {INPUT_REGISTERS} registers, got {len(regs)}")
    return Measurement(
        voltage_v=regs[0] / 10,
        current_a=(regs[1] | regs[2] << 16) / 1000,
        power_w=(regs[3] | regs[4] << 16) / 10,
        energy_wh=float(regs[5] | regs[6] << 16),
        frequency_hz=regs[7] / 10,
        power_factor=regs[8] / 100,
        alarm=regs[9] == ALARM_ON,
    )


def encode_registers(m: Measurement) -> list[int]:
    """The inverse of ``decode_registers`` (for the emulator and for tests)."""
    current = round(m.current_a * 1000)
    power = round(m.power_w * 10)
    energy = round(m.energy_wh)
    return [
        round(m.voltage_v * 10) & 0xFFFF,
        current & 0xFFFF, (current >> 16) & 0xFFFF,
        power & 0xFFFF, (power >> 16) & 0xFFFF,
        energy & 0xFFFF, (energy >> 16) & 0xFFFF,
        round(m.frequency_hz * 10) & 0xFFFF,
        round(m.power_factor * 100) & 0xFFFF,
        ALARM_ON if m.alarm else 0,
    ]


Count = Callable[[str, int], None]


class PzemBus(SharedLine):
    """One Modbus line: a port, a lock that serialises requests, retries with counting."""

    def __init__(self, port: SerialPort, timeout_s: float) -> None:
        super().__init__(port, FRAME_GAP_S)
        self.timeout_s = timeout_s

    async def request(
        self,
        request: bytes,
        address: int,
        function: int,
        registers: int = 0,
        *,
        retries: int,
        count: Count = modbus.no_count,
    ) -> modbus.Frame:
        """Send ``request`` and return the checked normal reply, retrying bad or missing ones.

        Raises DeviceNotReady when nothing answered, ProtocolError when only bad replies came
        back: a CRC error, an exception reply, a reply from another address or to another
        function, a truncated one, or noise. A lost port raises DeviceNotReady at once.
        """
        where = f"{self.port.where} address {address:#04x}"
        tally = modbus.Tally(count)
        parser = modbus.ReplyParser(address, function, registers, tally)
        last: DriverError | None = None
        async with self._lock:
            for attempt in range(retries + 1):
                if attempt:
                    count("retries", 1)
                parser.reset()
                crc_before = tally.crc_errors
                received = bytearray()
                frame = await self.exchange(request, parser, self.timeout_s, received)
                if frame is None:
                    if received and tally.crc_errors == crc_before:
                        key, why = modbus.describe_bad_reply(received, address, function,
                                                             parser.normal_length)
                        count(key, 1)
                        last = ProtocolError(f"{why} to function {function:#04x}", where=where)
                    elif tally.crc_errors > crc_before:
                        last = ProtocolError(
                            f"reply to function {function:#04x} failed its CRC check", where=where
                        )
                    else:
                        count("timeouts", 1)
                        last = DeviceNotReady(
                            f"no reply to function {function:#04x} within {self.timeout_s:g} s",
                            where=where,
                        )
                    continue
                if frame.is_exception:
                    count("exception_replies", 1)
                    code = frame.exception_code
                    last = ProtocolError(
                        f"exception reply {code:#04x} ({modbus.exception_name(code)}) "
                        f"to function {function:#04x}",
                        where=where,
                    )
                    continue
                return frame
        assert last is not None
        raise last

    async def read_measurement(
        self, address: int, *, retries: int = 2, count: Count = modbus.no_count
    ) -> Measurement:
        frame = await self.request(
            modbus.read_registers_request(address, 0, INPUT_REGISTERS),
            address,
            modbus.FC_READ_INPUT,
            INPUT_REGISTERS,
            retries=retries,
            count=count,
        )
        return decode_registers(frame.registers())

    async def reset_energy(
        self, address: int, *, retries: int = 2, count: Count = modbus.no_count
    ) -> None:
        """Zero the meter's energy counter (function 0x42); the meter echoes the request."""
        await self.request(
            modbus.reset_energy_request(address),
            address,
            modbus.FC_PZEM_RESET_ENERGY,
            retries=retries,
            count=count,
        )


async def reset_energy(port_path: str, address: int, *, timeout_s: float = 2.0,
                       retries: int = 2) -> None:
    """Open ``port_path``, reset the energy of the meter at ``address`` and close the port."""
    bus = PzemBus(SerialPort(port_path, baudrate=BAUDRATE), timeout_s)
    try:
        await bus.port.open()
        await bus.reset_energy(address, retries=retries)
    finally:
        await bus.close()


class PzemSensor(PolledSensor):
    def __init__(
        self,
        name: str,
        clock: Clock,
        period_s: float,
        bus: PzemBus,
        *,
        address: int,
        retries: int,
    ) -> None:
        super().__init__(name, clock, period_s)
        self.bus = bus
        self.address = address
        self.retries = retries
        self._opened = False

    async def open(self) -> None:
        if self.emulator is not None:
            await self.emulator.start()
        await self.bus.open()
        self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                await self.bus.release()
            except Exception:  # close must not raise
                log.debug("%s: error releasing the bus", self.name, exc_info=True)

    async def sample(self) -> Sequence[Reading]:
        m = await self.bus.read_measurement(self.address, retries=self.retries, count=self.count)
        return [
            self.reading("voltage", m.voltage_v, "V"),
            self.reading("current", m.current_a, "A"),
            self.reading("active_power", m.power_w, "W"),
            self.reading("energy", m.energy_wh, "Wh"),
            self.reading("frequency", m.frequency_hz, "Hz"),
            self.reading("power_factor", m.power_factor, "1"),
            self.reading("alarm", 1.0 if m.alarm else 0.0, "1"),
        ]

    async def reset_energy(self) -> None:
        await self.bus.reset_energy(self.address, retries=self.retries, count=self.count)


def build(cfg: Any, ctx: BuildContext) -> PzemSensor:
    where = f"sensor {cfg.name}"
    options = dict(cfg.options)
    address = cfg.address if cfg.address is not None else 0x01
    if not 0x01 <= address <= modbus.BROADCAST_GENERAL:
        raise ConfigurationError(f"Modbus address {address:#04x} outside 0x01..0xF8", where=where)
    retries = option(options, "retries", int, 2, where)
    if not 0 <= retries <= 10:
        raise ConfigurationError(f"option retries={retries} outside 0..10", where=where)
    baudrate = option(options, "baudrate", int, BAUDRATE, where)
    path = str(cfg.port)
    bus = shared(
        ctx,
        port_key(path),
        lambda: PzemBus(SerialPort(path, baudrate=baudrate), cfg.timeout_s),
    )
    if not isinstance(bus, PzemBus):
        raise ConfigurationError(f"port {path} is already used by another kind of driver",
                                 where=where)
    return PzemSensor(cfg.name, ctx.clock, cfg.period_s, bus, address=address, retries=retries)
