"""Metrics of the seven tasks, their headline numbers and the average score (DESIGN.md).

Predictions follow the contract: dense complex64 [S, G, K, N] on the normalised scale of
``td.targets`` (NMSE and SE are per-sample scale-invariant, so physical units give the same
numbers); BF float32 [S, B] beam scores; DE metres; PE dB; LoS probability of LoS.
"""
from __future__ import annotations

import math

import numpy as np

HEADLINE = {"CE": "nmse_db", "CP": "nmse_db", "PF": "nmse_db", "BF": "top1",
            "DE": "mae_m", "PE": "mae_db", "LoS": "accuracy"}
UNITS = {"nmse_db": "dB", "nmse": "", "se": "bit/s/Hz", "se_perfect": "bit/s/Hz", "se_ratio": "",
         "top1": "", "top3": "", "beam_se_ratio": "", "mae_m": "m", "mae_db": "dB", "accuracy": "", "f1": ""}
SE_SNR_DB = 10.0  # LLM4WM evaluates SE at 10 dB


# ---- dense channels -----------------------------------------------------------------
def nmse_per_sample(pred: np.ndarray, true: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """‖Ĥ−H‖²/‖H‖² (linear) of each sample over ``region``: float64 [S].

    pred, true: complex [S, ...]; region: bool [...] (the per-sample shape) or None = all."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"nmse: prediction shape {pred.shape} != target shape {true.shape}")
    S = true.shape[0]
    err = np.abs(pred - true) ** 2
    ref = np.abs(true) ** 2
    if region is not None:
        err, ref = err[:, region], ref[:, region]
    err = err.reshape(S, -1).sum(axis=1, dtype=np.float64)
    ref = ref.reshape(S, -1).sum(axis=1, dtype=np.float64)
    return err / np.maximum(ref, 1e-30)


def nmse(pred: np.ndarray, true: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean over samples of ‖Ĥ−H‖²/‖H‖² (linear) over ``region`` (see :func:`nmse_per_sample`)."""
    return float(np.mean(nmse_per_sample(pred, true, region)))


def nmse_db(x: float) -> float:
    """10 log10 of a linear NMSE."""
    return 10.0 * math.log10(max(float(x), 1e-30))


def spectral_efficiency(h_est: np.ndarray, h_true: np.ndarray, snr_db: float = SE_SNR_DB,
                        region: np.ndarray | None = None) -> tuple[float, float]:
    """(SE with matched filtering from the estimate, SE with perfect CSI), bit/s/Hz.

    h_est, h_true: complex [S, G, K, N]; region: bool [G, K] or [G, K, N] ((slot, subcarrier)
    pairs scored; with N, a pair counts when all its antennas are in the region).
    LLM4WM Eq. (4)/(7): per slot and subcarrier, w = ĥ/‖ĥ‖ and SE = log2(1 + ρ|hᴴw|²), with
    ρ such that the sample's mean per-antenna channel power ρ·E|h_n|² equals ``snr_db``.
    A zero estimate beamforms nowhere (SE 0). Both numbers are means over samples and pairs.
    """
    h_est, h_true = np.asarray(h_est), np.asarray(h_true)
    if h_est.shape != h_true.shape:
        raise ValueError(f"spectral_efficiency: estimate shape {h_est.shape} != channel shape {h_true.shape}")
    if region is not None:
        region = np.asarray(region, bool)
        pairs = region.all(axis=-1) if region.ndim == 3 else region
        h_est, h_true = h_est[:, pairs], h_true[:, pairs]                # [S, M, N]
    else:
        h_est = h_est.reshape(h_est.shape[0], -1, h_est.shape[-1])
        h_true = h_true.reshape(h_true.shape[0], -1, h_true.shape[-1])
    power = (np.abs(h_true) ** 2).mean(axis=(1, 2), dtype=np.float64)    # [S] per antenna
    rho = 10.0 ** (snr_db / 10.0) / np.maximum(power, 1e-30)
    norm2 = np.sum(np.abs(h_est.astype(np.complex128)) ** 2, axis=-1)   # ‖ĥ‖²: [S, M]
    inner = np.abs(np.sum(h_true.conj() * h_est, axis=-1, dtype=np.complex128)) ** 2
    gain = np.where(norm2 > 0, inner / np.where(norm2 > 0, norm2, 1.0), 0.0)  # |hᴴw|², w = ĥ/‖ĥ‖
    perfect = np.sum(np.abs(h_true) ** 2, axis=-1)                        # |hᴴh/‖h‖|² = ‖h‖²
    se = np.log2(1.0 + rho[:, None] * gain)
    se_perfect = np.log2(1.0 + rho[:, None] * perfect)
    return float(se.mean()), float(se_perfect.mean())


# ---- beams ---------------------------------------------------------------------------
def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each sample's label is among its k highest scores: bool [S]. scores [S, B], labels [S]."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    k = min(int(k), scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the k highest scores. scores [S, B], labels [S]."""
    return float(np.mean(topk_hits(scores, labels, k)))


def beam_se_ratio(scores: np.ndarray, h_mmwave: np.ndarray, codebook: np.ndarray,
                  snr_db: float = SE_SNR_DB) -> float:
    """SE of the top-scored beam over SE of the best beam (ratio of means over samples).

    scores: [S, B]; h_mmwave: complex [S, K_mm, N_mm]; codebook: complex [N_mm, B], unit-norm
    columns. Per subcarrier SE = log2(1 + ρ|wᴴh|²), ρ giving ``snr_db`` per antenna at the
    sample's mean channel power; the best beam is the one with the highest SE."""
    h = np.asarray(h_mmwave, np.complex64)
    S, K, N = h.shape
    cb = np.asarray(codebook, np.complex64)
    y = (h.reshape(S * K, N) @ cb.conj()).reshape(S, K, -1)               # wᴴh: [S, K_mm, B]
    power = (np.abs(h) ** 2).mean(axis=(1, 2), dtype=np.float64)
    rho = (10.0 ** (snr_db / 10.0) / np.maximum(power, 1e-30)).astype(np.float32)
    gain = y.real ** 2 + y.imag ** 2
    se = np.log2(1.0 + rho[:, None, None] * gain).mean(axis=1, dtype=np.float64)  # [S, B]
    chosen = se[np.arange(se.shape[0]), np.asarray(scores).argmax(axis=1)]
    return float(chosen.sum() / max(se.max(axis=1).sum(), 1e-30))


# ---- regression and classification -------------------------------------------------
def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(true, np.float64))))


def accuracy(pred_labels: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred_labels) == np.asarray(labels)))


def f1(pred_labels: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class (LoS = 1): 2TP / (2TP + FP + FN); 0 if there are no positives at all."""
    p, y = np.asarray(pred_labels) == positive, np.asarray(labels) == positive
    tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
    return float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else 0.0


# ---- per task ------------------------------------------------------------------------
def score(task: str, prediction: np.ndarray, td) -> dict[str, float]:
    """All metrics of one task for a prediction in the contract format (see module docstring)."""
    pred = np.asarray(prediction)
    if task in ("CE", "CP", "PF"):
        x = nmse(pred, td.targets, td.region)
        se, se_perfect = spectral_efficiency(pred, td.targets, SE_SNR_DB, td.region)
        return {"nmse": x, "nmse_db": nmse_db(x), "se": se, "se_perfect": se_perfect,
                "se_ratio": se / se_perfect if se_perfect > 0 else 0.0}
    if task == "BF":
        return {"top1": topk_accuracy(pred, td.targets, 1), "top3": topk_accuracy(pred, td.targets, 3),
                "beam_se_ratio": beam_se_ratio(pred, td.extras["h_mmwave"], td.extras["codebook"])}
    if task in ("DE", "PE"):
        y = np.asarray(td.targets, np.float64)
        # NMSE of the scalar target (DESIGN.md lists it for PE): Σ(ŷ−y)² / Σy².
        rel = float(np.sum((pred - y) ** 2) / max(np.sum(y ** 2), 1e-30))
        return {"mae_m" if task == "DE" else "mae_db": mae(pred, y), "nmse": rel}
    if task == "LoS":
        labels = (pred >= 0.5).astype(np.int64)
        return {"accuracy": accuracy(labels, td.targets), "f1": f1(labels, td.targets)}
    raise ValueError(f"score: unknown task {task!r}; expected one of {', '.join(HEADLINE)}")


def error_for_score(task: str, metrics: dict[str, float]) -> float:
    """The error the average score compares (lower is better): NMSE (linear) for CE/CP/PF,
    MAE for DE (m) / PE (dB), 1 − top-1 for BF, 1 − accuracy for LoS."""
    if task in ("CE", "CP", "PF"):
        return float(metrics["nmse"])
    if task == "DE":
        return float(metrics["mae_m"])
    if task == "PE":
        return float(metrics["mae_db"])
    if task == "BF":
        return 1.0 - float(metrics["top1"])
    if task == "LoS":
        return 1.0 - float(metrics["accuracy"])
    raise ValueError(f"error_for_score: unknown task {task!r}; expected one of {', '.join(HEADLINE)}")


# An error rate measured as 0 on a finite test split only says it is small: BF/LoS errors
# are floored at one percentage point before dividing, so an error-free baseline on a
# 128-sample split gives a finite ratio (model error / 1 %) instead of ∞.
ERROR_FLOOR = {"BF": 0.01, "LoS": 0.01}


def error_ratio(task: str, model_error: float, baseline_error: float) -> float:
    """Model error / baseline error, both floored at ERROR_FLOOR[task] (1.0 = the baseline)."""
    floor = ERROR_FLOOR.get(task, 0.0)
    m, b = max(model_error, floor), max(baseline_error, floor)
    if b > 0:
        return m / b
    return 1.0 if m <= 0 else math.inf


def average_score(model_metrics: dict[str, dict], baseline_metrics: dict[str, dict]) -> float:
    """Mean over tasks (those in both) of model error / baseline error (DESIGN.md "Average score").

    Lower is better; 1.0 = no better than the classical baseline; see :func:`error_ratio`.
    NaN if no task is shared."""
    ratios = [error_ratio(t, error_for_score(t, model_metrics[t]), error_for_score(t, baseline_metrics[t]))
              for t in model_metrics if t in baseline_metrics]
    return float(np.mean(ratios)) if ratios else math.nan


# ---- per-sample errors and the paired bootstrap ------------------------------------------
def sample_errors(task: str, prediction: np.ndarray, td) -> np.ndarray:
    """Each test sample's share of :func:`error_for_score`: float64 [S] whose mean is that
    error (per-sample NMSE for CE/CP/PF, absolute error for DE/PE, 1 − hit for BF top-1 and
    LoS). The evidence a paired comparison of two models on the same samples needs."""
    pred = np.asarray(prediction)
    if task in ("CE", "CP", "PF"):
        return nmse_per_sample(pred, td.targets, td.region)
    if task == "BF":
        return 1.0 - topk_hits(pred, td.targets, 1).astype(np.float64)
    if task in ("DE", "PE"):
        return np.abs(np.asarray(pred, np.float64) - np.asarray(td.targets, np.float64))
    if task == "LoS":
        return ((pred >= 0.5).astype(np.int64) != np.asarray(td.targets)).astype(np.float64)
    raise ValueError(f"sample_errors: unknown task {task!r}; expected one of {', '.join(HEADLINE)}")


def _score_of_means(means: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> np.ndarray:
    """The average score (mean over tasks of error_ratio) for arrays of mean errors: [n]."""
    ratios = []
    for t, m in means.items():
        floor = ERROR_FLOOR.get(t, 0.0)
        m, b = np.maximum(m, floor), np.maximum(base[t], floor)
        with np.errstate(divide="ignore", invalid="ignore"):  # an error-free baseline: as error_ratio
            ratios.append(np.where(b > 0, m / np.where(b > 0, b, 1.0), np.where(m <= 0, 1.0, np.inf)))
    return np.mean(ratios, axis=0)


BOOTSTRAP_DRAWS, BOOTSTRAP_LEVEL, BOOTSTRAP_SEED = 2000, 0.95, 0  # every interval fedfm reports


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], base: dict[str, np.ndarray],
                     n_boot: int = BOOTSTRAP_DRAWS, level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED) -> dict:
    """Average score of model ``a`` minus that of model ``b`` on one site, with a percentile
    confidence interval from resampling the site's test samples (Efron's paired bootstrap).

    a, b, base: {task: per-sample errors [S]} of the two models and the site's classical
    baseline on the same test samples (:func:`sample_errors`); the tasks scored are those all
    three have. Each replicate draws S sample indices with replacement and recomputes both
    average scores from the same draw, baseline included (the ratios' denominator varies with
    the draw too); tasks with the same S share the draw (a site's tasks are views of the same
    test samples), others draw their own. ``delta`` < 0: ``a`` is better; the interval
    excluding 0 is what "better on this site" can claim at that level.
    Written by hand: scipy.stats.bootstrap resamples one statistic of one or more samples, not
    a ratio of means over several tasks sharing one draw."""
    tasks = [t for t in a if t in b and t in base]
    if not tasks:
        raise ValueError("paired_bootstrap: the two models and the baseline share no task")
    for t in tasks:
        if not (len(a[t]) == len(b[t]) == len(base[t])) or len(a[t]) == 0:
            raise ValueError(f"paired_bootstrap: task {t} has {len(a[t])}, {len(b[t])} and {len(base[t])} "
                             f"samples; a paired comparison needs the same test samples, at least one")
    rng = np.random.default_rng(seed)
    draws: dict[int, np.ndarray] = {}
    ma, mb, mbase = {}, {}, {}
    for t in tasks:
        S = len(a[t])
        if S not in draws:
            draws[S] = rng.integers(0, S, size=(n_boot, S))
        idx = draws[S]
        ma[t], mb[t], mbase[t] = (np.asarray(x[t], np.float64)[idx].mean(axis=1) for x in (a, b, base))

    def score(x):  # the average score of the test split itself
        return float(_score_of_means({t: np.array([np.mean(x[t])]) for t in tasks},
                                     {t: np.array([np.mean(base[t])]) for t in tasks})[0])

    delta = score(a) - score(b)
    diffs = _score_of_means(ma, mbase) - _score_of_means(mb, mbase)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"delta": delta, "lo": float(lo), "hi": float(hi), "level": level, "n_boot": n_boot,
            "samples": sorted({len(a[t]) for t in tasks}), "tasks": tasks}


def mean_ratio_interval(task: str, pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = BOOTSTRAP_DRAWS,
                        level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED) -> dict:
    """One task's model/baseline error ratio averaged over sites, with a percentile interval
    from resampling each site's test samples on its own (paired within a site: the model's and
    the baseline's errors share the draw; sites are independent draws, their test samples
    being different channels). pairs: [(model errors [S_i], baseline errors [S_i]) per site]
    (:func:`sample_errors`). A site whose baseline is error-free on the task (ratio ∞) is left
    out, as the average score leaves it. {ratio, lo, hi, sites}: ``hi`` < 1 is what "beats the
    baseline on this task, averaged over sites" can claim at that level.
    Written by hand for the same reason as :func:`paired_bootstrap`."""
    rng = np.random.default_rng(seed)
    point, per_draw = [], []
    for m, b in pairs:
        m, b = np.asarray(m, np.float64), np.asarray(b, np.float64)
        if len(m) != len(b) or len(m) == 0:
            raise ValueError(f"mean_ratio_interval: {task} has {len(m)} model and {len(b)} baseline errors on a "
                             f"site; a paired comparison needs the same test samples, at least one")
        r = float(_score_of_means({task: np.array([m.mean()])}, {task: np.array([b.mean()])})[0])
        if not math.isfinite(r):
            continue
        idx = rng.integers(0, len(m), size=(n_boot, len(m)))
        point.append(r)
        per_draw.append(_score_of_means({task: m[idx].mean(axis=1)}, {task: b[idx].mean(axis=1)}))
    if not point:
        raise ValueError(f"mean_ratio_interval: no site with a finite {task} ratio")
    lo, hi = np.quantile(np.mean(per_draw, axis=0), [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": float(np.mean(point)), "lo": float(lo), "hi": float(hi), "sites": len(point)}


def ratio_interval(task: str, model_errors: np.ndarray, baseline_errors: np.ndarray) -> dict:
    """One task's model/baseline error ratio with its paired bootstrap interval: {ratio, lo, hi}.
    The baseline against itself is a ratio of 1 in every draw, so the ratio is 1 + the
    difference :func:`paired_bootstrap` finds."""
    ci = paired_bootstrap({task: model_errors}, {task: baseline_errors}, {task: baseline_errors})
    return {"ratio": 1.0 + ci["delta"], "lo": 1.0 + ci["lo"], "hi": 1.0 + ci["hi"]}
