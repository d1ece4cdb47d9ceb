"""Polls per second on one Modbus RTU line at 9600 baud, beside the line-rate limit.

    python bench/modbus.py [--seconds 20] [--baud 9600] [--units 3]

A pty has no baud rate, so the emulated line is paced: each reply leaves only after the wire
time of the request and the reply at the bench's baud rate, 8N1 framing, 10 bits per byte
(start, 8 data, stop; 8E1 or 8N2 would be 11). The driver polls back to back, as fast as the
line allows: SDM630, SDM120 and PZEM-004T profiles on units 1..3 in turn.

Rows printed:

  line-rate limit       (baud / 10) bytes/s / the bytes one round of polls puts on the wire
                        (requests + replies; the 3.5-character silences excluded)
  limit with silences   the same with the 3.5-character silence the driver keeps before each
                        request (the emulator adds none before its replies; a real device
                        must, so a real line is slower still)
  edge-agent driver     measured polls/s, and its ratio to the line-rate limit
  pymodbus client       the same requests through pymodbus's async serial client, same line

Ratio >= 0.8 is the target for the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.clock import SystemClock  # noqa: E402
from agent.config.schema import SensorConfig  # noqa: E402
from drivers.base import BuildContext  # noqa: E402
from drivers.emulated.modbus import ModbusRtuLine  # noqa: E402
from drivers.modbus.options import resolve  # noqa: E402
from drivers.modbus.plan import Request, plan  # noqa: E402
from drivers.modbus.sensor import ModbusSensor  # noqa: E402
from drivers.registry import build_sensor  # noqa: E402

PROFILES = ("eastron-sdm630", "eastron-sdm120", "pzem-004t-v3")
BITS_PER_BYTE = 10  # 8N1


def wire_bytes(requests: list[Request]) -> int:
    """Request (8 bytes) plus reply (5 + 2 x count) of every read of one poll."""
    return sum(8 + 5 + 2 * r.count for r in requests)


async def driver_rate(line: ModbusRtuLine, units: int, seconds: float) -> tuple[float, int]:
    async with contextlib.AsyncExitStack() as stack:
        ctx = BuildContext(SystemClock(), stack)
        sensors = []
        for u in range(1, units + 1):
            s = build_sensor(SensorConfig(
                name=f"m{u}", driver="modbus", port=line.path, address=u, timeout_s=1.0,
                options={"profile": PROFILES[(u - 1) % 3], "baudrate": line.baud,
                         "retries": 0}), ctx)
            assert isinstance(s, ModbusSensor)
            await s.open()
            sensors.append(s)
        polls = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for s in sensors:
                await s.sample()
                polls += 1
        rate = polls / (time.perf_counter() - t0)
        for s in sensors:
            await s.close()
    return rate, polls


async def pymodbus_rate(line: ModbusRtuLine, units: int, seconds: float) -> float:
    from pymodbus.client import AsyncModbusSerialClient

    reqs = {u: plan_for(PROFILES[(u - 1) % 3]) for u in range(1, units + 1)}
    client = AsyncModbusSerialClient(line.path, baudrate=line.baud or 9600, timeout=1,
                                     retries=0)
    assert await client.connect()
    polls = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            for u, rs in reqs.items():
                for r in rs:
                    rr = await client.read_input_registers(r.start, count=r.count, device_id=u)
                    assert not rr.isError(), rr
                polls += 1
    finally:
        client.close()
    return polls / (time.perf_counter() - t0)


def plan_for(profile: str) -> list[Request]:
    spec = resolve({"profile": profile})
    return plan(spec.points, spec.max_registers, spec.max_gap)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--baud", type=int, default=9600)
    ap.add_argument("--units", type=int, default=3, choices=[1, 2, 3])
    args = ap.parse_args()

    per_round = [plan_for(PROFILES[i % 3]) for i in range(args.units)]
    round_bytes = sum(wire_bytes(r) for r in per_round)
    frames = sum(len(r) for r in per_round)
    bytes_per_s = args.baud / BITS_PER_BYTE
    limit = bytes_per_s / round_bytes * args.units
    limit_gaps = bytes_per_s / (round_bytes + 3.5 * frames) * args.units

    line = ModbusRtuLine("bench", baud=args.baud, bits_per_char=BITS_PER_BYTE)
    for u in range(1, args.units + 1):
        line.add_unit(u, resolve({"profile": PROFILES[(u - 1) % 3]}).points)
    await line.start()
    try:
        ours, polls = await driver_rate(line, args.units, args.seconds)
        theirs = await pymodbus_rate(line, args.units, args.seconds)
    finally:
        await line.close()

    print(f"Modbus RTU at {args.baud} baud 8N1 ({BITS_PER_BYTE} bits/byte), {args.units} "
          f"unit(s) ({', '.join(PROFILES[:args.units])}), {round_bytes} bytes on the wire "
          f"per round of polls; emulator paced to the baud rate, {args.seconds:g} s each")
    print(f"  {'line-rate limit':<24} {limit:8.2f} polls/s")
    print(f"  {'limit with silences':<24} {limit_gaps:8.2f} polls/s  (3.5 chars before "
          f"each of {frames} requests)")
    print(f"  {'edge-agent driver':<24} {ours:8.2f} polls/s  ratio {ours / limit:.2f} "
          f"({polls} polls)")
    print(f"  {'pymodbus client':<24} {theirs:8.2f} polls/s  ratio {theirs / limit:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
