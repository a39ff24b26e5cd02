"""How many judged queries give what CI width (pipeline/search/scoring.py: judged_budget)."""

import numpy as np

from pipeline.search.scoring import judged_budget


def test_widths_shrink_with_more_judged_queries_and_the_last_row_is_every_query():
    rng = np.random.default_rng(0)
    base = rng.beta(1, 2, 400)
    adapted = np.clip(base + rng.normal(0.02, 0.1, 400), 0, 1)
    rows = judged_budget(adapted, base, sizes=(25, 100, 300), repeats=30, n_boot=300)
    assert [r["queries"] for r in rows] == [25, 100, 300, 400] and rows[-1]["subsets"] == 1
    widths = [r["ci_width"] for r in rows[:-1]]
    assert widths == sorted(widths, reverse=True) and 1.5 < widths[0] / widths[2] < 5  # about sqrt(12)
    assert rows[0]["delta_ci_width"] < rows[0]["ci_width"]  # pairing removes the between-query spread


def test_a_constant_difference_has_no_width_and_is_always_better():
    base = np.linspace(0, 0.9, 200)
    rows = judged_budget(base + 0.05, base, sizes=(50,), repeats=10, n_boot=200)
    assert all(r["delta_ci_width"] < 1e-9 and r["delta_better_share"] == 1.0 for r in rows)
