"""Classical baselines: exact on the signals they model, better than trivial predictors on a generated site."""
import numpy as np
import pytest

from conftest import tiny_site
from fedfm.baselines import BASELINES, Baseline, evaluate_baselines, fit_baseline
from fedfm.channels.codebook import beam_grid, dft_codebook, ula_steering
from fedfm.data import SiteData, load_split
from fedfm.metrics import error_for_score, score
from fedfm.tasks import TASKS, TaskData, build_tasks

TRAIN, TEST = 160, 96


# ---- exact on synthetic signals ---------------------------------------------------------
def _td(task, inputs, known, targets=None, **extras):
    S = inputs.shape[0]
    x = np.where(known, inputs, 0).astype(np.complex64)
    t = inputs.astype(np.complex64) if targets is None else targets
    return TaskData(task, "synthetic", x, known, ~known if task != "CE" else np.ones_like(known), t,
                    np.ones(S, np.float32), {"snr_db": np.full(S, 30.0, np.float32), **extras})


def _multipath(S, G, K, N, delays, seed=0):
    """Σ_p α_p e^{-j2π k τ_p} over subcarriers with per-(slot, antenna) complex gains: [S, G, K, N]."""
    rng = np.random.default_rng(seed)
    amp = rng.standard_normal((S, G, len(delays), N)) + 1j * rng.standard_normal((S, G, len(delays), N))
    z = np.exp(-2j * np.pi * np.outer(delays, np.arange(K)))                    # [paths, K]
    return np.einsum("sgpn,pk->sgkn", amp, z)


def test_ce_interp_is_exact_on_a_linear_response_including_past_the_last_pilot():
    S, G, K, N = 2, 1, 16, 2
    k = np.arange(K)[None, None, :, None]
    h = np.broadcast_to((1 + 0.5j) + (0.1 - 0.2j) * k, (S, G, K, N))
    known = np.broadcast_to(k[0] % 4 == 0, (G, K, N))                       # pilots at 0, 4, 8, 12
    pred = Baseline("CE-interp", "CE").predict(_td("CE", h, known))
    np.testing.assert_allclose(pred, h, atol=1e-5)


def test_pf_ar_extends_a_noiseless_multipath_response_exactly():
    S, G, K, N = 3, 2, 32, 4
    h = _multipath(S, G, K, N, delays=[0.02, 0.11, 0.3])
    known = np.broadcast_to(np.arange(K)[None, :, None] < K // 2, (G, K, N))
    td = _td("PF", h, known)
    ar = fit_baseline("PF", td, None)
    assert ar.name == "PF-AR" and ar.params["order"] >= 3                      # 3 paths need order >= 3
    assert score("PF", ar.predict(td), td)["nmse"] < 1e-6
    line = fit_baseline("PF", td, None, "PF-linear")
    assert score("PF", line.predict(td), td)["nmse"] > 0.1                     # a line cannot follow 3 paths


def test_cp_hold_and_linear_on_a_static_and_a_ramping_channel():
    S, G, K, N = 2, 6, 4, 2
    known = np.broadcast_to(np.arange(G)[:, None, None] < 4, (G, K, N))
    static = np.broadcast_to(np.exp(1j * np.arange(K))[None, None, :, None], (S, G, K, N))
    td = _td("CP", static, known)
    assert score("CP", fit_baseline("CP", td, None).predict(td), td)["nmse"] < 1e-10
    ramp = static * (1 + 0.1 * np.arange(G))[None, :, None, None]
    td = _td("CP", ramp, known)
    assert score("CP", fit_baseline("CP", td, None, "CP-linear").predict(td), td)["nmse"] < 1e-10
    assert score("CP", fit_baseline("CP", td, None).predict(td), td)["nmse"] > 1e-3


def test_bf_aoa_picks_the_beam_nearest_a_single_paths_direction():
    N, B, N_mm = 8, 256, 64
    u = np.array([-0.71, -0.2, 0.0, 0.33, 0.87])
    a = ula_steering(N, u)                                                       # [S, N], the codebook's convention
    rng = np.random.default_rng(1)
    gains = rng.standard_normal((len(u), 4, 16)) + 1j * rng.standard_normal((len(u), 4, 16))
    x = gains[..., None] * a[:, None, None, :]                                  # [S, G, K, N]
    codebook = dft_codebook(N_mm, B)
    labels = np.abs(beam_grid(B)[None] - u[:, None]).argmin(1)
    known = np.ones(x.shape[1:], bool)
    td = TaskData("BF", "synthetic", x.astype(np.complex64), known, known, labels, np.ones(len(u), np.float32),
                  {"snr_db": np.zeros(len(u), np.float32), "codebook": codebook,
                   "h_mmwave": ula_steering(N_mm, u)[:, None, :] * np.ones((1, 4, 1))})
    scores = fit_baseline("BF", td, None).predict(td)
    assert scores.shape == (len(u), B) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores.argmax(1), labels)


def test_bad_names_are_reported():
    td = _td("CE", np.ones((1, 1, 8, 2)), np.ones((1, 8, 2), bool))
    with pytest.raises(ValueError, match="'CE-magic' is not a CE baseline; expected one of CE-interp, CE-LMMSE"):
        fit_baseline("CE", td, None, "CE-magic")
    with pytest.raises(ValueError, match="expected one of CE, CP"):
        fit_baseline("XX", td, None)
    with pytest.raises(ValueError, match="got a CE TaskData"):
        fit_baseline("CP", td, None)


# ---- a generated site: every baseline beats the trivial predictor -------------------------
@pytest.fixture(scope="module")
def site(cache_dir):
    # UMi, 10–150 m: LoS probability falls with range (TR 38.901 Table 7.4.2-1), the only
    # trace range leaves in unit-power CSI; DE-kNN has something to find.
    spec = tiny_site("baselines", "umi", ue={"distance_min_m": 10.0, "distance_max_m": 150.0},
                     time={"history_slots": 8})
    arrays = {s: load_split(spec, s, cache_dir, samples=n) for s, n in (("train", TRAIN), ("test", TEST))}
    train, test = build_tasks(arrays["train"], spec, "train"), build_tasks(arrays["test"], spec, "test")
    errors = {}
    for task in TASKS:
        for name in BASELINES[task]:
            b = fit_baseline(task, train[task], spec, name)
            errors[name] = error_for_score(task, score(task, b.predict(test[task]), test[task]))
    return spec, arrays, errors


def test_dense_baselines_beat_the_zero_channel(site):
    _, _, err = site
    for name in ("CE-interp", "CE-LMMSE", "CP-hold", "PF-AR"):
        assert err[name] < 0.7, name                                           # zero channel: NMSE 1 (0 dB)
    assert err["CE-LMMSE"] < err["CE-interp"]                                  # the covariance helps
    assert err["PF-AR"] < err["PF-linear"]


def test_sensing_baselines_beat_trivial_predictors(site):
    _, arrays, err = site
    train, test = arrays["train"], arrays["test"]
    most_frequent = np.bincount(train["best_beam"]).argmax()
    assert err["BF-AoA"] < 1 - np.mean(test["best_beam"] == most_frequent) - 0.05
    mean_distance_mae = np.mean(np.abs(test["distance_m"] - train["distance_m"].mean()))
    assert err["DE-kNN"] < mean_distance_mae
    assert err["DE-logdist"] < 0.85 * mean_distance_mae                        # seeing power helps a lot
    mean_pathloss_mae = np.mean(np.abs(test["pathloss_db"] - train["pathloss_db"].mean()))
    assert err["PE-kNN"] < 0.8 * mean_pathloss_mae
    assert err["PE-logdist"] < 0.3 * mean_pathloss_mae
    majority_error = min(test["los"].mean(), 1 - test["los"].mean())
    assert err["LoS-Kfactor"] < 0.5 * majority_error
    assert err["LoS-logistic"] < 0.5 * majority_error


def test_los_logistic_is_the_penalised_likelihoods_stationary_point(site):
    # The Newton fit zeroes the gradient of mean BCE + λ‖w‖² (b unpenalised), computed here
    # independently; identical channels leave only the intercept, the log-odds of the label
    # mean (3 LoS of 4: ln 3); one class gives that class everywhere.
    from fedfm.baselines import LOS_LR_RIDGE, _fit_los_lr, _los_lr
    from fedfm.tasks.sensing import profile_features

    spec, arrays, _ = site
    td = build_tasks(arrays["train"], spec, "train", ("LoS",))["LoS"]
    fit = _fit_los_lr(td, spec)
    z = (profile_features(td.inputs) - fit["mu"]) / fit["sd"]
    y = (td.targets == 1).astype(np.float64)
    p = 1 / (1 + np.exp(-(z @ fit["w"] + fit["b"])))
    np.testing.assert_allclose(z.T @ (p - y) / len(y) + 2 * LOS_LR_RIDGE * np.asarray(fit["w"]), 0, atol=1e-9)
    assert np.mean(p - y) == pytest.approx(0, abs=1e-9)
    np.testing.assert_allclose(_los_lr(td, **fit), p, rtol=1e-5)

    same = TaskData("LoS", "s", np.repeat(td.inputs[:1], 4, 0), td.known, td.region,
                    np.array([1, 1, 0, 1]), np.ones(4, np.float32), {})
    fit = _fit_los_lr(same, spec)
    assert fit["b"] == pytest.approx(np.log(3), abs=1e-9) and np.allclose(fit["w"], 0, atol=1e-9)
    one = TaskData("LoS", "s", td.inputs[:4], td.known, td.region, np.zeros(4, np.int64),
                   np.ones(4, np.float32), {})
    fit = _fit_los_lr(one, spec)
    assert fit["b"] == -10.0 and (_los_lr(one, **fit) < 1e-4).all()


def test_los_logistic_refuses_or_survives_degenerate_train_splits(site):
    # A feature constant on the train split leaves ~1e-17 of rounding in its std, which must
    # not scale another channel's value by 1e16: the fit is the one without that column. A
    # non-finite fingerprint and an empty split are refused in one line naming the site.
    import fedfm.baselines as baselines
    from fedfm.baselines import _fit_los_lr, _los_lr

    spec, arrays, _ = site
    td = build_tasks(arrays["train"], spec, "train", ("LoS",))["LoS"]
    real = baselines.profile_features
    # the one mock of this test: a fingerprint column constant on the train split (0.1, whose
    # mean over 7 rows is inexact) and 0.3 elsewhere, as a one-antenna site's angle features are
    flat = lambda x: np.concatenate([real(x)[:, :2], np.full((len(x), 1), 0.1 if len(x) == 7 else 0.3),
                                     real(x)[:, 3:]], 1)
    assert np.full(7, 0.1).std() > 0   # the rounding the fit must not divide by
    seven = TaskData("LoS", "s7", td.inputs[:7], td.known, td.region, np.array([1, 1, 0, 1, 0, 0, 1]),
                     np.ones(7, np.float32), {})
    drop = lambda x: np.concatenate([real(x)[:, :2], real(x)[:, 3:]], 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(baselines, "profile_features", flat)
        fit = _fit_los_lr(seven, spec)
        p = _los_lr(td, **fit)                     # every other channel: column 2 at 0.3
        mp.setattr(baselines, "profile_features", drop)
        p_without = _los_lr(td, **_fit_los_lr(seven, spec))
    np.testing.assert_allclose(p, p_without, atol=1e-6)   # a constant column changes nothing
    assert fit["sd"][2] == 1.0
    zero = TaskData("LoS", "s0", np.concatenate([td.inputs[:3], np.zeros_like(td.inputs[:1])]), td.known,
                    td.region, np.array([1, 0, 1, 0]), np.ones(4, np.float32), {})
    with np.errstate(divide="ignore", invalid="ignore"), \
            pytest.raises(ValueError, match="site s0: 1 of 4 train samples have non-finite"):
        _fit_los_lr(zero, spec)   # log 0 of the zero channel's fingerprint: the case refused
    empty = TaskData("LoS", "se", td.inputs[:0], td.known, td.region, np.zeros(0, np.int64),
                     np.ones(0, np.float32), {})
    with pytest.raises(ValueError, match="site se has no LoS train samples"):
        _fit_los_lr(empty, spec)


def test_evaluate_baselines_reports_headline_and_variants(site):
    spec, arrays, err = site
    data = SiteData(spec, arrays)
    head = evaluate_baselines(data, spec, "test", tasks=("CP", "LoS"))
    assert set(head) == {"CP", "LoS"} and head["CP"]["error"] == pytest.approx(err["CP-hold"])
    assert set(head["LoS"]) >= {"accuracy", "f1"}
    every = evaluate_baselines(data, spec, "test", variants=True, tasks=("CP",))
    assert set(every) == {"CP-hold", "CP-linear", "CP-LMMSE3D"} and every["CP-linear"]["error"] == pytest.approx(err["CP-linear"])


def test_kron_lmmse_against_the_full_matrix_formula():
    # ĥ = R_ho (R_oo + I/snr)⁻¹ y with R = R_t ⊗ R_f ⊗ R_s written out as a (G·K·N)² matrix: the
    # eigen-factored estimator and its error variance must give the same numbers (CE's comb
    # and CP's history sets).
    from fedfm.estimators import kron_error_variance, kron_lmmse, kron_observed

    rng = np.random.default_rng(0)
    G, K, N = 5, 8, 3

    def cov(n):
        a = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
        r = a @ a.conj().T
        return r / (np.trace(r).real / n)

    covs = (cov(G), cov(K), cov(N))
    R = np.kron(np.kron(covs[0], covs[1]), covs[2])
    for known in (np.arange(K)[None, :, None] % 3 == 0, np.arange(G)[:, None, None] < 3):
        known = np.broadcast_to(known, (G, K, N))
        obs = kron_observed(known)
        o = np.flatnonzero(known.reshape(-1))
        y = rng.standard_normal((2, o.size)) + 1j * rng.standard_normal((2, o.size))
        snr = np.array([3.0, 30.0])
        want = np.stack([R[:, o] @ np.linalg.solve(R[np.ix_(o, o)] + np.eye(o.size) / s, v) for v, s in zip(y, snr)])
        got = kron_lmmse(y.reshape(2, len(obs[0]), len(obs[1]), len(obs[2])), covs, obs, snr)
        np.testing.assert_allclose(got.reshape(2, -1), want, rtol=2e-4, atol=2e-4)
        for s in snr:   # its error variance: the diagonal of R − R_ho (R_oo + I/snr)⁻¹ R_oh
            post = R - R[:, o] @ np.linalg.solve(R[np.ix_(o, o)] + np.eye(o.size) / s, R[o, :])
            var = kron_error_variance(covs, obs, s)
            np.testing.assert_allclose(var.reshape(-1), np.real(np.diagonal(post)), rtol=1e-6, atol=1e-9)
            assert var.reshape(-1)[np.setdiff1d(np.arange(R.shape[0]), o)].min() > 1e-3   # unseen entries stay uncertain
    assert kron_observed(np.eye(4, dtype=bool)[:, :, None]) is None           # a diagonal: no Kronecker set


def test_kron_covariances_of_a_separable_channel():
    # h = A_t · w · A_f^T (per antenna A_s): the fitted factors recover the generating
    # covariances up to sampling error (2 000 draws: ±5 % of the unit diagonal, stated tolerance).
    from fedfm.estimators import kron_covariances

    rng = np.random.default_rng(1)
    G, K, N, S = 3, 4, 2, 2000
    Lt, Lf, Ls = (np.linalg.cholesky(np.eye(n) + 0.6 * (np.eye(n, k=1) + np.eye(n, k=-1))) for n in (G, K, N))
    w = (rng.standard_normal((S, G, K, N)) + 1j * rng.standard_normal((S, G, K, N))) / np.sqrt(2)
    h = np.einsum("ga,kb,nc,sabc->sgkn", Lt, Lf, Ls, w)
    for R, L in zip(kron_covariances(h), (Lt, Lf, Ls)):
        want = L @ L.T
        np.testing.assert_allclose(R, want / (np.trace(want) / len(want)), atol=0.05)
    # raw channels carry path loss: every sample weighs the same whatever its power
    gain = 10.0 ** rng.uniform(-7, 0, (S, 1, 1, 1))
    for R, want in zip(kron_covariances(h * np.sqrt(gain)), kron_covariances(h)):
        np.testing.assert_allclose(R, want, rtol=1e-9, atol=1e-12)


def test_kronecker_lmmse_beats_interpolation_hold_and_plain_ar(site):
    _, _, err = site
    assert err["CE-LMMSE3D"] < err["CE-LMMSE"] < err["CE-interp"]     # time and antennas help beyond frequency
    assert err["CP-LMMSE3D"] < err["CP-hold"]
    assert err["PF-ARLMMSE"] < err["PF-AR"]                            # AR on a denoised band carries less noise
