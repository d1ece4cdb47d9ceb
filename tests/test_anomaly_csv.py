"""Site calibration from an exported history CSV: the same thresholds as from the arrays, and
clear errors for files that cannot be used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.anomaly import SiteInfo, Thresholds
from agent.anomaly.calibrate import calibrate
from agent.anomaly.thresholds import load_thresholds
from models.anomaly_csv import HistoryCsvError, calibrate_from_csv, read_history, write_history
from models.anomaly_eval import main
from models.anomaly_sim import SITES, simulate_cabinet

SITE = SITES["chicago-arterial"]
INFO = SiteInfo(SITE.lat_deg, SITE.lon_deg, SITE.timezone)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 days with faults from the first day on: calibration reads only the first 14.
    run = simulate_cabinet(SITE, 16, fault_free_days=0.0, split_days=14)
    path = tmp_path_factory.mktemp("history") / "history.csv"
    write_history(path, run.history(16), run.ts_s, SITE.timezone)
    return path


def test_csv_gives_the_thresholds_of_its_first_14_days(exported: Path) -> None:
    run = simulate_cabinet(SITE, 16, fault_free_days=0.0, split_days=14)
    from_csv = json.loads(calibrate_from_csv(exported, INFO, days=14).to_json())
    direct = json.loads(calibrate(run.history(14)).to_json())
    assert from_csv["calibrated_days"] == direct["calibrated_days"] == 14.0
    # Only the decimal text of the CSV differs: the same thresholds to ~1e-9.
    assert from_csv["stuck"] == direct["stuck"]
    for part in ("lamps", "drift", "unexplained"):
        for k, v in direct[part].items():
            assert from_csv[part][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (part, k)


def test_cli_writes_thresholds_the_config_accepts(exported: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "site.json"
    rc = main(["--calibrate", str(exported), "--lat", str(INFO.lat_deg), "--lon",
               str(INFO.lon_deg), "--tz", INFO.timezone, "--out", str(out)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    th = load_thresholds(out)
    assert th.window_s == 60 and len(th.unexplained.main_gains) == 1 + len(SITE.chargers_kw)
    assert main(["--calibrate", str(exported), "--lat", "41.9"]) == 2
    assert "--tz" in capsys.readouterr().err


def test_powerless_columns_and_aliases(tmp_path: Path) -> None:
    run = simulate_cabinet(SITE, 4, fault_free_days=0.0)
    path = tmp_path / "h.csv"
    write_history(path, run.history(4), run.ts_s, SITE.timezone)
    text = path.read_text().replace("main_w", "power_mean_w", 1)
    path.write_text(text)
    h = read_history(path, INFO, days=3)
    assert h.days == pytest.approx(3.0) and h.chargers_w.shape[1] == len(SITE.chargers_kw)
    assert isinstance(calibrate(h), Thresholds)


@pytest.mark.parametrize(("body", "needle"), [
    ("ts,main_w,lights_w,bogus\n", "unknown column"),
    ("ts,lights_w\n", "'main_w' or 'power_mean_w'"),
    ("ts,main_w,lights_w\n2025-01-01T00:00:00,1,2\n", "no UTC offset"),
    ("ts,main_w,lights_w\n1735689600,inf,2\n", "not a plausible"),
    ("ts,main_w,lights_w\n1735689600,1e400,2\n", "not a plausible"),
    ("ts,main_w,lights_w\n1735689630,1,2\n", "not aligned"),
    ("ts,main_w,lights_w\n1735689600,1,2\n1735689600,1,2\n", "second row"),
    ("ts,main_w,lights_w\n1735689600,1\n", "fields"),
    ("ts,main_w,lights_w\n1735689600,x,2\n", "column main_w"),
    ("ts,main_w,lights_w,charger_2_w\n", "numbered 1..n"),
    ("ts,main_w,lights_w\n1735689600,1,2\n", "at least 3"),
    ("ts,main_w,lights_w\n9e99,1,2\n", "plausible Unix time"),
])
def test_bad_files_are_refused_with_a_reason(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(HistoryCsvError, match=r"bad\.csv") as err:
        read_history(path, INFO)
    assert needle in str(err.value)


def test_not_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(b"ts,main_w,lights_w\n\xff\xfe,1,2\n")
    with pytest.raises(HistoryCsvError, match="not UTF-8"):
        read_history(path, INFO)
    with pytest.raises(HistoryCsvError, match="cannot read"):
        read_history(tmp_path / "absent.csv", INFO)
    with pytest.raises(HistoryCsvError, match="days nan"):
        read_history(path, INFO, days=float("nan"))
    with pytest.raises(HistoryCsvError, match="not on Earth"):
        read_history(path, SiteInfo(float("nan"), 0.0, "UTC"))
    with pytest.raises(HistoryCsvError, match="time zone"):
        read_history(path, SiteInfo(0.0, 0.0, "Mars/Olympus"))
