"""A site's first weeks as training data: the short split, and the training site as a prior
that the site's own rows outweigh (no torch needed to check either)."""

from __future__ import annotations

import numpy as np

from models.dataset import build, split_of
from models.simulate import simulate_site
from models.sites import preset
from models.train import SITE_WEIGHT, prior_for, scored_rows, with_prior


def test_a_fortnight_validates_on_one_day_a_week_and_holds_nothing_out() -> None:
    ts = np.arange(0, 14 * 86_400, 300) + 1_735_689_600  # a fortnight
    split = split_of(ts)
    assert not (split == 2).any()
    days = np.unique((ts[split == 1] - ts[0]) // 86_400)
    assert list(days) == [5, 12]
    year = np.arange(0, 365 * 86_400, 300)
    assert (split_of(year) == 2).any()  # a year keeps its test weeks


def test_the_prior_joins_the_training_rows_only_and_weighs_less() -> None:
    site = simulate_site(preset("chicago-arterial", days=14, seed=3))
    prior = simulate_site(preset("berlin-street", days=80, seed=7))
    md = build("energy", site)
    joined, weight = with_prior(md, prior)
    n = len(md.y)
    assert np.array_equal(joined.x[:n], md.x) and joined.spec == md.spec
    assert (joined.split[n:] == 0).all()
    assert (weight[:n] == SITE_WEIGHT).all() and (weight[n:] == 1).all()
    rows, label = scored_rows(joined)
    assert label == "validation days" and not rows[n:].any()
    assert rows.sum() == (md.split == 1).sum()
    # The prior's own test weeks stay out, as in the shipped training.
    assert len(joined.y) - n == (build("energy", prior, spec=md.spec).split != 2).sum()


def test_a_long_history_trains_without_a_prior() -> None:
    long = simulate_site(preset("seville-suburb", days=75, seed=3))
    assert prior_for(long, "auto") is None
    assert prior_for(long.slice(0, 14 * 288), "none") is None
