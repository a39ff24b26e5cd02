"""Metric functions against hand-computed answers (field note 7: evaluators disagree)."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipeline.search import metrics as M


def test_retrieval_per_query_hand_computed():
    # q0: relevant at ranks 2 and 3 of 2 relevant; q1: nothing relevant in top 3 (1 relevant);
    # q2: relevant at rank 1 of 3 relevant.
    rel = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=bool)
    out = M.retrieval_per_query(rel, np.array([2, 1, 3]), ks=(1, 3))
    assert out["recall@1"].tolist() == [0, 0, 1]
    assert out["recall@3"].tolist() == [1, 0, 1]
    assert out["recall_all@3"].tolist() == pytest.approx([1.0, 0.0, 1 / 3])
    assert out["mrr@3"].tolist() == pytest.approx([0.5, 0.0, 1.0])
    ndcg0 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert out["ndcg@3"].tolist() == pytest.approx([ndcg0, 0.0, 1 / (1 + 1 / math.log2(3) + 1 / math.log2(4))])


def test_query_without_relevant_items_is_rejected():
    with pytest.raises(ValueError):
        M.retrieval_per_query(np.zeros((1, 3), bool), np.array([0]))


def test_group_retrieval_with_one_hot_toy_encoder():
    # Items 0,1 share group "a"; 2,3 share "b"; 4 is alone. The encoder maps 0 and 1 to the same
    # one-hot vector, so item 0's nearest neighbour is item 1 (relevant). Items 2 and 3 are each
    # closer to item 4 (irrelevant) than to each other, and closer to each other than to 0 and 1.
    e = np.zeros((5, 4), np.float32)
    e[0] = e[1] = [1, 0, 0, 0]
    e[2] = [0, 1, 0, 0]
    e[3] = [0, 0.3, 0.954, 0]
    e[4] = [0, 0.8, 0.6, 0]
    out = M.group_retrieval(e, np.array(["a", "a", "b", "b", "c"]), k=2)
    # queries are 0,1,2,3 (item 4 has no partner)
    assert out["recall@1"].tolist() == [1, 1, 0, 0]
    assert out["recall@2"].tolist() == [1, 1, 1, 1]
    assert out["mrr@2"].tolist() == pytest.approx([1, 1, 0.5, 0.5])


def test_knn_vote_one_hot():
    train = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]
    labels = np.array(["x", "x", "y", "z"])
    test = np.eye(3, dtype=np.float32)[[0, 1, 2]]
    assert M.knn_predict(train, labels, test, k=1).tolist() == ["x", "y", "z"]
    assert M.knn_predict(train, labels, test[:1], k=3).tolist() == ["x"]


def test_macro_f1_from_codes_matches_sklearn():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    p[p == 4] = 3  # class 4 never predicted
    assert M.macro_f1_from_codes(t, p, 5) == pytest.approx(f1_score(t, p, average="macro"))


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.7, rng.random(5000) < 0.7
    lo_s, hi_s = M.bootstrap_mean_ci(small, 500, seed=0)
    lo_l, hi_l = M.bootstrap_mean_ci(large, 500, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s)
    # a known case: a fair coin over 10,000 items has a 95% CI of about +-0.0098
    coin = np.arange(10000) % 2 == 0
    lo, hi = M.bootstrap_mean_ci(coin, 1000, seed=1)
    assert hi - lo == pytest.approx(2 * 1.96 * 0.5 / 100, rel=0.15)


def test_bootstrap_macro_f1_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.choice(["a", "b", "c"], 400)
    pred = np.where(rng.random(400) < 0.8, y, rng.choice(["a", "b", "c"], 400))
    lo, hi = M.bootstrap_macro_f1_ci(y, pred, 300, seed=0)
    assert lo < f1_score(y, pred, average="macro") < hi


def test_ci_position_places_a_value_against_a_closed_interval():
    assert M.ci_position(0.5, (0.4, 0.6)) == "within"
    assert M.ci_position(0.4, (0.4, 0.6)) == "within" and M.ci_position(0.6, (0.4, 0.6)) == "within"
    assert M.ci_position(0.39, (0.4, 0.6)) == "below" and M.ci_position(0.61, (0.4, 0.6)) == "above"
    with pytest.raises(ValueError):
        M.ci_position(float("nan"), (0.4, 0.6))


def test_seed_summary_known_case():
    # three seeds scoring 0.70, 0.72, 0.74: mean 0.72, sample sd 0.02; per-seed CIs averaged
    s = M.seed_summary([0.70, 0.72, 0.74], [[0.65, 0.75], [0.67, 0.77], [0.69, 0.79]])
    assert s["mean"] == pytest.approx(0.72) and s["sd"] == pytest.approx(0.02)
    assert (s["min"], s["max"], s["n"]) == (0.70, 0.74, 3)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(0.67), pytest.approx(0.77))
    one = M.seed_summary([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["sd"]) and "ci_low" not in one


def test_bootstrap_cis_known_cases():
    # no variation, no uncertainty
    assert M.bootstrap_mean_ci(np.full(200, 0.3), 200, seed=0) == (pytest.approx(0.3), pytest.approx(0.3))
    y = np.array(list("abcd") * 50)
    assert M.bootstrap_macro_f1_ci(y, y, 200, seed=0) == (1.0, 1.0)
    # 100 items, half relevant: the bootstrap mean is Binomial(100, 0.5) / 100, whose 2.5% and 97.5%
    # quantiles are 0.40 and 0.60
    lo, hi = M.bootstrap_mean_ci(np.arange(100) % 2, 4000, seed=0)
    assert lo == pytest.approx(0.40, abs=0.011) and hi == pytest.approx(0.60, abs=0.011)


def test_paired_bootstrap_mean_hand_computed_cases():
    # a constant gain on every item: no sampling uncertainty in the difference
    b = np.arange(50) % 3 / 2
    r = M.paired_bootstrap_mean(b + 0.1, b, 200, seed=0)
    assert r["delta"] == pytest.approx(0.1) and r["ci"] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert r["verdict"] == "better"
    # the model misses half of the items the reference finds: difference -1 on 50 of 100 items, the
    # replicate mean is -Binomial(100, 0.5) / 100, so the CI is about [-0.60, -0.40]: worse
    ref = np.ones(100)
    mine = (np.arange(100) % 2).astype(float)
    r = M.paired_bootstrap_mean(mine, ref, 4000, seed=0)
    assert r["delta"] == pytest.approx(-0.5) and r["verdict"] == "worse"
    assert r["ci"][0] == pytest.approx(-0.60, abs=0.011) and r["ci"][1] == pytest.approx(-0.40, abs=0.011)
    # the same replicates as the marginal bootstrap of the per-item differences with the same seed
    assert tuple(r["ci"]) == M.bootstrap_mean_ci(mine - ref, 4000, seed=0)
    same = M.paired_bootstrap_mean(ref, ref, 100, seed=0)
    assert same["verdict"] == "no measurable difference" and same["delta"] == 0
    assert M.paired_bootstrap_mean(mine, ref, 0)["verdict"].startswith("not measured")
    with pytest.raises(ValueError):
        M.paired_bootstrap_mean([1.0, 0.0], [1.0], 10)


def test_pairing_detects_a_small_gain_that_separate_intervals_cannot():
    # 400 queries, the reference finds half; the model finds the same ones plus 12 more. The separate
    # 95% CIs overlap widely, yet every resample of the same queries shows the gain.
    rng = np.random.default_rng(1)
    ref = (rng.random(400) < 0.5).astype(float)
    mine = ref.copy()
    mine[np.flatnonzero(ref == 0)[:12]] = 1.0
    lo_m, hi_m = M.bootstrap_mean_ci(mine, 1000, seed=0)
    lo_r, hi_r = M.bootstrap_mean_ci(ref, 1000, seed=0)
    assert lo_m < hi_r  # the marginal intervals overlap
    r = M.paired_bootstrap_mean(mine, ref, 1000, seed=0)
    assert r["delta"] == pytest.approx(12 / 400) and r["ci"][0] > 0 and r["verdict"] == "better"


def test_paired_bootstrap_macro_f1_matches_scikit_learn_on_the_same_resamples():
    rng = np.random.default_rng(0)
    y = rng.choice(list("abcd"), 120)
    good = np.where(rng.random(120) < 0.9, y, rng.choice(list("abcd"), 120))
    bad = np.where(rng.random(120) < 0.4, y, rng.choice(list("abcde"), 120))  # "e": a class never true
    r = M.paired_bootstrap_macro_f1(y, bad, good, 300, seed=3)
    f1 = lambda t, p: f1_score(t, p, average="macro", zero_division=0)  # noqa: E731
    assert r["delta"] == pytest.approx(f1(y, bad) - f1(y, good))
    assert r["verdict"] == "worse" and r["ci"][1] < 0
    # each replicate scores both prediction vectors on one draw of indices: redo the draws by hand
    gen = np.random.default_rng(3)
    reps = []
    for _ in range(300):
        idx = gen.integers(0, 120, 120)
        reps.append(f1(y[idx], bad[idx]) - f1(y[idx], good[idx]))
    assert r["ci"] == [pytest.approx(np.quantile(reps, 0.025)), pytest.approx(np.quantile(reps, 0.975))]
    assert M.paired_bootstrap_macro_f1(y, good, bad, 300, seed=3)["verdict"] == "better"
    assert M.paired_bootstrap_macro_f1(y, good, good, 50, seed=0) == {"delta": 0.0, "ci": [0.0, 0.0],
                                                                      "verdict": "no measurable difference"}
