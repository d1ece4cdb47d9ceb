"""The model history: stream windows in, the training CSV out, bounded, never someone else's
file."""

from __future__ import annotations

import io
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from agent.pipeline.history import (
    COLUMNS,
    HistoryError,
    HistoryRecorder,
    export_csv,
    open_history,
    read_rows,
)
from models.csvdata import read_csv
from models.simulate import simulate_site
from models.sites import preset
from models.windows_io import site_window, split_window


def _stream(data, kind: str, stream: str, parts: int):  # type: ignore[no-untyped-def]
    for i in range(len(data)):
        yield from split_window(site_window(data, i, kind, stream), parts)


def _record(tmp_path: Path, days: int = 2) -> tuple[Path, object]:
    data = simulate_site(preset("chicago-arterial", days=days, seed=3))
    db = tmp_path / "history.db"
    rec = HistoryRecorder(db, traffic_streams={"traffic"}, energy_streams={"energy"})
    rec.open()
    # The gateway delivers windows as they close: 10 s traffic and 60 s energy interleaved.
    traffic = list(_stream(data, "traffic", "traffic", 30))
    energy = list(_stream(data, "energy", "energy", 5))
    for w in sorted(traffic + energy, key=lambda w: (w.end_ns, w.stream)):
        rec.observe(w)
    rec.close()
    return db, data


def test_export_gives_back_the_rows_the_windows_were_made_of(tmp_path: Path) -> None:
    db, data = _record(tmp_path)
    out = tmp_path / "site.csv"
    with out.open("w") as fh:
        n = export_csv(db, fh)
    assert n == len(data.ts_s)  # type: ignore[attr-defined]
    back = read_csv(out, 300, "America/Chicago")
    assert np.array_equal(back.ts_s, data.ts_s)  # type: ignore[attr-defined]
    for c in COLUMNS:
        want, got = data.col(c), back.col(c)  # type: ignore[attr-defined]
        if c in ("speed_in_mean", "speed_out_mean"):
            # No vehicle in a direction: the simulator may still hold a speed; no window can.
            want = np.where(data.col(c.replace("speed", "vehicles").replace("_mean", "")) > 0,  # type: ignore[attr-defined]
                            want, np.nan)
        both = np.isfinite(want)
        assert np.array_equal(both, np.isfinite(got)), c
        assert np.allclose(got[both], want[both], rtol=1e-6, atol=1e-9), c


def test_a_model_window_the_stream_only_partly_covered_keeps_levels_not_counts(
        tmp_path: Path) -> None:
    data = simulate_site(preset("berlin-street", days=1, seed=5))
    db = tmp_path / "h.db"
    rec = HistoryRecorder(db, traffic_streams={"t"})
    rec.open()
    busy = int(np.nanargmax(data.col("vehicles_in")))
    parts = split_window(site_window(data, busy, "traffic", "t"), 30)
    for w in parts[15:]:  # the agent started half-way through the model window
        rec.observe(w)
    for w in split_window(site_window(data, busy + 1, "traffic", "t"), 30):
        rec.observe(w)
    rec.close()
    rows = list(read_rows(db))
    assert [r.ts_s for r in rows] == [int(data.ts_s[busy]), int(data.ts_s[busy + 1])]
    first, second = rows[0].values, rows[1].values
    assert math.isnan(first["vehicles_in"]) and math.isnan(first["vehicles_out"])
    assert math.isfinite(first["speed_in_mean"])
    assert second["vehicles_in"] == data.col("vehicles_in")[busy + 1]


def test_rows_older_than_the_retention_are_deleted(tmp_path: Path) -> None:
    data = simulate_site(preset("berlin-street", days=3, seed=5))
    db = tmp_path / "h.db"
    rec = HistoryRecorder(db, energy_streams={"e"}, retention_days=1)
    rec.open()
    for i in range(len(data)):
        rec.observe(site_window(data, i, "energy", "e"))
    rec.close()
    ts = [r.ts_s for r in read_rows(db)]
    assert ts[-1] - ts[0] <= 86_400
    assert len(ts) <= 289


def test_a_late_window_of_a_written_model_window_is_counted_not_written_twice(
        tmp_path: Path) -> None:
    data = simulate_site(preset("berlin-street", days=1, seed=5))
    rec = HistoryRecorder(tmp_path / "h.db", energy_streams={"e"}, grace_s=0)
    rec.open()
    for i in range(20):
        rec.observe(site_window(data, i, "energy", "e"))
    rec.observe(site_window(data, 3, "energy", "e"))
    rec.close()
    assert rec.late_windows == 1
    assert len(list(read_rows(tmp_path / "h.db"))) == 20


@pytest.mark.parametrize("content", [b"not a database at all\n" * 100, b""])
def test_a_file_that_is_not_a_history_is_refused_and_left_alone(tmp_path: Path,
                                                                content: bytes) -> None:
    p = tmp_path / "h.db"
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
    for f in (p, other):
        if f == p:
            f.write_bytes(content)
        before = f.read_bytes()
        if f == p and not content:
            continue  # an empty file is a new database: allowed
        with pytest.raises(HistoryError, match="not a model history"):
            open_history(f, create=True)
        assert f.read_bytes() == before


def test_export_of_a_missing_history_names_it(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="no model history"):
        export_csv(tmp_path / "none.db", io.StringIO())


def test_circuit_history_exports_what_the_anomaly_calibration_reads(tmp_path: Path) -> None:
    import json

    from agent.anomaly import SiteInfo
    from agent.anomaly.calibrate import calibrate
    from agent.anomaly.sample import ChannelMap
    from agent.readings import ChannelStats, Window
    from models.anomaly_csv import calibrate_from_csv
    from models.anomaly_sim import SITES, simulate_cabinet

    site = SITES["seville-suburb"]
    run = simulate_cabinet(site, 15, fault_free_days=0.0, split_days=14)
    k = run.chargers_w.shape[1]
    ch = ChannelMap(main="feed.active_power", lights="lamps.active_power",
                    check="check.active_power",
                    chargers=tuple(f"cp{j}.active_power" for j in range(k)),
                    photocell="cell.light")
    rec = HistoryRecorder(tmp_path / "h.db", circuits={"cabinet": ch})
    rec.open()
    ns = 1_000_000_000

    def st(v: float, unit: str = "W") -> ChannelStats:
        return ChannelStats(60, v, v, v, v, 0.0, unit)

    measured = 0
    for i, t in enumerate(run.ts_s.tolist()):
        chans = {ch.main: st(run.main_w[i]), ch.lights: st(run.lights_w[i]),
                 "check.active_power": st(run.check_w[i]), "cell.light": st(run.photocell[i], "1"),
                 **{ch.chargers[j]: st(run.chargers_w[i, j]) for j in range(k)}}
        chans = {n: s for n, s in chans.items() if math.isfinite(s.mean)}
        rec.observe(Window("cabinet", int(t) * ns, (int(t) + 60) * ns, chans))
        measured += bool(chans)
    rec.close()
    # A window with nothing measured (an outage) is a missing row, as the CSV format says.
    assert measured > len(run.ts_s) - 50
    assert rec.circuits.rows_written == measured
    out = tmp_path / "circuits.csv"
    with out.open("w") as fh:
        assert export_csv(tmp_path / "h.db", fh, circuits="cabinet") == measured
    info = SiteInfo(site.lat_deg, site.lon_deg, site.timezone)
    got = json.loads(calibrate_from_csv(out, info, days=14).to_json())
    want = json.loads(calibrate(run.history(14)).to_json())
    assert got["stuck"] == want["stuck"]
    for part in ("lamps", "drift", "unexplained"):
        for key, v in want[part].items():
            assert got[part][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (part, key)
    with pytest.raises(HistoryError, match="no circuit history of stream 'other'"):
        export_csv(tmp_path / "h.db", io.StringIO(), circuits="other")
