"""The independent Sparkplug B decoder for the tests: the specification's schema
(``sparkplug_b.proto`` of Eclipse Tahu) compiled by ``protoc``, as shipped by the
``sparkplug-b-packets`` package, run by Google's ``protobuf`` runtime. Nothing of the agent's
codec is involved."""

from __future__ import annotations

from typing import Any

from sparkplub_b_packets.core import sparkplug_b_pb2 as pb  # the package's own spelling

Payload: Any = pb.Payload


def parse(data: bytes) -> Any:
    msg = pb.Payload()
    msg.ParseFromString(data)
    return msg


def value(metric: Any) -> Any:
    """The metric's value by its oneof, or None when it is null."""
    if metric.is_null:
        return None
    which = metric.WhichOneof("value")
    return None if which is None else getattr(metric, which)


def by_name(payload: Any) -> dict[str, Any]:
    return {m.name: m for m in payload.metrics}
