"""Classical first guesses that the dense heads correct (model-based residual learning).

A dense head outputs ``prior(x, known) + learned correction``. With the correction
initialised to zero, an untrained model already equals the classical estimator on the
grid it fills — CE: linear interpolation of the pilot comb across sub-bands; CP: the last
observed slot held — and training only has to learn what the classical estimator misses.
PF keeps the observed half and zeros (no cheap classical predictor is worth starting from:
a line across half the band is worse than zero, see the baselines table).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

PRIORS = {"CE": "comb", "CP": "hold", "PF": "observed"}


@functools.lru_cache(maxsize=64)
def _comb_matrix(pattern: bytes, num_k: int) -> np.ndarray:
    """W [K, K] with y[k] = Σ_j W[k, j] x[j]: linear interpolation between the known
    sub-bands (nearest known one beyond the first/last)."""
    known = np.frombuffer(pattern, dtype=bool)
    pilots = np.flatnonzero(known)
    w = np.zeros((num_k, num_k), np.float32)
    for k in range(num_k):
        right = np.searchsorted(pilots, k)
        if right < len(pilots) and pilots[right] == k:
            w[k, k] = 1.0
        elif right == 0:
            w[k, pilots[0]] = 1.0
        elif right == len(pilots):
            w[k, pilots[-1]] = 1.0
        else:
            p0, p1 = pilots[right - 1], pilots[right]
            w[k, p0], w[k, p1] = (p1 - k) / (p1 - p0), (k - p0) / (p1 - p0)
    return w


def classical_prior(kind: str, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """x: [B, G, K, N, 2] with zeros where unknown; known: bool [G, K, N] → [B, G, K, N, 2]."""
    observed = x * known.to(x.dtype)[..., None]
    if kind == "observed" or known.dim() != 3:
        return observed
    if kind == "comb":
        comb = known.any(dim=(0, 2))                               # (K,) sub-bands carrying pilots
        if not comb.any() or comb.all():
            return observed
        w = torch.from_numpy(_comb_matrix(comb.cpu().numpy().tobytes(), comb.numel())).to(x)
        return torch.einsum("jk,bgknc->bgjnc", w, observed)
    if kind == "hold":
        slots = known.any(dim=(1, 2))                              # (G,) observed slots
        if not slots.any() or slots.all():
            return observed
        last = int(torch.nonzero(slots)[-1])
        held = observed.clone()
        held[:, last + 1:] = observed[:, last:last + 1]
        return held
    raise ValueError(f"classical_prior: kind {kind!r} is not one of {', '.join(sorted(set(PRIORS.values())))}")
