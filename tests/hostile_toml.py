"""Hypothesis strategies for hostile configuration files: a valid file with one key given a
hostile value (huge integers, NaN and infinity, long strings, wrong types, nesting 10 000 deep),
with bytes that are not UTF-8 spliced in, or cut short anywhere."""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

# Each table of the base file and keys that may be set in it; the fuzzer also adds keys that
# do not exist and tables that do not exist.
KEYS: dict[str, list[str]] = {
    "gateway": ["id", "site", "latitude", "longitude", "timezone"],
    "[sensors]": ["name", "driver", "bus", "port", "address", "period_s", "timeout_s",
                  "enabled", "options", "clean"],
    "[streams]": ["name", "sensors", "window_s", "fuse", "share", "drop", "round",
                  "min_vehicles", "audiences"],
    "mqtt": ["host", "port", "tls", "topic_prefix", "keepalive_s", "max_inflight",
             "replay_rate", "reconnect_max_s", "max_payload_bytes", "poison_attempts",
             "client_id", "ca_file"],
    "outbox": ["path", "max_bytes", "max_rows", "max_age_s", "commit_interval_ms",
               "commit_batch"],
    "control": ["socket"],
    "[models]": ["name", "stream", "path", "shadow", "enabled", "guard_horizon_s",
                 "guard_margin", "activate_min_s"],
    "runtime": ["queue_size", "backoff_initial_s", "backoff_max_s", "down_after",
                "health_period_s", "stop_timeout_s", "model_watch_s", "clock"],
}


def base_config(state: Path, port: int = 1883) -> dict[str, dict[str, str]]:
    """The valid file as table -> key -> TOML value text (``[name]`` for an array of tables)."""
    return {
        "gateway": {"id": '"gw-fuzz"', "site": '"Straße 5"'},
        "[sensors]": {"name": '"s"', "driver": '"synthetic"', "period_s": "0.05"},
        "[streams]": {"name": '"st"', "sensors": '["s"]', "window_s": "1"},
        "mqtt": {"host": '"127.0.0.1"', "port": str(port), "topic_prefix": '"fz"'},
        "outbox": {"path": f'"{state}/outbox.db"', "commit_interval_ms": "50"},
        "control": {"socket": f'"{state}/control.sock"'},
        "runtime": {"health_period_s": "3600", "clock": '"trust"'},
    }


def render(tables: dict[str, dict[str, str]]) -> str:
    lines: list[str] = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


def _nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "1" + "]" * depth
    return "{ a = " * depth + "1" + " }" * depth


DEPTHS = st.sampled_from([2, 13, 40, 999, 10_000])

hostile_values: st.SearchStrategy[str] = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from([str(2**63), str(-(2**63) - 1), str(2**64), "9" * 4300, "9" * 5000,
                     "0x7fffffffffffffff", "0b" + "1" * 200]),
    st.sampled_from(["nan", "+nan", "-nan", "inf", "+inf", "-inf", "1e-300", "5e-324",
                     "1e308", "-0.0", "0.0", "-1"]),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: "nan" if f != f else ("inf" if f == float("inf") else
                                        "-inf" if f == float("-inf") else repr(f))),
    st.integers(min_value=0, max_value=100_000).map(lambda n: '"' + "x" * n + '"'),
    st.text(max_size=50).map(lambda t: '"' + t.encode("unicode_escape").decode("ascii")
                             .replace('"', '\\"') + '"'),
    st.sampled_from(["true", "false", '""', "[]", "{}", "[1, 2]", '["s", 1]',
                     "{ a = 1 }", "1979-05-27T07:32:00Z", "07:32:00", '"emulated"',
                     '"/dev/zero"', '"/proc/self/mem"', '"../../etc/passwd"', '"\\u0000"']),
    st.tuples(DEPTHS, st.sampled_from(["array", "table"])).map(lambda t: _nested(*t)),
)


@st.composite
def mutated_config(draw: st.DrawFn, state: Path) -> str:
    """The base file with one to three keys (existing, new, or misspelt) set to hostile values."""
    tables = base_config(state)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        table = draw(st.sampled_from([*KEYS, "nonesuch"]))
        keys = KEYS.get(table, ["x"])
        key = draw(st.one_of(st.sampled_from(keys), st.from_regex(r"[a-z_]{1,12}",
                                                                  fullmatch=True)))
        tables.setdefault(table, {})[key] = draw(hostile_values)
    return render(tables)


@st.composite
def hostile_bytes(draw: st.DrawFn, state: Path) -> bytes:
    """The base file with bytes spliced in (often not UTF-8), bytes overwritten, or cut."""
    data = render(base_config(state)).encode()
    at = draw(st.integers(min_value=0, max_value=len(data)))
    how = draw(st.sampled_from(["insert", "overwrite", "truncate"]))
    if how == "truncate":
        return data[:at]
    junk = draw(st.one_of(st.binary(min_size=1, max_size=16),
                          st.sampled_from([b"\xdf", b"\xc3", b"\xff\xfe", b"\x00", b"\xed\xa0\x80",
                                           b"\xf4\x90\x80\x80", b"\r", b"\x1b[2J"])))
    if how == "insert":
        return data[:at] + junk + data[at:]
    return data[:at] + junk + data[at + len(junk):]


def hostile_file(state: Path) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated_config(state).map(str.encode), hostile_bytes(state))
