"""The seven task views of a site's data (LLM4WM's six tasks plus LoS/NLoS, as in LWM).

    tds = build_tasks(load_split(spec, "test"), spec, "test")   # {task: TaskData}

Every view holds what the base station observes — noisy estimates at the site's SNR
(``fedfm.tasks.observe``), zero where unobserved, normalised per sample to unit average
power over the observed elements — and a target:

  task  grid [G, K, N]   known                 target
  CE    [T, K, N]        pilot comb             true CSI (normalised like the inputs)
  CP    [T+P, K, N]      t < T                  true CSI, scored at t >= T
  PF    [T, K, N]        k < K/2                true CSI, scored at k >= K/2
  BF    [T, K, N]        all                    best mmWave beam, int64
  DE    [T, K, N]        all                    3D distance [m], float32
  PE    [T, K, N]        all                    path loss + shadow fading [dB], float32
  LoS   [T, K, N]        all                    1 = LoS, int64

``inputs * scale[:, None, None, None]`` gives the noisy observation in physical units.
Noise is drawn from ``default_rng(derive_seed(split_seed(spec, split), task))``: the same
spec, split and task give the same bits; tasks do not share noise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from fedfm.scenarios import ENVIRONMENTS, SiteSpec, derive_seed, split_seed
from fedfm.tasks.observe import draw_snr_db, noisy_observation, unit_power_scale
from fedfm.tasks.reconstruction import dense_grid_slots, dense_masks

TASKS = ("CE", "CP", "PF", "BF", "DE", "PE", "LoS")
DENSE_TASKS = ("CE", "CP", "PF")
REGRESSION_TASKS = ("DE", "PE")


@dataclass(frozen=True)
class TaskData:
    """One task's view of one split of one site (S samples). Shapes in the module docstring."""

    task: str
    site: str
    inputs: np.ndarray     # complex64 [S, G, K, N], normalised noisy observation, 0 where not known
    known: np.ndarray      # bool [G, K, N]
    region: np.ndarray     # bool [G, K, N]: where dense targets are scored (all True for the others)
    targets: np.ndarray    # dense complex64 [S, G, K, N]; BF/LoS int64 [S]; DE/PE float32 [S]
    scale: np.ndarray      # float32 [S]: inputs * scale = physical units
    extras: dict = field(default_factory=dict)  # snr_db float32 [S]; context float32 [C]; BF: h_mmwave, codebook

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])


# extras holding one entry per sample; the rest (context, codebook, stats) are the site's
PER_SAMPLE_EXTRAS = ("snr_db", "h_mmwave")


def sample_range(td: TaskData, start: int, stop: int | None = None) -> TaskData:
    """Samples ``start:stop`` of a TaskData: its per-sample arrays sliced, the site-level ones
    (known, region and the extras outside ``PER_SAMPLE_EXTRAS``, its priors included) shared."""
    sl = slice(start, stop)
    return dataclasses.replace(td, inputs=td.inputs[sl], targets=td.targets[sl], scale=td.scale[sl],
                               extras={k: v[sl] if k in PER_SAMPLE_EXTRAS else v for k, v in td.extras.items()})


def _check_arrays(arrays: dict, spec: SiteSpec) -> np.ndarray:
    h = arrays.get("h_sub6")
    want = (spec.num_slots, spec.sub6.subcarriers, spec.sub6.antennas)
    if h is None or h.ndim != 4 or tuple(h.shape[1:]) != want:
        got = None if h is None else tuple(h.shape)
        raise ValueError(f"{spec.path or spec.name}: `h_sub6` has shape {got}; expected [S, T+P, K, N] = "
                         f"[S, {', '.join(map(str, want))}] from the site spec")
    return h


# site_context layout: one-hot environment, log2 carrier / bandwidth / antennas, then the
# deployment prior (fedfm.channels.deployment) on the scale of the heads' outputs.
_PRIOR_OFFSET = len(ENVIRONMENTS) + 3
CONTEXT_PRIOR = {"DE": 0, "PE": 1, "PE-LoS": 2, "PE-NLoS": 3, "LoS": 4}
CONTEXT_SIZE = _PRIOR_OFFSET + len(CONTEXT_PRIOR)


def context_index(name: str) -> int:
    """Index in ``site_context`` of a deployment-prior entry (``CONTEXT_PRIOR`` keys)."""
    return _PRIOR_OFFSET + CONTEXT_PRIOR[name]


def site_context(spec: SiteSpec) -> np.ndarray:
    """What a base station knows about its own deployment, as a float32 [CONTEXT_SIZE] vector
    the pooled heads read: one-hot TR 38.901 environment, log2 of the sub-6 carrier [GHz], of
    the sampled bandwidth K·Δf [MHz] and of the antenna count; then the TR 38.901 prior of its
    cell (``fedfm.channels.deployment``: median distance and path loss, normalised as the DE/PE
    targets; median path loss of LoS and of NLoS links; log-odds of LoS), which the DE/PE/LoS
    heads start from. No label statistics and no received power: the site's identity and
    geometry, which a per-site baseline fitted on that site's own train split has implicitly,
    and which unit-power CSI at 10 dB SNR barely reveals (the noise floor flattens the delay
    profile's spread across sites)."""
    from fedfm.channels.deployment import deployment_prior

    env = np.zeros(len(ENVIRONMENTS), np.float32)
    env[ENVIRONMENTS.index(spec.environment)] = 1.0
    s6 = spec.sub6
    prior = deployment_prior(spec)
    p = prior.los_probability
    pe = normalise_target("PE", [prior.pathloss_db, prior.pathloss_los_db, prior.pathloss_nlos_db])
    return np.concatenate([env, np.log2([s6.carrier_ghz, s6.subcarriers * s6.subcarrier_spacing_khz / 1e3,
                                         s6.antennas]),
                           normalise_target("DE", [prior.distance_m]), pe,
                           [np.log(p / (1.0 - p))]]).astype(np.float32)


def _labels(task: str, arrays: dict) -> np.ndarray:
    if task == "BF":
        return np.asarray(arrays["best_beam"], np.int64)
    if task == "DE":
        return np.asarray(arrays["distance_m"], np.float32)
    if task == "PE":
        return np.asarray(arrays["pathloss_db"], np.float32)
    return np.asarray(arrays["los"]).astype(np.int64)


def build_task(task: str, arrays: dict[str, np.ndarray], spec: SiteSpec, split: str) -> TaskData:
    """The view of ``task`` on one split's arrays (``fedfm.data.load_split``); deterministic."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not allowed; expected one of {', '.join(TASKS)}")
    h = _check_arrays(arrays, spec)
    T = spec.time.history_slots
    rng = np.random.default_rng(derive_seed(split_seed(spec, split), task))
    if task in DENSE_TASKS:
        known, region = dense_masks(task, spec)
        h_grid = h[:, :dense_grid_slots(task, spec)]
    else:
        h_grid = h[:, :T]
        known = region = np.ones(h_grid.shape[1:], bool)
    snr_db = draw_snr_db(rng, h.shape[0], spec.estimation.snr_db_min, spec.estimation.snr_db_max)
    x = noisy_observation(h_grid, known, snr_db, rng)
    scale = unit_power_scale(x, known)
    inv = (1.0 / scale)[:, None, None, None]
    inputs = (x * inv).astype(np.complex64)
    extras = {"snr_db": snr_db, "context": site_context(spec)}
    if task in DENSE_TASKS:
        targets = (h_grid * inv).astype(np.complex64)
    else:
        targets = _labels(task, arrays)
    if task == "BF":
        extras.update(h_mmwave=arrays["h_mmwave"], codebook=arrays["codebook"])
    return TaskData(task, spec.name, inputs, known, region, targets, scale, extras)


def build_tasks(arrays: dict[str, np.ndarray], spec: SiteSpec, split: str,
                tasks: tuple[str, ...] = TASKS) -> dict[str, TaskData]:
    """``{task: TaskData}`` for one split of a site."""
    return {t: build_task(t, arrays, spec, split) for t in tasks}


# Fixed affine maps of the regression targets: no statistics from any site's data, so
# federated sites need not agree on shared normalisation constants. DE: 100 m → 0,
# 10 m / 1 km → ∓2; PE: 110 dB → 0, one unit per 20 dB (typical 38.901 spread).
def normalise_target(task: str, y: np.ndarray) -> np.ndarray:
    """Physical regression target (DE metres, PE dB) → O(1) float32 value."""
    y = np.asarray(y, np.float64)
    if task == "DE":
        return ((np.log10(np.maximum(y, 1e-3)) - 2.0) / 0.5).astype(np.float32)
    if task == "PE":
        return ((y - 110.0) / 20.0).astype(np.float32)
    raise ValueError(f"task {task!r} has no normalised target; expected one of {', '.join(REGRESSION_TASKS)}")


def denormalise_target(task: str, z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise_target`: float32 metres (DE) or dB (PE)."""
    z = np.asarray(z, np.float64)
    if task == "DE":
        return (10.0 ** (2.0 + 0.5 * z)).astype(np.float32)
    if task == "PE":
        return (110.0 + 20.0 * z).astype(np.float32)
    raise ValueError(f"task {task!r} has no normalised target; expected one of {', '.join(REGRESSION_TASKS)}")


__all__ = ["TASKS", "DENSE_TASKS", "REGRESSION_TASKS", "CONTEXT_SIZE", "CONTEXT_PRIOR", "TaskData", "build_task",
           "build_tasks", "context_index", "site_context",
           "normalise_target", "denormalise_target"]
