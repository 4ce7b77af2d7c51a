"""Sionna-based synthesis: shapes, determinism, and labels against TR 38.901 (stated tolerances)."""
import numpy as np
import pytest
import torch

from conftest import tiny_site
from fedfm.channels.codebook import beam_gains, beam_grid, best_beam, dft_codebook
from fedfm.channels.synthesis import _BS_HEIGHT_M, _UE_HEIGHT_M, _drop_ues, SiteChannelGenerator
from fedfm.data import generate_split

N_STAT = 256  # samples for statistical checks


@pytest.fixture(scope="module")
def uma_auto():
    spec = tiny_site("uma_auto", "uma")
    return spec, SiteChannelGenerator(spec).generate(N_STAT, seed=11)


def test_shapes_and_dtypes():
    spec = tiny_site("shape", "umi", sub6={"antennas": 16, "subcarriers": 32}, time={"history_slots": 6})
    out = generate_split(spec, "test", samples=10)
    T, P = 6, 4
    assert out["h_sub6"].shape == (10, T + P, 32, 16) and out["h_sub6"].dtype == np.complex64
    assert out["h_mmwave"].shape == (10, 64, 64) and out["h_mmwave"].dtype == np.complex64
    assert out["codebook"].shape == (64, 256) and out["codebook"].dtype == np.complex64
    for k, dt in [("distance_m", np.float32), ("pathloss_db", np.float32), ("speed_mps", np.float32),
                  ("los", np.bool_), ("best_beam", np.int64)]:
        assert out[k].shape == (10,) and out[k].dtype == dt, k
    # h_mmwave is normalised to unit mean power per sample
    np.testing.assert_allclose((np.abs(out["h_mmwave"]) ** 2).mean(axis=(1, 2)), 1.0, rtol=1e-4)


def test_deterministic_across_runs_and_threads():
    spec = tiny_site("det", "rma")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = generate_split(spec, "val", samples=20)
        torch.set_num_threads(2)
        b = generate_split(spec, "val", samples=20)
    finally:
        torch.set_num_threads(threads)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    c = generate_split(spec, "test", samples=20)
    assert not np.array_equal(a["h_sub6"], c["h_sub6"])  # splits have their own seeds


def test_best_beam_recomputed_from_mmwave_and_codebook(uma_auto):
    spec, out = uma_auto
    cb = dft_codebook(spec.mmwave.antennas, spec.mmwave.codebook_beams)
    gains = np.abs(np.einsum("skn,nb->skb", out["h_mmwave"], cb.conj())) ** 2  # |wᴴh|²
    assert np.array_equal(out["best_beam"], gains.sum(1).argmax(1))
    assert np.array_equal(best_beam(out["h_mmwave"], cb), out["best_beam"])
    np.testing.assert_allclose(np.linalg.norm(cb, axis=0), 1.0, rtol=1e-5)


def test_beam_gains_against_the_sum_written_out():
    """|wᴴh|² summed over subcarriers, one beam and sample at a time, on a non-contiguous
    complex128 input (beam_gains casts and reshapes it into one matrix product)."""
    rng = np.random.default_rng(3)
    h = (rng.standard_normal((5, 8, 3)) + 1j * rng.standard_normal((5, 8, 3))).transpose(0, 2, 1)  # [S=5, K=3, N=8]
    cb = dft_codebook(8, 12)
    want = np.array([[sum(abs(np.vdot(cb[:, b], h[s, k])) ** 2 for k in range(3)) for b in range(12)]
                     for s in range(5)])
    got = beam_gains(h, cb)
    assert got.shape == (5, 12) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert beam_gains(h[:0], cb).shape == (0, 12)   # an empty split: no gains, no error


def test_distance_from_topology(uma_auto):
    spec, out = uma_auto
    drop = _drop_ues(spec, N_STAT, np.random.default_rng(11))
    d3 = np.linalg.norm(drop["ut_loc"] - drop["bs_loc"], axis=1)
    np.testing.assert_allclose(out["distance_m"], d3, rtol=1e-4)
    np.testing.assert_allclose(out["speed_mps"], drop["speed_mps"], rtol=1e-6)


def _uma_los_probability(d2d):
    # TR 38.901 Table 7.4.2-1, UMa, h_UT <= 13 m (C' = 0)
    p = 18.0 / d2d + np.exp(-d2d / 63.0) * (1 - 18.0 / d2d)
    return np.where(d2d <= 18.0, 1.0, p)


def test_los_fraction_matches_38901_probability(uma_auto):
    spec, out = uma_auto
    dh = _BS_HEIGHT_M["uma"] - _UE_HEIGHT_M["uma"]
    d2d = np.sqrt(out["distance_m"].astype(float) ** 2 - dh ** 2)
    expected = _uma_los_probability(d2d).mean()
    sigma = np.sqrt(expected * (1 - expected) / N_STAT)
    # 4 binomial standard deviations (~0.1 here)
    assert abs(out["los"].mean() - expected) < 4 * sigma, (out["los"].mean(), expected)


def _uma_pathloss_db(d3d, d2d, fc_ghz, los):
    # TR 38.901 Table 7.4.1-1, UMa, h_BS = 25 m, h_UT = 1.5 m (h_E = 1 m)
    d_bp = 4 * (25.0 - 1.0) * (1.5 - 1.0) * fc_ghz * 1e9 / 3e8
    pl1 = 28.0 + 22 * np.log10(d3d) + 20 * np.log10(fc_ghz)
    pl2 = 28.0 + 40 * np.log10(d3d) + 20 * np.log10(fc_ghz) - 9 * np.log10(d_bp ** 2 + (25.0 - 1.5) ** 2)
    pl_los = np.where(d2d <= d_bp, pl1, pl2)
    pl_nlos = np.maximum(pl_los, 13.54 + 39.08 * np.log10(d3d) + 20 * np.log10(fc_ghz))
    return np.where(los, pl_los, pl_nlos)


@pytest.mark.parametrize("los_mode,sigma_sf", [("los", 4.0), ("nlos", 6.0)])
def test_pathloss_follows_38901_formula(los_mode, sigma_sf):
    spec = tiny_site(f"pl_{los_mode}", "uma", los_mode=los_mode)
    out = SiteChannelGenerator(spec).generate(N_STAT, seed=5)
    assert out["los"].all() == (los_mode == "los") and out["los"].any() == (los_mode == "los")
    d3d = out["distance_m"].astype(float)
    d2d = np.sqrt(d3d ** 2 - (25.0 - 1.5) ** 2)
    resid = out["pathloss_db"] - _uma_pathloss_db(d3d, d2d, 1.9, los_mode == "los")
    # Shadow fading is zero-mean log-normal with σ_SF (4 dB LoS, 6 dB NLoS): the mean residual
    # lies within 4 standard errors and the spread within 30 % of σ_SF.
    assert abs(resid.mean()) < 4 * sigma_sf / np.sqrt(N_STAT), resid.mean()
    assert abs(resid.std() - sigma_sf) < 0.3 * sigma_sf, resid.std()
    # The channel carries that loss: mean |h|^2 over antennas, sub-bands and slots
    # (omni elements, unit-power small-scale fading) matches -pathloss_db within 3 dB on average.
    power_db = 10 * np.log10((np.abs(out["h_sub6"]) ** 2).mean(axis=(1, 2, 3)))
    assert abs(np.mean(power_db + out["pathloss_db"])) < 3.0


def test_los_best_beam_points_at_the_ue():
    """Shared geometry across bands: in LoS the mmWave best beam looks at the UE's azimuth."""
    spec = tiny_site("beam_los", "umi", los_mode="los")
    out = SiteChannelGenerator(spec).generate(128, seed=3)
    drop = _drop_ues(spec, 128, np.random.default_rng(3))
    rel = drop["ut_loc"] - drop["bs_loc"]
    u_ue = rel[:, 1] / np.linalg.norm(rel, axis=1)  # sin(azimuth)·sin(zenith) seen by the y-axis ULA
    u_beam = beam_grid(spec.mmwave.codebook_beams)[out["best_beam"]]
    beamwidth = 2.0 / spec.mmwave.antennas
    hit = np.abs(u_beam - u_ue) <= 2 * beamwidth
    # The LoS ray dominates for most UMi LoS links (K-factor 9 dB ± 5 dB): ≥ 70 % of beams on the UE.
    assert hit.mean() >= 0.7, hit.mean()


# ---- deployment prior (fedfm.channels.deployment) ----------------------------------------
def test_distance_quantiles_follow_the_uniform_in_area_drop():
    from fedfm.channels.deployment import distance_quantiles

    spec = tiny_site("q", "umi", ue={"distance_min_m": 10.0, "distance_max_m": 200.0})
    d = distance_quantiles(spec, 4)
    # CDF of a uniform-in-area drop: F(d) = (d² − d0²) / (d1² − d0²), so d_q = sqrt(d0² + q (d1² − d0²))
    expected = np.sqrt(100.0 + np.array([0.125, 0.375, 0.625, 0.875]) * (40000.0 - 100.0))
    np.testing.assert_allclose(d, expected, rtol=1e-12)


def test_deployment_prior_matches_generated_labels(uma_auto):
    """The prior knows no sample, so it can only match the cell's label statistics: median
    distance within 10 % (256 samples: the sample median's error is ~4 %), LoS share within
    0.08 (binomial σ ≈ 0.025 at p ≈ 0.2), median path loss within 3 dB (shadow fading σ 4–6 dB
    spreads the labels; the sample median moves ~0.5 dB)."""
    from fedfm.channels.deployment import deployment_prior

    spec, out = uma_auto
    prior = deployment_prior(spec)
    assert prior.distance_m == pytest.approx(np.median(out["distance_m"]), rel=0.10)
    assert prior.los_probability == pytest.approx(out["los"].mean(), abs=0.08)
    assert prior.pathloss_db == pytest.approx(np.median(out["pathloss_db"]), abs=3.0)
    assert prior.pathloss_los_db < prior.pathloss_db < prior.pathloss_nlos_db
    forced = deployment_prior(tiny_site("forced", "uma", los_mode="nlos"))
    assert forced.los_probability == 0.01 and forced.pathloss_db == forced.pathloss_nlos_db


def test_sionna_computes_on_the_host_where_it_would_pick_a_gpu(monkeypatch):
    """Sionna defaults to cuda:0 wherever a GPU is visible (seen on an H100: generation then
    failed at .numpy()). A site's data are named by its spec hash alone, so generation and the
    deployment prior must run on the host there too, and give the host's arrays."""
    from sionna.phy import config

    from fedfm.channels import deployment

    spec = tiny_site("host", "umi")
    expected = generate_split(spec, "val", samples=8)
    monkeypatch.setattr(config, "_device", "cuda:0")  # what Sionna's own default is on a GPU machine
    got = generate_split(spec, "val", samples=8)
    for k in expected:
        assert np.array_equal(expected[k], got[k]), k
    monkeypatch.setattr(config, "_device", "cuda:0")
    monkeypatch.setattr(deployment, "_CACHE", {})
    assert deployment.deployment_prior(spec).los_probability > 0
    assert config.device == "cpu"
