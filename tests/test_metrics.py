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
    assert s["per_task"]["BF"] == {"ratio": math.inf, "wins": 0, "sites": 2}
    assert s["per_task"]["CE"] == {"ratio": 0.375, "wins": 2, "sites": 2}
