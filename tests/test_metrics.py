"""Metrics against hand-computed values."""
import math

import numpy as np
import pytest

from fedfm.metrics import (HEADLINE, accuracy, average_score, beam_se_ratio, error_for_score, f1, mae, nmse,
                           nmse_db, score, spectral_efficiency, topk_accuracy)
from fedfm.tasks import TASKS, TaskData


def test_nmse_is_mean_of_per_sample_ratios():
    true = np.array([[1, 1], [2, 0]], np.complex64)
    pred = np.array([[1, 0], [0, 0]], np.complex64)
    # sample 0: |0|² + |1|² over 1 + 1 = 0.5; sample 1: 4 / 4 = 1 → mean 0.75 (not 5/6, the pooled ratio)
    assert nmse(pred, true) == pytest.approx(0.75)
    # region = first element only: sample 0: 0 / 1, sample 1: 4 / 4 → 0.5
    assert nmse(pred, true, region=np.array([True, False])) == pytest.approx(0.5)
    assert nmse_db(0.1) == pytest.approx(-10.0)
    assert nmse_db(nmse(true, true)) < -200  # perfect prediction
    with pytest.raises(ValueError, match="shape"):
        nmse(pred[:, :1], true)


def test_spectral_efficiency_matched_filter_by_hand():
    # one sample, one (slot, subcarrier), two antennas: mean per-antenna power 1 → ρ = 10 at 10 dB
    h = np.array([1.0, 1j], np.complex64).reshape(1, 1, 1, 2)
    se, se_perfect = spectral_efficiency(h, h, 10.0)
    assert se == pytest.approx(math.log2(1 + 10 * 2)) and se_perfect == pytest.approx(se)
    est = np.array([3.0, 0.0], np.complex64).reshape(1, 1, 1, 2)   # w = [1, 0] → |hᴴw|² = 1
    assert spectral_efficiency(est, h, 10.0)[0] == pytest.approx(math.log2(11))
    assert spectral_efficiency(np.zeros_like(h), h, 10.0)[0] == 0.0  # no estimate: no beam
    # the scale of the estimate and of the channel do not matter (ρ follows the channel's power)
    assert spectral_efficiency(5 * est, 7 * h, 10.0)[0] == pytest.approx(math.log2(11), rel=1e-6)
    assert spectral_efficiency(h, h, 0.0)[1] == pytest.approx(math.log2(3))


def test_spectral_efficiency_region_selects_slot_subcarrier_pairs():
    h = np.ones((1, 2, 1, 2), np.complex64)
    est = h.copy()
    est[0, 1] = [1, -1]                                  # orthogonal to h in slot 1: gain 0
    region = np.zeros((2, 1, 2), bool)
    region[1] = True
    assert spectral_efficiency(est, h, 10.0, region)[0] == pytest.approx(0.0)
    assert spectral_efficiency(est, h, 10.0)[0] == pytest.approx(math.log2(21) / 2)


def test_topk_accuracy_on_a_3x4_example():
    scores = np.array([[0.1, 0.5, 0.2, 0.9],
                       [0.3, 0.2, 0.8, 0.1],
                       [0.4, 0.3, 0.2, 0.1]])
    labels = np.array([3, 0, 2])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)   # only row 0
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)   # rows 0 ({3,1}) and 1 ({2,0})
    assert topk_accuracy(scores, labels, 3) == pytest.approx(1.0)
    assert topk_accuracy(scores, labels, 10) == pytest.approx(1.0)    # k > B: every beam


def test_beam_se_ratio_by_hand():
    codebook = np.eye(2, dtype=np.complex64)                          # beam b = antenna b
    h = np.array([[[np.sqrt(2), 0]], [[0, np.sqrt(2)]]], np.complex64)  # [S=2, K=1, N=2], power 1/antenna
    best = math.log2(1 + 10 * 2)
    right = np.array([[1.0, 0.0], [0.0, 1.0]])
    wrong_on_second = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert beam_se_ratio(right, h, codebook) == pytest.approx(1.0)
    assert beam_se_ratio(wrong_on_second, h, codebook) == pytest.approx(best / (2 * best))


def test_mae_accuracy_f1_by_hand():
    assert mae([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == pytest.approx(4 / 3)
    pred, y = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    assert accuracy(pred, y) == pytest.approx(3 / 5)
    assert f1(pred, y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))      # TP 2, FP 1, FN 1
    assert f1(np.zeros(3), np.zeros(3)) == 0.0


def test_error_for_score_and_average_score():
    model = {"CE": {"nmse": 0.05}, "BF": {"top1": 0.6}, "DE": {"mae_m": 30.0}, "LoS": {"accuracy": 0.9}}
    base = {"CE": {"nmse": 0.1}, "BF": {"top1": 0.2}, "DE": {"mae_m": 20.0}, "LoS": {"accuracy": 0.8},
            "PE": {"mae_db": 5.0}}
    assert error_for_score("BF", model["BF"]) == pytest.approx(0.4)
    assert error_for_score("PE", base["PE"]) == 5.0
    # CE 0.5, BF 0.4/0.8 = 0.5, DE 1.5, LoS 0.1/0.2 = 0.5 → mean 0.75 (PE: no model score, skipped)
    assert average_score(model, base) == pytest.approx(0.75)
    assert average_score({"LoS": {"accuracy": 1.0}}, {"LoS": {"accuracy": 1.0}}) == 1.0
    # an error-free baseline: errors floored at 1 % → 0.10 / 0.01
    assert average_score({"LoS": {"accuracy": 0.9}}, {"LoS": {"accuracy": 1.0}}) == pytest.approx(10.0)
    assert average_score({"BF": {"top1": 1.0}}, {"BF": {"top1": 1.0}}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown task"):
        error_for_score("XX", {})
    assert set(HEADLINE) == set(TASKS)


def _dense_td(targets, region):
    S, G, K, N = targets.shape
    return TaskData("CP", "t", targets, np.ones((G, K, N), bool), region, targets, np.ones(S, np.float32),
                    {"snr_db": np.zeros(S, np.float32)})


def test_score_of_a_dense_task_uses_its_region():
    rng = np.random.default_rng(0)
    h = (rng.standard_normal((3, 4, 2, 2)) + 1j * rng.standard_normal((3, 4, 2, 2))).astype(np.complex64)
    region = np.zeros((4, 2, 2), bool)
    region[2:] = True
    pred = h.copy()
    pred[:, :2] = 0                                   # wrong only outside the region
    m = score("CP", pred, _dense_td(h, region))
    assert m["nmse"] < 1e-12 and m["se_ratio"] == pytest.approx(1.0)
    pred[:, 2:] = 0
    m = score("CP", pred, _dense_td(h, region))
    assert m["nmse"] == pytest.approx(1.0) and m["nmse_db"] == pytest.approx(0.0) and m["se"] == 0.0


def test_summarise_counts_a_nan_score_as_a_loss_not_as_missing():
    # a diverged model scores NaN on some tasks; leaving them out averaged the site over the rest
    from fedfm.evaluate import summarise

    rows = [{"site": "a", "role": "train", "task": "CE", "ratio": 0.5},
            {"site": "a", "role": "train", "task": "BF", "ratio": float("nan")},
            {"site": "b", "role": "train", "task": "CE", "ratio": 0.25},
            {"site": "b", "role": "train", "task": "BF", "ratio": None}]  # no baseline: not computed
    s = summarise(rows)
    assert s["per_site"] == {"a": math.inf, "b": 0.25}
    assert s["per_task"]["BF"] == {"ratio": math.inf, "wins": 0, "sites": 2, "wins_95": 0, "losses_95": 0}
    assert s["per_task"]["CE"] == {"ratio": 0.375, "wins": 2, "sites": 2, "wins_95": 0, "losses_95": 0}


def _td(task, targets, extras=None):
    S = len(targets)
    one = np.ones((1, 1, 1), bool)
    return TaskData(task, "t", np.zeros((S, 1, 1, 1), np.complex64), one, one, np.asarray(targets),
                    np.ones(S, np.float32), extras or {})


def test_sample_errors_by_hand_and_their_mean_is_the_scored_error():
    from fedfm.metrics import sample_errors

    true = np.array([[1, 1], [2, 0]], np.complex64).reshape(2, 1, 2, 1)
    pred = np.array([[1, 0], [0, 0]], np.complex64).reshape(2, 1, 2, 1)
    td = TaskData("CE", "t", true, np.ones((1, 2, 1), bool), np.ones((1, 2, 1), bool), true,
                  np.ones(2, np.float32), {})
    assert sample_errors("CE", pred, td) == pytest.approx([0.5, 1.0])       # as in the nmse test
    assert sample_errors("CE", pred, td).mean() == pytest.approx(error_for_score("CE", score("CE", pred, td)))
    scores = np.array([[0.1, 0.5, 0.2, 0.9], [0.3, 0.2, 0.8, 0.1], [0.4, 0.3, 0.2, 0.1]])
    e = sample_errors("BF", scores, _td("BF", np.array([3, 0, 2])))
    assert e == pytest.approx([0.0, 1.0, 1.0])                              # only row 0's top beam is right
    assert e.mean() == pytest.approx(1 - topk_accuracy(scores, np.array([3, 0, 2]), 1))
    for task in ("DE", "PE"):
        td = _td(task, np.array([2.0, 2.0, 1.0], np.float32))
        e = sample_errors(task, np.array([1.0, 2.0, 4.0], np.float32), td)
        assert e == pytest.approx([1.0, 0.0, 3.0])
        assert e.mean() == pytest.approx(error_for_score(task, score(task, np.array([1.0, 2.0, 4.0]), td)))
    td = _td("LoS", np.array([1, 1, 0, 0]))
    prob = np.array([0.7, 0.2, 0.5, 0.1], np.float32)                        # 0.5 counts as LoS, as score does
    assert sample_errors("LoS", prob, td) == pytest.approx([0.0, 1.0, 1.0, 0.0])
    assert error_for_score("LoS", score("LoS", prob, td)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown task"):
        sample_errors("XX", prob, td)


def test_paired_bootstrap_by_hand():
    from fedfm.metrics import paired_bootstrap

    one = np.ones(2)
    # one task, two samples: a's mean over a draw is 0, 1 or 2 with probabilities 1/4, 1/2, 1/4 and b's
    # is 1, so the difference of average scores is −1, 0 or +1: the 2.5 % / 97.5 % quantiles are −1 / +1
    r = paired_bootstrap({"CE": np.array([0.0, 2.0])}, {"CE": one}, {"CE": one})
    assert (r["delta"], r["lo"], r["hi"]) == (0.0, -1.0, 1.0) and r["samples"] == [2]
    # a is b scaled by 0.9 and the baseline b scaled by 2, sample by sample: every draw gives ratios 0.45 and
    # 0.5, so the interval is the point, which holds only if the baseline is resampled with the same draw
    e = np.random.default_rng(1).exponential(size=500)
    r = paired_bootstrap({"CE": 0.9 * e}, {"CE": e}, {"CE": 2 * e})
    assert r["delta"] == pytest.approx(-0.05) and r["lo"] == pytest.approx(-0.05) and r["hi"] == pytest.approx(-0.05)
    # two tasks of the same samples share the draw: a's CE and PE errors are b's swapped, so a and b have the
    # same average score in every draw (independent draws per task would spread the difference)
    a = {"CE": np.array([0.0, 1.0]), "PE": np.array([1.0, 0.0])}
    b = {"CE": np.array([1.0, 0.0]), "PE": np.array([0.0, 1.0])}
    r = paired_bootstrap(a, b, {"CE": one, "PE": one})
    assert (r["delta"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0) and r["tasks"] == ["CE", "PE"]
    # error-free BF everywhere: floored at 1 %, ratio 1 for both (not 0 / 0)
    z = np.zeros(4)
    assert paired_bootstrap({"BF": z}, {"BF": z}, {"BF": z})["delta"] == 0.0
    # a clear advantage on 400 noisy samples is found; the same model against itself is not
    rng = np.random.default_rng(2)
    base = rng.exponential(size=400) + 0.5
    b = base * rng.uniform(0.5, 1.1, 400)
    r = paired_bootstrap({"CE": 0.7 * b * rng.uniform(0.8, 1.2, 400)}, {"CE": b}, {"CE": base})
    assert r["hi"] < 0
    r = paired_bootstrap({"CE": b}, {"CE": b}, {"CE": base})
    assert r["lo"] == r["hi"] == r["delta"] == 0.0
    with pytest.raises(ValueError, match="task CE has 2, 3 and 2 samples"):
        paired_bootstrap({"CE": one}, {"CE": np.ones(3)}, {"CE": one})
    with pytest.raises(ValueError, match="share no task"):
        paired_bootstrap({"CE": one}, {"PE": one}, {"CE": one})


def test_summarise_counts_sites_beaten_and_lost_at_95_percent():
    from fedfm.evaluate import summarise

    rows = [{"site": "a", "role": "train", "task": "PE", "ratio": 0.85, "ratio_ci": [0.8, 0.9]},    # beaten
            {"site": "b", "role": "train", "task": "PE", "ratio": 0.97, "ratio_ci": [0.9, 1.05]},   # can't tell
            {"site": "c", "role": "train", "task": "PE", "ratio": 1.15, "ratio_ci": [1.1, 1.2]},    # lost
            {"site": "d", "role": "train", "task": "PE", "ratio": 1.0, "ratio_ci": None}]           # no interval
    assert summarise(rows)["per_task"]["PE"] == {"ratio": pytest.approx(0.9925), "wins": 2, "sites": 4,
                                                 "wins_95": 1, "losses_95": 1}


def test_mean_ratio_interval_averages_sites_and_draws_each_site_on_its_own():
    from fedfm.metrics import mean_ratio_interval

    rng = np.random.default_rng(3)
    b1, b2 = rng.uniform(0.1, 1.0, 50), rng.uniform(0.1, 1.0, 80)
    # model errors a fixed multiple of the baseline's on each site: every draw gives the same
    # ratios, 0.5 and 1.5, so the mean is 1.0 and the interval has no width
    ci = mean_ratio_interval("CE", [(0.5 * b1, b1), (1.5 * b2, b2)])
    assert ci["ratio"] == pytest.approx(1.0) and ci["lo"] == pytest.approx(1.0) and ci["hi"] == pytest.approx(1.0)
    assert ci["sites"] == 2
    # a site whose baseline is error-free (ratio ∞) is left out of the mean
    ci = mean_ratio_interval("DE", [(0.5 * b1, b1), (b2, np.zeros_like(b2))])
    assert ci["ratio"] == pytest.approx(0.5) and ci["sites"] == 1
    # LoS error rates floored at 1 %: an error-free model and baseline are level (1.0), a model
    # with 4 errors in 100 against an error-free baseline is at 4 %/1 % = 4
    hits = np.zeros(100)
    four = np.r_[np.ones(4), np.zeros(96)]
    assert mean_ratio_interval("LoS", [(hits, hits)])["ratio"] == pytest.approx(1.0)
    ci = mean_ratio_interval("LoS", [(four, hits), (hits, hits)])
    assert ci["ratio"] == pytest.approx((4.0 + 1.0) / 2)
    assert ci["lo"] < ci["ratio"] < ci["hi"]         # resampled: some draws hold fewer or more of the 4
    with pytest.raises(ValueError, match="same test samples"):
        mean_ratio_interval("CE", [(b1, b2)])
