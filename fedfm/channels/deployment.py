"""What TR 38.901 predicts for a site from its deployment alone: no channel sample, no label.

    prior = deployment_prior(spec)   # DeploymentPrior(distance_m=214.9, pathloss_db=109.4, ...)

A base station knows its environment, carrier, mast height and the range of distances it
serves. From those, TR 38.901 gives the LoS probability (§7.4.2) and the basic path loss
(§7.4.1) at every distance; over the site's UE distribution (uniform in area between
``distance_min_m`` and ``distance_max_m``, as ``fedfm.channels.synthesis`` drops them) they
give the typical distance, path loss and LoS share of the cell. The pooled DE/PE/LoS heads
start from these values (``fedfm.tasks.site_context``) the way the dense heads start from a
classical estimator: an untrained head is the cell-wide TR 38.901 prediction, and training
learns what the sample's CSI adds. Medians, because DE and PE are trained and scored with
an L1 loss. Shadow fading (zero-mean in dB) and per-sample LoS draws are what the prior
cannot know.

The formulas are Sionna's own (``basic_pathloss``, ``los_probability`` of the scenario
objects the generator uses), evaluated on a deterministic grid of distance quantiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfm.scenarios import SiteSpec, spec_hash

NUM_QUANTILES = 256         # distance grid: quantiles (i + 0.5) / n of the UE distribution
LOS_PROBABILITY_CLIP = 0.01  # a forced LoS/NLoS site gets logit(0.99) / logit(0.01), not ±inf


@dataclass(frozen=True)
class DeploymentPrior:
    distance_m: float        # median 3D UE–BS distance
    pathloss_db: float       # median basic path loss over the cell (LoS/NLoS mixture)
    pathloss_los_db: float   # median basic path loss of the cell's LoS links
    pathloss_nlos_db: float  # median basic path loss of the cell's NLoS links
    los_probability: float   # share of LoS links in the cell


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    if cum[-1] <= 0:
        return float(np.median(values))
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def distance_quantiles(spec: SiteSpec, n: int = NUM_QUANTILES) -> np.ndarray:
    """2D distances [m] at the quantiles (i + 0.5) / n of a uniform-in-area drop: float64 [n]."""
    d0, d1 = spec.ue.distance_min_m, spec.ue.distance_max_m
    q = (np.arange(n) + 0.5) / n
    return np.sqrt(d0 ** 2 + q * (d1 ** 2 - d0 ** 2))


def _prior(spec: SiteSpec) -> DeploymentPrior:
    from fedfm.channels.synthesis import _BS_HEIGHT_M, _UE_HEIGHT_M, _model, _set_topology

    n, env = NUM_QUANTILES, spec.environment
    d2d = distance_quantiles(spec, n)
    drop = {"ut_loc": np.stack([d2d, np.zeros(n), np.full(n, _UE_HEIGHT_M[env])], -1),
            "bs_loc": np.tile([0.0, 0.0, _BS_HEIGHT_M[env]], (n, 1)), "ut_vel": np.zeros((n, 3))}
    model = _model(spec, spec.sub6.carrier_ghz, 1)  # one antenna: only the scenario's formulas are read
    pathloss = {}
    for los in (True, False):
        _set_topology(model, drop, los, env == "inh")
        pathloss[los] = model._scenario.basic_pathloss[:, 0, 0].double().numpy()
    scenario = model._scenario
    distance = scenario.distance_3d[:, 0, 0].double().numpy()
    p = {"auto": scenario.los_probability.double().numpy().reshape(n),
         "los": np.ones(n), "nlos": np.zeros(n)}[spec.los_mode]
    mixture = _weighted_median(np.concatenate([pathloss[True], pathloss[False]]), np.concatenate([p, 1 - p]))
    return DeploymentPrior(
        distance_m=float(np.median(distance)), pathloss_db=mixture,
        pathloss_los_db=_weighted_median(pathloss[True], p if p.sum() > 0 else np.ones(n)),
        pathloss_nlos_db=_weighted_median(pathloss[False], 1 - p if (1 - p).sum() > 0 else np.ones(n)),
        los_probability=float(np.clip(p.mean(), LOS_PROBABILITY_CLIP, 1 - LOS_PROBABILITY_CLIP)))


_CACHE: dict[str, DeploymentPrior] = {}


def deployment_prior(spec: SiteSpec) -> DeploymentPrior:
    """The site's TR 38.901 prior (deterministic; computed once per spec and process)."""
    key = spec_hash(spec)
    if key not in _CACHE:
        _CACHE[key] = _prior(spec)
    return _CACHE[key]


__all__ = ["DeploymentPrior", "deployment_prior", "distance_quantiles"]
