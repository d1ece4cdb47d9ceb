"""The skill guard at a site: what the gateway publishes, day by day, against persistence.

Simulates a preset (``models.sites``), turns every 300 s row into the stream window a gateway
would close (``models.windows_io.site_window``), and runs the gateway's own inference stage
(``agent.pipeline.infer``, shipped models, skill guard at its defaults) on them in order. For
each forecast it keeps the published value, the model's own value and persistence's (the held
current value), and scores them against the next window's measurement. A day is the UTC day of
the forecast window.

    python -m models.guard_eval --preset chicago-arterial --days 14 [--json]

The target (model card): on no day is the published MAE more than 2 % above persistence's.
Beside the calendar days it reports the worst 24 h starting at any window (``worst_24h_ratio``),
a stricter reading of "any day".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from agent.config.schema import ModelConfig
from agent.pipeline.infer import InferenceStage
from models.csvdata import SiteData
from models.simulate import simulate_site
from models.sites import PRESETS, preset
from models.windows_io import site_window

MODELS = {"traffic": ("speed_next", "speed_mean"), "energy": ("power_next_w", "power_mean_w")}
TOLERANCE = 0.02
EVAL_SEED = 101  # not a training seed: the days scored here were never trained on


@dataclass
class DayScore:
    day: int
    n: int = 0
    published: float = 0.0
    model: float = 0.0
    persistence: float = 0.0
    fallback: int = 0
    blend: int = 0

    def row(self) -> dict[str, Any]:
        n = max(self.n, 1)
        pub, pers = self.published / n, self.persistence / n
        return {"day": self.day, "windows": self.n, "published_mae": round(pub, 4),
                "model_mae": round(self.model / n, 4), "persistence_mae": round(pers, 4),
                "fallback_share": round(self.fallback / n, 3),
                "blend_share": round(self.blend / n, 3),
                "ratio": round(pub / pers, 4) if pers > 0 else None}


@dataclass
class GuardRun:
    site: str
    model: str
    days: list[DayScore] = field(default_factory=list)
    # (published error, persistence error) of every scored window, in order
    errors: list[tuple[float, float]] = field(default_factory=list)

    @property
    def worst_ratio(self) -> float:
        ratios = [d.published / d.persistence for d in self.days if d.n and d.persistence > 0]
        return max(ratios) if ratios else math.nan

    @property
    def worst_24h_ratio(self) -> float:
        """The worst published/persistence MAE ratio over 288 consecutive scored windows."""
        n = 86_400 // 300
        if len(self.errors) < n:
            return self.worst_ratio
        pub = [0.0, *accumulate(e[0] for e in self.errors)]
        pers = [0.0, *accumulate(e[1] for e in self.errors)]
        return max((pub[i + n] - pub[i]) / (pers[i + n] - pers[i])
                   for i in range(len(self.errors) - n + 1) if pers[i + n] > pers[i])

    def summary(self) -> dict[str, Any]:
        total = DayScore(-1)
        for d in self.days:
            total.n += d.n
            total.published += d.published
            total.model += d.model
            total.persistence += d.persistence
            total.fallback += d.fallback
            total.blend += d.blend
        return {"site": self.site, "model": self.model, "days": len(self.days),
                "worst_day_ratio": round(self.worst_ratio, 4),
                "worst_24h_ratio": round(self.worst_24h_ratio, 4),
                "meets_target": self.worst_ratio <= 1 + TOLERANCE, "overall": total.row(),
                "per_day": [d.row() for d in self.days]}


async def run_guard(data: SiteData, site: str, kind: str) -> GuardRun:
    """The guarded model ``kind`` over every window of ``data``, scored per day."""
    output, quantity = MODELS[kind]
    windows = [site_window(data, i, kind, kind) for i in range(len(data.ts_s))]
    stage = InferenceStage([ModelConfig(name=kind, stream=kind)])
    days: dict[int, DayScore] = defaultdict(lambda: DayScore(0))
    run = GuardRun(site, kind)
    try:
        for i, w in enumerate(windows):
            for inf in await stage.on_window(w):
                nxt = windows[i + 1] if i + 1 < len(windows) else None
                actual = nxt.derived.get(quantity, math.nan) if nxt is not None else math.nan
                published = inf.outputs.get(output)
                model = inf.outputs.get(f"{output}_model", published)
                persistence = stage.last_persistence(kind)
                if not (isinstance(published, float) and isinstance(model, float)
                        and persistence is not None and math.isfinite(actual)):
                    continue
                day = int(data.ts_s[i] + data.window_s) // 86_400
                d = days[day]
                d.day = day
                d.n += 1
                d.published += abs(actual - published)
                d.model += abs(actual - model)
                d.persistence += abs(actual - persistence)
                d.fallback += inf.source == "fallback"
                d.blend += inf.source == "blend"
                run.errors.append((abs(actual - published), abs(actual - persistence)))
    finally:
        stage.close()
    run.days = [days[k] for k in sorted(days)]
    return run


def evaluate(site: str, days: int, seed: int = EVAL_SEED) -> list[GuardRun]:
    data = simulate_site(preset(site, days=days, seed=seed, start="2025-03-01"))
    return [asyncio.run(run_guard(data, site, kind)) for kind in MODELS]


def format_run(r: GuardRun) -> str:
    s = r.summary()
    lines = [f"{r.site} / {r.model}: worst day published/persistence = "
             f"{s['worst_day_ratio']:.3f} ({'ok' if s['meets_target'] else 'FAILS'} "
             f"<= {1 + TOLERANCE:.2f}); worst 24 h {s['worst_24h_ratio']:.3f}",
             "  day    windows  published  model      persistence  fallback  blend"]
    for d in s["per_day"]:
        lines.append(f"  {d['day']:<6} {d['windows']:>7}  {d['published_mae']:>9.4g}  "
                     f"{d['model_mae']:>9.4g}  {d['persistence_mae']:>11.4g}  "
                     f"{d['fallback_share']:>8.0%}  {d['blend_share']:>5.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.guard_eval", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="site preset (repeatable; default: all)")
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.days < 2:
        ap.error("--days must be at least 2")
    runs = [r for site in (args.preset or sorted(PRESETS))
            for r in evaluate(site, args.days, args.seed)]
    if args.json:
        print(json.dumps([r.summary() for r in runs], indent=1))
    else:
        print("\n\n".join(format_run(r) for r in runs))
    return 0 if all(r.summary()["meets_target"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
