"""The skill guard through the gateway's inference stage on simulated days of foreign sites.

The shipped traffic model is several times worse than persistence at these sites; what the
gateway publishes must not be."""

from __future__ import annotations

import pytest

from models.guard_eval import TOLERANCE, evaluate


@pytest.mark.parametrize("site", ["chicago-arterial", "heldout-ring"])
def test_published_traffic_forecasts_track_persistence_at_a_foreign_site(site: str) -> None:
    runs = {r.model: r for r in evaluate(site, days=4)}
    traffic = runs["traffic"].summary()
    overall = traffic["overall"]
    assert overall["model_mae"] > 2 * overall["persistence_mae"]  # the model alone fails here
    assert overall["published_mae"] <= overall["persistence_mae"] * (1 + TOLERANCE)
    for run in runs.values():
        summary = run.summary()
        assert summary["overall"]["published_mae"] <= \
            summary["overall"]["persistence_mae"] * (1 + TOLERANCE)
        for day in summary["per_day"]:
            if day["windows"] >= 200:  # whole days
                assert day["published_mae"] <= day["persistence_mae"] * (1 + TOLERANCE), day
