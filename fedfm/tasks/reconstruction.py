"""Grids and masks of the dense tasks CE, CP and PF (LLM4WM §III).

Every mask is bool [G, K, N] (grid slots, subcarriers, antennas):
  CE  grid = T history slots; known = LS pilots on the comb k % pilot_spacing == 0; region = all.
  CP  grid = T + P slots;     known = t < T;                                       region = t >= T.
  PF  grid = T history slots; known = k < K/2 (lower half of the band);            region = k >= K/2.
"""
from __future__ import annotations

import numpy as np

from fedfm.scenarios import SiteSpec


def dense_grid_slots(task: str, spec: SiteSpec) -> int:
    """G: slots on the task's grid (CP also holds the P predicted slots)."""
    return spec.num_slots if task == "CP" else spec.time.history_slots


def dense_masks(task: str, spec: SiteSpec) -> tuple[np.ndarray, np.ndarray]:
    """(known, region), each bool [G, K, N], for CE, CP or PF."""
    G, K, N = dense_grid_slots(task, spec), spec.sub6.subcarriers, spec.sub6.antennas
    t = np.arange(G)[:, None, None]
    k = np.arange(K)[None, :, None]
    full = np.ones((G, K, N), bool)
    if task == "CE":
        known = full & (k % spec.estimation.pilot_spacing == 0)
        region = full
    elif task == "CP":
        T = spec.time.history_slots
        known, region = full & (t < T), full & (t >= T)
    elif task == "PF":
        known, region = full & (k < K // 2), full & (k >= K // 2)
    else:
        raise ValueError(f"task {task!r} is not a dense task; expected one of CE, CP, PF")
    return known, region

