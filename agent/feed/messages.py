"""Feed messages: what the gateway publishes on MQTT, as versioned pydantic models.

Every message carries the same envelope::

    schema    "edge-agent/<kind>/<major>"; a consumer dispatches on it
    msg_id    "<boot_id>-<seq>": unique, and identical on every retry of the same message
    seq       per-gateway sequence, +1 per accepted message, continued across restarts
    boot_id   random per agent start; tells the cloud which run produced the message
    gateway   the gateway id
    ts        when the message was accepted (UTC)
    replayed  true when delivered late from the store (absent otherwise)

Builders turn pipeline contracts (Window, Inference, Reading, a health snapshot) into a
``Draft``: the body of a message without its sequence. The outbox seals a draft with the next
``seq`` when it accepts it, so the sequence follows acceptance order exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from agent.feed.numbers import DERIVED_UNITS, round_last_values, rounded, rounded_any
from agent.health import HealthBody
from agent.readings import ChannelStats, Inference, Reading, Window

SCHEMA_WINDOW = "edge-agent/window/1"
SCHEMA_INFERENCE = "edge-agent/inference/1"
SCHEMA_READING = "edge-agent/reading/1"
SCHEMA_RAW_BATCH = "edge-agent/raw-batch/1"
SCHEMA_HEALTH = "edge-agent/health/1"
SCHEMA_ANOMALY = "edge-agent/anomaly/1"

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A JSON number above 2**53 loses precision in many consumers, so times travel as ISO 8601.
MaybeFloat = float | None


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", serialize_by_alias=True, validate_by_name=True,
        validate_by_alias=True,
    )


class FeedMessage(_Model):
    """The envelope shared by every feed message."""

    schema_: str = Field(alias="schema", description="Message type and major version.")
    msg_id: Annotated[str, Field(min_length=3, max_length=80)] = Field(
        description="Unique per message and stable across retries: de-duplicate on it.")
    seq: Annotated[int, Field(ge=1)] = Field(
        description="Per-gateway sequence, +1 per accepted message; a hole is a lost message.")
    boot_id: Annotated[str, Field(min_length=1, max_length=40)] = Field(
        description="Random id of the agent run that accepted the message.")
    gateway: str = Field(description="Gateway id.")
    ts: datetime = Field(description="When the gateway accepted the message (UTC).")
    replayed: bool = Field(
        default=False,
        description="Present and true when the message is delivered late from the store.")


class ChannelStatsModel(_Model):
    count: Annotated[int, Field(ge=0)]
    mean: MaybeFloat
    min: MaybeFloat
    max: MaybeFloat
    last: MaybeFloat
    std: MaybeFloat
    unit: str = Field(description="From the unit vocabulary (docs/mqtt.md, Units).")
    suspect: Annotated[int, Field(ge=0)] = 0
    bad: Annotated[int, Field(ge=0)] = 0


class WindowMessage(FeedMessage):
    """Aggregates of one stream over one wall-clock window, on ``telemetry/{stream}``."""

    schema_: Literal["edge-agent/window/1"] = Field(alias="schema")
    stream: str
    start: datetime = Field(description="Window start, inclusive (UTC).")
    end: datetime = Field(description="Window end, exclusive (UTC).")
    channels: dict[str, ChannelStatsModel] = Field(
        description="By channel `sensor.quantity`; statistics over good readings only.")
    fused: dict[str, ChannelStatsModel] = Field(default_factory=dict)
    derived: dict[str, MaybeFloat] = Field(
        default_factory=dict, description="Values computed from the channels, by name: "
        "meaning and unit in docs/mqtt.md (Derived values); null without input.")
    flags: list[str] = Field(default_factory=list)


class InferenceMessage(FeedMessage):
    """The outputs of one model run on one window, on ``inference/{model}``."""

    schema_: Literal["edge-agent/inference/1"] = Field(alias="schema")
    model: str
    version: str = Field(description="sha256 prefix of the model file.")
    stream: str
    window_start: datetime
    outputs: dict[str, float | str | None] = Field(
        description="By output name (units in the model's manifest) plus `<output>_model`, "
        "class labels, `anomaly_score`, `anomaly`, `inputs_filled`: docs/mqtt.md (Model "
        "outputs).")
    latency_ms: MaybeFloat = Field(description="The model's run time, milliseconds.")
    shadow: bool = Field(default=False, description="True for a candidate model run beside "
                                                    "the active one.")
    source: Literal["model", "blend", "fallback"] = Field(
        default="model", description="Where the published forecast comes from: the model; "
        "persistence (the current window's value) where the model has not beaten that at "
        "this site; or blend: persistence plus the model's move clipped to what the skill "
        "guard's error budget can still lose. The model's own value is in outputs as "
        "`<output>_model`.")
    skill: MaybeFloat = Field(
        default=None, description="1 - model MAE / persistence MAE over the guard's horizon "
        "at this site (> 0: the model beats persistence); null until scored.")
    out_of_range: list[str] = Field(
        default_factory=list, description="Inputs outside the span of the model's training "
        "data: the model extrapolates on them.")


class AnomalyMessage(FeedMessage):
    """One fault episode found by a typed detector, on ``anomaly/{stream}``: published when it
    opens (``end`` null) and again when it clears (``end`` set), with the same ``event_id``.
    ``docs/anomalies.md`` says what each type means at the cabinet."""

    schema_: Literal["edge-agent/anomaly/1"] = Field(alias="schema")
    event_id: Annotated[str, Field(max_length=128)] = Field(
        description="Stable across the open and the close message of one episode.")
    type: Literal["meter_stuck", "meter_spike", "meter_drift", "lamps_dark", "lamps_lit",
                  "unexplained_load"]
    stream: str
    channel: str = Field(description="The meter or circuit concerned, e.g. `main`, `lights`.")
    start: datetime = Field(description="When the evidence says the fault began.")
    detected: datetime = Field(description="End of the window in which it was confirmed.")
    end: datetime | None = Field(description="When it cleared; null while it is open.")
    severity: Literal["info", "warning", "critical"]
    evidence: dict[str, float | str | None] = Field(
        description="The numbers that triggered it (detector-specific).")


class ReadingMessage(FeedMessage):
    """One cleaned, flagged reading of a raw stream, on ``raw/{stream}``."""

    schema_: Literal["edge-agent/reading/1"] = Field(alias="schema")
    stream: str
    sensor: str
    quantity: str
    value: MaybeFloat
    unit: str = Field(description="From the unit vocabulary (docs/mqtt.md, Units).")
    sampled_at: datetime
    quality: Literal["good", "suspect", "bad"]
    reasons: list[str] = Field(default_factory=list)


class RawChannel(_Model):
    sensor: str
    quantity: str
    unit: str


RawRow = tuple[Annotated[int, Field(ge=0)], int, MaybeFloat,
               Literal["good", "suspect", "bad"], list[str]]


class RawBatchMessage(FeedMessage):
    """The cleaned, flagged readings of a raw stream over one short interval, on
    ``raw/{stream}``: one message, one ``seq``, one outbox row for many readings."""

    schema_: Literal["edge-agent/raw-batch/1"] = Field(alias="schema")
    stream: str
    start: datetime = Field(
        description="Base time of the batch (UTC, microseconds); each reading's `offset_ns` "
        "is counted from it.")
    channels: list[RawChannel] = Field(
        description="The channels the readings refer to, by position.")
    readings: list[RawRow] = Field(
        description="One `[channel, offset_ns, value, quality, reasons]` per reading, in the "
        "order the gateway cleaned them: `channel` indexes `channels`; `offset_ns` is the "
        "sampled time minus `start` in nanoseconds (may be negative); `value` is null when "
        "not finite; `quality` and `reasons` as in `edge-agent/reading/1`.")


class HealthMessage(FeedMessage):
    """A snapshot of the agent's health, on ``health``."""

    schema_: Literal["edge-agent/health/1"] = Field(alias="schema")
    health: HealthBody = Field(description="The same snapshot `edge-agent status --json` "
                                               "prints (docs/status.schema.json).")


M = TypeVar("M", bound=FeedMessage)


@dataclass(frozen=True, slots=True)
class Draft(Generic[M]):
    """A message body waiting for its place in the sequence."""

    model: type[M]
    fields: Mapping[str, Any]

    def seal(self, *, seq: int, boot_id: str, ts_ns: int) -> M:
        return self.model.model_validate({
            **self.fields, "seq": seq, "boot_id": boot_id, "msg_id": msg_id(boot_id, seq),
            "ts": to_datetime(ts_ns),
        })


@dataclass(frozen=True, slots=True)
class TrustedRows(Draft[M]):
    """A raw batch whose ``readings`` the gateway built itself from typed readings, each a
    tuple of (int, int, float or None, quality, list of str): sealing validates the rest and
    takes the rows as they are. Validating 500 rows again was most of the cost of a batch."""

    def seal(self, *, seq: int, boot_id: str, ts_ns: int) -> M:
        head = self.model.model_validate({
            **self.fields, "readings": [], "seq": seq, "boot_id": boot_id,
            "msg_id": msg_id(boot_id, seq), "ts": to_datetime(ts_ns),
        })
        return head.model_copy(update={"readings": self.fields["readings"]})


def msg_id(boot_id: str, seq: int) -> str:
    return f"{boot_id}-{seq}"


def encode(message: FeedMessage) -> bytes:
    """Compact JSON. ``replayed`` is left out: the publisher adds it when it applies."""
    return type(message).__pydantic_serializer__.to_json(
        message, by_alias=True, exclude={"replayed"})


def mark_replayed(payload: bytes) -> bytes:
    """The same message flagged as late; everything else, msg_id included, is unchanged."""
    if not payload.endswith(b"}"):
        raise ValueError("a feed payload is a JSON object")
    return payload[:-1] + b',"replayed":true}'


def to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def _stats(s: ChannelStats) -> dict[str, Any]:
    u = s.unit
    return {"count": s.count, "mean": rounded(s.mean, u), "min": rounded(s.min, u),
            "max": rounded(s.max, u), "last": rounded(s.last, u), "std": rounded(s.std, u),
            "unit": u, "suspect": s.suspect, "bad": s.bad}


def window_message(gateway: str, w: Window) -> Draft[WindowMessage]:
    return Draft(WindowMessage, {
        "schema": SCHEMA_WINDOW, "gateway": gateway, "stream": w.stream,
        "start": to_datetime(w.start_ns), "end": to_datetime(w.end_ns),
        "channels": {k: _stats(v) for k, v in w.channels.items()},
        "fused": {k: _stats(v) for k, v in w.fused.items()},
        "derived": {k: rounded(v, DERIVED_UNITS.get(k, "")) for k, v in w.derived.items()},
        "flags": list(w.flags),
    })


def inference_message(gateway: str, i: Inference) -> Draft[InferenceMessage]:
    outputs = {k: rounded_any(v) for k, v in i.outputs.items()}
    return Draft(InferenceMessage, {
        "schema": SCHEMA_INFERENCE, "gateway": gateway, "model": i.model, "version": i.version,
        "stream": i.stream, "window_start": to_datetime(i.window_start_ns), "outputs": outputs,
        "latency_ms": rounded(i.latency_ms), "shadow": i.shadow, "source": i.source,
        "skill": None if i.skill is None else rounded(i.skill),
        "out_of_range": list(i.out_of_range),
    })


def anomaly_message(gateway: str, event: Mapping[str, Any]) -> Draft[AnomalyMessage]:
    """``event`` is an ``AnomalyEvent.to_message()`` body (schema, times as ISO 8601)."""
    evidence = {k: rounded_any(v) for k, v in dict(event.get("evidence") or {}).items()}
    return Draft(AnomalyMessage, {**event, "schema": SCHEMA_ANOMALY, "gateway": gateway,
                                  "evidence": evidence})


def reading_message(gateway: str, stream: str, r: Reading) -> Draft[ReadingMessage]:
    return Draft(ReadingMessage, {
        "schema": SCHEMA_READING, "gateway": gateway, "stream": stream, "sensor": r.sensor,
        "quantity": r.quantity, "value": rounded(r.value, r.unit), "unit": r.unit,
        "sampled_at": to_datetime(r.ts_ns), "quality": r.quality, "reasons": list(r.reasons),
    })


def raw_batch_message(gateway: str, stream: str, start_ns: int,
                      channels: list[dict[str, str]],
                      rows: list[tuple[Any, ...]]) -> Draft[RawBatchMessage]:
    """``start_ns`` is a whole number of microseconds (what ``start`` can say exactly); the
    rows are trusted (``TrustedRows``): build them only as ``agent.feed.raw_batch`` does."""
    return TrustedRows(RawBatchMessage, {
        "schema": SCHEMA_RAW_BATCH, "gateway": gateway, "stream": stream,
        "start": EPOCH + timedelta(microseconds=start_ns // 1000), "channels": channels,
        "readings": rows,
    })


def health_message(gateway: str, snapshot: Mapping[str, Any]) -> Draft[HealthMessage]:
    # Round-trip through JSON so a snapshot that cannot be published fails here, at the
    # caller, and not later in the publisher.
    body = json.loads(json.dumps(dict(snapshot), allow_nan=False, default=str))
    round_last_values(body.get("sensors"))
    return Draft(HealthMessage, {"schema": SCHEMA_HEALTH, "gateway": gateway, "health": body})


class Topics:
    """Topic names for one gateway: ``{prefix}/{gateway}/...``."""

    def __init__(self, prefix: str, gateway: str) -> None:
        for part in (prefix, gateway):
            if not part or any(c in part for c in "+#\0") or part.startswith("/"):
                raise ValueError(f"{part!r} cannot be part of an MQTT topic")
        self.base = f"{prefix}/{gateway}"
        self.status = f"{self.base}/status"
        self.health = f"{self.base}/health"
        self.cmd_filter = f"{self.base}/cmd/+"

    def _level(self, kind: str, name: str) -> str:
        if not name or any(c in name for c in "/+#\0"):
            raise ValueError(f"{name!r} cannot be one MQTT topic level ({kind})")
        return f"{self.base}/{kind}/{name}"

    def telemetry(self, stream: str) -> str:
        return self._level("telemetry", stream)

    def raw(self, stream: str) -> str:
        return self._level("raw", stream)

    def inference(self, model: str) -> str:
        return self._level("inference", model)

    def cmd(self, name: str) -> str:
        return self._level("cmd", name)

    def cmd_result(self, name: str) -> str:
        return self._level("cmd", name) + "/result"

    def command_name(self, topic: str) -> str | None:
        """The command name of a ``cmd/{name}`` topic of this gateway, else None."""
        head = f"{self.base}/cmd/"
        if not topic.startswith(head):
            return None
        name = topic[len(head):]
        return name if name and "/" not in name else None
