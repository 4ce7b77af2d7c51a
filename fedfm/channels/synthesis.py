"""Channel synthesis with Sionna's TR 38.901 system-level models (UMa, UMi, RMa, InH).

One sample = one UE dropped in the site's single sector, seen by two co-located
base-station ULAs: the sub-6 GHz uplink over T+P slots and the mmWave array at the last
history slot. The two bands share the UE geometry (position, velocity, LoS state) and,
following TR 38.901 §7.6.5 (multi-frequency simulations), the same clusters: rays
(delays, angles, powers) are drawn once by the sub-6 model and the mmWave model computes
its own coefficients from them for its own array and carrier.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from sionna.phy import config as sionna_config
from sionna.phy.channel import cir_to_ofdm_channel, subcarrier_frequencies
from sionna.phy.channel.tr38901 import RMa, UMa, UMi, InH, PanelArray

from fedfm.channels.codebook import best_beam, dft_codebook
from fedfm.scenarios import SiteSpec, derive_seed

_MODELS = {"uma": UMa, "umi": UMi, "rma": RMa, "inh": InH}
# BS / UE heights [m]: TR 38.901 Table 7.4.1-1 (UMa 25, UMi 10, RMa 35 m; InH ceiling 3 m).
_BS_HEIGHT_M = {"uma": 25.0, "umi": 10.0, "rma": 35.0, "inh": 3.0}
_UE_HEIGHT_M = {"uma": 1.5, "umi": 1.5, "rma": 1.5, "inh": 1.0}
_SECTOR_HALF_WIDTH_RAD = math.radians(60.0)  # one 120° sector facing +x


def _ula(num_antennas: int, carrier_hz: float) -> PanelArray:
    # Omni elements keep the array response pure geometry (no 38.901 element pattern),
    # so gains compare across sites and the DFT codebook's beams are exact steering vectors.
    return PanelArray(num_rows_per_panel=1, num_cols_per_panel=num_antennas, polarization="single",
                      polarization_type="V", antenna_pattern="omni", carrier_frequency=carrier_hz)


def _model(spec: SiteSpec, carrier_ghz: float, num_antennas: int):
    # Sionna computes on the host: it defaults to cuda:0 where a GPU is visible, but a site's
    # data are named by its spec hash alone and torch's CUDA random streams differ from the
    # CPU's, so the same YAML would give other channels on a GPU machine (and every array is
    # read back with .numpy()). Every Sionna model fedfm builds comes from here.
    sionna_config.device = "cpu"
    fc = carrier_ghz * 1e9
    kwargs = dict(carrier_frequency=fc, ut_array=_ula(1, fc), bs_array=_ula(num_antennas, fc),
                  direction="uplink")
    if spec.environment in ("uma", "umi"):
        kwargs["o2i_model"] = "low"
    return _MODELS[spec.environment](**kwargs)


def _drop_ues(spec: SiteSpec, batch: int, gen: np.random.Generator) -> dict[str, np.ndarray]:
    """UE positions, velocities and BS location for ``batch`` single-UE drops.

    Distances uniform in area between distance_min_m and distance_max_m (2D), azimuths
    uniform across the sector, speeds uniform in [speed_min, speed_max] with a uniform
    horizontal heading."""
    d0, d1 = spec.ue.distance_min_m, spec.ue.distance_max_m
    d2d = np.sqrt(gen.uniform(d0 ** 2, d1 ** 2, batch))
    phi = gen.uniform(-_SECTOR_HALF_WIDTH_RAD, _SECTOR_HALF_WIDTH_RAD, batch)
    speed = gen.uniform(spec.ue.speed_min_mps, spec.ue.speed_max_mps, batch)
    heading = gen.uniform(-math.pi, math.pi, batch)
    ut = np.stack([d2d * np.cos(phi), d2d * np.sin(phi), np.full(batch, _UE_HEIGHT_M[spec.environment])], -1)
    vel = np.stack([speed * np.cos(heading), speed * np.sin(heading), np.zeros(batch)], -1)
    bs = np.tile([0.0, 0.0, _BS_HEIGHT_M[spec.environment]], (batch, 1))
    return {"ut_loc": ut, "bs_loc": bs, "ut_vel": vel, "speed_mps": speed}


def _set_topology(model, drop: dict, los, indoor: bool) -> None:
    b = drop["ut_loc"].shape[0]
    # A fresh topology every batch: Sionna skips re-sampling LSPs for an unchanged
    # topology, which would make a batch depend on the previous one.
    model.reset_topology()
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)
    model.set_topology(ut_loc=t(drop["ut_loc"])[:, None], bs_loc=t(drop["bs_loc"])[:, None],
                       ut_orientations=torch.zeros(b, 1, 3), bs_orientations=torch.zeros(b, 1, 3),
                       ut_velocities=t(drop["ut_vel"])[:, None], in_state=torch.full((b, 1), indoor),
                       los=los)


class _RecordRays(torch.nn.Module):
    """Wraps a model's ray sampler and keeps a shallow copy of the rays it drew.

    The system-level channel re-points (not mutates) ray attributes to the TX/RX view of
    the link, so a shallow copy taken at sampling time holds the rays as drawn."""

    def __init__(self, sampler):
        super().__init__()
        self.sampler, self.rays = sampler, None

    def forward(self, lsp):
        rays = self.sampler(lsp)
        self.rays = copy.copy(rays)
        return rays

    def topology_updated_callback(self):
        self.sampler.topology_updated_callback()

    def allocate_topology_tensors(self, *args):
        self.sampler.allocate_topology_tensors(*args)

    def reset_topology(self):
        self.sampler.reset_topology()


class _ReplayRays(torch.nn.Module):
    """Ray sampler that hands out the sub-6 model's rays (TR 38.901 §7.6.5)."""

    def __init__(self, recorder: _RecordRays):
        super().__init__()
        self.recorder = [recorder]  # a list: not registered as a second parent of the module

    def forward(self, lsp):
        return copy.copy(self.recorder[0].rays)

    def topology_updated_callback(self):
        pass

    def allocate_topology_tensors(self, *args):
        pass

    def reset_topology(self):
        pass


class SiteChannelGenerator:
    """Generates one site's samples in batches with Sionna.

    Build once per (site); call :meth:`generate` per batch with its own seed."""

    def __init__(self, spec: SiteSpec):
        self.spec = spec
        self.sub6 = _model(spec, spec.sub6.carrier_ghz, spec.sub6.antennas)
        self.mmw = _model(spec, spec.mmwave.carrier_ghz, spec.mmwave.antennas)
        # Private hook: Sionna has no public API to reuse one model's rays in another.
        self._recorder = _RecordRays(self.sub6._ray_sampler)
        self.sub6._ray_sampler = self._recorder
        self.mmw._ray_sampler = _ReplayRays(self._recorder)
        # All UEs outdoor in UMa/UMi/RMa (no O2I penetration loss: the site is about the
        # outdoor radio channel); InH UEs are indoor by definition of the scenario.
        self._indoor = spec.environment == "inh"
        self.codebook = dft_codebook(spec.mmwave.antennas, spec.mmwave.codebook_beams)
        self.freq_sub6 = subcarrier_frequencies(spec.sub6.subcarriers, spec.sub6.subcarrier_spacing_khz * 1e3)
        self.freq_mmw = subcarrier_frequencies(spec.mmwave.subcarriers, spec.mmwave.subcarrier_spacing_khz * 1e3)

    def _los_control(self):
        return {"auto": "random", "los": True, "nlos": False}[self.spec.los_mode]

    def generate(self, batch: int, seed: int) -> dict[str, np.ndarray]:
        """One batch of samples; same (spec, batch, seed) → bit-identical arrays.

        Returns h_sub6 complex64 [S, T+P, K, N], h_mmwave complex64 [S, K_mm, N_mm]
        (unit mean power), distance_m, pathloss_db, speed_mps float32 [S], los bool [S],
        best_beam int64 [S]."""
        spec = self.spec
        gen = np.random.default_rng(seed)
        sionna_config.seed = derive_seed(seed, "sionna")
        drop = _drop_ues(spec, batch, gen)
        _set_topology(self.sub6, drop, self._los_control(), self._indoor)
        slot_s = spec.time.slot_interval_ms * 1e-3
        a, tau = self.sub6(spec.num_slots, 1.0 / slot_s)
        # a: [S, num_rx=1, N, num_tx=1, 1, paths, T+P]; tau: [S, 1, 1, paths]
        h = cir_to_ofdm_channel(self.freq_sub6, a, tau, normalize=False)  # [S,1,N,1,1,T+P,K]
        h_sub6 = h[:, 0, :, 0, 0].permute(0, 2, 3, 1)  # [S, T+P, K, N]

        scenario = self.sub6._scenario
        los = scenario.los[:, 0, 0].clone()  # [S] (BS, UT) view
        lsp = self.sub6._lsp
        pathloss_db = lsp.pathloss[:, 0, 0] - 10.0 * torch.log10(lsp.sf[:, 0, 0])
        distance_m = scenario.distance_3d[:, 0, 0]

        # mmWave: same UE, same LoS state, same clusters; its own carrier and array.
        _set_topology(self.mmw, drop, los[:, None, None], self._indoor)
        self.mmw._lsp = lsp
        last_hist_s = (spec.time.history_slots - 1) * slot_s
        # Two time samples spaced by (T-1) slots: sample 1 is the last history slot.
        a_m, tau_m = self.mmw(2, 1.0 / last_hist_s) if last_hist_s > 0 else self.mmw(1, 1.0)
        h_m = cir_to_ofdm_channel(self.freq_mmw, a_m[..., -1:], tau_m, normalize=False)
        h_mmwave = h_m[:, 0, :, 0, 0, 0].permute(0, 2, 1)  # [S, K_mm, N_mm]
        h_mmwave = h_mmwave / h_mmwave.abs().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()

        h_mmwave = h_mmwave.numpy().astype(np.complex64)
        return {
            "h_sub6": h_sub6.numpy().astype(np.complex64),
            "h_mmwave": h_mmwave,
            "distance_m": distance_m.numpy().astype(np.float32),
            "pathloss_db": pathloss_db.numpy().astype(np.float32),
            "los": los.numpy().astype(bool),
            "speed_mps": drop["speed_mps"].astype(np.float32),
            "best_beam": best_beam(h_mmwave, self.codebook),
        }
