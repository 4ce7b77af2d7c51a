"""Classical estimators shared by the baselines and the model's priors (one implementation).

    pred = ar_extrapolate(x, k0=32, order=16)           # PF: AR across subcarriers, per sample
    pred = lmmse_ar_extrapolate(x, 32, 16, covs, snr)   # PF: the same on the LMMSE-denoised band
    p = angular_spectrum(x, num_beams=256, method="capon")  # BF: sub-6 spectrum at the beams' u
    h = kron_lmmse(y, kron_covariances(train_h), observed, snr)  # CE/CP: Kronecker LMMSE

numpy only (complex arrays [S, G, K, N]); ``fedfm.baselines`` fits their hyper-parameters on
a site's train split and ``fedfm.model.prior`` / ``fedfm.model.heads`` start from them.
"""
from __future__ import annotations

import numpy as np

from fedfm.channels.codebook import beam_grid, ula_steering


def lag_covariance(x: np.ndarray, order: int, chunk: int = 64) -> np.ndarray:
    """C[i, j] = Σ conj(x_{k-p+i}) x_{k-p+j} over k, slots and antennas: complex128 [S, p+1, p+1].

    x: complex [S, G, K0, N]. Chunked over samples to bound the lag matrix's memory."""
    S, G, K0, N = x.shape
    out = np.empty((S, order + 1, order + 1), np.complex128)
    for s0 in range(0, S, chunk):
        seq = x[s0:s0 + chunk].transpose(0, 1, 3, 2).reshape(-1, G * N, K0)
        L = np.stack([seq[:, :, j:K0 - order + j] for j in range(order + 1)], -1).reshape(seq.shape[0], -1, order + 1)
        out[s0:s0 + chunk] = np.matmul(np.conj(L.transpose(0, 2, 1)), L)
    return out


def ar_coefficients(x: np.ndarray, order: int) -> np.ndarray:
    """Forward-backward least-squares AR fit across subcarriers (the modified covariance
    method), pooled over slots and antennas: x complex [S, G, K0, N] → a complex [S, p] with
    x_k ≈ Σ_i a_i x_{k-i}. The paths' delays are common to every slot and antenna
    (TR 38.901 §7.5), so one predictor per sample serves them all."""
    C = lag_covariance(x, order)
    p = order
    i = np.arange(1, p + 1)
    F, f = C[:, p - i[:, None], p - i[None, :]], C[:, p - i, p]       # forward normal equations
    B, b = np.conj(C[:, i[:, None], i[None, :]]), np.conj(C[:, i, 0])  # backward (conjugate) ones
    A = F + B
    A += 1e-6 * np.trace(A, axis1=1, axis2=2).real[:, None, None] / p * np.eye(p)  # noise-only samples
    return np.linalg.solve(A, (f + b)[..., None])[..., 0]


def stabilise(a: np.ndarray) -> np.ndarray:
    """Pull AR poles outside the unit circle back onto it: a growing mode would explode over
    half a band, and a channel's modes e^{-j2πfτ} have |z| = 1. a complex [S, p] → [S, p]."""
    S, p = a.shape
    comp = np.zeros((S, p, p), np.complex128)                          # companion matrix of z^p - Σ a_i z^{p-i}
    comp[:, 0] = a
    comp[:, np.arange(1, p), np.arange(p - 1)] = 1.0
    z = np.linalg.eigvals(comp)
    z = np.where(np.abs(z) > 1.0, z / np.abs(z), z)
    poly = np.zeros((S, p + 1), np.complex128)                         # Π (1 - z_i q), q = z^-1
    poly[:, 0] = 1.0
    for r in range(p):
        poly[:, 1:] = poly[:, 1:] - z[:, r:r + 1] * poly[:, :-1]
    return -poly[:, 1:]


def ar_extrapolate(x: np.ndarray, k0: int, order: int) -> np.ndarray:
    """Extend each sample's first ``k0`` subcarriers to all K by its own stabilised AR(order)
    predictor. x: complex [S, G, K, N] (values at k >= k0 ignored) → complex64, first k0 kept."""
    a = stabilise(ar_coefficients(x[:, :, :k0], order)).astype(np.complex64)   # [S, p]
    pred = np.array(x, dtype=np.complex64, copy=True)
    for k in range(k0, x.shape[2]):
        past = pred[:, :, k - order:k][:, :, ::-1]                           # x_{k-1}, …, x_{k-p}
        pred[:, :, k] = np.matmul(a[:, None, None, :], past)[:, :, 0]           # Σ_i a_i x_{k-i}
    return pred


def lmmse_ar_extrapolate(x: np.ndarray, k0: int, order: int, covs: tuple, snr: np.ndarray | float) -> np.ndarray:
    """:func:`ar_extrapolate` of the lower band after the site's Kronecker LMMSE has denoised it
    (:func:`kron_lmmse` of the observed k < k0 from themselves, at linear ``snr``, scalar or [S]):
    the predictor runs on estimates, not on noisy samples whose noise it would carry across the
    upper band. x: complex [S, G, K, N]; covs: :func:`kron_covariances` over at least G slots and
    all K subcarriers → complex64 [S, G, K, N] (first k0: the denoised band)."""
    S, G, K, N = x.shape
    low = (covs[0][:G, :G], covs[1][:k0, :k0], covs[2])
    den = np.array(x, dtype=np.complex64, copy=True)
    den[:, :, :k0] = kron_lmmse(x[:, :, :k0], low, (np.arange(G), np.arange(k0), np.arange(N)), snr)
    return ar_extrapolate(den, k0, order)


def spatial_covariance(x: np.ndarray) -> np.ndarray:
    """Sample covariance over slots and subcarriers: x [S, G, K, N] → complex128 [S, N, N]."""
    v = x.reshape(x.shape[0], -1, x.shape[3])
    R = np.matmul(v.transpose(0, 2, 1), v.conj()) / v.shape[1]                 # Σ_m v_i v_j*
    return R.astype(np.complex128)


def quadratic_form(A: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Re(a_bᴴ R_s a_b) for every beam b and sample s: A [B, N], R [S, N, N] → float64 [S, B]."""
    return np.sum((A.conj()[None] @ R) * A[None], axis=-1).real


def angular_spectrum(x: np.ndarray, num_beams: int, method: str = "bartlett") -> np.ndarray:
    """Angular spectrum of the sub-6 array at each codebook beam's u = sin(θ): float32 [S, B],
    peak 1 per sample. x: complex [S, G, K, N].

    Both ULAs have half-wavelength spacing at their own carrier, so one direction has the
    same u in both bands and the codebook's steering vectors (fedfm.channels.codebook) scan
    the sub-6 array too; the best-scored beam is the one nearest the estimated AoA."""
    if method not in ("bartlett", "capon"):
        raise ValueError(f"angular_spectrum: method {method!r} is not one of bartlett, capon")
    R = spatial_covariance(x)
    N = R.shape[1]
    A = ula_steering(N, beam_grid(num_beams)).astype(np.complex128)             # [B, N]
    if method == "capon":  # MVDR: 1 / aᴴR⁻¹a, sharper peaks than Bartlett with 8 antennas
        Rinv = np.linalg.inv(R + 1e-3 * np.trace(R, axis1=1, axis2=2).real[:, None, None] / N * np.eye(N))
        p = 1.0 / np.maximum(quadratic_form(A, Rinv), 1e-30)
    else:  # Bartlett: aᴴRa
        p = quadratic_form(A, R)
    return (p / np.maximum(p.max(axis=1, keepdims=True), 1e-30)).astype(np.float32)


# ---- Kronecker time × frequency × antenna LMMSE (CE, CP) ----------------------------------
# Written here, not taken from a library: Sionna's LMMSE interpolator is TensorFlow (fedfm's
# Sionna is the PyTorch one, without it), and this one is three small eigendecompositions.
def kron_covariances(h: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R_t, R_f, R_s): the site's slot, subcarrier and antenna covariances of channels
    h complex [S, G, K, N], each complex128 with unit mean diagonal, so R_t ⊗ R_f ⊗ R_s is a
    unit-power covariance of the whole grid (the Kronecker model of a channel whose time,
    frequency and space correlations separate; TR 38.901 channels nearly do: Doppler, delays
    and angles are drawn per path). Each sample is scaled to unit mean power first, so every
    sample weighs the same: a site's raw channels carry their path loss, seven decades of
    power across a cell, and would leave the covariances to the few UEs nearest the mast (the
    models' inputs are scaled per sample too). Chunked over samples to bound memory."""
    S, G, K, N = h.shape
    Rt, Rf, Rs = (np.zeros((n, n), np.complex128) for n in (G, K, N))
    for s0 in range(0, S, chunk):
        x = np.asarray(h[s0:s0 + chunk], np.complex128)
        x = x / np.sqrt(np.maximum(np.mean(np.abs(x) ** 2, axis=(1, 2, 3), keepdims=True), 1e-300))
        Rt += np.einsum("sgkn,shkn->gh", x, x.conj())
        Rf += np.einsum("sgkn,sgln->kl", x, x.conj())
        Rs += np.einsum("sgkn,sgkm->nm", x, x.conj())
    return tuple(R / max(np.trace(R).real / R.shape[0], 1e-30) for R in (Rt, Rf, Rs))


def kron_lmmse(y: np.ndarray, covs: tuple[np.ndarray, np.ndarray, np.ndarray], observed: tuple,
               snr: np.ndarray | float, out_slots: int | None = None) -> np.ndarray:
    """LMMSE estimate of the whole grid from y = h + n seen on a Kronecker set of entries.

    y: complex [S, t, k, n], the observation on slots ``observed[0]``, subcarriers
    ``observed[1]``, antennas ``observed[2]`` (index arrays into the grid of ``covs``);
    covs: (R_t, R_f, R_s) of :func:`kron_covariances`; snr: linear, scalar or [S] (noise
    power 1/snr against unit channel power). Returns complex64 [S, G, K, N], G = out_slots
    (default R_t's size): ĥ = R_ho (R_oo + I/snr)⁻¹ y, with R_oo's inverse read off the
    eigendecompositions of the three observed blocks (R_oo = ⊗ U_i Λ_i U_iᴴ), so the cost is
    three small einsums, not an inverse of a (t·k·n)² matrix. The scale of y cancels."""
    A, L, B = kron_lmmse_factors(covs, observed, out_slots)
    snr = np.asarray(snr, np.float64).reshape(-1, 1, 1, 1)
    z = kron_apply(A, np.asarray(y, np.complex128)) / (L[None] + 1.0 / snr)
    return kron_apply(B, z).astype(np.complex64)


def kron_error_variance(covs: tuple, observed: tuple, snr: float, out_slots: int | None = None) -> np.ndarray:
    """Per-entry error variance of :func:`kron_lmmse` under its own model: float64 [G, K, N],
    the diagonal of R − R_ho (R_oo + I/snr)⁻¹ R_oh (unit channel power), i.e.
    diag(R_t) ⊗ diag(R_f) ⊗ diag(R_s) − Σ_j |B_j|² / (Λ_j + 1/snr) with the factors of
    :func:`kron_lmmse_factors` (B = B_t ⊗ B_f ⊗ B_s, so |B|² factors too). Where the estimate
    is sure (a pilot at high SNR, a strongly correlated channel) this is small; the dense heads
    scale their learned correction by its square root (``fedfm.model.prior``)."""
    A, L, B = kron_lmmse_factors(covs, observed, out_slots)
    G = B[0].shape[0]
    d = [np.real(np.diagonal(R))[:n] for R, n in zip(covs, (G, None, None))]
    prior = d[0][:, None, None] * d[1][None, :, None] * d[2][None, None, :]
    explained = kron_apply([np.abs(b) ** 2 for b in B], (1.0 / (L + 1.0 / float(snr)))[None])[0]
    return np.maximum(prior - explained, 0.0)


def kron_apply(mats, y, einsum=np.einsum):
    """(M_t ⊗ M_f ⊗ M_s) applied to every sample of y [S, t, k, n] → [S, t', k', n'], one axis at a
    time (three small matrix products; one einsum over all four operands would loop over every
    index combination: 111 ms instead of 1 ms per batch of 16 in torch). ``einsum``: np.einsum,
    or torch.einsum for tensors (``fedfm.model.prior``)."""
    y = einsum("at,stkn->sakn", mats[0], y)
    y = einsum("bk,sakn->sabn", mats[1], y)
    return einsum("cn,sabn->sabc", mats[2], y)


def kron_lmmse_factors(covs: tuple, observed: tuple, out_slots: int | None = None):
    """(A, Λ, B) of :func:`kron_lmmse`: A_i = U_iᴴ [r_i, o_i] (into the eigenbasis of the observed
    block), Λ [r_t, r_k, r_n] the products of the blocks' eigenvalues, B_i = R_i[:, o_i] U_i
    [n_i, r_i] (back to the whole grid). ``fedfm.model.prior`` applies the same factors in torch."""
    Rt, Rf, Rs = covs
    G = Rt.shape[0] if out_slots is None else int(out_slots)
    if not 0 < G <= Rt.shape[0]:
        raise ValueError(f"kron_lmmse: {G} output slots, but the time covariance covers {Rt.shape[0]}")
    A, lams, B = [], [], []
    for R, o in zip((Rt[:G, :G], Rf, Rs), observed):
        o = np.asarray(o, np.int64)
        lam, U = np.linalg.eigh(R[np.ix_(o, o)])
        lams.append(np.clip(lam, 0.0, None))       # a sample covariance: tiny negative round-off
        A.append(U.conj().T)
        B.append(R[:, o] @ U)
    L = lams[0][:, None, None] * lams[1][None, :, None] * lams[2][None, None, :]
    return A, L, B


def kron_observed(known: np.ndarray) -> tuple | None:
    """(slots, subcarriers, antennas) index arrays when bool ``known`` [G, K, N] is their
    Kronecker product (CE's pilot comb, CP's history), else None (the random masks of
    pretraining, which this estimator does not serve)."""
    known = np.asarray(known, bool)
    idx = tuple(np.flatnonzero(known.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    if not all(len(i) for i in idx) or known.sum() != np.prod([len(i) for i in idx]):
        return None
    return idx


class ChannelStats:
    """A site's Kronecker channel covariances (:func:`kron_covariances` over history and horizon
    slots), its nominal SNR and the AR order of its PF predictor (chosen on its train channels
    as the PF-ARLMMSE baseline chooses it; None = the prior's default): what the CE, CP and PF
    heads' classical start needs. Fitted where the site's channels are
    (``fedfm.federated.site_channel_stats``) and never sent anywhere. ``factors`` caches the
    prior's torch factors per known pattern and device."""

    def __init__(self, covs: tuple[np.ndarray, np.ndarray, np.ndarray], snr_db: float,
                 pf_order: int | None = None):
        self.covs = tuple(np.asarray(c, np.complex128) for c in covs)
        self.snr_db = float(snr_db)
        self.pf_order = None if pf_order is None else int(pf_order)
        self.factors: dict = {}

    @classmethod
    def fit(cls, h: np.ndarray, snr_db: float) -> "ChannelStats":
        return cls(kron_covariances(h), snr_db)
