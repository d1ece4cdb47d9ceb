"""Device profiles: a Modbus register map as TOML data, validated into frozen models.

A profile names the device, cites the register-map document it was written from, gives the
line defaults and lists its points::

    name = "eastron-sdm120"
    document = "Eastron SDM120-Modbus protocol V2.4, input registers (function 04)"
    table = "input"          # default for points: coil, discrete, holding, input
    order = "ABCD"           # default word/byte order of multi-register points
    [[points]]
    quantity = "voltage"
    address = 0x0000
    type = "f32"
    unit = "V"

Profiles ship in ``drivers/profiles/`` and a site folder (``/etc/edge-agent/profiles`` unless
configured) holds a site's own; a site file of the same name replaces the shipped one. Every
problem names the file, the point and the key (``ProfileError``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drivers.modbus.decode import ORDERS, TYPES, WORDS, Order, Type
from drivers.modbus.units import UNIT_MAP, canonical
from drivers.serial.modbus import MAX_READ_BITS, MAX_READ_REGISTERS

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "profiles"
SITE_DIR = "/etc/edge-agent/profiles"
MAX_PROFILE_BYTES = 1 << 20
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
Table = Literal["coil", "discrete", "holding", "input"]
BIT_TABLES = ("coil", "discrete")
FUNCTION = {"coil": 0x01, "discrete": 0x02, "holding": 0x03, "input": 0x04}
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Point(_Frozen):
    """One value of the device, published as the Reading quantity ``quantity``."""

    quantity: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    address: Annotated[int, Field(ge=0, le=0xFFFF, strict=True)]
    table: Table | None = None
    type: Type = "u16"
    order: Order | None = None
    bit: Annotated[int, Field(ge=0, le=63, strict=True)] | None = None
    width: Annotated[int, Field(ge=1, le=64, strict=True)] = 1
    scale: Finite = 1.0
    offset: Finite = 0.0
    unit: str = "1"
    description: str = ""
    clean: dict[str, Any] = Field(default_factory=dict)
    """Cleaning defaults of this point's quantity, as `[sensors.clean.<quantity>]` takes them
    (canonical units); a sensor's own `[sensors.clean.<quantity>]` keys override them."""

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in TYPES:
            raise ValueError(f"{v!r} is not a type (one of {', '.join(TYPES)})")
        return v

    @field_validator("order", mode="before")
    @classmethod
    def _order(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ORDERS:
            raise ValueError(f"{v!r} is not a word/byte order (one of {', '.join(ORDERS)})")
        return v

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        if v not in UNIT_MAP:
            raise ValueError(f"{v!r} is not a known unit (known: "
                             f"{', '.join(sorted(u for u in UNIT_MAP if u))})")
        return v

    @field_validator("clean")
    @classmethod
    def _clean(cls, v: dict[str, Any]) -> dict[str, Any]:
        # The keys are checked against the cleaning options when a config loads the profile.
        for key, value in v.items():
            scalar = isinstance(value, (bool, int, float))
            names = isinstance(value, list) and all(isinstance(x, str) for x in value)
            if not (scalar or names):
                raise ValueError(f"{key}: a cleaning value is a number, true/false or a list "
                                 "of check names")
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if v == 0:
            raise ValueError("a scale of 0 would make every value 0")
        return v

    @property
    def words(self) -> int:
        return WORDS[self.type]


@dataclass(frozen=True, slots=True)
class ResolvedPoint:
    """A point with the profile's defaults applied and its unit mapped: what the driver reads."""

    quantity: str
    table: str
    address: int
    type: str
    order: str
    bit: int | None
    width: int
    scale: float
    offset: float
    unit: str  # canonical
    factor: float  # device unit -> canonical unit
    device_unit: str
    clean: tuple[tuple[str, Any], ...] = ()

    @property
    def span(self) -> int:
        """Registers (or bits, for coil and discrete tables) the point occupies."""
        return 1 if self.table in BIT_TABLES else WORDS[self.type]


class Profile(_Frozen):
    name: Annotated[str, Field(pattern=NAME_RE.pattern)]
    document: Annotated[str, Field(min_length=1)]
    """The register-map document the points were written from."""
    manufacturer: str = ""
    model: str = ""
    description: str = ""
    table: Table = "holding"
    order: Order = "ABCD"
    baudrate: Annotated[int, Field(ge=300, le=1_000_000, strict=True)] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    max_registers: Annotated[int, Field(ge=1, strict=True)] = MAX_READ_REGISTERS
    """Registers one request may ask for (some meters take fewer than Modbus's 125)."""
    max_gap: Annotated[int, Field(ge=0, le=MAX_READ_REGISTERS, strict=True)] = 0
    """Unused registers a request may span to join two groups of points (only for devices
    that answer reads of their reserved registers)."""
    points: Annotated[list[Point], Field(min_length=1)]


class ProfileError(ValueError):
    """Problems of one profile (or of a sensor's inline points), each naming point and key."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        super().__init__("; ".join(f"{source}: {p}" for p in problems))
        self.source = source
        self.problems = list(problems)


def _label(points: Any, i: int) -> str:
    q = points[i].get("quantity") if isinstance(points, list) and i < len(points) \
        and isinstance(points[i], dict) else None
    return f"point points[{i}]" + (f" ({q})" if isinstance(q, str) else "")


def _messages(err: ValidationError, data: Any, prefix: str = "") -> list[str]:
    points = data.get("points") if isinstance(data, dict) else None
    out = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        if len(loc) >= 3 and loc[0] == "points" and isinstance(loc[1], int):
            key = ".".join(str(k) for k in loc[2:])
            out.append(f"{_label(points, loc[1])}: key {prefix}{key}: {msg}")
        else:
            key = ".".join(str(k) for k in loc) or "(top level)"
            out.append(f"key {prefix}{key}: {msg}")
    return out


def resolve_points(points: Sequence[Point], table: str, order: str, max_registers: int,
                   labels: Sequence[str]) -> tuple[list[ResolvedPoint], list[str]]:
    """Apply defaults, map units, and check what spans points: overlaps, sizes, names."""
    out: list[ResolvedPoint] = []
    problems: list[str] = []
    if max_registers > MAX_READ_REGISTERS:
        problems.append(f"key max_registers: {max_registers} is more than the "
                        f"{MAX_READ_REGISTERS} registers one Modbus request can carry")
    seen: dict[str, str] = {}
    for p, label in zip(points, labels, strict=True):
        unit, factor = canonical(p.unit)
        tab = p.table or table
        r = ResolvedPoint(p.quantity, tab, p.address, p.type, p.order or order, p.bit,
                          p.width, p.scale, p.offset, unit, factor, p.unit,
                          tuple(sorted(p.clean.items())))
        if p.quantity in seen:
            problems.append(f"{label}: key quantity: {p.quantity!r} is already {seen[p.quantity]}")
        seen.setdefault(p.quantity, label)
        if tab in BIT_TABLES and p.type != "bool":
            problems.append(f"{label}: key type: a {tab} is one bit: the type must be \"bool\"")
        elif p.bit is not None and (p.type in ("f32", "f64", "bool")
                                    or p.bit + p.width > 16 * WORDS[p.type]):
            problems.append(f"{label}: key bit: bits {p.bit}..{p.bit + p.width - 1} do not fit "
                            f"an integer {p.type}")
        elif p.address + r.span - 1 > 0xFFFF:
            problems.append(f"{label}: key address: {p.type} at {p.address:#06x} runs past "
                            "register 0xFFFF")
        limit = MAX_READ_BITS if tab in BIT_TABLES else min(max_registers, MAX_READ_REGISTERS)
        if r.span > limit:
            problems.append(f"{label}: key type: {p.type} takes {r.span} registers, more than "
                            f"max_registers {limit}")
        out.append(r)
    problems += _overlaps(out, labels)
    return out, problems


def _overlaps(points: Sequence[ResolvedPoint], labels: Sequence[str]) -> list[str]:
    problems = []
    order = sorted(range(len(points)), key=lambda i: (points[i].table, points[i].address))
    cover: int | None = None  # the point reaching furthest so far in this table
    for b_i in order:
        b = points[b_i]
        a_i = cover
        if a_i is None or points[a_i].table != b.table:
            cover = b_i
            continue
        a = points[a_i]
        if b.address + b.span > a.address + a.span:
            cover = b_i
        if b.address > a.address + a.span - 1:
            continue
        if (a.bit is not None and b.bit is not None and a.address == b.address
                and a.type == b.type
                and (a.bit + a.width <= b.bit or b.bit + b.width <= a.bit)):
            continue  # bit fields of one register may share it
        problems.append(f"{labels[b_i]}: key address: {b.table} register {b.address:#06x} "
                        f"overlaps {labels[a_i]} ({a.address:#06x}..{a.address + a.span - 1:#06x})")
    return problems


@dataclass(frozen=True, slots=True)
class LoadedProfile:
    profile: Profile
    points: tuple[ResolvedPoint, ...]
    path: str


def parse_profile(data: Any, source: str) -> LoadedProfile:
    try:
        prof = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(source, _messages(exc, data)) from None
    labels = [f"point points[{i}] ({p.quantity})" for i, p in enumerate(prof.points)]
    points, problems = resolve_points(prof.points, prof.table, prof.order, prof.max_registers,
                                      labels)
    if problems:
        raise ProfileError(source, problems)
    return LoadedProfile(prof, tuple(points), source)


def load_profile_file(path: str | Path) -> LoadedProfile:
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(source, [f"cannot read: {exc.strerror}"]) from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(source, [f"larger than {MAX_PROFILE_BYTES} bytes"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(source, [f"not valid TOML: {exc}"]) from None
    return parse_profile(data, source)


def find_profile(name: str, site_dir: str | Path = SITE_DIR) -> Path:
    """The file of profile ``name``: the site folder first, then the shipped profiles."""
    if not NAME_RE.match(name):
        raise ProfileError(name, ["key profile: a profile name is lower-case letters, digits, "
                                  "'-' and '_'"])
    for folder in (Path(site_dir), SHIPPED_DIR):
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(n for n, _, _ in list_profiles(site_dir)) or "none"
    raise ProfileError(name, [f"key profile: no profile {name!r} in {site_dir} or the shipped "
                              f"profiles (known: {known})"])


def load_profile(name: str, site_dir: str | Path = SITE_DIR) -> LoadedProfile:
    loaded = load_profile_file(find_profile(name, site_dir))
    if loaded.profile.name != name:
        raise ProfileError(loaded.path, [f"key name: {loaded.profile.name!r} differs from the "
                                         f"file name {name!r}"])
    return loaded


def list_profiles(site_dir: str | Path = SITE_DIR) -> list[tuple[str, Path, str]]:
    """(name, file, origin) of every profile; a site profile hides a shipped one."""
    found: dict[str, tuple[str, Path, str]] = {}
    for folder, origin in ((SHIPPED_DIR, "shipped"), (Path(site_dir), "site")):
        try:
            files = sorted(folder.glob("*.toml"))
        except OSError:
            continue
        for f in files:
            if NAME_RE.match(f.stem):
                found[f.stem] = (f.stem, f, origin)
    return [found[k] for k in sorted(found)]
