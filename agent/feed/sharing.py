"""What of each stream leaves the gateway, on which topics, and at what detail.

Every stream is published to one or more *namespaces*: the plain topics (``telemetry/{stream}``
...) when it has no audiences, else one namespace per audience (``{audience}/telemetry/{stream}``
...). Each namespace has a level, which decides the message kinds it gets::

    raw      cleaned readings, windows, inferences, anomaly events
    window   windows, inferences, anomaly events
    derived  inferences, anomaly events
    local    nothing (the technician CLI still sees the stream)

and a field policy applied to what it gets:

* ``drop``: field patterns withheld. Fields are dotted paths: ``channels.<sensor>.<quantity>``
  with a statistic (``.mean`` ...) in windows or ``.value`` in readings, ``fused.<name>.<stat>``,
  ``derived.<name>``, ``outputs.<name>``. ``*`` matches any text, dots included, and a pattern
  that matches a path also withholds everything below it (``channels.radar`` withholds every
  channel of the sensor ``radar``). A withheld statistic is sent as ``null`` (the window schema
  has the key) and the window gets the flag ``redacted``; a withheld derived value or model
  output is left out; a reading whose channel or value is withheld is not published (taken
  out of its raw batch; a batch left empty is not published).
* ``round``: values whose path matches a pattern are rounded to a multiple of the step. A
  channel's ``count``, ``suspect`` and ``bad`` are never rounded or withheld on their own.
* ``min_vehicles`` (k): a window that counts 1 to k-1 vehicles is withheld (``suppressed``),
  and in a window that is published, every per-vehicle speed statistic over fewer than k
  vehicles is withheld (a mean over one vehicle is that vehicle's speed). A window with no
  vehicle is published: it describes nobody. An inference computed at a window that a
  namespace suppressed is suppressed there too (a forecast from one vehicle's window tells its
  speed): the namespace remembers the starts of its last ``SUPPRESSED_KEPT`` suppressed windows.
* model outputs are rounded like the window field they stand for: an output without a rule
  of its own (``outputs.<name>``) takes the step of ``derived.<quantity>`` it forecasts
  (``speed_next`` -> ``derived.speed_mean``, ``power_next_w`` -> ``derived.power_mean_w``; the
  guard's ``<output>_model`` like its output).
* per-vehicle readings (radar ``speed_in``/``speed_out``: one reading is one vehicle) are
  published only where ``vehicle_events`` is on.

Privacy defaults: a stream shares windows; ``drop`` withholds min, max and last of per-vehicle
speed channels; k is 3.

The health message goes to the plain ``health`` topic with the last reading of a channel only
where some namespace publishes that channel's readings as they are, and the last output of a
model only where some namespace publishes it as it is: health never tells more than the feed.

Decisions about a field path are memoised per namespace (the set of paths is small and
repeats), and a message that no rule changes is passed on as the same draft.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agent import quality as quality_codes
from agent.config.schema import AgentConfig, AudienceConfig, StreamConfig
from agent.feed.fields import (
    VEHICLE_QUANTITIES,
    FieldRules,
    output_field,
    quantity_of,
    quantize,
    vehicles_of,
)
from agent.feed.messages import Draft, RawBatchMessage
from agent.feed.raw_batch import filter_batch

log = logging.getLogger(__name__)

Level = Literal["raw", "window", "derived", "local"]

KINDS_BY_LEVEL: Final[dict[str, frozenset[str]]] = {
    "raw": frozenset({"raw", "window", "inference", "anomaly"}),
    "window": frozenset({"window", "inference", "anomaly"}),
    "derived": frozenset({"inference", "anomaly"}),
    "local": frozenset(),
}
TOPIC_LEVEL: Final[dict[str, str]] = {"raw": "raw", "window": "telemetry",
                                      "inference": "inference", "anomaly": "anomaly"}
DEFAULT_SHARE: Final[Level] = "window"
DEFAULT_MIN_VEHICLES: Final = 3
DEFAULT_DROP: Final[tuple[str, ...]] = tuple(
    f"channels.*.{q}.{stat}" for q in sorted(VEHICLE_QUANTITIES) for stat in ("min", "max", "last"))
VALUE_STATS: Final = ("mean", "min", "max", "last", "std")
REDACTED: Final = quality_codes.REDACTED
COUNTERS: Final = ("published", "local", "suppressed", "withheld", "redacted", "rounded")
SUPPRESSED_KEPT: Final = 1024  # window starts per namespace; inferences follow within seconds


@dataclass(frozen=True)
class Namespace:
    """One destination of one stream, with every default resolved."""

    stream: str
    audience: str | None
    share: Level
    drop: tuple[str, ...]
    drop_default: bool
    round: tuple[tuple[str, float], ...]
    min_vehicles: int
    vehicle_events: bool

    @property
    def kinds(self) -> frozenset[str]:
        return KINDS_BY_LEVEL[self.share]

    def topic(self, kind: str, name: str) -> str:
        """Topic relative to ``{prefix}/{gateway}/`` of a message of ``kind`` about ``name``
        (the stream, or the model for inferences)."""
        head = f"{self.audience}/" if self.audience else ""
        return f"{head}{TOPIC_LEVEL[kind]}/{name}"


def namespaces(stream: StreamConfig) -> list[Namespace]:
    """The namespaces of ``stream``: its audiences, else the plain topics."""
    if not stream.audiences:
        return [_resolve(stream, None)]
    return [_resolve(stream, a) for a in stream.audiences]


def _resolve(stream: StreamConfig, a: AudienceConfig | None) -> Namespace:
    drop = stream.drop if a is None or a.drop is None else a.drop
    steps = stream.round if a is None or a.round is None else a.round
    k = stream.min_vehicles if a is None or a.min_vehicles is None else a.min_vehicles
    events = stream.vehicle_events if a is None or a.vehicle_events is None else a.vehicle_events
    share: Level = (stream.share or DEFAULT_SHARE) if a is None else a.share
    return Namespace(
        stream=stream.name, audience=None if a is None else a.name, share=share,
        drop=DEFAULT_DROP if drop is None else tuple(drop), drop_default=drop is None,
        round=tuple(steps.items()), min_vehicles=DEFAULT_MIN_VEHICLES if k is None else k,
        vehicle_events=events)


@dataclass
class _Edit:
    """What one namespace did to one message."""

    withheld: bool = False
    rounded: bool = False
    withheld_readings: int = 0  # of a raw batch


class _Route:
    """A namespace with its field rules: transforms one message at a time for it."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.rules = FieldRules(ns.drop, ns.round)
        self.k = ns.min_vehicles if ns.min_vehicles > 1 else 0
        self._reading: dict[tuple[str, str], tuple[bool, float | None]] = {}
        self._suppressed: collections.OrderedDict[Any, None] = collections.OrderedDict()

    def suppress(self, start: Any, withheld: bool) -> None:
        """Remember a window start the k rule withheld here (forget one it published)."""
        if not withheld:
            self._suppressed.pop(start, None)
            return
        self._suppressed[start] = None
        while len(self._suppressed) > SUPPRESSED_KEPT:
            self._suppressed.popitem(last=False)

    def output_step(self, name: str) -> float | None:
        """The rounding step of model output ``name``: its own rule, else its window field's."""
        step = self.rules.step(f"outputs.{name}")
        return step if step is not None else self.rules.step(output_field(name))

    # -- readings ---------------------------------------------------------------------------

    def reading_rule(self, sensor: str, quantity: str) -> tuple[bool, float | None]:
        """(withheld, rounding step) for readings of one channel."""
        key = (sensor, quantity)
        rule = self._reading.get(key)
        if rule is None:
            path = f"channels.{sensor}.{quantity}.value"
            withheld = ((quantity in VEHICLE_QUANTITIES and not self.ns.vehicle_events)
                        or self.rules.dropped(path))
            rule = self._reading[key] = (withheld, None if withheld else self.rules.step(path))
        return rule

    def reading(self, draft: Draft[Any], edit: _Edit) -> Draft[Any] | None:
        f = draft.fields
        withheld, step = self.reading_rule(f["sensor"], f["quantity"])
        if withheld:
            edit.withheld = True
            return None
        value = f["value"]
        if step is None or value is None:
            return draft
        new = quantize(value, step)
        if new == value:
            return draft
        edit.rounded = True
        return Draft(draft.model, {**f, "value": new})

    def raw_batch(self, draft: Draft[Any], edit: _Edit) -> Draft[Any] | None:
        routed, edit.withheld_readings, edit.rounded = filter_batch(draft, self.reading_rule)
        edit.withheld = edit.withheld_readings > 0
        return routed

    # -- windows ----------------------------------------------------------------------------

    def _stats(self, path: str, st: Mapping[str, Any], small: bool,
               edit: _Edit) -> Mapping[str, Any]:
        out: dict[str, Any] | None = None
        for stat in VALUE_STATS:
            v = st[stat]
            if v is None:
                continue
            p = f"{path}.{stat}"
            if small or self.rules.dropped(p):
                new = None
                edit.withheld = True
            else:
                step = self.rules.step(p)
                if step is None:
                    continue
                new = quantize(v, step)
                if new == v:
                    continue
                edit.rounded = True
            if out is None:
                out = dict(st)
            out[stat] = new
        return st if out is None else out

    def _group(self, root: str, group: Mapping[str, Any], small: Callable[[str, Any], bool],
               edit: _Edit) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        changed = False
        for name, st in group.items():
            path = f"{root}.{name}"
            if self.rules.dropped(path):
                edit.withheld = changed = True
                continue
            new = self._stats(path, st, small(name, st), edit)
            changed = changed or new is not st
            out[name] = new
        return out if changed else group

    def _values(self, root: str, values: Mapping[str, Any], withheld: Iterable[str],
                edit: _Edit, step_of: Callable[[str], float | None] | None = None,
                ) -> Mapping[str, Any]:
        """A flat name -> value table (derived values, model outputs)."""
        gone = set(withheld)
        out: dict[str, Any] = {}
        changed = False
        for name, v in values.items():
            path = f"{root}.{name}"
            if name in gone or self.rules.dropped(path):
                edit.withheld = changed = True
                continue
            if not isinstance(v, float):
                step = None
            else:
                step = step_of(name) if step_of is not None else self.rules.step(path)
            if step is not None and (new := quantize(v, step)) != v:
                edit.rounded = changed = True
                out[name] = new
            else:
                out[name] = v
        return out if changed else values

    def window(self, draft: Draft[Any], edit: _Edit) -> Draft[Any] | None:
        """The window as this namespace may see it; None when the k rule withholds it."""
        f = draft.fields
        k = self.k
        small_q: set[str] = set()
        if k:
            vehicles = vehicles_of(f)
            if vehicles is not None and 0 < vehicles < k:
                return None
            by_q: dict[str, int] = {}
            for ch, st in f["channels"].items():
                q = quantity_of(ch)
                if q in VEHICLE_QUANTITIES:
                    by_q[q] = by_q.get(q, 0) + st["count"]
            small_q = {q for q, n in by_q.items() if 0 < n < k}
        if self.rules.empty and not small_q:
            return draft

        def small_channel(name: str, st: Any) -> bool:
            return bool(k) and quantity_of(name) in VEHICLE_QUANTITIES and 0 < st["count"] < k

        channels = self._group("channels", f["channels"], small_channel, edit)
        fused = self._group("fused", f["fused"], lambda _n, _s: False, edit)
        derived = self._values("derived", f["derived"], (f"{q}_mean" for q in small_q), edit)
        if channels is f["channels"] and fused is f["fused"] and derived is f["derived"]:
            return draft
        flags = list(f["flags"])
        if edit.withheld and REDACTED not in flags:
            flags.append(REDACTED)
        return Draft(draft.model, {**f, "channels": channels, "fused": fused,
                                   "derived": derived, "flags": flags})

    # -- inferences -------------------------------------------------------------------------

    def inference(self, draft: Draft[Any], edit: _Edit) -> Draft[Any] | None:
        """The inference as this namespace may see it; None when its window was suppressed."""
        if draft.fields.get("window_start") in self._suppressed:
            return None
        if self.rules.empty:
            return draft
        outputs = self._values("outputs", draft.fields["outputs"], (), edit, self.output_step)
        if outputs is draft.fields["outputs"]:
            return draft
        return Draft(draft.model, {**draft.fields, "outputs": outputs})


@dataclass
class _StreamState:
    routes: list[_Route]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


class SharingPolicy:
    """Routes pipeline drafts to the topics their stream's sharing policy allows.

    ``route(kind, stream, draft)`` returns the (relative topic, draft) pairs to put into the
    outbox, an empty list when nothing may leave. Inferences are routed by the stream of their
    model's windows; health by the policy of every stream at once.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self._streams: dict[str, _StreamState] = {
            st.name: _StreamState([_Route(ns) for ns in namespaces(st)]) for st in cfg.streams}
        self._sensor_streams: dict[str, list[str]] = {}
        for st in cfg.streams:
            for sensor in dict.fromkeys(st.sensors):
                self._sensor_streams.setdefault(sensor, []).append(st.name)
        self._model_stream = {m.name: m.stream for m in cfg.models}
        self._unknown: set[str] = set()
        self._health_value: dict[tuple[str, str], bool] = {}
        self._health_output: dict[tuple[str, str], frozenset[int]] = {}
        # Per model (":shadow" for a candidate): the routes that withheld its last inference.
        self._last_withheld: dict[str, frozenset[int]] = {}
        self.health_scrubbed = 0

    def route(self, kind: str, stream: str,
              draft: Draft[Any]) -> list[tuple[str, Draft[Any]]]:
        if kind == "health":
            return [("health", self.health(draft))]
        if kind not in TOPIC_LEVEL:
            raise ValueError(f"{kind!r} is not a message kind "
                             "(raw, window, inference, anomaly, health)")
        state = self._streams.get(stream)
        if state is None:
            if stream not in self._unknown:
                self._unknown.add(stream)
                log.warning("a %s message of stream %r, which is not configured, is kept local",
                            kind, stream)
            return []
        name = draft.fields["model"] if kind == "inference" else stream
        counts = state.counts
        out: list[tuple[str, Draft[Any]]] = []
        withheld: set[int] = set()
        for i, r in enumerate(state.routes):
            if kind not in r.ns.kinds:
                counts["local"] += 1
                continue
            edit = _Edit()
            routed: Draft[Any] | None
            if kind == "window":
                routed = r.window(draft, edit)
                r.suppress(draft.fields["start"], routed is None)
                if routed is None:
                    counts["suppressed"] += 1
                    continue
            elif kind == "raw" and draft.model is RawBatchMessage:
                routed = r.raw_batch(draft, edit)
                counts["withheld"] += edit.withheld_readings
                if routed is None:
                    continue
            elif kind == "raw":
                routed = r.reading(draft, edit)
                if routed is None:
                    counts["withheld"] += 1
                    continue
            elif kind == "anomaly":
                routed = draft  # an event names a fault, not a person: nothing to redact
            else:
                routed = r.inference(draft, edit)
                if routed is None:
                    withheld.add(i)
                    counts["suppressed"] += 1
                    continue
            counts["published"] += 1
            counts["redacted"] += edit.withheld
            counts["rounded"] += edit.rounded
            out.append((r.ns.topic(kind, name), routed))
        if kind == "inference":
            shadow = ":shadow" if draft.fields.get("shadow") else ""
            self._last_withheld[f"{name}{shadow}"] = frozenset(withheld)
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        """Per stream, summed over its namespaces: messages ``published``, kept ``local`` by
        the level, ``suppressed`` by the k rule, readings ``withheld``, and messages published
        with fields withheld (``redacted``) or ``rounded``."""
        return {name: dict(s.counts) for name, s in self._streams.items()}

    # -- health -----------------------------------------------------------------------------

    def _value_shared(self, sensor: str, quantity: str) -> bool:
        """Some namespace publishes this channel's readings as they are."""
        key = (sensor, quantity)
        hit = self._health_value.get(key)
        if hit is None:
            hit = any(
                "raw" in r.ns.kinds and r.reading_rule(sensor, quantity) == (False, None)
                for stream in self._sensor_streams.get(sensor, ())
                for r in self._streams[stream].routes)
            self._health_value[key] = hit
        return hit

    def _output_shared(self, model: str, output: str) -> bool:
        """Some namespace published this output of the model's last inference as it is."""
        key = (model, output)
        routes = self._health_output.get(key)
        if routes is None:
            state = self._streams.get(self._model_stream.get(model.partition(":")[0], ""))
            path = f"outputs.{output}"
            routes = frozenset(
                i for i, r in enumerate(state.routes if state is not None else ())
                if "inference" in r.ns.kinds and not r.rules.dropped(path)
                and r.output_step(output) is None)
            self._health_output[key] = routes
        return bool(routes - self._last_withheld.get(model, frozenset()))

    def _scrub_sensors(self, sensors: list[Any]) -> list[Any] | None:
        out: list[Any] = []
        changed = False
        for s in sensors:
            values = s.get("last_values") if isinstance(s, Mapping) else None
            if not isinstance(values, Mapping) or not values:
                out.append(s)
                continue
            name = str(s.get("name", ""))
            kept = {q: (v if self._value_shared(name, q) or not isinstance(v, Mapping)
                        else {k: x for k, x in v.items() if k != "value"})
                    for q, v in values.items()}
            if all(kept[q] is values[q] for q in values):
                out.append(s)
            else:
                out.append({**s, "last_values": kept})
                changed = True
        return out if changed else None

    def _scrub_models(self, last: Mapping[str, Any]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        changed = False
        for model, entry in last.items():
            outputs = entry.get("outputs") if isinstance(entry, Mapping) else None
            if not isinstance(outputs, Mapping):
                out[model] = entry
                continue
            kept = {o: v for o, v in outputs.items() if self._output_shared(str(model), str(o))}
            if len(kept) == len(outputs):
                out[model] = entry
            else:
                out[model] = {**entry, "outputs": kept}
                changed = True
        return out if changed else None

    def scrub_sensors(self, sensors: list[Any]) -> list[Any]:
        """Sensor snapshots without the last values the feed does not publish as they are, for
        other replies that leave the gateway (the ``sensors.read`` command)."""
        return self._scrub_sensors(sensors) or sensors

    def health(self, draft: Draft[Any]) -> Draft[Any]:
        """The health message without the last values the feed does not publish as they are."""
        body = draft.fields.get("health")
        if not isinstance(body, Mapping):
            return draft
        new_body = dict(body)
        sensors = body.get("sensors")
        scrubbed = self._scrub_sensors(sensors) if isinstance(sensors, list) else None
        if scrubbed is not None:
            new_body["sensors"] = scrubbed
        models = body.get("models")
        last = models.get("last") if isinstance(models, Mapping) else None
        kept = self._scrub_models(last) if isinstance(last, Mapping) else None
        if kept is not None and isinstance(models, Mapping):
            new_body["models"] = {**models, "last": kept}
        if scrubbed is None and kept is None:
            return draft
        self.health_scrubbed += 1
        return Draft(draft.model, {**draft.fields, "health": new_body})
