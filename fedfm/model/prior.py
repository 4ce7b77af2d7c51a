"""Classical first guesses that the heads correct (model-based residual learning).

A dense head outputs ``prior(x, known) + learned correction``. With the correction
initialised to zero, an untrained model already equals the classical estimator on the
grid it fills — CE: linear interpolation of the pilot comb across sub-bands; CP: the last
observed slot held; PF: each sample's own AR predictor across sub-bands (order K0/2, at
most 16: the order the PF-AR baseline picks on every default site) — and training only has
to learn what the classical estimator misses. Where the site's channel statistics come with
the data (``fedfm.estimators.ChannelStats``, fitted by ``fedfm.federated.load_site_tasks`` on
the site's own train channels), CE and CP start instead from the site's time × frequency ×
antenna Kronecker LMMSE (the CE-LMMSE3D / CP-LMMSE3D baselines at the site's nominal SNR),
which on ``benchmark.yaml`` is 0.42 / 0.33 of interpolation / hold on UMa, below what the
heads learned on top of interpolation / hold (0.54 / 0.71); and PF runs its AR predictor on
the lower band as that LMMSE denoises it, at the order chosen on the site's train channels
(``ChannelStats.pf_order``; the PF-ARLMMSE baseline: 0.65–0.93 of PF-AR there, 300 test
samples a site, where the heads had learned 0.80–0.92 on top of plain AR; the default order
16 cost RMa 0.44 dB against the 12 its channels choose, default federation).

The pooled heads get the classical *inputs* the baselines read (``side_inputs``): the
profile fingerprint of ``fedfm.tasks.sensing`` (delay and angle spreads, peak shares, the
K-factor proxy) and the site context (``fedfm.tasks.site_context``: environment, carrier,
bandwidth, antennas — what a per-site baseline knows by being fitted per site) for BF/DE/PE/LoS, and for BF the sub-6 Bartlett and Capon angular spectra
at the codebook's beams, whose log the BF head starts from (an untrained BF head picks the
Capon AoA beam). A mean-pooled token embedding carries none of these quadratic
statistics linearly, and a CPU-sized backbone does not learn them in a few hundred steps.
These are parameter-free functions of the observed input; they run in numpy (no gradient
flows into the input) and cost a host copy on GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from fedfm.estimators import (ChannelStats, angular_spectrum, ar_extrapolate, kron_apply, kron_error_variance,
                              kron_lmmse_factors, kron_observed)
from fedfm.tasks import CONTEXT_SIZE
from fedfm.tasks.sensing import profile_features

PRIORS = {"CE": "comb", "CP": "hold", "PF": "ar"}
AR_MAX_ORDER = 16
NUM_PROFILE_FEATURES = 5    # fedfm.tasks.sensing.profile_features
# Fixed affine scaling of the profile features (log delay spread, log angle spread, log peak
# shares of PDP, angle profile and delay-angle profile): their typical centre and spread on
# TR 38.901 channels at 10 dB SNR (pooled train splits of the default training sites, rounded).
# Raw, they sit at ±2.5 with spreads of 0.15–0.6, so the weights that read them (a K-factor
# threshold is a slope of ~10 per unit) were hundreds of Adam steps away. Constants, not
# statistics of a run's data, so every site and the server scale alike.
PROFILE_CENTER = (-1.65, -1.75, -0.7, -1.9, -2.3)
PROFILE_SCALE = (0.15, 0.25, 0.5, 0.35, 0.6)
PEAK_SHARE_FEATURE = 4      # index of log(delay-angle peak share), the K-factor proxy
SPECTRUM_METHODS = ("bartlett", "capon")
SPECTRUM_FLOOR = 1e-4       # log-spectra clipped at -40 dB below the peak
ERROR_STD_FLOOR = 1e-3      # the LMMSE error scale of the CE/CP correction, at least -60 dB of the channel


def comb_weights(comb: torch.Tensor) -> torch.Tensor:
    """W [K, K] with y[k] = Σ_j W[k, j] x[j]: linear interpolation between the known sub-bands
    ``comb`` (bool [K]; nearest known one beyond the first/last; W = I where every sub-band is
    known). Built with tensor ops on ``comb``'s device: nothing is read back to the host, so on a
    GPU the CE head does not wait for the device at every call (it did through numpy)."""
    K = comb.numel()
    k = torch.arange(K, device=comb.device)
    left = torch.where(comb, k, -1).cummax(0).values                             # last pilot <= k, -1: none
    right = K - 1 - torch.where(comb.flip(0), k, -1).cummax(0).values.flip(0)    # first pilot >= k, K: none
    left, right = torch.where(left < 0, right, left), torch.where(right >= K, left, right)
    left, right = left.clamp(0, K - 1), right.clamp(0, K - 1)   # no pilot at all: the input is zeros anyway
    span = (right - left).float()
    w_left = torch.where(span > 0, (right - k).float() / span.clamp(min=1), torch.ones_like(span))
    w_right = torch.where(span > 0, (k - left).float() / span.clamp(min=1), torch.zeros_like(span))
    w = torch.zeros(K, K, device=comb.device)
    return w.scatter_add(1, left[:, None], w_left[:, None]).scatter_add(1, right[:, None], w_right[:, None])


def kron_prior(stats: ChannelStats, x: torch.Tensor,
               known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The site's Kronecker LMMSE (``fedfm.estimators.kron_lmmse``) of the grid from what ``known``
    shows, in torch on x's device, and the square root of its own error variance per entry
    (``fedfm.estimators.kron_error_variance``): x [B, G, K, N, 2] → ([B, G, K, N, 2], [G, K, N]);
    None where ``known`` is not a slots × subcarriers × antennas set or the site's covariances
    do not fit the grid. The factors are built once per known pattern and device at the site's
    nominal SNR."""
    G, K, N = known.shape
    Rt, Rf, Rs = stats.covs
    if Rt.shape[0] < G or Rf.shape[0] != K or Rs.shape[0] != N:
        return None
    # The pattern's key is read off the host once per mask tensor and kept on the tensor (with its
    # version counter, so an in-place change is seen): a training loop passes the same mask tensor
    # at every step, and on a GPU a host read per call would wait for the device.
    tag = getattr(known, "_fedfm_pattern", None)
    if tag is None or tag[0] != known._version:
        mask = known.detach().cpu().numpy()
        tag = (known._version, (mask.shape, np.packbits(mask).tobytes()))
        known._fedfm_pattern = tag
    key = (*tag[1], str(x.device))
    f = stats.factors.get(key, False)
    if f is False:
        obs = kron_observed(known.detach().cpu().numpy())
        if obs is None:
            f = None
        else:
            A, L, B = kron_lmmse_factors(stats.covs, obs, G)
            c = lambda a: torch.as_tensor(a, dtype=torch.complex64, device=x.device)
            d = torch.as_tensor(1.0 / (L + 10.0 ** (-stats.snr_db / 10.0)), dtype=torch.float32, device=x.device)
            std = np.sqrt(np.maximum(kron_error_variance(stats.covs, obs, 10.0 ** (stats.snr_db / 10.0), G),
                                     ERROR_STD_FLOOR ** 2))
            f = ([torch.as_tensor(o, device=x.device) for o in obs], [c(a) for a in A], d, [c(b) for b in B],
                 torch.as_tensor(std, dtype=torch.float32, device=x.device))
        stats.factors[key] = f
    if f is None:
        return None
    obs, A, d, B, std = f
    y = torch.view_as_complex(x.float().contiguous())
    y = y.index_select(1, obs[0]).index_select(2, obs[1]).index_select(3, obs[2])
    z = kron_apply(A, y, torch.einsum) * d
    return torch.view_as_real(kron_apply(B, z, torch.einsum).contiguous()).to(x.dtype), std


def classical_prior(kind: str, x: torch.Tensor, known: torch.Tensor,
                    stats: ChannelStats | None = None) -> torch.Tensor:
    """x: [B, G, K, N, 2] with zeros where unknown; known: bool [G, K, N] → [B, G, K, N, 2].
    With the site's ``stats``, CE ("comb") and CP ("hold") start from its Kronecker LMMSE."""
    return prior_and_scale(kind, x, known, stats)[0]


def prior_and_scale(kind: str, x: torch.Tensor, known: torch.Tensor,
                    stats: ChannelStats | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(:func:`classical_prior`, its error's standard deviation [G, K, N] or None). The scale is
    known only for the Kronecker LMMSE (its own posterior error, unit channel power); None
    elsewhere, where the dense head adds its correction unscaled."""
    observed = x * known.to(x.dtype)[..., None]
    if kind == "observed" or known.dim() != 3:
        return observed, None
    if stats is not None and kind in ("comb", "hold"):
        lmmse = kron_prior(stats, observed, known)
        if lmmse is not None:
            return lmmse
    if stats is not None and kind == "ar":
        bands = known.any(dim=(0, 2))
        k0 = int(bands.sum())
        lmmse = kron_prior(stats, observed, known) if 4 <= k0 < bands.numel() and bands[:k0].all() else None
        if lmmse is not None:   # PF: AR over the LMMSE-denoised lower band (fedfm.estimators.lmmse_ar_extrapolate)
            den = torch.where(known[..., None], lmmse[0], observed)
            pred = ar_extrapolate(_complex(den), k0, min(stats.pf_order or AR_MAX_ORDER, k0 // 2))
            return torch.view_as_real(torch.from_numpy(pred)).to(x), None
    return _plain_prior(kind, x, known, observed), None


def _plain_prior(kind: str, x: torch.Tensor, known: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    if kind == "comb":
        comb = known.any(dim=(0, 2))                               # (K,) sub-bands carrying pilots
        return torch.einsum("jk,bgknc->bgjnc", comb_weights(comb).to(x), observed)
    if kind == "ar":
        bands = known.any(dim=(0, 2))                              # (K,) observed sub-bands
        k0 = int(bands.sum())
        if k0 < 4 or bands.all() or not bands[:k0].all():          # needs a contiguous lower band
            return observed
        xc = _complex(observed)
        pred = ar_extrapolate(xc, k0, min(AR_MAX_ORDER, k0 // 2))
        return torch.view_as_real(torch.from_numpy(pred)).to(x)
    if kind == "hold":
        slots = known.any(dim=(1, 2))                              # (G,) observed slots
        if not slots.any() or slots.all():
            return observed
        last = int(torch.nonzero(slots)[-1])
        held = observed.clone()
        held[:, last + 1:] = observed[:, last:last + 1]
        return held
    raise ValueError(f"classical_prior: kind {kind!r} is not one of {', '.join(sorted(set(PRIORS.values())))}")


def _complex(x: torch.Tensor) -> np.ndarray:
    """[B, G, K, N, 2] real → complex64 numpy [B, G, K, N] (detached, on the host)."""
    return torch.view_as_complex(x.detach().float().cpu().contiguous()).numpy()


def scaled_profile_features(xc: np.ndarray) -> np.ndarray:
    """Profile fingerprint, centred and scaled by the fixed constants: complex [B, G, K, N] → float32 [B, 5]."""
    f = (profile_features(xc) - np.asarray(PROFILE_CENTER)) / np.asarray(PROFILE_SCALE)
    return f.astype(np.float32)


def side_inputs(task: str, x: torch.Tensor, num_beams: int,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Classical inputs of a pooled head: (features [B, 5 + CONTEXT_SIZE],) — the scaled profile
    fingerprint and the site context ([C] or [B, C]; None = zeros) — and for BF also log
    angular spectra [B, 2, num_beams] (Bartlett, Capon; peak 0, floor ln 1e-4)."""
    xc = _complex(x)
    B = x.shape[0]
    ctx = torch.zeros(B, CONTEXT_SIZE) if context is None else context.float().cpu().reshape(-1, CONTEXT_SIZE).expand(B, -1)
    feats = torch.cat([torch.from_numpy(scaled_profile_features(xc)), ctx], 1).to(x.device)
    if task != "BF":
        return (feats,)
    spectra = np.stack([angular_spectrum(xc, num_beams, m) for m in SPECTRUM_METHODS], 1)
    logs = torch.from_numpy(np.log(np.maximum(spectra, SPECTRUM_FLOOR)).astype(np.float32)).to(x.device)
    return feats, logs
