"""What a base station observes: noisy estimates at the site's SNR, normalised per sample.

The issue (#2) asks that inputs be estimates, not perfect CSI, and that absolute power be
hidden from the model (LLM4WM normalises its CSI the same way): DE and PE must then be read
from the channel's structure (delays, angles, K-factor), not from a power meter.
"""
from __future__ import annotations

import numpy as np


def _mean_power(a: np.ndarray) -> np.ndarray:
    """Mean |a|² over the last axis of complex [S, M]: float64 [S] (one pass, no complex abs)."""
    v = np.ascontiguousarray(a).view(np.float32 if a.dtype == np.complex64 else np.float64)
    return np.einsum("sm,sm->s", v, v).astype(np.float64) / a.shape[1]


def draw_snr_db(rng: np.random.Generator, num_samples: int, snr_db_min: float, snr_db_max: float) -> np.ndarray:
    """Per-sample estimation SNR, uniform in [snr_db_min, snr_db_max] dB: float32 [S]."""
    return rng.uniform(snr_db_min, snr_db_max, num_samples).astype(np.float32)


def noisy_observation(h: np.ndarray, known: np.ndarray, snr_db: np.ndarray, rng: np.random.Generator
                      ) -> np.ndarray:
    """LS-style estimates ĥ = h + n on the observed elements, zeros elsewhere.

    h: complex [S, G, K, N] true CSI (physical units); known: bool [G, K, N];
    snr_db: float [S]. The noise n ~ CN(0, σ²) with σ² = P_s / 10^(snr/10), P_s the mean
    power of sample s's true channel over its observed elements (the SNR of the estimates
    the BS actually holds). Returns complex64 [S, G, K, N] (physical units).
    """
    S = h.shape[0]
    idx = np.flatnonzero(known)
    flat = h.reshape(S, -1)
    obs = flat if idx.size == flat.shape[1] else flat[:, idx]           # [S, M]
    power = _mean_power(obs)                                            # [S]
    sigma = np.sqrt(power / 10.0 ** (np.asarray(snr_db, np.float64) / 10.0) / 2.0)  # per real dimension
    # Only the observed elements get noise: the same bits whatever the grid size, and no
    # [S, G, K, N] float64 temporary for the 10k-sample benchmark sites.
    noise = rng.standard_normal((S, idx.size, 2), dtype=np.float32).view(np.complex64)[..., 0]
    noise *= sigma.astype(np.float32)[:, None]
    if idx.size == flat.shape[1]:
        return (obs + noise).astype(np.complex64, copy=False).reshape(h.shape)
    x = np.zeros((S, flat.shape[1]), np.complex64)
    x[:, idx] = obs + noise
    return x.reshape(h.shape)


def unit_power_scale(x: np.ndarray, known: np.ndarray) -> np.ndarray:
    """RMS of each sample's observed elements: float32 [S], so that x / scale has unit
    average power over what was observed (``x / scale * scale`` gives physical units back)."""
    idx = np.flatnonzero(known)
    flat = x.reshape(x.shape[0], -1)
    power = _mean_power(flat if idx.size == flat.shape[1] else flat[:, idx])
    return np.sqrt(np.maximum(power, 1e-30)).astype(np.float32)
