"""The schema of the agent's one TOML file: frozen pydantic models, one per section.

Field docstrings are the documentation: the README's configuration reference is generated from
them (``agent.config.reference``). Loading and the checks that span sections are in
``agent.config.load``.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from agent.config.base import (
    MAX_ITEMS,
    MAX_SENSORS,
    Channel,
    FilePath,
    Key,
    Name,
    PositiveSeconds,
    Text,
    _Frozen,
    is_loopback,
)
from agent.config.cleaning import CleanOptions
from agent.config.fleet import BrokerAddress, CommandsConfig, ModelDeployConfig
from agent.config.services import HistoryConfig, SparkplugConfig, WebConfig
from drivers import registry


class GatewayConfig(_Frozen):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", max_length=64)]
    """This gateway's identity: used in topics, the MQTT client id and the certificate CN."""
    site: Text = ""
    """Free text: where the cabinet stands."""
    latitude: Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False)] | None = None
    """Latitude of the cabinet in degrees (north positive); the lamp checks need the sun."""
    longitude: Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False)] | None = None
    """Longitude of the cabinet in degrees (east positive)."""
    timezone: Annotated[str, Field(max_length=64)] = "UTC"
    """IANA time zone of the site (e.g. `Europe/Berlin`), for daily load and dimming profiles."""

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ValueError, OSError, ZoneInfoNotFoundError):
            raise ValueError(f"{v!r} is not an IANA time zone") from None
        return v


class SensorConfig(_Frozen):
    name: Name
    """Unique name; readings are keyed `name.quantity`."""
    driver: Annotated[str, Field(max_length=64)]
    """One of the known drivers, built in or from a plugin package (`edge-agent sensors
    drivers` lists them)."""
    bus: Annotated[int, Field(ge=0, le=255)] | Literal["emulated"] | None = None
    """I2C bus number N (`/dev/i2c-N`), or `"emulated"`. I2C drivers only."""
    port: FilePath | None = None
    """Serial port, best as `/dev/serial/by-id/...`, or `"emulated"`. Serial drivers only;
    `modbus` also takes `tcp://HOST:PORT` for Modbus TCP."""
    address: Annotated[int, Field(ge=0, le=0xF8)] | None = None
    """7-bit I2C address (e.g. `0x76`), or the Modbus unit id (`modbus`, `pzem004t`)."""
    period_s: PositiveSeconds = 1.0
    """Seconds between polls (polled drivers) or the expected report interval (streaming)."""
    timeout_s: Annotated[float, Field(ge=0.001, le=600, allow_inf_nan=False)] = 2.0
    """Timeout of one bus or port transaction."""
    enabled: bool = True
    """A disabled sensor is kept in the file but not started."""
    options: dict[Key, Any] = Field(default_factory=dict, max_length=MAX_ITEMS)
    """Driver-specific options (see the driver's documentation), checked by the driver's own
    rules: `modbus` loads its profile here, a plugin validates them with its pydantic model."""
    clean: dict[Key, CleanOptions] = Field(default_factory=dict, max_length=MAX_ITEMS)
    """Cleaning overrides by quantity, e.g. `[sensors.clean.temperature] max = 60`."""

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        known = registry.known()
        if v not in known:
            raise ValueError(f"{v!r} is not a known driver (known: {', '.join(known)})")
        return v

    @model_validator(mode="after")
    def _driver_options(self) -> SensorConfig:
        problems = registry.options_problems(self.driver, self.options)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = int(v, 0)
            except ValueError:
                raise ValueError(f"{v[:20]!r} is not an integer address") from None
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 0xF8:
            raise ValueError(f"{v:#04x} is not a valid device address")
        return v

    @field_validator("bus", mode="before")
    @classmethod
    def _bus(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 255:
            raise ValueError(f"{v} is not an I2C bus number (0..255)")
        return v


class FuseGroup(_Frozen):
    name: Name
    """Name of the fused channel in the window."""
    channels: Annotated[list[Channel], Field(min_length=2, max_length=MAX_ITEMS)]
    """Redundant channels (`sensor.quantity`) of one quantity to fuse."""


MIN_ROUND_STEP = 1e-9  # finer than any sensor resolves; 1e-300 would overflow value / step


def _round_step(v: float) -> float:
    if v < MIN_ROUND_STEP:
        raise ValueError(f"a rounding step must be at least {MIN_ROUND_STEP:g}")
    return v


RoundStep = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False),
                      AfterValidator(_round_step)]


class AudienceConfig(_Frozen):
    """One namespace a stream is published to (`[[streams.audiences]]`), with its own level.

    Unset keys take the stream's value.
    """

    name: Name
    """Topic level of the namespace: topics are `{prefix}/{gateway}/{name}/telemetry/{stream}`."""
    share: Literal["raw", "window", "derived", "local"]
    """What this audience gets: `raw`, `window`, `derived` or `local` (as the stream's `share`)."""
    drop: Annotated[list[Key], Field(max_length=MAX_ITEMS)] | None = None
    """Field patterns withheld from this audience (unset: the stream's `drop`)."""
    round: Annotated[dict[Key, RoundStep], Field(max_length=MAX_ITEMS)] | None = None
    """Rounding steps by field pattern for this audience (unset: the stream's `round`)."""
    min_vehicles: Annotated[int, Field(ge=0, le=1000)] | None = None
    """Vehicle threshold for this audience (unset: the stream's `min_vehicles`)."""
    vehicle_events: bool | None = None
    """Per-vehicle radar readings for this audience (unset: the stream's `vehicle_events`)."""

    @field_validator("name")
    @classmethod
    def _not_a_kind(cls, v: str) -> str:
        reserved = ("raw", "telemetry", "inference", "health", "status", "cmd")
        if v in reserved:
            raise ValueError(f"{v!r} is a topic level of its own; an audience cannot be called "
                             f"{', '.join(reserved)}")
        return v

    @field_validator("drop", "round")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        for pattern in v or ():
            cls.check_pattern(pattern)
        return v

    @staticmethod
    def check_pattern(pattern: str) -> None:
        """A field pattern names dotted paths under `channels`, `fused`, `derived` or `outputs`."""
        if not re.fullmatch(r"[A-Za-z0-9_.*?\[\]!-]+", pattern):
            raise ValueError(f"{pattern!r} is not a field pattern (letters, digits, `_ - .`, "
                             "and the wildcards `*` `?` `[...]`)")
        head = pattern.split(".", 1)[0]
        roots = ("channels", "fused", "derived", "outputs")
        if not any(fnmatch.fnmatchcase(root, head) for root in roots):
            raise ValueError(f"{pattern!r} matches no field: paths start with "
                             f"{', '.join(r + '.' for r in roots)}")


class AnomalyConfig(_Frozen):
    main: Channel
    """Channel of the cabinet's feed meter (`sensor.quantity`, e.g. `meter.active_power`)."""
    lights: Channel
    """Channel of the street-lighting circuit's power."""
    check: Channel = ""
    """A second meter on the same feed, for the drift and spike cross-checks; empty if none."""
    chargers: list[Channel] = Field(default_factory=list, max_length=16)
    """Channels of separately metered charge points; their power is subtracted from the feed."""
    photocell: Channel = ""
    """Channel of the photocell (1 calls for light, 0 not); empty if none."""
    thresholds: FilePath = ""
    """Thresholds calibrated for this site (JSON); empty for the shipped ones of the training
    site (`agent/anomaly/training_site.json`). Calibrate a site's own from its history:
    `edge-agent model history export --circuits STREAM`, then `python -m models.anomaly_eval
    --calibrate`."""


class StreamConfig(_Frozen):
    name: Name
    """Stream name; windows are published on `telemetry/{name}`."""
    sensors: Annotated[list[Key], Field(min_length=1, max_length=MAX_SENSORS)]
    """Names of the sensors whose readings go into this stream."""
    window_s: Annotated[float, Field(ge=0.1, le=86_400, allow_inf_nan=False)] = 10.0
    """Window length in seconds, aligned to the wall clock."""
    fuse: list[FuseGroup] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Groups of redundant channels fused by inverse-variance weighting."""
    share: Literal["raw", "window", "derived", "local"] | None = None
    """What leaves the gateway: `raw` (cleaned readings on `raw/{name}`, windows, inferences),
    `window` (windows and inferences), `derived` (inferences only) or `local` (nothing; the
    technician CLI still sees it). Unset: `window`. With `audiences`, set it per audience."""
    drop: Annotated[list[Key], Field(max_length=MAX_ITEMS)] | None = None
    """Field patterns withheld from what is published, e.g. `channels.radar.speed_in.last`,
    `channels.*.min`, `derived.occupancy`, `outputs.*` (`*` matches any text, dots included;
    a pattern that matches a channel withholds all of it). Unset: the min, max and last of
    per-vehicle speed channels (`speed_in`, `speed_out`)."""
    round: dict[Key, RoundStep] = Field(default_factory=dict, max_length=MAX_ITEMS)
    """Round published values whose field matches a pattern to a multiple of a step, e.g.
    `{ "*.speed_*" = 0.2778 }` (1 km/h in m/s); first matching pattern wins."""
    min_vehicles: Annotated[int, Field(ge=0, le=1000)] | None = None
    """k for vehicle counts: a window counting 1 to k-1 vehicles is withheld (and counted), and
    speed statistics over fewer than k vehicles are withheld. Unset: 3; 0 or 1 turns it off."""
    vehicle_events: bool = False
    """With `share = "raw"`, also publish per-vehicle radar readings (`speed_in`,
    `speed_out`); off keeps each vehicle's speed on the gateway."""
    audiences: list[AudienceConfig] = Field(default_factory=list, max_length=16)
    """Publish this stream to several namespaces, each at its own level
    (`[[streams.audiences]]`); without audiences it goes to the plain topics."""
    anomaly: AnomalyConfig | None = None
    """Typed anomaly detection on this (energy) stream's windows (`[streams.anomaly]`); events
    go to `anomaly/{stream}`. Needs `gateway.latitude` and `gateway.longitude`."""

    @model_validator(mode="before")
    @classmethod
    def _no_raw_flag(cls, data: Any) -> Any:
        if isinstance(data, dict) and "raw" in data:
            raise ValueError('the key `raw` was replaced by `share`: write share = "raw" to '
                             "publish cleaned readings, or remove `raw` (windows only is the "
                             "default)")
        return data

    @field_validator("drop", "round")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        for pattern in v or ():
            AudienceConfig.check_pattern(pattern)
        return v

    @model_validator(mode="after")
    def _audiences(self) -> StreamConfig:
        if self.audiences and self.share is not None:
            raise ValueError("`share` and `audiences` exclude each other: with audiences, "
                             "each audience has its own `share`")
        seen: set[str] = set()
        for a in self.audiences:
            if a.name in seen:
                raise ValueError(f"audience {a.name!r} is listed twice")
            seen.add(a.name)
        return self

    @property
    def raw(self) -> bool:
        """True when some namespace of this stream gets its cleaned readings."""
        if self.audiences:
            return any(a.share == "raw" for a in self.audiences)
        return self.share == "raw"


class ModelConfig(_Frozen):
    name: Name
    """Model name: `traffic` or `energy` for the shipped models."""
    stream: Key
    """The stream whose windows feed the model."""
    path: FilePath = ""
    """ONNX file; empty for the model shipped in the package. Its manifest lies beside it."""
    shadow: FilePath = ""
    """A candidate ONNX file run beside the active model until activated."""
    enabled: bool = True
    """A disabled model is not loaded."""
    guard: bool = True
    """Skill guard: publish the model's forecast only where its moves away from persistence (the
    current window's value) have beaten persistence at this site, and only as far as an error
    budget allows; otherwise persistence."""
    guard_horizon_s: Annotated[float, Field(ge=60, le=60 * 86_400, allow_inf_nan=False)] = (
        7 * 86_400.0)
    """Seconds of scored forecasts over which the model's record against persistence is kept,
    per size of move away from persistence."""
    guard_margin: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.02
    """The published forecasts may do at most this fraction worse than persistence over any
    12 h (so over any day): the guard's error budget."""
    guard_min_s: Annotated[float, Field(ge=0, le=60 * 86_400, allow_inf_nan=False)] = 3_600.0
    """Seconds of scored forecasts the guard needs before any of the model's forecasts can be
    published."""
    activate_margin: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.05
    """A shadow candidate is activated only if its error on the live windows is below both the
    active model's and persistence's by this fraction (`--force` overrides)."""
    activate_min_s: Annotated[float, Field(ge=0, le=30 * 86_400, allow_inf_nan=False)] = (
        86_400.0)
    """Seconds of live windows the candidate must have been scored on before activation."""
    runtime: Literal["auto", "onnxruntime", "numpy"] = "auto"
    """What runs the graph: `auto` is the package's numpy executor when it supports every operator
    of the graph (it does for the shipped models; the process then never loads onnxruntime),
    else onnxruntime."""


MQTT_MAX_PACKET_BYTES = 268_435_455  # the largest remaining length MQTT can encode


class MqttConfig(_Frozen):
    host: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    """Broker host name or address."""
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    """Broker port (8883 is usual for TLS)."""
    brokers: list[BrokerAddress] = Field(default_factory=list, max_length=8)
    """More brokers (the nodes of a cluster, or a standby), tried in order after `host`:`port`
    when it cannot be reached (`[[mqtt.brokers]] host, port`); the same TLS, credentials and
    client id are used with each."""
    session_expiry_s: Annotated[int, Field(ge=0, le=30 * 86_400)] = 7 * 86_400
    """How long the broker keeps the command subscription while the gateway is away, so a
    command sent meanwhile runs when it is back; 0 starts a clean session on every connect."""
    tls: bool | None = None
    """TLS with server verification. Unset: on unless the broker is on loopback."""
    ca_file: FilePath = ""
    """CA bundle that signs the broker's certificate; empty for the system trust store."""
    cert_file: FilePath = ""
    """Client certificate for mutual TLS (optional; with `key_file`)."""
    key_file: FilePath = ""
    """Private key of the client certificate."""
    credentials_file: FilePath = ""
    """File of two lines, username then password; empty for none."""
    client_id: Annotated[str, Field(max_length=128)] = ""
    """MQTT client id; empty derives it from the gateway id."""
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
                                       max_length=128)] = "edge"
    """First topic levels: topics are `{prefix}/{gateway}/...` (at most 128 characters of
    letters, digits, `_` and `-`, levels split by `/`; no MQTT wildcards or empty levels)."""
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    """MQTT keepalive in seconds."""
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    """MQTT version; `auto` tries 5 and falls back to 3.1.1."""
    max_inflight: Annotated[int, Field(ge=1, le=1000)] = 64
    """Publishes awaiting PUBACK at once."""
    replay_rate: Annotated[float, Field(ge=1, le=1_000_000, allow_inf_nan=False)] = 200.0
    """Backlog messages per second replayed after an outage, at full link health."""
    reconnect_max_s: Annotated[float, Field(ge=0.1, le=3600, allow_inf_nan=False)] = 60.0
    """Cap of the jittered exponential reconnect backoff."""
    reconnect_spread_s: Annotated[float, Field(ge=0, le=600, allow_inf_nan=False)] = 5.0
    """After a connection that held is lost, the first reconnect waits a random time in
    [0, this] once the broker's port is open again, so a fleet that lost the same broker comes
    back spread over this time instead of in one burst. Nothing is lost meanwhile: the outbox
    keeps every message."""
    max_payload_bytes: Annotated[int, Field(ge=256, le=MQTT_MAX_PACKET_BYTES)] = 256 * 1024
    """Larger messages are quarantined instead of sent."""
    poison_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    """A message the broker rejects this many times is quarantined."""

    def tls_enabled(self) -> bool:
        if self.tls is not None:
            return self.tls
        return not all(is_loopback(h) for h, _ in self.addresses())

    def addresses(self) -> list[tuple[str, int]]:
        """Every broker, in the order they are tried."""
        return [(self.host, self.port), *((b.host, b.port) for b in self.brokers)]


class OutboxConfig(_Frozen):
    path: Annotated[FilePath, Field(min_length=1)] = "/var/lib/edge-agent/outbox.db"
    """SQLite file of the store-and-forward outbox."""
    max_bytes: Annotated[int, Field(ge=64 * 1024, le=1 << 40)] = 256 * 1024 * 1024
    """Bound on stored payload bytes; past it the drop policy applies."""
    max_rows: Annotated[int, Field(ge=10, le=1_000_000_000)] = 2_000_000
    """Bound on stored messages."""
    max_age_s: Annotated[float, Field(ge=1, le=366 * 86_400, allow_inf_nan=False)] | None = None
    """Messages older than this are dropped (unset: no age bound)."""
    commit_interval_ms: Annotated[int, Field(ge=1, le=60_000)] = 500
    """Pending messages are committed at least this often."""
    commit_batch: Annotated[int, Field(ge=1, le=100_000)] = 500
    """...or as soon as this many are pending."""


class RawConfig(_Frozen):
    format: Literal["batch", "reading"] = "batch"
    """How the cleaned readings of `share = "raw"` streams travel: `batch` packs a stream's
    readings into one `edge-agent/raw-batch/1` message (one outbox row, one seq, one PUBACK);
    `reading` sends one `edge-agent/reading/1` message per reading."""
    linger_ms: Annotated[int, Field(ge=0, le=60_000)] = 0
    """How long a batch waits for more readings after its first. 0: it is sealed as soon as
    the pipeline has caught up, so batches grow with the load and add no latency."""
    max_readings: Annotated[int, Field(ge=1, le=100_000)] = 500
    """Readings per batch at most."""
    max_bytes: Annotated[int, Field(ge=1024, le=MQTT_MAX_PACKET_BYTES)] = 64 * 1024
    """Encoded size of a batch at most (and never above `mqtt.max_payload_bytes`)."""


class ControlConfig(_Frozen):
    socket: Annotated[str, Field(min_length=1, max_length=107)] = "/run/edge-agent/control.sock"
    """Unix socket of the local control interface used by the CLI."""


class RuntimeConfig(_Frozen):
    queue_size: Annotated[int, Field(ge=16, le=1_000_000)] = 4096
    """Readings queued between acquisition and cleaning; the oldest are dropped past it."""
    backoff_initial_s: PositiveSeconds = 0.5
    """First retry delay of a failing sensor."""
    backoff_max_s: PositiveSeconds = 30.0
    """Cap of a failing sensor's retry delay."""
    down_after: Annotated[int, Field(ge=1, le=1000)] = 3
    """Consecutive failures before a sensor shows `down`."""
    health_period_s: Annotated[float, Field(ge=0.1, le=86_400, allow_inf_nan=False)] = 30.0
    """Seconds between health messages."""
    stop_timeout_s: Annotated[float, Field(ge=0.1, le=30, allow_inf_nan=False)] = 4.0
    """Budget to flush and publish on SIGTERM before exiting."""
    model_watch_s: Annotated[float, Field(ge=0.1, le=86_400, allow_inf_nan=False)] = 5.0
    """How often model files are checked for a new version (a stat() each)."""
    clock: Literal["detect", "trust"] = "detect"
    """`detect`: hold timestamps as provisional until the system clock is synchronised (NTP),
    then re-stamp them. `trust`: take the system clock as right (hosts with an RTC)."""

    @model_validator(mode="after")
    def _backoff_order(self) -> RuntimeConfig:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(f"backoff_initial_s ({self.backoff_initial_s:g}) is above "
                             f"backoff_max_s ({self.backoff_max_s:g})")
        return self


class AgentConfig(_Frozen):
    gateway: GatewayConfig
    """Identity of this gateway."""
    sensors: list[SensorConfig] = Field(default_factory=list, max_length=MAX_SENSORS)
    """The devices to read (`[[sensors]]`)."""
    streams: list[StreamConfig] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Groups of sensors windowed together (`[[streams]]`)."""
    models: list[ModelConfig] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Edge models run on windows (`[[models]]`)."""
    mqtt: MqttConfig = MqttConfig()
    """The uplink to the cloud."""
    outbox: OutboxConfig = OutboxConfig()
    """The durable store between the pipeline and the uplink."""
    raw: RawConfig = RawConfig()
    """How raw readings are packed into messages."""
    history: HistoryConfig = HistoryConfig()
    """The local history of model windows, for site calibration."""
    control: ControlConfig = ControlConfig()
    """The local control socket."""
    runtime: RuntimeConfig = RuntimeConfig()
    """Queues, supervision and shutdown."""
    web: WebConfig = WebConfig()
    """The local status page and the Prometheus endpoint (both off by default)."""
    sparkplug: SparkplugConfig = SparkplugConfig()
    """The Sparkplug B output profile (off by default)."""
    commands: CommandsConfig = CommandsConfig()
    """Cloud commands: the keys that may sign state-changing ones."""
    model_deploy: ModelDeployConfig = ModelDeployConfig()
    """Models sent by the cloud (`model.deploy`): size, expiry of partial deploys, versions
    kept."""

    def sensor(self, name: str) -> SensorConfig:
        for s in self.sensors:
            if s.name == name:
                return s
        raise KeyError(name)

    def history_path(self) -> str:
        """Where the model history lives: configured, or beside the outbox file."""
        if self.history.path:
            return self.history.path
        return str(Path(self.outbox.path).with_name("history.db"))
