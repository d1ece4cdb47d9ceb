"""The agent's health snapshot, typed: the body of the ``health`` feed message and what
``edge-agent status --json`` prints. One model for both, so ``docs/schemas/health.schema.json``
and ``docs/status.schema.json`` cannot disagree.

Every object is open (unknown fields are accepted and kept): a stage may add a counter without
breaking a consumer, which by the feed's rule ignores fields it does not know. The fields listed
here are the contract of the current major version. Times are in seconds (``_s``) or
milliseconds (``_ms``), as their names say; counts are since the agent started. A stage that
reports a new field names it here (then ``python docs/gen_mqtt_schemas.py``): a test fails on
any field of a live health message that this model does not name.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

OPEN = ConfigDict(extra="allow")

MaybeFloat = float | None


class _Open(BaseModel):
    model_config = OPEN


class AgentInfo(_Open):
    version: str = Field(description="The agent's version.")
    gateway: str = Field(description="The gateway id.")
    uptime_s: float = Field(ge=0, description="Seconds since the agent started.")
    config_file: str | None = Field(description="The config file; null when started without.")
    generation: int = Field(ge=0, description="+1 per configuration run (start, reloads).")
    reloads_ok: int = Field(default=0, ge=0)
    reloads_rejected: int = Field(default=0, ge=0)
    last_reload_error: str = Field(default="", description="Empty when the last reload took.")


class LastValue(_Open):
    value: MaybeFloat = Field(description="The sensor's latest value, in `unit`.")
    unit: str = Field(description="From the unit vocabulary of docs/mqtt.md.")
    quality: str = Field(description="`good`, `suspect` or `bad`.")


class SensorStatus(_Open):
    name: str
    driver: str
    state: str = Field(description="`starting`, `up`, `retrying`, `down`, `disabled`, ...")
    readings: int = Field(ge=0)
    failures: int = Field(ge=0, description="Errors out of the driver since start.")
    consecutive_failures: int = Field(ge=0)
    restarts: int = Field(default=0, ge=0)
    last_error: str | None = Field(description="Empty or null when there was none.")
    last_reading_age_s: MaybeFloat
    last_values: dict[str, LastValue] = Field(description="By quantity.")
    counters: dict[str, int] = Field(default_factory=dict,
                                     description="The driver's own counters (frames, CRC "
                                                 "errors, ...).")
    next_retry_s: MaybeFloat = Field(default=None,
                                     description="Seconds until the next open attempt.")
    last_error_age_s: MaybeFloat = Field(default=None,
                                         description="Seconds since `last_error`; null when none.")
    next_retry_in_s: MaybeFloat = Field(default=None, description=(
        "Seconds until the next attempt while retrying; null when not waiting."))


class QueueStats(_Open):
    depth: int = Field(ge=0)
    maxsize: int = Field(ge=0)
    policy: str = Field(description="What happens when full, e.g. `drop_oldest`.")
    put: int = Field(ge=0)
    dropped: int = Field(ge=0)
    high_water: int = Field(ge=0)


class PipelineStats(_Open):
    windows: int = Field(ge=0, description="Windows published.")
    inferences: int = Field(ge=0, description="Model results published.")
    raw: int = Field(ge=0, description="Raw readings published.")
    raw_readings: int = Field(default=0, ge=0, description=(
        "Readings handed to the raw lane, counted once per stream (a batch holds many)."))
    heartbeat_age_s: float = Field(ge=0, description="Since the processing loop last ran.")
    errors: dict[str, int] = Field(default_factory=dict, description="By stage.")


class ChannelCleaning(_Open):
    good: int = Field(ge=0)
    suspect: int = Field(ge=0)
    bad: int = Field(ge=0)
    dropped: dict[str, int] = Field(default_factory=dict,
                                    description="Readings dropped, by reason (`duplicate`).")
    reasons: dict[str, int] = Field(default_factory=dict,
                                    description="Quality reasons raised, by reason.")
    stale: bool


class CleanStats(BaseModel):
    """Per channel (`sensor.quantity`), and the list of stale channels."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ChannelCleaning] = Field(init=False)
    stale: list[str] = Field(default_factory=list)


class WindowerStats(_Open):
    late: dict[str, int] = Field(description="Readings too late for their window, by stream.")
    closed_early: dict[str, int] = Field(description="Windows closed before their end, by "
                                                     "stream.")
    open: dict[str, int] = Field(description="Windows open now, by stream.")
    held: int = Field(ge=0, description="Readings held until the clock synchronises.")
    restamped: int = Field(ge=0)
    unrouted: int = Field(ge=0, description="Readings of a sensor in no stream.")


class ClockStatus(_Open):
    synced: bool | None
    source: str | None = Field(default=None, description="`ntp`, `trust`, ...")


class OutboxStats(_Open):
    path: str
    boot_id: str
    accepted_seq: int | None = Field(description="The last seq committed.")
    next_seq: int
    rows: int = Field(ge=0, description="Messages stored, not yet acknowledged by the broker.")
    bytes: int = Field(ge=0)
    depth: dict[str, int] = Field(description="Rows by class.")
    bytes_by_class: dict[str, int]
    oldest_age_s: MaybeFloat
    pending: int = Field(ge=0, description="Produced, not yet committed.")
    drops: dict[str, int] = Field(description="Messages dropped at a bound, by class.")
    drops_by_reason: dict[str, int] = Field(description="`rows`, `bytes`, `age`, `buffer`.")
    quarantined: int = Field(ge=0)
    quarantine_rows: int = Field(ge=0)
    corrupt_resets: int = Field(ge=0)
    salvaged: int = Field(ge=0)
    unreadable: int = Field(ge=0)
    commits: int = Field(ge=0)
    commit_errors: int = Field(ge=0)
    last_commit_ms: float
    max_commit_ms: float
    published_through: int = Field(default=0, ge=0, description=(
        "Messages handed to the uplink before their commit (publish-through)."))
    acked_before_commit: int = Field(default=0, ge=0, description=(
        "Of those, acknowledged by the broker before their commit, so never written."))
    seq_skipped: list[Any] | None = Field(description="Seq ranges skipped after a power cut or "
                                                      "a replaced file: not a loss.")


class SharingCounts(_Open):
    published: int = Field(ge=0)
    local: int = Field(ge=0)
    suppressed: int = Field(ge=0)
    withheld: int = Field(ge=0)
    redacted: int = Field(ge=0)
    rounded: int = Field(ge=0)


class CommandStats(_Open):
    ok: int = Field(ge=0)
    error: int = Field(ge=0)
    retained: int = Field(ge=0)
    repeated: int = Field(ge=0)
    running: int = Field(ge=0)
    available: list[str]
    refused: dict[str, int] = Field(default_factory=dict, description=(
        "Commands refused, by reason (`unsigned`, `bad_signature`, `unknown_key`, `expired`, "
        "`wrong_gateway`, ...)."))
    require_signature: bool = Field(default=True, description=(
        "State-changing commands run only when signed by a trusted key."))
    trusted_keys: list[str] = Field(default_factory=list,
                                    description="Ids of the keys trusted (never the keys).")
    seen_ids: int | None = Field(default=None, description=(
        "Command ids remembered across restarts (null: no id store)."))


class UplinkStatus(_Open):
    state: str = Field(description="`connected`, `connecting`, `probing`, `backoff`, ...")
    broker: str = Field(description="host:port")
    protocol: str | None = Field(description="`5` or `3.1.1`; null before the first connect.")
    tls: bool
    nodelay: bool | None = None
    connected_for_s: MaybeFloat = None
    last_puback_age_s: MaybeFloat = None
    puback_latency_ms: MaybeFloat = None
    inflight: int = Field(ge=0)
    live_queue: int = Field(default=0, ge=0)
    backlog_pending: int = Field(ge=0, description="Committed rows not yet handed to the broker.")
    careful: bool = Field(default=False, description="Sending one message at a time after a "
                                                     "suspected poison message.")
    suspects: int = Field(default=0, ge=0)
    replay_rate: float = Field(description="Backlog messages per second allowed now.")
    published: int = Field(ge=0)
    replayed: int = Field(ge=0)
    acked: int = Field(ge=0)
    refused: int = Field(ge=0)
    quarantined: int = Field(ge=0)
    connects: int = Field(ge=0)
    reconnects: int = Field(ge=0)
    connect_failures: int = Field(ge=0)
    blamed: int = Field(ge=0)
    probes_refused: int = Field(ge=0)
    last_error: str | None
    last_error_age_s: MaybeFloat = Field(default=None,
                                         description="Seconds since `last_error`; null when none.")
    next_attempt_in_s: MaybeFloat = Field(default=None, description=(
        "Seconds until the next connection attempt while waiting; null otherwise."))
    commands: CommandStats | None


class GuardStatus(_Open):
    """The skill guard of a forecast output: model against persistence at this site."""

    source: str = Field(description="What is published now: `model`, `blend` or `fallback`.")
    enabled: bool
    skill: MaybeFloat = Field(description="1 - model MAE / persistence MAE; null until scored.")
    published_skill: MaybeFloat = Field(description="The same for what was published.")
    model_mae: MaybeFloat = Field(description="In the output's unit.")
    persistence_mae: MaybeFloat = Field(description="In the output's unit.")
    published_mae: MaybeFloat = Field(description="In the output's unit.")
    room: float = Field(description="Error budget left for the model's moves (0..1).")
    evaluated_s: float = Field(ge=0, description="Seconds of forecasts scored.")
    evaluations: int = Field(ge=0)
    switches: int = Field(ge=0, description="Changes of source.")
    trusted_move_classes: int = Field(ge=0)
    last_source: str | None = Field(default=None,
                                    description="The source of the last published value.")


class ShadowScores(_Open):
    """A shadow candidate against the active model and persistence on the same windows."""

    candidate_mae: MaybeFloat
    active_mae: MaybeFloat
    persistence_mae: MaybeFloat
    evaluated_s: float = Field(ge=0)


class ModelStatus(_Open):
    version: str = Field(description="sha256 prefix of the model file.")
    path: str
    stream: str
    runtime: str = Field(description="What runs the graph: `onnxruntime` or `numpy`.")
    opset: int | None = None
    runs: int = Field(ge=0)
    failures: int = Field(ge=0)
    last_window_start_ns: int | None = Field(default=None,
                                             description="UNIX ns of the last window run.")
    window_s: float | None = None
    forecast_output: str | None = Field(default=None,
                                        description="The output the guard scores, if any.")
    last_actual: MaybeFloat = Field(default=None,
                                    description="The measured value of the last window.")
    last_latency_ms: MaybeFloat = None
    last_outputs: dict[str, float | str | None] = Field(default_factory=dict)
    inputs_filled: list[str] = Field(default_factory=list,
                                     description="Inputs that had no value in the last window.")
    guard: GuardStatus | None = None
    out_of_range: list[str] = Field(default_factory=list)
    out_of_range_windows: int = Field(default=0, ge=0)
    runs_on: str | None = Field(default=None, description="`loop` or `worker` (chosen at load "
                                                          "from a timing probe).")
    probe_p90_ms: MaybeFloat = Field(default=None, description="The load-time probe's run "
                                                               "time, 90th percentile.")
    probe_p99_ms: MaybeFloat = None
    shadow: ModelStatus | None = Field(default=None,
                                       description="The candidate run beside this one.")
    comparison: ShadowScores | None = Field(default=None,
                                            description="On a shadow: how it scores.")


class InferStatus(_Open):
    models: dict[str, ModelStatus]
    errors: list[Any] = Field(default_factory=list,
                              description="Models that failed to load, with the reason.")


class LastInference(_Open):
    version: str
    outputs: dict[str, float | str | None]
    latency_ms: MaybeFloat
    window_start_ns: int


class HistoryStatus(_Open):
    path: str
    rows_written: int = Field(ge=0)
    circuit_rows_written: int = Field(default=0, ge=0)
    circuit_errors: int = Field(default=0, ge=0)
    late_windows: int = Field(default=0, ge=0)
    errors: int = Field(ge=0)
    last_error: str | None


class DeployInProgress(_Open):
    name: str
    version: str
    count: int = Field(ge=0, description="Chunks in the deploy.")
    missing: int = Field(ge=0, description="Chunks not received yet.")


class ModelDeployStatus(_Open):
    """Model files sent by the cloud in chunks (``model.deploy``, docs/fleet.md)."""

    installed: int = Field(ge=0)
    activated: int = Field(ge=0)
    rolled_back: int = Field(ge=0)
    failed: int = Field(ge=0)
    refused: dict[str, int] = Field(description="By reason.")
    last: dict[str, str] = Field(description="By model: what happened to it last.")
    state_error: str | None = None
    in_progress: dict[str, DeployInProgress] = Field(default_factory=dict,
                                                     description="By deploy id.")
    expired: int = Field(default=0, ge=0)
    evicted: int = Field(default=0, ge=0)


class FirmwareDeployStatus(_Open):
    """Firmware images sent by the cloud to bridge microcontrollers (``firmware.flash``,
    docs/fleet.md)."""

    flashed: int = Field(ge=0)
    failed: int = Field(ge=0)
    refused: dict[str, int] = Field(description="By reason.")
    last: dict[str, str] = Field(description="By bridge sensor: what happened to its device "
                                             "last.")
    in_progress: dict[str, DeployInProgress] = Field(default_factory=dict,
                                                     description="By deploy id.")
    expired: int = Field(default=0, ge=0)
    evicted: int = Field(default=0, ge=0)


class ModelsStatus(_Open):
    status: InferStatus
    last: dict[str, LastInference] = Field(description="By model (`<name>:shadow` for a "
                                                       "candidate).")
    deployments: ModelDeployStatus | None = None
    history: HistoryStatus | None


class AnomalyStatus(_Open):
    events: int = Field(ge=0, description="Anomaly messages published.")
    open: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="Open episodes by stream, as anomaly messages.")


class WebStatus(_Open):
    url: str
    page: bool
    metrics: bool
    token: bool = Field(default=False, description="Whether requests need the token.")
    watchers: int = Field(ge=0)
    requests: int = Field(default=0, ge=0)
    unauthorized: int = Field(default=0, ge=0)
    bad_requests: int = Field(default=0, ge=0)
    refused: int = Field(default=0, ge=0)


class SparkplugStatus(_Open):
    state: str
    group_id: str
    node_id: str
    bd_seq: int
    devices: list[str] = Field(default_factory=list)
    backlog: int = Field(ge=0)
    pending: int = Field(default=0, ge=0)
    backlog_dropped: int = Field(default=0, ge=0)
    backlog_unreadable: int = Field(default=0, ge=0)
    last_error: str | None = None
    births: int = Field(default=0, ge=0)
    rebirths: int = Field(default=0, ge=0)
    data: int = Field(default=0, ge=0)
    historical: int = Field(default=0, ge=0)
    pending_dropped: int = Field(default=0, ge=0)
    bad_commands: int = Field(default=0, ge=0)
    connects: int = Field(default=0, ge=0)


class ConfigApplyStatus(_Open):
    """The last remote config deployment (docs/fleet.md), when the agent runs from a file."""

    counts: dict[str, int] = Field(description="`applied`, `refused`, `confirmed`, "
                                               "`rolled_back`, `requested_rollbacks`.")
    deployment: str | None = None
    state: str | None = Field(default=None, description="`trial`, `confirmed`, `rolled_back`.")
    sha256: str | None = None
    reason: str | None = None
    changes: dict[str, Any] | None = Field(default=None,
                                           description="What the deployment changed.")
    reported: bool | None = Field(default=None,
                                  description="The outcome was acknowledged by the broker.")
    timeout_s: float | None = None
    problems: list[str] | None = Field(default=None,
                                       description="During a trial: why it is not healthy yet.")
    remaining_s: float | None = Field(default=None, description="During a trial.")


def _absent(value: object) -> bool:
    return value is None


def _section(description: str = "") -> Any:
    """A section: left out of the JSON when absent, never sent as null."""
    return Field(default=None, exclude_if=_absent, description=description or None)


# The sections a running agent always reports, required by the schema; the others are absent
# (never null) when their part is off.
ALWAYS = ("agent", "sensors", "queues", "pipeline", "clean", "clock", "outbox", "uplink",
          "models")


# While no pipeline runs (starting, between two generations) ``status`` still shows every
# required section, empty; a health message is only sent by a running pipeline.
EMPTY = {"type": "object", "maxProperties": 0,
         "description": "Empty while no pipeline runs (starting, reloading)."}


def _require_sections(schema: dict[str, Any]) -> None:
    for name, prop in schema["properties"].items():
        (present,) = [s for s in prop.pop("anyOf") if s.get("type") != "null"]
        prop.pop("default", None)
        if name in ALWAYS and "$ref" in present and name != "agent":
            prop["anyOf"] = [present, dict(EMPTY)]
        else:
            prop.update(present)
    schema["required"] = list(ALWAYS)


class HealthSnapshot(_Open):
    """The running agent's health: published on ``health`` and printed by
    ``edge-agent status --json``."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_require_sections)

    agent: AgentInfo | None = _section()
    sensors: list[SensorStatus] | None = _section()
    queues: dict[str, QueueStats] | None = _section("By queue name.")
    pipeline: PipelineStats | None = _section()
    clean: CleanStats | None = _section()
    windows: WindowerStats | None = _section()
    clock: ClockStatus | None = _section()
    outbox: OutboxStats | None = _section()
    sharing: dict[str, SharingCounts] | None = _section("By stream.")
    uplink: UplinkStatus | None = _section()
    models: ModelsStatus | None = _section()
    anomalies: AnomalyStatus | None = _section()
    firmware: FirmwareDeployStatus | None = _section()
    web: WebStatus | None = _section("Present when the web server is on.")
    sparkplug: SparkplugStatus | None = _section("Present when Sparkplug is on.")
    config_apply: ConfigApplyStatus | None = _section("Present when the agent runs from a "
                                                      "config file.")


class _DescribedBy:
    """Validated as any JSON object, described by the schema of ``HealthSnapshot``: the agent
    publishes its snapshot as its stages report it (a health message must never fail on a new
    counter), and tests hold the live snapshot to the schema."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any,
                                     handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.dict_schema(core_schema.str_schema(), core_schema.any_schema())

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(HealthSnapshot.__pydantic_core_schema__)


HealthBody = Annotated[dict[str, Any], _DescribedBy]
