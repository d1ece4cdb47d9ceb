"""JSON text from outside the agent, parsed so that no input can raise anything but one error.

``json.loads`` recurses once per level of nesting (10,000 ``[`` raise RecursionError), turns
``1e999`` into ``inf``, accepts ``NaN`` and ``Infinity``, and reads integers of thousands of
digits. ``parse`` checks size and nesting depth on the raw text before the parser sees it (a
scan that cannot recurse), refuses non-finite numbers and over-long integers, and raises
``JsonRefused`` (a ``ValueError``) whose message says what was wrong and where, for every
input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

MAX_DEPTH: Final = 32  # no message of the agent nests deeper than a handful of levels
MAX_INT_DIGITS: Final = 40  # beyond any counter or id a message carries (2**128 has 39)

_OPEN: Final = frozenset(b"[{")
_CLOSE: Final = frozenset(b"]}")


class JsonRefused(ValueError):
    """The text is not acceptable JSON; the message says why and where."""


def nesting_depth(text: bytes, limit: int) -> int:
    """Deepest ``[``/``{`` nesting outside strings, scanning no further than ``limit`` + 1."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif byte in _CLOSE:
            depth = max(0, depth - 1)
    return deepest


def _constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused(f"the number {text[:40]} is too large for a float")
    return value


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise JsonRefused(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def parse(raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """The value of one JSON text; ``JsonRefused`` for anything else."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise JsonRefused(f"{len(data)} bytes; the limit is {max_bytes}")
    depth = nesting_depth(data, max_depth)
    if depth > max_depth:
        raise JsonRefused(f"nested more than {max_depth} levels deep")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused(f"not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except JsonRefused:
        raise
    except json.JSONDecodeError as exc:
        raise JsonRefused(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. a lone surrogate
        raise JsonRefused(f"not JSON: {type(exc).__name__}: {str(exc)[:100]}") from None
    _check_strings(value, max_depth)
    return value


def _check_strings(value: Any, depth: int) -> None:
    """Refuse a lone surrogate (``"\\ud800"``): valid JSON, but no UTF-8 can carry it on."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonRefused("a string holds a lone UTF-16 surrogate") from None
    elif depth >= 0 and isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth - 1)
            _check_strings(v, depth - 1)
    elif depth >= 0 and isinstance(value, list):
        for v in value:
            _check_strings(v, depth - 1)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, through mappings and sequences: JSON has
    no NaN, and a reader that is strict (most are) refuses the whole document for one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON text of what the agent writes (command output, files): never a bare NaN."""
    return json.dumps(finite(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
