"""Site/federation YAML validation: every bad input gives one line naming file, key, value."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedfm.scenarios import (ConfigError, derive_seed, load_federation, load_site, site_from_dict,
                             spec_hash, split_seed)

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "scenarios/sites/uma_1g9.yaml").read_text()


def write(tmp_path, text, name="site.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_scenarios_load():
    fed = load_federation(ROOT / "scenarios/federations/default.yaml")
    assert len(fed.train_sites) >= 4 and len(fed.heldout_sites) >= 2
    assert {s.environment for s in fed.train_sites} == {"uma", "umi", "rma", "inh"}
    uma = load_site(ROOT / "scenarios/sites/uma_1g9.yaml")
    # LLM4WM Table II defaults
    assert (uma.sub6.carrier_ghz, uma.sub6.antennas, uma.sub6.subcarriers) == (1.9, 8, 64)
    assert (uma.mmwave.carrier_ghz, uma.mmwave.antennas, uma.mmwave.codebook_beams) == (28.0, 64, 256)
    assert (uma.time.history_slots, uma.time.horizon_slots, uma.time.slot_interval_ms) == (16, 4, 0.5)
    assert uma.estimation.pilot_spacing == 4 and uma.estimation.snr_db_min == 10.0
    held = {(s.sub6.antennas, s.sub6.subcarriers) for s in fed.heldout_sites}
    train = {(s.sub6.antennas, s.sub6.subcarriers) for s in fed.train_sites}
    assert held - train, "one held-out site must have a configuration no training site has"
    bench = load_federation(ROOT / "scenarios/federations/benchmark.yaml")
    assert all(s.samples.train >= 5000 for s in bench.train_sites)


@pytest.mark.parametrize("old,new,key,fragment", [
    ("antennas: 8 ", "antennas: -8 ", "sub6.antennas", "-8"),
    ("subcarriers: 64         # sampled", "subcarriers: 0          # sampled", "sub6.subcarriers", "0"),
    ("codebook_beams: 256", "codebook_beams: 32", "mmwave.codebook_beams", "32"),
    ("history_slots: 16", "history_slots: 0", "time.history_slots", "0"),
    ("horizon_slots: 4", "horizon_slots: 0", "time.horizon_slots", "0"),
    ("speed_min_mps: 0.0", "speed_min_mps: 40.0", "ue.speed_min_mps", "40.0"),
    ("environment: uma", "environment: suburb", "environment", "suburb"),
    ("los_mode: auto", "los_mode: sometimes", "los_mode", "sometimes"),
    ("antennas: 8 ", "antennas: eight ", "sub6.antennas", "eight"),
    ("seed: 101", "seed: 101\ncolour: blue", "colour", "colour"),
    ("  slot_interval_ms: 0.5", "  slot_interval_ms: 0.5\n  jitter: 1", "time.jitter", "jitter"),
    ("name: uma_1g9\n", "", "name", "name"),
    # physically meaningless values that once validated and generated (a bad-input audit)
    ("speed_max_mps: 15.0", "speed_max_mps: 1.0e+9", "ue.speed_max_mps", "1000000000.0"),
    ("distance_min_m: 35.0", "distance_min_m: 1.0", "ue.distance_min_m", "1.0"),
    ("distance_max_m: 300.0", "distance_max_m: 8000.0", "ue.distance_max_m", "8000.0"),
    ("  train: 512", "  train: 100000000000", "samples.train", "100000000000"),
])
def test_bad_site_names_file_key_value(tmp_path, old, new, key, fragment):
    # Prepare
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    # Execute
    with pytest.raises(ConfigError) as err:
        load_site(path)
    # Assert: one line naming the file, the key and the value
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg and f"`{key}`" in msg and fragment in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nsub6: [1, 2\n")
    with pytest.raises(ConfigError, match=r"site.yaml: malformed YAML at line \d"):
        load_site(path)


def test_cli_validate_one_line_and_exit_code(tmp_path):
    bad = write(tmp_path, GOOD.replace("environment: uma", "environment: moon"))
    r = subprocess.run([sys.executable, "-m", "fedfm.scenarios", "validate", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "`environment`" in lines[0] and "moon" in lines[0]


def test_cli_generate_bad_site_no_traceback(tmp_path):
    bad = write(tmp_path, GOOD.replace("antennas: 8 ", "antennas: 0 "))
    out = tmp_path / "x.npz"
    r = subprocess.run([sys.executable, "-m", "fedfm.scenarios", "generate", str(bad), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "`sub6.antennas`" in r.stderr
    assert not out.exists()


def test_a_site_file_given_as_the_federation_says_so(tmp_path):
    from fedfm.config import federation_site_paths

    site = write(tmp_path, GOOD)
    for load in (load_federation, federation_site_paths):
        with pytest.raises(ConfigError, match=rf"^{site}: a site file \(it has `environment`\), not a federation"):
            load(site)


def test_federation_rejects_missing_site(tmp_path):
    from fedfm.config import load_federation_sites

    fed = write(tmp_path, "name: f\ntrain_sites: [nowhere.yaml]\n", "fed.yaml")
    needle = f"nowhere.yaml: no such file, listed in `train_sites` of {fed}"
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_federation(fed)
    # the lenient loader (launchers, ServerApp) excludes that site with the same line
    (entry,) = load_federation_sites(fed)
    assert entry.spec is None and needle in entry.error
    # a folder listed as a site: named with the federation that lists it
    fed = write(tmp_path, "name: f\ntrain_sites: [.]\n", "fed.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: a folder, not a file, listed in `train_sites` of {fed}")):
        load_federation(fed)


@pytest.mark.parametrize("text, needle", [
    ("name: f\ntrain_sites: [a.yaml]\nheldout_site: [b.yaml]\n", "unknown key `heldout_site`"),  # held nothing out
    ("train_sites: [a.yaml]\n", "missing required key `name`"),
    ("name: [x]\ntrain_sites: [a.yaml]\n", "`name` = ['x'] is not allowed; expected a non-empty string"),
    ("name: f\ntrain_sites: []\n", "`train_sites` = [] is not allowed"),
    ("name: f\ntrain_sites: [a.yaml]\nheldout_sites: b.yaml\n", "`heldout_sites` = 'b.yaml' is not allowed"),
    # falsy values that are no list once read as "none held out" / "[]"
    ("name: f\ntrain_sites: [a.yaml]\nheldout_sites: {}\n", "`heldout_sites` = {} is not allowed"),
    ("name: f\ntrain_sites: [a.yaml]\nheldout_sites: 0\n", "`heldout_sites` = 0 is not allowed"),
    ("name: f\ntrain_sites: ''\n", "`train_sites` = '' is not allowed"),
])
def test_both_federation_loaders_refuse_a_malformed_federation_file_alike(tmp_path, text, needle):
    from fedfm.config import load_federation_sites

    fed = write(tmp_path, text, "fed.yaml")
    for load in (load_federation, load_federation_sites):
        with pytest.raises(ConfigError, match=re.escape(f"{fed}: {needle}")):
            load(fed)


def test_hash_and_seeds():
    a = site_from_dict({"name": "a", "environment": "uma"}, "x.yaml")
    b = site_from_dict({"name": "a", "environment": "uma"}, "elsewhere.yaml")
    c = site_from_dict({"name": "a", "environment": "uma", "sub6": {"antennas": 16}}, "x.yaml")
    assert spec_hash(a) == spec_hash(b) != spec_hash(c)  # the path is not part of the data
    seeds = {split_seed(a, s) for s in ("train", "val", "test")}
    assert len(seeds) == 3
    assert derive_seed(1, "x") == derive_seed(1, "x") != derive_seed(2, "x")


@pytest.mark.parametrize("text, fragment", [
    (GOOD.replace("seed: 101", "seed: 101\nname: other"), "key `name` appears twice (lines"),
    (GOOD.replace("distance_max_m: 300.0", "distance_max_m: .inf"), "`ue.distance_max_m`"),
    (GOOD.replace("distance_max_m: 300.0", "distance_max_m: 1.0e9"), "write 1.0e+3, not 1.0e3"),
    (GOOD.replace("antennas: 8 ", 'antennas: "8" '), "`sub6.antennas` = '8' is not allowed; expected a positive "
                                                   "integer (int); it is quoted: write 8, not '8'"),
    (GOOD.replace("  carrier_ghz: 1.9", "  carrier_ghz: 6.5").replace("  carrier_ghz: 28.0", "  carrier_ghz: 6.5"),
     "`mmwave.carrier_ghz` = 6.5 is not allowed; expected a carrier above sub6.carrier_ghz (6.5 GHz)"),
])
def test_yaml_a_user_gets_wrong_is_one_line_naming_the_file(tmp_path, text, fragment):
    # PyYAML keeps the last of two equal keys silently; `.inf` passed validation and crashed the
    # generator; 1.0e9 is text to YAML 1.1
    assert text != GOOD
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_site(path)
    assert str(err.value).startswith(str(path)) and fragment in str(err.value) and "\n" not in str(err.value)


def test_a_binary_file_is_not_a_traceback(tmp_path):
    from fedfm.config import federation_site_paths

    path = tmp_path / "site.yaml"
    path.write_bytes(b"name: \x96\xff\x00 x\n")
    for load in (load_site, load_federation, federation_site_paths):
        with pytest.raises(ConfigError, match=rf"^{path}: not a text file \(byte \d+ is not UTF-8\)"):
            load(path)
    r = subprocess.run([sys.executable, "-m", "fedfm.scenarios", "validate", str(path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and f"{path}: not a text file" in r.stderr
