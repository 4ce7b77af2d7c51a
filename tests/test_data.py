"""SiteData cache: keyed by spec hash, corrupt files detected and regenerated, CLI contract."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import tiny_site
from fedfm.data import ARRAY_NAMES, load_site_data, load_split, site_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def test_cache_roundtrip_and_spec_change(tmp_path):
    spec = tiny_site("cache", "umi")
    a = load_split(spec, "test", tmp_path, samples=12)
    path = site_cache_dir(spec, tmp_path) / "test-12.npz"
    assert path.exists() and path.with_suffix(".json").exists()
    mtime = path.stat().st_mtime_ns
    b = load_split(spec, "test", tmp_path, samples=12)
    assert path.stat().st_mtime_ns == mtime  # served from the cache
    for k in a:
        assert np.array_equal(a[k], b[k])
        # and laid out alike: reductions over another layout sum in another order (the site
        # channel statistics of a run that generated its data were a few ulps off a later run's)
        assert a[k].flags.c_contiguous and b[k].flags.c_contiguous, k
    from fedfm.estimators import kron_covariances

    assert all(np.array_equal(x, y) for x, y in zip(kron_covariances(a["h_sub6"]), kron_covariances(b["h_sub6"])))
    changed = tiny_site("cache", "umi", sub6={"antennas": 4})
    c = load_split(changed, "test", tmp_path, samples=12)
    assert site_cache_dir(changed, tmp_path) != site_cache_dir(spec, tmp_path)
    assert c["h_sub6"].shape[-1] == 4


def test_corrupt_cache_is_reported_and_regenerated(tmp_path, capfd):
    spec = tiny_site("corrupt", "rma")
    good = load_split(spec, "val", tmp_path, samples=8)
    path = site_cache_dir(spec, tmp_path) / "val-8.npz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    again = load_split(spec, "val", tmp_path, samples=8)
    err = capfd.readouterr().err
    assert "corrupt cache file" in err and str(path) in err
    for k in good:
        assert np.array_equal(good[k], again[k])
    # a flipped byte in the middle (same length) is caught by the checksum too
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    load_split(spec, "val", tmp_path, samples=8)
    assert "checksum mismatch" in capfd.readouterr().err


def test_site_data_splits_use_spec_counts(tmp_path):
    spec = tiny_site("counts", "inh", samples={"train": 10, "val": 3, "test": 5})
    site = load_site_data(spec, cache_dir=tmp_path)
    assert {s: site.splits[s]["h_sub6"].shape[0] for s in site.splits} == {"train": 10, "val": 3, "test": 5}


def test_cli_generate_writes_contract_arrays(tmp_path):
    out = tmp_path / "uma.npz"
    r = subprocess.run([sys.executable, "-m", "fedfm.scenarios", "generate",
                        str(ROOT / "scenarios/sites/umi_2g1_n16.yaml"), "--split", "test", "--samples", "6",
                        "--out", str(out), "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert set(z.files) == set(ARRAY_NAMES) | {"codebook"}
        assert z["h_sub6"].shape == (6, 20, 32, 16) and z["codebook"].shape == (64, 256)


def test_a_cache_that_cannot_be_used_is_one_line(tmp_path, capfd):
    import json

    import pytest

    spec = tiny_site("sidecar", "uma")
    good = load_split(spec, "val", tmp_path, samples=8)
    path = site_cache_dir(spec, tmp_path) / "val-8.npz"
    path.with_suffix(".json").write_text(json.dumps([]))  # valid JSON, not the sidecar's object
    again = load_split(spec, "val", tmp_path, samples=8)  # reported and regenerated, not a TypeError
    err = capfd.readouterr().err
    assert f"{path.with_suffix('.json')}: corrupt cache sidecar (no `sha256` string)" in err  # names the sidecar
    assert all(np.array_equal(good[k], again[k]) for k in good)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=rf"^{blocker}/sidecar-\w+: cannot write the site's data cache"):
        load_split(spec, "val", blocker, samples=8)
    # a sidecar's path taken by a folder: that path named, no temp file left beside the cache
    other = tmp_path / "other"
    sidecar = site_cache_dir(spec, other) / "val-8.json"
    sidecar.mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^{sidecar}: cannot write the site's data cache \(Is a directory\)"):
        load_split(spec, "val", other, samples=8)
    assert sorted(p.name for p in sidecar.parent.iterdir()) == ["val-8.json", "val-8.npz"]


def test_site_tasks_carry_the_channel_stats_of_the_samples_the_site_trains_on(tmp_path):
    # CE, CP and PF views carry the site's ChannelStats, fitted on the first `stats_samples` train
    # channels (by default: the train split's own max_samples; all for the other splits); DE and
    # PE their KnnPrior on the same samples' labels, BF its BfPrior, LoS its LosPrior.
    from fedfm.estimators import kron_covariances
    from fedfm.federated import load_site_tasks

    spec = tiny_site("stats", samples={"train": 24, "val": 8, "test": 8})
    h = load_split(spec, "train", tmp_path)["h_sub6"]
    train = load_site_tasks(spec, "train", str(tmp_path), max_samples=10)
    test = load_site_tasks(spec, "test", str(tmp_path), stats_samples=10)
    everything = load_site_tasks(spec, "val", str(tmp_path))
    assert train["CE"].extras["stats"] is train["CP"].extras["stats"] is train["PF"].extras["stats"] is test["CE"].extras["stats"]
    assert np.ptp(np.log10(np.mean(np.abs(h) ** 2, axis=(1, 2, 3)))) > 1        # raw channels: path loss
    for R, want in zip(train["CE"].extras["stats"].covs, kron_covariances(h[:10])):
        np.testing.assert_allclose(R, want, rtol=1e-10, atol=1e-12)
    for R, want in zip(everything["CP"].extras["stats"].covs, kron_covariances(h)):
        np.testing.assert_allclose(R, want, rtol=1e-10, atol=1e-12)
    assert not np.allclose(everything["CP"].extras["stats"].covs[1], train["CE"].extras["stats"].covs[1])
    wider = load_site_tasks(spec, "train", str(tmp_path), max_samples=5, stats_samples=12)   # not the 5 loaded
    for R, want in zip(wider["CE"].extras["stats"].covs, kron_covariances(h[:12])):
        np.testing.assert_allclose(R, want, rtol=1e-10, atol=1e-12)
    assert train["CE"].extras["stats"].snr_db == 0.5 * (spec.estimation.snr_db_min + spec.estimation.snr_db_max)
    # the PF head's AR order: chosen on the same train samples as PF-ARLMMSE chooses it
    from fedfm.baselines import pf_ar_lmmse_order
    view = load_site_tasks(spec, "train", str(tmp_path), max_samples=10, tasks=("PF",))["PF"]
    assert train["PF"].extras["stats"].pf_order == pf_ar_lmmse_order(view, kron_covariances(h[:10])) is not None
    # DE/PE: the site's kNN on the labels of the same train samples; BF: the spectrum BF-AoA
    # chose on them; LoS: LoS-logistic fitted on them; none of these where labels=False
    from fedfm.baselines import BfPrior, KnnPrior, LosPrior, _fit_bf
    from fedfm.tasks import normalise_target
    for t in ("DE", "PE"):
        prior = train[t].extras["stats"]
        assert isinstance(prior, KnnPrior) and prior is test[t].extras["stats"] and prior.task == t
        np.testing.assert_allclose(prior.labels, normalise_target(t, train[t].targets), rtol=1e-6)
    assert train["BF"].extras["stats"] == test["BF"].extras["stats"] == BfPrior(_fit_bf(train["BF"], spec)["method"])
    assert train["LoS"].extras["stats"] == test["LoS"].extras["stats"] == LosPrior.fit(train["LoS"])
    full = load_site_tasks(spec, "train", str(tmp_path), tasks=("LoS",), labels=False)["LoS"]   # all 24 train
    assert everything["LoS"].extras["stats"] == LosPrior.fit(full)
    assert everything["LoS"].extras["stats"] != LosPrior.fit(everything["LoS"])  # not val's
    blind = load_site_tasks(spec, "test", str(tmp_path), stats_samples=10, labels=False)
    assert all("stats" not in blind[t].extras for t in ("BF", "DE", "PE", "LoS")) and "stats" in blind["CE"].extras
