"""Loading the agent's TOML file into the frozen models of ``agent.config.schema``.

`load_config` reads the file with `tomllib`, applies `EDGE_AGENT__SECTION__KEY`
environment overrides, validates the structure and then the cross-references (streams name
sensors that exist, I2C addresses fit the chip). Every problem is reported at once, each as a
`Problem` with the key path, the bad value and the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.anomaly.thresholds import ThresholdsError, load_thresholds
from agent.config.base import is_loopback
from agent.config.cleaning import CleanOptions
from agent.config.env import Override, Unusable, apply_env
from agent.config.schema import AgentConfig, SensorConfig, StreamConfig
from drivers.registry import DRIVERS, clean_defaults, kind_of


@dataclass(frozen=True)
class Problem:
    path: str
    value: str
    reason: str
    origin: str = ""  # where it came from when not the file: an environment variable

    def __str__(self) -> str:
        # A hostile value (an 80 KB path) is shown shortened, wherever it appears.
        value = _shown(self.value)
        reason = self.reason.replace(self.value, value) if self.value else self.reason
        reason = _shown(reason, REASON_SHOWN)
        if not self.path:  # about the file as a whole: the source is named beside it
            return reason
        if value and value not in reason:
            return f"{self.path}: {value}: {reason}"
        return f"{self.path}: {reason}"


VALUE_SHOWN = 120
REASON_SHOWN = 600


def _shown(text: str, limit: int = VALUE_SHOWN) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit - 40]}... ({len(text)} characters)"


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)")
        self.source = source
        self.problems = problems

    def lines(self) -> list[str]:
        """One line per problem, each led by where it came from (the file, or a variable)."""
        return [f"{p.origin or self.source}: {p}" for p in self.problems]


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


MAX_CONFIG_BYTES = 1024 * 1024  # a gateway's file is a few KiB; this bounds a hostile one
MAX_DEPTH = 12  # tables and arrays inside each other; the schema needs 5
_SHOW_CHARS = 60


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int) and abs(value) >= 10**18:
        # repr() of a huge int is slow or refused (int_max_str_digits): name its size instead
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, str) and len(value) > _SHOW_CHARS:
        return repr(value[:_SHOW_CHARS]) + f"... ({len(value)} characters)"
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return repr(value)[:60]


def _problems(err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "missing":
            out.append(Problem(_path(e["loc"]), "", "required key is missing"))
        elif e["type"] == "extra_forbidden":
            out.append(Problem(_path(e["loc"]), "", "unknown key"))
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            out.append(Problem(_path(e["loc"]), "", msg))  # a whole table: its path says it
        else:
            out.append(Problem(_path(e["loc"]), _show(e.get("input")), msg))
    return out


def _sensor_problems(i: int, s: SensorConfig) -> list[Problem]:
    out: list[Problem] = []
    here = f"sensors[{i}]"
    kind = kind_of(s.driver)
    info = DRIVERS.get(s.driver)
    if kind == "i2c":
        if s.bus is None:
            out.append(Problem(f"{here}.bus", "", f"an I2C bus is required for {s.driver}"))
        if s.address is None:
            out.append(Problem(f"{here}.address", "", f"an address is required for {s.driver}"))
        elif not 0x03 <= s.address <= 0x77:
            out.append(Problem(f"{here}.address", f"{s.address:#04x}",
                               f"{s.address:#04x} is not a valid 7-bit I2C address"))
        elif info is not None and info.addresses and s.address not in info.addresses:
            allowed = ", ".join(f"{a:#04x}" for a in info.addresses)
            out.append(Problem(f"{here}.address", f"{s.address:#04x}",
                               f"{s.driver} answers only at {allowed}"))
    elif kind in ("serial", "bridge") and not s.port:
        out.append(Problem(f"{here}.port", "", f"a serial port is required for {s.driver}"))
    return out


def _cross_check(cfg: AgentConfig) -> list[Problem]:
    """Checks that span keys: references, uniqueness, chip-specific addresses."""
    out: list[Problem] = []
    names: set[str] = set()
    for i, s in enumerate(cfg.sensors):
        if s.name in names:
            out.append(Problem(f"sensors[{i}].name", repr(s.name), "duplicate sensor name"))
        names.add(s.name)
        out.extend(_sensor_problems(i, s))
    streams: set[str] = set()
    for i, st in enumerate(cfg.streams):
        if st.name in streams:
            out.append(Problem(f"streams[{i}].name", repr(st.name), "duplicate stream name"))
        streams.add(st.name)
        for j, ref in enumerate(st.sensors):
            if ref not in names:
                out.append(Problem(f"streams[{i}].sensors[{j}]", repr(ref),
                                   "no sensor has this name"))
        if st.anomaly is not None:
            out.extend(_anomaly_problems(i, st, cfg))
        out.extend(_fuse_problems(i, st, cfg))
    models: set[str] = set()
    for i, m in enumerate(cfg.models):
        if m.name in models:
            out.append(Problem(f"models[{i}].name", repr(m.name), "duplicate model name"))
        models.add(m.name)
        if m.stream not in streams:
            out.append(Problem(f"models[{i}].stream", repr(m.stream), "no stream has this name"))
    mq = cfg.mqtt
    remote = [h for h, _ in mq.addresses() if not is_loopback(h)]
    if mq.tls is False and remote:
        out.append(Problem("mqtt.tls", "false",
                           "plaintext MQTT is refused for a broker that is not on loopback "
                           f"({remote[0]})"))
    if bool(mq.cert_file) != bool(mq.key_file):
        out.append(Problem("mqtt.cert_file", mq.cert_file or "''",
                           "cert_file and key_file must be given together"))
    return out


def _fuse_problems(i: int, st: StreamConfig, cfg: AgentConfig) -> list[Problem]:
    """What the windower would refuse at start: channels of sensors the stream does not list,
    a channel twice, or quantities mixed in one group."""
    out: list[Problem] = []
    groups: set[str] = set()
    for j, g in enumerate(st.fuse):
        where = f"streams[{i}].fuse[{j}]"
        if g.name in groups:
            out.append(Problem(f"{where}.name", repr(g.name), "duplicate fuse group name"))
        groups.add(g.name)
        seen: set[str] = set()
        quantities: set[str] = set()
        for k, ch in enumerate(g.channels):
            sensor, dot, quantity = ch.partition(".")
            here = f"{where}.channels[{k}]"
            if not dot or not sensor or not quantity:
                out.append(Problem(here, repr(ch), "not a channel name (sensor.quantity)"))
            elif sensor not in st.sensors:
                out.append(Problem(here, repr(ch), f"sensor {sensor!r} is not one of this "
                                                   "stream's sensors"))
            elif ch in seen:
                out.append(Problem(here, repr(ch), "listed twice in the group"))
            seen.add(ch)
            if quantity:
                quantities.add(quantity)
        if len(quantities) > 1:
            out.append(Problem(f"{where}.channels", "", "mixes quantities "
                                                        f"{', '.join(sorted(quantities))}"))
    return out


def _anomaly_problems(i: int, st: StreamConfig, cfg: AgentConfig) -> list[Problem]:
    a = st.anomaly
    assert a is not None
    where = f"streams[{i}].anomaly"
    out: list[Problem] = []
    if cfg.gateway.latitude is None or cfg.gateway.longitude is None:
        out.append(Problem(where, "", "needs gateway.latitude and gateway.longitude (the lamp "
                                      "checks follow the sun)"))
    named = [(k, getattr(a, k)) for k in ("main", "lights", "check", "photocell")]
    named += [(f"chargers[{j}]", c) for j, c in enumerate(a.chargers)]
    for key, channel in named:
        if channel and channel.partition(".")[0] not in st.sensors:
            out.append(Problem(f"{where}.{key}", repr(channel),
                               "not a channel (sensor.quantity) of this stream's sensors"))
    if a.thresholds:
        try:  # a FIFO would block the open below
            regular = stat.S_ISREG(os.stat(a.thresholds).st_mode)
        except OSError:
            regular = True  # load_thresholds names what is wrong with it
        if not regular:
            out.append(Problem(f"{where}.thresholds", repr(a.thresholds), "not a regular file"))
            return out
    try:
        th = load_thresholds(a.thresholds)
    except ThresholdsError as exc:
        out.append(Problem(f"{where}.thresholds", repr(a.thresholds or "shipped"), str(exc)))
        return out
    circuits = len(th.unexplained.main_gains)
    if circuits != 1 + len(a.chargers):
        out.append(Problem(f"{where}.chargers", str(len(a.chargers)),
                           f"the anomaly thresholds are calibrated for {circuits - 1} separately "
                           "metered charge points"))
    if th.window_s != st.window_s:
        out.append(Problem(f"streams[{i}].window_s", f"{st.window_s:g}",
                           f"the anomaly thresholds are calibrated for {th.window_s} s windows"))
    return out


def _partial_checks(data: dict[str, Any]) -> list[Problem]:
    """Sensor checks for the sensors that are valid on their own, so that one structural
    mistake elsewhere does not hide the rest."""
    out: list[Problem] = []
    sensors = data.get("sensors")
    if isinstance(sensors, list):
        for i, raw in enumerate(sensors):
            with contextlib.suppress(ValidationError):
                out.extend(_sensor_problems(i, SensorConfig.model_validate(raw)))
    return out


def parse_config(data: dict[str, Any], source: str = "<config>") -> AgentConfig:
    deep = _too_deep(data)
    if deep is not None:
        raise ConfigError(source, [Problem(deep, "", f"nested more than {MAX_DEPTH} levels deep")])
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc) + _partial_checks(data)) from None
    problems = _cross_check(cfg)
    sensors, clean_problems = _with_driver_cleaning(cfg)
    problems += clean_problems
    if problems:
        raise ConfigError(source, problems)
    return cfg.model_copy(update={"sensors": sensors}) if sensors != cfg.sensors else cfg


def _with_driver_cleaning(cfg: AgentConfig) -> tuple[list[SensorConfig], list[Problem]]:
    """Sensors with the cleaning defaults their driver derives (a Modbus profile's points)
    merged under their own `[sensors.clean.<quantity>]` keys, which win."""
    out: list[SensorConfig] = []
    problems: list[Problem] = []
    for i, s in enumerate(cfg.sensors):
        derived = clean_defaults(s.driver, s.options)
        if not derived:
            out.append(s)
            continue
        merged = dict(s.clean)
        for quantity, (where, keys) in derived.items():
            own = s.clean.get(quantity)
            data = {**keys, **(own.model_dump(exclude_unset=True) if own else {})}
            try:
                merged[quantity] = CleanOptions.model_validate(data)
            except ValidationError as exc:
                for p in _problems(exc):
                    problems.append(Problem(f"sensors[{i}]", "",
                                            f"{where}: key clean.{p.path}: {p.reason}"))
        out.append(s.model_copy(update={"clean": merged}))
    return out, problems


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def read_bounded(path: str | Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; OSError or ValueError otherwise.

    Opened non-blocking so that a FIFO cannot hang the caller, and checked with fstat on the
    open descriptor so that the file cannot be swapped between the check and the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
            raise ValueError(f"is {kind}, not a regular file")
        if st.st_size > limit:
            raise ValueError(f"is {st.st_size} bytes, more than the {limit} a config may have")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > limit:  # grew while being read
                raise ValueError(f"is more than the {limit} bytes a config may have")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8, or a ConfigError naming the offset, line and column of the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start:exc.end].hex(" ")
        raise ConfigError(source, [Problem(
            "", "", f"not UTF-8: byte offset {exc.start} (line {line}, column {col}): "
                        f"{bad} ({exc.reason})")]) from None


def _too_deep(data: Any) -> str | None:
    """The key path of the first value nested deeper than MAX_DEPTH, else None (no recursion:
    the point is to refuse what would exhaust the stack further on)."""
    todo: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    while todo:
        node, loc = todo.pop()
        if len(loc) > MAX_DEPTH:
            return _path(loc[:MAX_DEPTH + 1])
        if isinstance(node, dict):
            todo.extend((v, (*loc, str(k))) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((v, (*loc, i)) for i, v in enumerate(node))
    return None


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text into a dict, with every way the parser can fail as a ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        reason = f"not valid TOML: {exc}"
    except RecursionError:
        reason = "not valid TOML: nested too deeply to parse"
    except ValueError as exc:
        reason = ("not valid TOML: an integer has more digits than Python converts"
                  if "digits" in str(exc) else f"not valid TOML: {exc}")
    except MemoryError:
        reason = "not valid TOML: too large to parse"
    else:
        return data
    raise ConfigError(source, [Problem("", "", reason)])


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, decode, parse and validate the file at ``path``; every failure is a ConfigError."""
    source = str(path)
    try:
        raw = read_bounded(path)
    except OSError as exc:
        raise ConfigError(source, [Problem("", "",
                                           f"cannot read: {exc.strerror or exc}")]) from None
    except ValueError as exc:
        raise ConfigError(source, [Problem("", "", f"cannot read: {exc}")]) from None
    data = parse_toml(decode_utf8(raw, source), source)
    applied: list[Override] = []
    unusable: list[Unusable] = []
    data = apply_env(data, os.environ if env is None else env, applied, unusable)
    if unusable:
        raise ConfigError(source, [Problem("", "", u.reason, origin=_from_env(u.var))
                                   for u in unusable])
    try:
        return parse_config(data, source)
    except ConfigError as exc:
        by_path = {_path(o.loc): o.var for o in applied}
        raise ConfigError(exc.source, [
            dataclasses.replace(p, origin=_from_env(by_path[p.path])) if p.path in by_path
            else p for p in exc.problems]) from None


def _from_env(var: str) -> str:
    return f"{var} (environment)"
