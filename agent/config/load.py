"""Loading the agent's TOML file into the frozen models of ``agent.config.schema``.

`load_config` reads the file with `tomllib`, applies `EDGE_AGENT__SECTION__KEY`
environment overrides, validates the structure and then the cross-references (streams name
sensors that exist, I2C addresses fit the chip). Every problem is reported at once, each as a
`Problem` with the key path, the bad value and the reason.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.anomaly.thresholds import ThresholdsError, load_thresholds
from agent.config.cleaning import CleanOptions
from agent.config.env import apply_env
from agent.config.schema import AgentConfig, SensorConfig, StreamConfig, is_loopback
from drivers.registry import DRIVERS, clean_defaults, kind_of


@dataclass(frozen=True)
class Problem:
    path: str
    value: str
    reason: str

    def __str__(self) -> str:
        if self.value and self.value not in self.reason:
            return f"{self.path}: {self.value}: {self.reason}"
        return f"{self.path}: {self.reason}"


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)")
        self.source = source
        self.problems = problems


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
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
    for i, m in enumerate(cfg.models):
        if m.stream not in streams:
            out.append(Problem(f"models[{i}].stream", repr(m.stream), "no stream has this name"))
    mq = cfg.mqtt
    if mq.tls is False and not is_loopback(mq.host):
        out.append(Problem("mqtt.tls", "false",
                           "plaintext MQTT is refused for a broker that is not on loopback "
                           f"({mq.host})"))
    if bool(mq.cert_file) != bool(mq.key_file):
        out.append(Problem("mqtt.cert_file", mq.cert_file or "''",
                           "cert_file and key_file must be given together"))
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


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> AgentConfig:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [Problem(source, "", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem(source, "", f"not valid TOML: {exc}")]) from None
    return parse_config(apply_env(data, os.environ if env is None else env), source)
