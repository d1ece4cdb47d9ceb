"""Clock-sync detection, held timestamps while unsynced, and re-stamping once synced."""

from __future__ import annotations

import sys
from pathlib import Path

from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.clean import Cleaner
from agent.pipeline.clocksync import EPOCH_FLOOR_NS, ClockSync, SyncDetector, kernel_synced, restamp
from agent.pipeline.windows import Windower
from agent.readings import Reading

S = 10**9
DAY = 86_400 * S
TRUE_T0 = 1_795_000_000 * S  # 2026-11-18, a multiple of 10 s


class HostTime:
    """The host's two clocks as the test sets them: a wall clock that NTP may step, and a
    monotonic clock that only moves forward."""

    def __init__(self, wall_ns: int, mono_ns: int) -> None:
        self.wall_offset = wall_ns - mono_ns
        self.mono_now = mono_ns
        self.kernel_synced = False

    def wall(self) -> int:
        return self.mono_now + self.wall_offset

    def mono(self) -> int:
        return self.mono_now

    def kernel(self) -> bool:
        return self.kernel_synced

    def ntp_step(self, true_wall_ns: int) -> None:
        self.wall_offset = true_wall_ns - self.mono_now
        self.kernel_synced = True


def clock_for(host: HostTime, check_interval_s: float = 1.0) -> ClockSync:
    detector = SyncDetector(kernel=host.kernel, flag_path=None)
    return ClockSync(detector, wall=host.wall, mono=host.mono, check_interval_s=check_interval_s)


# -- detection ----------------------------------------------------------------------------------

def test_a_clock_before_the_floor_is_never_synced() -> None:
    d = SyncDetector(kernel=lambda: True, flag_path=None)
    assert not d(EPOCH_FLOOR_NS - 1)
    assert d(EPOCH_FLOOR_NS + 1)


def test_the_timesync_flag_file_or_the_kernel_state_decide(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    d = SyncDetector(kernel=lambda: False, flag_path=str(flag))
    assert not d(TRUE_T0)
    flag.touch()
    assert d(TRUE_T0)
    assert SyncDetector(kernel=lambda: True, flag_path=None)(TRUE_T0)
    # A host that cannot be asked: past the floor is all the evidence there is.
    assert SyncDetector(kernel=lambda: None, flag_path=None)(TRUE_T0)


def test_the_kernel_state_is_readable_on_linux() -> None:
    state = kernel_synced()
    if sys.platform.startswith("linux"):
        assert isinstance(state, bool)
    else:
        assert state is None or isinstance(state, bool)


def test_clock_holds_steady_while_unsynced_and_follows_ntp_once_synced() -> None:
    host = HostTime(TRUE_T0 - 3 * DAY, 1000 * S)  # fake-hwclock: the time of the last shutdown
    clock = clock_for(host)
    assert not clock.synced()
    start = clock.wall_ns()
    host.mono_now += 5 * S
    assert clock.wall_ns() == start + 5 * S
    host.ntp_step(TRUE_T0 + 5 * S)
    assert not clock.synced()  # the state is re-read once per check interval
    host.mono_now += S
    assert clock.synced()
    assert clock.syncs == 1
    assert clock.wall_ns() == TRUE_T0 + 6 * S
    assert clock.offset_ns() == TRUE_T0 - 1000 * S
    assert clock.stamped_unsynced(1004 * S)
    assert not clock.stamped_unsynced(1006 * S)


def test_restamp_moves_the_timestamp_and_swaps_the_flag() -> None:
    r = Reading("a", "temperature", 20.0, "degC", 5 * S, 7 * S, "suspect", ("clock_unsynced",))
    out = restamp(r, TRUE_T0)
    assert (out.ts_ns, out.quality, out.reasons) == (TRUE_T0 + 7 * S, "good", ("restamped",))
    spiky = Reading("a", "temperature", 20.0, "degC", 5 * S, 7 * S, "suspect",
                    ("spike", "clock_unsynced"))
    assert restamp(spiky, 0).quality == "suspect"
    bad = Reading("a", "temperature", 99.0, "degC", 5 * S, 7 * S, "bad",
                  ("out_of_range", "clock_unsynced"))
    assert restamp(bad, 0).quality == "bad"


# -- through the cleaner and the windows ---------------------------------------------------------

def pipeline(host: HostTime, **kw: float) -> tuple[ClockSync, Cleaner, Windower]:
    clock = clock_for(host, check_interval_s=0.0)  # notice NTP at once, to keep counts exact
    sensors = [SensorConfig(name="env", driver="synthetic")]
    streams = [StreamConfig(name="env", sensors=["env"], window_s=10)]
    return clock, Cleaner(sensors, clock), Windower(streams, sensors, clock=clock, **kw)  # type: ignore[arg-type]


def acquire(host: HostTime, clock: ClockSync, cleaner: Cleaner, windower: Windower,
            value: float) -> Reading:
    """One reading stamped the way a driver stamps it, then cleaned and windowed."""
    raw = Reading("env", "temperature", value, "degC", clock.wall_ns(), clock.mono_ns())
    cleaned = cleaner.process(raw)
    assert cleaned is not None
    windower.add(cleaned)
    host.mono_now += S
    return cleaned


def test_start_unsynced_sync_later_and_the_timestamps_come_out_corrected() -> None:
    host = HostTime(TRUE_T0 - 3 * DAY, 1000 * S)
    clock, cleaner, windower = pipeline(host)
    early = [acquire(host, clock, cleaner, windower, 20.0 + 0.01 * (i % 4)) for i in range(25)]
    assert all(r.quality == "suspect" and r.reasons == ("clock_unsynced",) for r in early)
    assert early[0].ts_ns == TRUE_T0 - 3 * DAY  # provisional: the host's wrong time
    assert windower.close_due(clock.wall_ns(), 0) == []  # held, not windowed on a wrong clock

    host.ntp_step(TRUE_T0 + 25 * S)  # acquisition went on for 25 s before NTP answered
    late = [acquire(host, clock, cleaner, windower, 20.0) for _ in range(10)]
    assert all(r.quality == "good" and r.reasons == () for r in late)
    assert late[0].ts_ns == TRUE_T0 + 25 * S

    out = windower.close_due(TRUE_T0 + 40 * S, 0)
    assert [(w.start_ns - TRUE_T0) // S for w in out] == [0, 10, 20, 30]
    assert [w.channels["env.temperature"].count for w in out] == [10, 10, 10, 5]
    assert [w.flags for w in out] == [("restamped",)] * 3 + [()]
    assert windower.stats()["restamped"] == 25
    assert windower.stats()["held"] == 0
    assert all(w.channels["env.temperature"].suspect == 0 for w in out)


def test_readings_past_the_hold_are_windowed_provisionally_and_sync_reopens_true_time() -> None:
    host = HostTime(TRUE_T0 + 1 * DAY, 1000 * S)  # the host clock is a day ahead
    clock, cleaner, windower = pipeline(host, hold_max=5)
    for _ in range(17):
        acquire(host, clock, cleaner, windower, 20.0)
    # 0..11 s overflowed the hold and went into windows on provisional time; 12..16 s are held,
    # so only the window before them may close.
    (provisional,) = windower.close_due(clock.wall_ns(), 0)
    assert provisional.flags == ("clock_unsynced",)
    assert provisional.start_ns == TRUE_T0 + DAY
    assert provisional.channels["env.temperature"].count == 10
    assert windower.stats()["held"] == 5

    host.ntp_step(TRUE_T0 + 17 * S)
    for _ in range(10):
        acquire(host, clock, cleaner, windower, 20.0)
    out = windower.close_due(clock.wall_ns(), 0) + windower.flush()
    ahead = [w for w in out if w.start_ns >= TRUE_T0 + DAY]
    true_time = [w for w in out if w.start_ns < TRUE_T0 + DAY]
    # The provisional window still open at the sync is finished early...
    assert [(w.flags, w.channels["env.temperature"].count) for w in ahead] == [
        (("clock_unsynced", "partial"), 2)]
    # ...and windows on true time open although they are a day "earlier".
    assert [(w.start_ns - TRUE_T0) // S for w in true_time] == [10, 20]
    assert [w.channels["env.temperature"].count for w in true_time] == [8, 7]
    assert true_time[0].flags == ("restamped",)
    assert windower.late("env") == 0


def test_without_a_sync_aware_clock_the_cleaner_asks_synced() -> None:
    class NeverSynced:
        def wall_ns(self) -> int:
            return TRUE_T0

        def mono_ns(self) -> int:
            return 0

        def synced(self) -> bool:
            return False

    c = Cleaner([SensorConfig(name="env", driver="synthetic")], NeverSynced())
    out = c.process(Reading("env", "temperature", 20.0, "degC", TRUE_T0, 0))
    assert out is not None
    assert (out.quality, out.reasons) == ("suspect", ("clock_unsynced",))


def test_without_a_clock_the_first_synced_reading_gives_the_new_offset() -> None:
    cfg = [SensorConfig(name="env", driver="synthetic")]
    w = Windower([StreamConfig(name="env", sensors=["env"], window_s=10)], cfg)
    for i in range(3):  # provisional stamps: mono 100..102 s on a clock 2 days behind
        w.add(Reading("env", "temperature", 20.0, "degC", TRUE_T0 - 2 * DAY + i * S,
                      100 * S + i * S, "suspect", ("clock_unsynced",)))
    w.add(Reading("env", "temperature", 20.0, "degC", TRUE_T0 + 3 * S, 103 * S))
    (win,) = w.flush()
    assert (win.start_ns, win.channels["env.temperature"].count) == (TRUE_T0, 4)
    assert win.flags == ("restamped", "partial")


def test_readings_held_longer_than_the_hold_go_out_on_provisional_time() -> None:
    cfg = [SensorConfig(name="env", driver="synthetic")]
    w = Windower([StreamConfig(name="env", sensors=["env"], window_s=10)], cfg, hold_s=30)
    for i in range(40):
        w.add(Reading("env", "temperature", 20.0, "degC", TRUE_T0 + i * S, i * S, "suspect",
                      ("clock_unsynced",)))
    out = w.close_due(TRUE_T0 + 40 * S, 0)
    # Readings 0..10 s are older than the 30 s hold: windowed, and 0..10 s is closed.
    assert [(x.start_ns - TRUE_T0) // S for x in out] == [0]
    assert out[0].flags == ("clock_unsynced",)
    assert out[0].channels["env.temperature"].count == 10
    assert w.stats()["held"] == 29
