"""Quality codes: the reasons a reading carries and the flags a window carries.

This is the one list of them. Drivers, the cleaner, the clock hold, the windows, fusion and the
sharing policy emit codes from here, and ``docs/mqtt.md`` explains each one with what a consumer
should do (a test fails when code emits a code this list lacks, or the docs miss one of it).

A flag that names a channel or group is a prefix followed by the name, e.g.
``drift:bme1.temperature``; the prefixes end with ``:``.
"""

from __future__ import annotations

from typing import Final

# -- reading reasons (``Reading.reasons``, the ``reasons`` of a raw message) --------------------
# Bad: the value is wrong.
NOT_FINITE: Final = "not_finite"
OUT_OF_RANGE: Final = "out_of_range"
UNIT: Final = "unit"
# Suspect: the value may be wrong.
RATE: Final = "rate"
SPIKE: Final = "spike"
STUCK: Final = "stuck"
FROZEN: Final = "frozen"
OVERFLOW: Final = "overflow"
# About the timestamp only, not the value.
CLOCK_UNSYNCED: Final = "clock_unsynced"
RESTAMPED: Final = "restamped"

READING_REASONS: Final = frozenset({NOT_FINITE, OUT_OF_RANGE, UNIT, RATE, SPIKE, STUCK, FROZEN,
                                    OVERFLOW, CLOCK_UNSYNCED, RESTAMPED})

# -- channel states and drop counters (health, not carried by a reading) ------------------------
STALE: Final = "stale"
DUPLICATE: Final = "duplicate"

CHANNEL_STATES: Final = frozenset({STALE, DUPLICATE})

# -- window flags (``flags`` of a window message) ------------------------------------------------
PARTIAL: Final = "partial"
REDACTED: Final = "redacted"
INCONSISTENT: Final = "inconsistent:"  # + channel
DISAGREEMENT: Final = "disagreement:"  # + group
DRIFT: Final = "drift:"  # + channel, or + group for a pair
DOWNWEIGHTED: Final = "downweighted:"  # + channel

WINDOW_FLAGS: Final = frozenset({PARTIAL, REDACTED, CLOCK_UNSYNCED, RESTAMPED})
WINDOW_FLAG_PREFIXES: Final = frozenset({INCONSISTENT, DISAGREEMENT, DRIFT, DOWNWEIGHTED})

ALL_CODES: Final = READING_REASONS | CHANNEL_STATES | WINDOW_FLAGS | WINDOW_FLAG_PREFIXES


def known_window_flag(flag: str) -> bool:
    """Whether ``flag`` is a window flag of this list (a prefixed one with any name)."""
    if flag in WINDOW_FLAGS:
        return True
    prefix, colon, name = flag.partition(":")
    return bool(colon and name) and prefix + colon in WINDOW_FLAG_PREFIXES
