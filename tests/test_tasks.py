"""Task views: shapes, masks, invertible normalisation, noise at the site's SNR, determinism."""
import numpy as np
import pytest

from conftest import tiny_site
from fedfm.data import load_split
from fedfm.tasks import DENSE_TASKS, TASKS, build_task, build_tasks, denormalise_target, normalise_target

S = 48
T, P, K, N = 6, 2, 32, 8
SNR_DB = (0.0, 20.0)     # a range, so per-sample SNRs differ
NOISE_RTOL = 0.12        # per-sample noise power vs σ²: ≥ 512 observed elements → ~4.4% std, ~3σ


@pytest.fixture(scope="module")
def site(cache_dir):
    spec = tiny_site("tasks", "umi", sub6={"subcarriers": K, "antennas": N},
                     time={"history_slots": T, "horizon_slots": P},
                     estimation={"snr_db_min": SNR_DB[0], "snr_db_max": SNR_DB[1]})
    arrays = load_split(spec, "test", cache_dir, samples=S)
    return spec, arrays, build_tasks(arrays, spec, "test")


def _physical_grid(task, spec, arrays):
    return arrays["h_sub6"][:, :spec.num_slots if task == "CP" else spec.time.history_slots]


def test_shapes_dtypes_and_masks(site):
    spec, arrays, tds = site
    assert tuple(tds) == TASKS
    grids = {"CE": T, "CP": T + P, "PF": T, "BF": T, "DE": T, "PE": T, "LoS": T}
    for task, td in tds.items():
        G = grids[task]
        assert td.task == task and td.site == "tasks"
        assert td.inputs.shape == (S, G, K, N) and td.inputs.dtype == np.complex64, task
        assert td.known.shape == td.region.shape == (G, K, N) and td.known.dtype == bool, task
        assert td.scale.shape == (S,) and td.scale.dtype == np.float32
        assert td.extras["snr_db"].shape == (S,) and td.extras["snr_db"].dtype == np.float32
        if task in DENSE_TASKS:
            assert td.targets.shape == td.inputs.shape and td.targets.dtype == np.complex64
    k = np.arange(K)[None, :, None]
    t = np.arange(T + P)[:, None, None]
    assert np.array_equal(tds["CE"].known, np.broadcast_to(k % 4 == 0, (T, K, N))) and tds["CE"].region.all()
    assert np.array_equal(tds["CP"].known, np.broadcast_to(t < T, (T + P, K, N)))
    assert np.array_equal(tds["CP"].region, ~tds["CP"].known)
    assert np.array_equal(tds["PF"].known, np.broadcast_to(k < K // 2, (T, K, N)))
    assert np.array_equal(tds["PF"].region, ~tds["PF"].known)
    for task in ("BF", "DE", "PE", "LoS"):
        assert tds[task].known.all()
    assert tds["BF"].targets.dtype == np.int64 and np.array_equal(tds["BF"].targets, arrays["best_beam"])
    assert tds["BF"].extras["codebook"].shape == (64, 256) and tds["BF"].extras["h_mmwave"].shape == (S, 64, 64)
    assert tds["DE"].targets.dtype == np.float32 and np.array_equal(tds["DE"].targets, arrays["distance_m"])
    assert np.array_equal(tds["PE"].targets, arrays["pathloss_db"])
    assert tds["LoS"].targets.dtype == np.int64 and np.array_equal(tds["LoS"].targets, arrays["los"].astype(int))


def test_unit_power_zeros_where_unobserved_and_invertible(site):
    spec, arrays, tds = site
    for task, td in tds.items():
        power = (np.abs(td.inputs[:, td.known]) ** 2).mean(axis=1)
        np.testing.assert_allclose(power, 1.0, rtol=1e-4, err_msg=task)
        assert not td.inputs[:, ~td.known].any(), task
        if task in DENSE_TASKS:  # targets * scale = the true physical channel
            h = _physical_grid(task, spec, arrays)
            np.testing.assert_allclose(td.targets * td.scale[:, None, None, None], h,
                                       rtol=1e-5, atol=1e-6 * np.abs(h).max(), err_msg=task)


def test_noise_matches_each_samples_snr(site):
    spec, arrays, tds = site
    for task in ("CE", "CP", "BF"):
        td = tds[task]
        snr = td.extras["snr_db"]
        assert snr.min() >= SNR_DB[0] and snr.max() <= SNR_DB[1] and snr.std() > 3.0
        h = _physical_grid(task, spec, arrays)[:, td.known]
        obs = (td.inputs * td.scale[:, None, None, None])[:, td.known]   # noisy physical observation
        noise_to_signal = (np.abs(obs - h) ** 2).mean(1) / (np.abs(h) ** 2).mean(1)
        np.testing.assert_allclose(noise_to_signal, 10 ** (-snr / 10), rtol=NOISE_RTOL, err_msg=task)


def test_deterministic_and_independent_noise(site, cache_dir):
    spec, arrays, tds = site
    again = build_task("CE", arrays, spec, "test")
    assert np.array_equal(again.inputs, tds["CE"].inputs) and np.array_equal(again.scale, tds["CE"].scale)
    other_split = build_task("CE", arrays, spec, "val")          # same channels, the val split's noise
    assert not np.array_equal(other_split.inputs, tds["CE"].inputs)
    assert not np.array_equal(tds["BF"].inputs, tds["DE"].inputs)  # tasks do not share noise


def test_bad_task_and_wrong_shape_are_named(site):
    spec, arrays, _ = site
    with pytest.raises(ValueError, match="'XX' is not allowed; expected one of CE, CP, PF, BF, DE, PE, LoS"):
        build_task("XX", arrays, spec, "test")
    bad = {**arrays, "h_sub6": arrays["h_sub6"][:, :, :K // 2]}
    with pytest.raises(ValueError, match="h_sub6"):
        build_task("CE", bad, spec, "test")


def test_regression_target_normalisation_is_fixed_and_invertible():
    np.testing.assert_allclose(normalise_target("DE", [100.0, 1000.0, 10.0]), [0.0, 2.0, -2.0], atol=1e-6)
    np.testing.assert_allclose(normalise_target("PE", [110.0, 130.0]), [0.0, 1.0], atol=1e-6)
    d = np.array([12.5, 80.0, 640.0], np.float32)
    np.testing.assert_allclose(denormalise_target("DE", normalise_target("DE", d)), d, rtol=1e-5)
    np.testing.assert_allclose(denormalise_target("PE", normalise_target("PE", d)), d, rtol=1e-5)
    with pytest.raises(ValueError, match="expected one of DE, PE"):
        normalise_target("CE", d)


def test_site_context_by_hand(site):
    from fedfm.channels.deployment import deployment_prior
    from fedfm.tasks import CONTEXT_SIZE, context_index, site_context

    spec, _, tds = site
    c = site_context(spec)
    env = [1.0 if e == spec.environment else 0.0 for e in ("uma", "umi", "rma", "inh")]
    s6 = spec.sub6
    prior = deployment_prior(spec)
    p = prior.los_probability
    expected = env + [np.log2(s6.carrier_ghz), np.log2(s6.subcarriers * s6.subcarrier_spacing_khz / 1e3), np.log2(s6.antennas),
                      (np.log10(prior.distance_m) - 2.0) / 0.5, (prior.pathloss_db - 110.0) / 20.0,
                      (prior.pathloss_los_db - 110.0) / 20.0, (prior.pathloss_nlos_db - 110.0) / 20.0, np.log(p / (1 - p))]
    assert c.shape == (CONTEXT_SIZE,) and c.dtype == np.float32
    np.testing.assert_allclose(c, expected, rtol=1e-5)
    assert c[context_index("DE")] == c[7] and c[context_index("LoS")] == c[-1]
    assert all(np.array_equal(td.extras["context"], c) for td in tds.values())   # every view carries it


def test_sample_range_slices_the_samples_and_shares_the_sites_arrays(site):
    from fedfm.tasks import sample_range

    spec, arrays, tds = site
    for task in ("CE", "BF"):
        td = tds[task]
        part = sample_range(td, 3, 7)
        assert part.num_samples == 4
        for name in ("inputs", "targets", "scale"):
            np.testing.assert_array_equal(getattr(part, name), getattr(td, name)[3:7])
        np.testing.assert_array_equal(part.extras["snr_db"], td.extras["snr_db"][3:7])
        assert part.known is td.known and part.region is td.region and part.extras["context"] is td.extras["context"]
    bf = sample_range(tds["BF"], 5)
    np.testing.assert_array_equal(bf.extras["h_mmwave"], tds["BF"].extras["h_mmwave"][5:])
    assert bf.extras["codebook"] is tds["BF"].extras["codebook"]  # the site's codebook, not per sample
