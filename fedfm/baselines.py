"""Classical baselines, one per task (issue #2), beside which every model score is shown.

    b = fit_baseline("CE", train_tds["CE"], spec)       # headline baseline of the task
    pred = b.predict(test_tds["CE"])                     # contract prediction format
    fit_baseline("CE", train_tds["CE"], spec, "CE-LMMSE")  # a variant, reported separately

BASELINES[task] lists a task's baselines, headline first:
  CE   CE-interp    linear interpolation of the LS pilots across the comb
       CE-LMMSE     frequency LMMSE with the site's channel covariance (fitted on train)
       CE-LMMSE3D   time × frequency × antenna LMMSE, the site's Kronecker covariance (train)
  CP   CP-hold      last observed slot held over the horizon
       CP-linear    linear extrapolation from the last two slots
       CP-LMMSE3D   the same Kronecker LMMSE over history and horizon: a Wiener predictor
  PF   PF-AR        least-squares AR across subcarriers, fitted per sample on the lower half
                    (order chosen on train); a plain line is a poor predictor over half a band
       PF-ARLMMSE   the same AR on the lower half denoised first by the Kronecker LMMSE
                    (the site's train covariances, each sample's SNR)
       PF-linear    least-squares line over the last L observed subcarriers (L chosen on train)
  BF   BF-AoA       sub-6 angular spectrum (Bartlett or Capon, chosen on train) at the
                    mmWave beams' directions: AoA → nearest DFT beam
  DE   DE-kNN       k-NN fingerprint on the shape of the normalised power-delay and angle
                    profiles (spreads, peak shares; train split; k from {5, 10, 20, 40} by
                    leave-one-out; median of the neighbours)
       DE-logdist   log-range regressed on received power: the log-distance law fitted on train
                    (sees power: a reference, not a baseline of the structure-only task)
  PE   PE-kNN       as DE-kNN
       PE-logdist   path loss regressed on received power (sees power: a reference)
  LoS  LoS-Kfactor  peak delay-angle bin's power share (K-factor proxy) thresholded (train)
       LoS-logistic ridge logistic regression on the DE-kNN fingerprint's five profile
                    features (train); the LoS head's starting point at a site with labels
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedfm.estimators import (angular_spectrum, ar_extrapolate, kron_covariances, kron_lmmse, kron_observed,
                              lmmse_ar_extrapolate)
from fedfm.metrics import error_for_score, nmse, score
from fedfm.scenarios import SiteSpec
from fedfm.tasks import TASKS, build_tasks
from fedfm.tasks.sensing import peak_power_ratio, profile_features

BASELINES = {"CE": ("CE-interp", "CE-LMMSE", "CE-LMMSE3D"), "CP": ("CP-hold", "CP-linear", "CP-LMMSE3D"), "PF": ("PF-AR", "PF-linear", "PF-ARLMMSE"),
             "BF": ("BF-AoA",), "DE": ("DE-kNN", "DE-logdist"), "PE": ("PE-kNN", "PE-logdist"),
             "LoS": ("LoS-Kfactor", "LoS-logistic")}


@dataclass(frozen=True)
class Baseline:
    """A fitted baseline: ``predict(td)`` gives the contract prediction format for its task."""

    name: str
    task: str
    params: dict = field(default_factory=dict)

    def predict(self, td) -> np.ndarray:
        if td.task != self.task:
            raise ValueError(f"baseline {self.name} predicts {self.task}, got a {td.task} TaskData")
        return _METHODS[self.name][1](td, **self.params)


# ---- CE: comb interpolation and LMMSE ---------------------------------------------------
def _interp_matrix(K: int, pilots: np.ndarray) -> np.ndarray:
    """Real [K, K_p]: linear interpolation between pilots, linear extrapolation past the last."""
    W = np.zeros((K, len(pilots)))
    for k in range(K):
        j = min(max(np.searchsorted(pilots, k, side="right") - 1, 0), len(pilots) - 2)
        w = (k - pilots[j]) / (pilots[j + 1] - pilots[j])
        W[k, j], W[k, j + 1] = 1 - w, w
    return W


def _pilots(td) -> np.ndarray:
    return np.flatnonzero(td.known[0, :, 0])


def _ce_interp(td) -> np.ndarray:
    p = _pilots(td)
    W = _interp_matrix(td.inputs.shape[2], p).astype(np.complex64)
    return np.einsum("kp,sgpn->sgkn", W, td.inputs[:, :, p]).astype(np.complex64)


def _fit_ce_lmmse(td, spec) -> dict:
    """Frequency covariance of the true channels of the train split, unit mean diagonal."""
    K = td.targets.shape[2]
    R = np.zeros((K, K), np.complex128)
    for s0 in range(0, td.targets.shape[0], 256):                             # bounded memory at 10k samples
        h = td.targets[s0:s0 + 256].transpose(0, 1, 3, 2).reshape(-1, K)      # [S·G·N, K]
        R += h.T @ h.conj()                                                   # Σ h hᴴ: [K, K]
    return {"cov": (R / np.real(np.trace(R)) * R.shape[0]).astype(np.complex128)}


def _ce_lmmse(td, cov) -> np.ndarray:
    """ĥ = R_kp (R_pp + I/snr)⁻¹ y per sample: the scale of y cancels, only its SNR matters."""
    p = _pilots(td)
    snr = 10.0 ** (np.asarray(td.extras["snr_db"], np.float64) / 10.0)       # [S]
    A = cov[np.ix_(p, p)][None] + np.eye(len(p))[None] / snr[:, None, None]   # [S, K_p, K_p]
    W = (cov[:, p][None] @ np.linalg.inv(A)).astype(np.complex64)           # [S, K, K_p]
    return np.einsum("skp,sgpn->sgkn", W, td.inputs[:, :, p]).astype(np.complex64)


def _fit_lmmse3d(td, spec) -> dict:
    """Slot, subcarrier and antenna covariances of the true channels of the train split."""
    return {"covs": kron_covariances(td.targets)}


def _lmmse3d(td, covs) -> np.ndarray:
    """Kronecker LMMSE of the task's grid from what it observes (CE: the pilot comb of every
    slot; CP: every sub-band of the history slots), at each sample's own SNR."""
    obs = kron_observed(td.known)
    if obs is None:
        raise ValueError(f"{td.task}-LMMSE3D: the known entries of {td.site} are not a slots × subcarriers × antennas set")
    y = td.inputs[:, obs[0]][:, :, obs[1]][:, :, :, obs[2]]
    snr = 10.0 ** (np.asarray(td.extras["snr_db"], np.float64) / 10.0)
    return kron_lmmse(y, covs, obs, snr, td.known.shape[0])


# ---- CP: hold and linear extrapolation in time -----------------------------------------
def _history(td) -> int:
    return int(td.known[:, 0, 0].sum())


def _cp_hold(td) -> np.ndarray:
    T, pred = _history(td), td.inputs.copy()
    pred[:, T:] = td.inputs[:, T - 1:T]
    return pred


def _cp_linear(td) -> np.ndarray:
    T, pred = _history(td), td.inputs.copy()
    step = td.inputs[:, T - 1] - td.inputs[:, T - 2]
    for j in range(pred.shape[1] - T):
        pred[:, T + j] = td.inputs[:, T - 1] + (j + 1) * step
    return pred


# ---- PF: extrapolation across frequency -------------------------------------------------
def _lower_band(td) -> int:
    return int(td.known[0, :, 0].sum())


def _pf_line(td, window: int) -> np.ndarray:
    """Least-squares line over the last ``window`` observed subcarriers, per (sample, slot, antenna)."""
    K0, K = _lower_band(td), td.inputs.shape[2]
    k = np.arange(K0 - window, K0, dtype=np.float64)
    X = np.stack([np.ones_like(k), k], 1)                                     # [L, 2]
    coef = np.linalg.pinv(X) @ td.inputs[:, :, K0 - window:K0].transpose(2, 0, 1, 3).reshape(window, -1)
    ext = np.stack([np.ones(K - K0), np.arange(K0, K)], 1) @ coef            # [K - K0, S·G·N]
    pred = td.inputs.copy()
    pred[:, :, K0:] = ext.reshape(K - K0, *td.inputs.shape[:2], td.inputs.shape[3]).transpose(1, 2, 0, 3)
    return pred


def _pf_ar(td, order: int) -> np.ndarray:
    return ar_extrapolate(td.inputs, _lower_band(td), order)


def _fit_by_train(td, predict: Callable, grid: list[dict], max_samples: int = 128) -> dict:
    """The parameters in ``grid`` whose predictions have the lowest NMSE on (the first
    ``max_samples`` of) the train split."""
    td = _head(td, max_samples)
    errs = [nmse(predict(td, **p), td.targets, td.region) for p in grid]
    return grid[int(np.argmin(errs))]


def _head(td, n: int):
    """The first n samples of a dense TaskData (a cheap subset to choose hyper-parameters on)."""
    return dataclasses.replace(td, inputs=td.inputs[:n], targets=td.targets[:n], scale=td.scale[:n],
                               extras={k: v[:n] for k, v in td.extras.items() if k == "snr_db"})


def _fit_pf_ar(td, spec) -> dict:
    return _fit_by_train(td, _pf_ar, [{"order": p} for p in (2, 4, 8, 12, 16) if p <= _lower_band(td) // 2])


def _pf_ar_lmmse(td, order: int, covs: tuple) -> np.ndarray:
    snr = 10.0 ** (np.asarray(td.extras["snr_db"], np.float64) / 10.0)
    return lmmse_ar_extrapolate(td.inputs, _lower_band(td), order, covs, snr)


def _fit_pf_ar_lmmse(td, spec) -> dict:
    covs = kron_covariances(td.targets)
    return {"order": pf_ar_lmmse_order(td, covs), "covs": covs}


def pf_ar_lmmse_order(td, covs: tuple) -> int | None:
    """PF-ARLMMSE's AR order: of 4, 8, 12, 16 (at most half the lower band), the one with the
    lowest NMSE on the first samples of the PF train view ``td``, with the Kronecker
    covariances ``covs``; None when the lower band is too short for any. The PF head's start
    (``fedfm.model.prior``) takes the same order from the site's ``ChannelStats``."""
    grid = [{"order": p, "covs": covs} for p in (4, 8, 12, 16) if p <= _lower_band(td) // 2]
    return _fit_by_train(td, _pf_ar_lmmse, grid)["order"] if grid else None


def _fit_pf_line(td, spec) -> dict:
    K0 = _lower_band(td)
    return _fit_by_train(td, _pf_line, [{"window": w} for w in (2, 4, 8, 16, 32, 64) if w <= K0])


# ---- BF: sub-6 AoA → nearest mmWave DFT beam ---------------------------------------------
def _bf_aoa(td, method: str, num_beams: int) -> np.ndarray:
    return angular_spectrum(td.inputs, num_beams, method)


def _fit_bf(td, spec) -> dict:
    B = td.extras["codebook"].shape[1]
    acc = {m: np.mean(_bf_aoa(td, m, B).argmax(1) == td.targets) for m in ("bartlett", "capon")}
    return {"method": max(acc, key=acc.get), "num_beams": B}


# ---- DE/PE: kNN fingerprint and the power-seeing log-distance reference ------------------
def _neighbours(q: np.ndarray, features: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Indices of the k nearest rows of ``features`` to each row of ``q``: int [S, k]."""
    d2 = (q ** 2).sum(1)[:, None] - 2 * q @ features.T + (features ** 2).sum(1)[None]
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    k = min(k, features.shape[0] - int(exclude_self))
    return np.argpartition(d2, k - 1, axis=1)[:, :k]


def _fit_knn(td, spec) -> dict:
    """Standardised train fingerprints and labels; k in {5, 10, 20, 40} by leave-one-out MAE.

    The median of the neighbours' labels (the MAE-optimal summary). DE averages log-range."""
    f = profile_features(td.inputs)
    mu, sd = f.mean(0), f.std(0) + 1e-9
    f = (f - mu) / sd
    y = np.log10(td.targets.astype(np.float64)) if td.task == "DE" else td.targets.astype(np.float64)
    n = min(len(y), 2000)  # leave-one-out on a subset: an [n, n] distance matrix
    loo = {k: np.mean(np.abs(np.median(y[:n][_neighbours(f[:n], f[:n], k, True)], 1) - y[:n]))
           for k in (5, 10, 20, 40)}
    return {"features": f, "labels": y, "mu": mu, "sd": sd, "k": min(loo, key=loo.get)}


def _knn(td, features, labels, mu, sd, k) -> np.ndarray:
    y = np.median(labels[_neighbours((profile_features(td.inputs) - mu) / sd, features, k)], 1)
    return (10.0 ** y if td.task == "DE" else y).astype(np.float32)


# The distance below which a query's fingerprint is taken to be a table row itself (standardised
# units squared): a training sample's own row is left out of its neighbours (leave-one-out), as
# the fit's choice of k is; two different channels never come this close.
SELF_MATCH_D2 = 1e-8


@dataclass
class KnnPrior:
    """A site's DE-/PE-kNN fitted on its own labelled train samples, as the model's heads read
    it (``fedfm.model.network``: an untrained DE/PE head outputs this estimate where the site
    has one). Kept at the site like its ``ChannelStats``; never sent anywhere.

    ``estimate`` gives the normalised target (``fedfm.tasks.normalise_target``) the DE-kNN /
    PE-kNN baseline predicts — the median of the k neighbours' normalised labels equals the
    normalised median, the normalisation being monotone — except that a query whose
    fingerprint is a table row (a training sample) leaves that row out, so the estimate a head
    trains on is the leave-one-out one, no better than what it gets on a new sample."""

    task: str
    features: np.ndarray   # float64 [n, F]: standardised train fingerprints
    labels: np.ndarray     # float64 [n]: normalised train targets
    mu: np.ndarray
    sd: np.ndarray
    k: int

    @classmethod
    def fit(cls, td) -> "KnnPrior":
        from fedfm.tasks import normalise_target

        if td.task not in ("DE", "PE"):
            raise ValueError(f"KnnPrior: task {td.task!r} is not allowed; expected DE or PE")
        if td.num_samples < 2:
            raise ValueError(f"KnnPrior: {td.site} {td.task} has {td.num_samples} train samples; needs at least 2")
        fit = _fit_knn(td, None)
        return cls(td.task, fit["features"], normalise_target(td.task, td.targets).astype(np.float64),
                   fit["mu"], fit["sd"], int(fit["k"]))

    def estimate(self, inputs: np.ndarray) -> np.ndarray:
        """complex [B, G, K, N] (unit-power observations) → float32 [B] normalised estimates."""
        q = (profile_features(inputs) - self.mu) / self.sd
        d2 = (q ** 2).sum(1)[:, None] - 2 * q @ self.features.T + (self.features ** 2).sum(1)[None]
        d2 = np.where(d2 < SELF_MATCH_D2, np.inf, d2)
        # k as the baseline takes it on a new sample (min(k, n)); a left-out self-match sits at
        # inf and is dropped from the median, so a train sample gets its n - 1 others at most
        k = min(self.k, self.features.shape[0])
        nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
        labels = np.where(np.isfinite(np.take_along_axis(d2, nearest, 1)), self.labels[nearest], np.nan)
        return np.nanmedian(labels, 1).astype(np.float32)


@dataclass
class LosPrior:
    """A site's LoS-logistic fit on its own labelled train samples, as the LoS head reads it
    (``fedfm.model.network``: an untrained LoS head at a site that has one outputs this fit's
    log-odds, so it calls LoS exactly where that baseline does). Kept at the site; never sent
    anywhere. Tuples, not arrays, so that two fits compare equal by value. Unlike KnnPrior's
    leave-one-out estimate, a train sample's log-odds are in-sample: six parameters on hundreds of samples
    do not overfit (default.yaml's training sites, all 512 train samples: train accuracy 98.2 /
    99.2 / 93.0 / 94.9 % against test 99.2 / 99.6 / 93.4 / 94.9 %)."""

    mu: tuple[float, ...]   # the features' train mean and standard deviation
    sd: tuple[float, ...]
    w: tuple[float, ...]    # weights on the standardised features
    b: float

    @classmethod
    def fit(cls, td) -> "LosPrior":
        if td.task != "LoS":
            raise ValueError(f"LosPrior: task {td.task!r} is not allowed; expected LoS")
        f = _fit_los_lr(td, None)
        return cls(tuple(f["mu"]), tuple(f["sd"]), tuple(f["w"]), f["b"])

    def logit(self, inputs: np.ndarray) -> np.ndarray:
        """complex [B, G, K, N] → float32 [B]: the log-odds of LoS whose sigmoid is the
        LoS-logistic baseline's p (clipped to ±20 as ``_los_lr`` clips it)."""
        return _lr_logit(profile_features(inputs), self.mu, self.sd, self.w, self.b).astype(np.float32)


@dataclass
class BfPrior:
    """The angular spectrum (Bartlett or Capon) the site's BF-AoA baseline chose on its own
    labelled train samples; an untrained BF head at a site that has one reads its beam from
    that spectrum, as the baseline does. Kept at the site; never sent anywhere."""

    method: str

    @classmethod
    def fit(cls, td) -> "BfPrior":
        if td.task != "BF":
            raise ValueError(f"BfPrior: task {td.task!r} is not allowed; expected BF")
        return cls(_fit_bf(td, None)["method"])


def _rx_power_db(td) -> np.ndarray:
    """Received channel power [dB]: inputs have unit power, so it is 20 log10(scale), less the
    share the estimation noise added (10 log10(1 + 1/snr))."""
    snr = 10.0 ** (np.asarray(td.extras["snr_db"], np.float64) / 10.0)
    return 20.0 * np.log10(np.asarray(td.scale, np.float64)) - 10.0 * np.log10(1.0 + 1.0 / snr)


def _fit_logdist(td, spec) -> dict:
    """Least-squares line from received power [dB] to log10 range (DE) or path loss [dB] (PE).

    Regressing the label on power, not power on log-range and inverting, keeps shadow fading
    (TR 38.901 Table 7.4.1-1: σ_SF 4–8 dB) from blowing ranges up when the line is inverted."""
    y = np.log10(td.targets.astype(np.float64)) if td.task == "DE" else td.targets.astype(np.float64)
    b, a = np.polyfit(_rx_power_db(td), y, 1)
    return {"a": float(a), "b": float(b)}


def _logdist(td, a, b) -> np.ndarray:
    y = a + b * _rx_power_db(td)
    return (10.0 ** y if td.task == "DE" else y).astype(np.float32)


# ---- LoS: K-factor threshold ------------------------------------------------------------
def _fit_los(td, spec) -> dict:
    """The threshold on log peak-power share with the best train accuracy (±inf: one class)."""
    r = np.log(peak_power_ratio(td.inputs))
    order = np.argsort(r)
    r, y = r[order], np.asarray(td.targets)[order] == 1
    # Threshold below sorted sample i: NLoS called right among the first i, LoS among the rest.
    correct = np.concatenate([[0], np.cumsum(~y)]) + np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    cands = np.concatenate([[-np.inf], (r[1:] + r[:-1]) / 2, [np.inf]])
    return {"threshold": float(cands[int(np.argmax(correct))])}


def _los(td, threshold) -> np.ndarray:
    r = np.log(peak_power_ratio(td.inputs))
    # A sigmoid of the margin: p ≥ 0.5 exactly where the fitted rule says LoS.
    return (1.0 / (1.0 + np.exp(-8.0 * np.clip(r - threshold, -10, 10)))).astype(np.float32)


# ---- LoS: logistic regression on the profile features -----------------------------------
LOS_LR_RIDGE = 1e-4   # λ on ‖w‖² (standardised features); chosen on the benchmark's train sites


def _fit_los_lr(td, spec, ridge: float = LOS_LR_RIDGE) -> dict:
    """Ridge logistic regression, P(LoS) = σ(w·z + b) with z the standardised
    ``profile_features``: minimises mean BCE + ridge ‖w‖² (b unpenalised) by Newton's method.

    Written here rather than taken from scikit-learn (not a dependency) for six parameters;
    the penalty keeps the Hessian positive definite, so Newton converges on separable data
    too. A train split with one class gives w = 0 and b = ±10 (that class everywhere)."""
    if len(td.inputs) == 0:
        raise ValueError(f"LoS-logistic: site {td.site} has no LoS train samples to fit on; expected at least 1")
    f = profile_features(td.inputs)
    bad = ~np.isfinite(f).all(1)
    if bad.any():
        raise ValueError(f"LoS-logistic: site {td.site}: {int(bad.sum())} of {len(f)} train samples have non-finite "
                         f"profile features (an all-zero or non-finite channel); expected finite, non-zero CSI")
    mu, sd = f.mean(0), f.std(0)
    # a constant feature (a site with one subcarrier or antenna) leaves rounding noise of ~1e-16
    # in its std, which would blow any other value up by 1e15: such a column is left unscaled
    sd = np.where(sd > 1e-9 * np.maximum(1.0, np.abs(mu)), sd, 1.0)
    y = (np.asarray(td.targets) == 1).astype(np.float64)
    F = f.shape[1]
    if y.min() == y.max():
        return {"mu": mu.tolist(), "sd": sd.tolist(), "w": [0.0] * F, "b": 10.0 if y[0] else -10.0}
    X = np.concatenate([(f - mu) / sd, np.ones((len(y), 1))], 1)
    pen = np.full(F + 1, 2.0 * ridge)
    pen[-1] = 0.0
    theta = np.zeros(F + 1)
    theta[-1] = np.log(y.mean() / (1 - y.mean()))
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ theta, -30, 30)))
        grad = X.T @ (p - y) / len(y) + pen * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X / len(y) + np.diag(pen)
        # a tiny jitter keeps the solve defined when p saturates on the unpenalised intercept
        step = np.linalg.solve(hess + 1e-10 * np.eye(F + 1), grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return {"mu": mu.tolist(), "sd": sd.tolist(), "w": theta[:-1].tolist(), "b": float(theta[-1])}


def _lr_logit(features, mu, sd, w, b) -> np.ndarray:
    z = (features - np.asarray(mu)) / np.asarray(sd) @ np.asarray(w) + b
    return np.clip(z, -20, 20)


def _los_lr(td, mu, sd, w, b) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-_lr_logit(profile_features(td.inputs), mu, sd, w, b)))).astype(np.float32)


# ---- registry, fitting and evaluation ----------------------------------------------------
def _no_fit(td, spec) -> dict:
    return {}


_METHODS: dict[str, tuple[Callable, Callable]] = {
    "CE-interp": (_no_fit, _ce_interp), "CE-LMMSE": (_fit_ce_lmmse, _ce_lmmse),
    "CE-LMMSE3D": (_fit_lmmse3d, _lmmse3d),
    "CP-hold": (_no_fit, _cp_hold), "CP-linear": (_no_fit, _cp_linear), "CP-LMMSE3D": (_fit_lmmse3d, _lmmse3d),
    "PF-AR": (_fit_pf_ar, _pf_ar), "PF-linear": (_fit_pf_line, _pf_line),
    "PF-ARLMMSE": (_fit_pf_ar_lmmse, _pf_ar_lmmse),
    "BF-AoA": (_fit_bf, _bf_aoa),
    "DE-kNN": (_fit_knn, _knn), "DE-logdist": (_fit_logdist, _logdist),
    "PE-kNN": (_fit_knn, _knn), "PE-logdist": (_fit_logdist, _logdist),
    "LoS-Kfactor": (_fit_los, _los), "LoS-logistic": (_fit_los_lr, _los_lr),
}


def fit_baseline(task: str, train_td, spec: SiteSpec, name: str | None = None) -> Baseline:
    """Fit a task's baseline on its train-split TaskData (``name`` None = the headline one)."""
    if task not in BASELINES:
        raise ValueError(f"task {task!r} is not allowed; expected one of {', '.join(TASKS)}")
    name = name or BASELINES[task][0]
    if name not in BASELINES[task]:
        raise ValueError(f"baseline {name!r} is not a {task} baseline; expected one of {', '.join(BASELINES[task])}")
    if train_td.task != task:
        raise ValueError(f"fit_baseline({task!r}): got a {train_td.task} TaskData")
    return Baseline(name, task, _METHODS[name][0](train_td, spec))


def evaluate_baselines(site_data, spec: SiteSpec, split: str = "test", variants: bool = False,
                       tasks: tuple[str, ...] = TASKS) -> dict[str, dict[str, float]]:
    """Fit on the site's train split, score on ``split``.

    Returns ``{task: metrics}`` of each task's headline baseline, or with ``variants``
    ``{baseline name: metrics}`` of every baseline (each metrics dict also holds 'error',
    the number the average score compares)."""
    train = build_tasks(site_data.splits["train"], spec, "train", tasks)
    test = build_tasks(site_data.splits[split], spec, split, tasks)
    out = {}
    for task in tasks:
        for name in BASELINES[task] if variants else BASELINES[task][:1]:
            m = score(task, fit_baseline(task, train[task], spec, name).predict(test[task]), test[task])
            out[name if variants else task] = {**m, "error": error_for_score(task, m)}
    return out
