"""The batched raw lane: the cleaned readings of a stream packed into ``edge-agent/raw-batch/1``.

A stream's pending batch is sealed, and handed to the sink as one draft (one outbox row, one
``seq``, one PUBACK), when:

* it holds ``max_readings`` readings;
* the next reading would take its encoded size over ``max_bytes``;
* on time: ``linger_ms`` after its first reading. With ``linger_ms = 0`` a batch is sealed as
  soon as the pipeline has processed the readings that arrived together (the readings queue is
  empty), so it adds no latency and grows with the load, and never later than
  ``HOLD_MAX_NS`` while the pipeline is behind.

The byte bound is an upper bound computed from lengths as readings are added, so a sealed batch
never exceeds it and nothing is encoded twice. Readings keep their own quality and reasons.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from agent.feed.fields import quantize
from agent.feed.messages import (
    EPOCH,
    SCHEMA_RAW_BATCH,
    SCHEMA_READING,
    Draft,
    raw_batch_message,
)
from agent.readings import Reading

_isfinite = math.isfinite
QUALITIES: Final = frozenset(("good", "suspect", "bad"))
HOLD_MAX_NS: Final = 100_000_000  # linger 0 and the pipeline behind: seal after 100 ms anyway
# Upper bounds of the encoded JSON, in bytes. The envelope: schema, msg_id, seq, boot_id, ts,
# start, the keys, and the `"replayed":true` a late delivery adds.
ENVELOPE_BYTES: Final = 360
# A row `[channel,offset_ns,value,"suspect",[]],`: an index of up to 6 digits, an offset of up
# to 20 characters, a float of up to 24 (repr), a quality, the brackets and commas.
ROW_BYTES: Final = 72
CHANNEL_BYTES: Final = 34  # {"sensor":,"quantity":,"unit":}, without the three strings
TEXT_CACHE: Final = 4096  # encoded lengths of names and reason codes kept

Sink = Callable[[str, Draft[Any]], None]


class _Pending:
    __slots__ = ("bytes", "channels", "first_mono_ns", "index", "rows", "start_ns")

    def __init__(self, stream: str, start_ns: int, mono_ns: int) -> None:
        self.channels: list[dict[str, str]] = []
        self.index: dict[tuple[str, str, str], int] = {}
        self.rows: list[tuple[Any, ...]] = []
        self.bytes = ENVELOPE_BYTES
        self.start_ns = start_ns
        self.first_mono_ns = mono_ns


class RawBatcher:
    """Pending raw batches, one per stream; sealed batches go to ``sink(stream, draft)``."""

    def __init__(self, gateway: str, sink: Sink, *, max_readings: int, max_bytes: int,
                 linger_ms: int, mono_ns: Callable[[], int]) -> None:
        if max_readings < 1 or max_bytes < ENVELOPE_BYTES + ROW_BYTES or linger_ms < 0:
            raise ValueError(f"raw batch bounds out of range: max_readings={max_readings}, "
                             f"max_bytes={max_bytes}, linger_ms={linger_ms}")
        self.gateway = gateway
        self._sink = sink
        self.max_readings = max_readings
        self.max_bytes = max_bytes
        self.linger_ns = linger_ms * 1_000_000
        self._mono_ns = mono_ns
        self._text_bytes: dict[str, int] = {}
        self._gateway_bytes = self._json_len(gateway)
        self._pending: dict[str, _Pending] = {}
        self.batches = 0  # sealed so far
        self.readings = 0  # readings in the sealed batches

    def __len__(self) -> int:
        """Readings waiting in unsealed batches."""
        return sum(len(p.rows) for p in self._pending.values())

    def add(self, stream: str, r: Reading) -> None:
        # The per-reading path of the raw lane: kept to plain operations on purpose.
        quality = r.quality
        if quality not in QUALITIES:
            raise ValueError(f"{r.sensor}.{r.quantity}: quality {quality!r} is not one of "
                             f"{', '.join(sorted(QUALITIES))}")
        # The rows are sealed without validation: their types are made sure of here.
        v = r.value
        if v.__class__ is not float:
            v = float(v)
        ts = r.ts_ns
        if ts.__class__ is not int:
            ts = int(ts)
        p = self._pending.get(stream)
        if p is None:
            p = self._start(stream, ts)
        reasons = r.reasons
        key = (r.sensor, r.quantity, r.unit)
        idx = p.index.get(key)
        size = ROW_BYTES if idx is not None and not reasons else self._size(key, idx, reasons)
        if p.bytes + size > self.max_bytes and p.rows:
            self._seal(stream, p)
            p = self._start(stream, ts)
            if idx is not None:
                idx = None
                size = self._size(key, idx, reasons)
        if idx is None:
            idx = p.index[key] = len(p.channels)
            p.channels.append({"sensor": key[0], "quantity": key[1], "unit": key[2]})
        rows = p.rows
        rows.append((idx, ts - p.start_ns, v if _isfinite(v) else None, quality,
                     list(reasons) if reasons else []))
        p.bytes += size
        if len(rows) >= self.max_readings:
            self._seal(stream, p)

    def _size(self, key: tuple[str, str, str], idx: int | None,
              reasons: tuple[str, ...]) -> int:
        """Encoded bytes a reading adds at most: its row, its reasons, a new channel."""
        size = ROW_BYTES + sum(self._json_len(x) + 1 for x in reasons)
        if idx is None:
            size += CHANNEL_BYTES + sum(self._json_len(x) for x in key)
        return size

    def flush_due(self, caught_up: bool) -> float | None:
        """Seal the batches that are due; seconds until the next one is, None when none waits.

        ``caught_up``: the pipeline has processed every reading that has arrived."""
        if not self._pending:
            return None
        now = self._mono_ns()
        wait_ns: int | None = None
        for stream, p in list(self._pending.items()):
            age = now - p.first_mono_ns
            limit = self.linger_ns or (0 if caught_up else HOLD_MAX_NS)
            if age >= limit:
                self._seal(stream, p)
            else:
                wait_ns = limit - age if wait_ns is None else min(wait_ns, limit - age)
        return None if wait_ns is None else wait_ns / 1e9

    def flush(self) -> None:
        """Seal every pending batch (at stop)."""
        for stream, p in list(self._pending.items()):
            self._seal(stream, p)

    def _start(self, stream: str, ts_ns: int) -> _Pending:
        # The base time is whole microseconds: what `start` (ISO 8601) can say exactly.
        p = _Pending(stream, ts_ns // 1000 * 1000, self._mono_ns())
        p.bytes += self._gateway_bytes + self._json_len(stream)
        self._pending[stream] = p
        return p

    def _json_len(self, text: str) -> int:
        """Bytes of ``text`` as a JSON string, quotes included."""
        n = self._text_bytes.get(text)
        if n is None:
            if len(self._text_bytes) >= TEXT_CACHE:
                self._text_bytes.clear()
            n = self._text_bytes[text] = len(json.dumps(text, ensure_ascii=False).encode())
        return n

    def _seal(self, stream: str, p: _Pending) -> None:
        del self._pending[stream]
        self.batches += 1
        self.readings += len(p.rows)
        self._sink(stream, raw_batch_message(self.gateway, stream, p.start_ns, p.channels,
                                             p.rows))


def filter_batch(draft: Draft[Any], rule: Callable[[str, str], tuple[bool, float | None]],
                 ) -> tuple[Draft[Any] | None, int, bool]:
    """A sharing namespace's view of a batch: (the batch or None when nothing is left,
    readings withheld, whether a value was rounded). ``rule(sensor, quantity)`` says whether a
    channel's readings are withheld and the step its values are rounded to."""
    f = draft.fields
    rules = [rule(c["sensor"], c["quantity"]) for c in f["channels"]]
    if not any(w or s is not None for w, s in rules):
        return draft, 0, False
    keep = [i for i, (w, _) in enumerate(rules) if not w]
    index = {old: new for new, old in enumerate(keep)}
    rows: list[tuple[Any, ...]] = []
    withheld = 0
    rounded = False
    for row in f["readings"]:
        new = index.get(row[0])
        if new is None:
            withheld += 1
            continue
        step = rules[row[0]][1]
        value = row[2]
        if step is not None and value is not None:
            q = quantize(value, step)
            if q != value:
                rounded = True
                value = q
        rows.append((new, row[1], value, row[3], row[4]))
    if not rows:
        return None, withheld, rounded
    # The same kind of draft: rows rebuilt from trusted rows are trusted too.
    return type(draft)(draft.model, {**f, "channels": [f["channels"][i] for i in keep],
                                     "readings": rows}), withheld, rounded


def readings_of(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The readings of a decoded ``raw/{stream}`` message, either schema, each in the shape of
    ``edge-agent/reading/1`` with its sampled time also as ``sampled_ns`` (exact). For cloud-side
    consumers and tests; raises ValueError on a message that is neither."""
    schema = body.get("schema")
    if schema == SCHEMA_READING:
        return [{**body, "sampled_ns": _iso_ns(body["sampled_at"])}]
    if schema != SCHEMA_RAW_BATCH:
        raise ValueError(f"not a raw message: schema {str(schema)[:64]!r}")
    base = _iso_ns(body["start"])
    channels = body["channels"]
    out = []
    for c, offset, value, quality, reasons in body["readings"]:
        ch = channels[c]
        ns = base + offset
        out.append({"stream": body["stream"], "sensor": ch["sensor"],
                    "quantity": ch["quantity"], "unit": ch["unit"], "value": value,
                    "sampled_ns": ns, "sampled_at": _ns_iso(ns), "quality": quality,
                    "reasons": reasons})
    return out


def _iso_ns(text: str) -> int:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (t - EPOCH) // timedelta(microseconds=1) * 1000


def _ns_iso(ns: int) -> str:
    t = EPOCH + timedelta(microseconds=ns // 1000)
    return t.isoformat().replace("+00:00", "Z")
