"""The ``[sensors.options]`` of a ``modbus`` sensor, and what they resolve to.

A sensor names a profile, lists points inline, or both (inline points add to the profile's)::

    [[sensors]]
    name = "feed"
    driver = "modbus"
    port = "/dev/serial/by-id/usb-FTDI_...-port0"   # or "tcp://10.0.0.7:502"
    address = 1                                     # the unit id
    options = { profile = "eastron-sdm630" }
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drivers.modbus.decode import Order
from drivers.modbus.profile import (
    SITE_DIR,
    LoadedProfile,
    Point,
    ProfileError,
    ResolvedPoint,
    Table,
    _messages,
    load_profile,
    resolve_points,
)
from drivers.serial.modbus import MAX_READ_REGISTERS

TCP_PREFIX = "tcp://"


class ModbusOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str | None = None
    """A profile name (`edge-agent profiles list`)."""
    points: list[Point] = Field(default_factory=list)
    """Points of the sensor's own, added to the profile's."""
    profiles_dir: str = SITE_DIR
    """The site folder searched before the shipped profiles."""
    table: Table | None = None
    order: Order | None = None
    retries: Annotated[int, Field(ge=0, le=10, strict=True)] = 2
    baudrate: Annotated[int, Field(ge=300, le=1_000_000, strict=True)] | None = None
    parity: Literal["N", "E", "O"] | None = None
    stopbits: Literal[1, 2] | None = None
    frame_gap_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] | None = None
    """Silence before each request; unset: 3.5 character times (1.75 ms above 19200 baud)."""
    max_registers: Annotated[int, Field(ge=1, strict=True)] | None = None
    max_gap: Annotated[int, Field(ge=0, le=MAX_READ_REGISTERS, strict=True)] | None = None
    """Unused registers a request may span to join two groups of points into one (unset: the
    profile's, else 0)."""
    emulator: dict[str, Any] = Field(default_factory=dict)
    """With `port = "emulated"`: `bus` (line name), `transport` (`rtu` or `tcp`), `seed`,
    `baud_paced` (delay replies by their wire time)."""


@dataclass(frozen=True, slots=True)
class Spec:
    """Everything the driver needs, resolved once."""

    options: ModbusOptions
    points: tuple[ResolvedPoint, ...]
    profile: LoadedProfile | None
    baudrate: int
    parity: str
    stopbits: int
    max_registers: int
    max_gap: int


def resolve(options: dict[str, Any]) -> Spec:
    """Validate ``options`` and load the profile; ProfileError names file, point and key."""
    try:
        opts = ModbusOptions.model_validate(options)
    except ValidationError as exc:
        raise ProfileError("options", _messages(exc, options)) from None
    loaded = load_profile(opts.profile, opts.profiles_dir) if opts.profile else None
    prof = loaded.profile if loaded else None
    if loaded is None and not opts.points:
        raise ProfileError("options", ["key profile: name a profile or list points"])
    table = opts.table or (prof.table if prof else "holding")
    order = opts.order or (prof.order if prof else "ABCD")
    max_registers = opts.max_registers or (prof.max_registers if prof else MAX_READ_REGISTERS)
    own = opts.points
    labels = [f"point points[{i}] ({p.quantity})" for i, p in enumerate(own)]
    inline, problems = resolve_points(own, table, order, max_registers, labels)
    points = (*(loaded.points if loaded else ()), *inline)
    if loaded is not None and inline:
        # Checked together too: an inline point may collide with one of the profile's.
        all_labels = [f"profile point {p.quantity}" for p in loaded.points] + labels
        every = [_as_point(p) for p in loaded.points] + list(own)
        _, joint = resolve_points(every, table, order, max_registers, all_labels)
        problems += [p for p in joint if p not in problems]
    if problems:
        raise ProfileError("options", problems)
    return Spec(opts, points, loaded,
                opts.baudrate or (prof.baudrate if prof else 9600),
                opts.parity or (prof.parity if prof else "N"),
                opts.stopbits or (prof.stopbits if prof else 1),
                max_registers,
                opts.max_gap if opts.max_gap is not None else (prof.max_gap if prof else 0))


def _as_point(r: ResolvedPoint) -> Point:
    return Point(quantity=r.quantity, address=r.address, table=r.table,  # type: ignore[arg-type]
                 type=r.type, order=r.order, bit=r.bit,  # type: ignore[arg-type]
                 width=r.width, scale=r.scale, offset=r.offset, unit=r.device_unit,
                 clean=dict(r.clean))


def problems(options: dict[str, Any]) -> list[str]:
    """Config-time check: every problem of these options, profile file included."""
    try:
        resolve(options)
    except ProfileError as exc:
        return [str(exc)]
    return []


def clean_defaults(options: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per quantity, (where it is written, the cleaning defaults its point carries)."""
    try:
        spec = resolve(options)
    except ProfileError:
        return {}  # reported by ``problems``
    where = spec.profile.path if spec.profile else "options"
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    own = {p.quantity for p in spec.options.points}
    for p in spec.points:
        if p.clean:
            source = "options" if p.quantity in own else where
            out[p.quantity] = (f"{source}: point {p.quantity}", dict(p.clean))
    return out


def tcp_target(port: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://host:port`` sensor port, None for a serial port."""
    if not port.startswith(TCP_PREFIX):
        return None
    host, sep, num = port[len(TCP_PREFIX):].rpartition(":")
    if not sep or not host or not num.isdigit() or not 1 <= int(num) <= 65535:
        raise ValueError(f"{port!r} is not tcp://HOST:PORT")
    return host.strip("[]"), int(num)
