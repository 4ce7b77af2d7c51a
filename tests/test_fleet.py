"""scripts/make_fleet.py: a federation of many sites written as plain, valid YAMLs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedfm.scenarios import ENVIRONMENTS, load_federation, spec_hash

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_fleet", ROOT / "scripts" / "make_fleet.py")
make_fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fleet)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fleet_writes_valid_distinct_sites_that_keep_the_heldout_sites_unseen(tmp_path):
    path = make_fleet.write_fleet(tmp_path / "a", 10, seed=3, samples={"train": 16, "val": 4, "test": 8})
    fed = load_federation(path)
    assert len(fed.train_sites) == 10
    # environments in turn: 10 sites = 3 UMa, 3 UMi, 2 RMa, 2 InH
    assert [sum(s.environment == e for s in fed.train_sites) for e in ENVIRONMENTS] == [3, 3, 2, 2]
    assert len({s.name for s in fed.train_sites}) == 10
    assert len({s.seed for s in fed.train_sites}) == 10
    assert len({spec_hash(s) for s in fed.train_sites}) == 10          # ten different caches, ten datasets
    assert all((s.samples.train, s.samples.val, s.samples.test) == (16, 4, 8) for s in fed.train_sites)
    # the held-out sites are the repository's own files, and no fleet site takes their novelty away
    assert [Path(s.path) for s in fed.heldout_sites] == [(ROOT / h).resolve() for h in make_fleet.HELDOUT]
    assert not any(s.environment == "uma" and s.sub6.carrier_ghz == 2.4 for s in fed.train_sites)
    assert all((s.sub6.antennas, s.sub6.subcarriers) == (8, 64) for s in fed.train_sites)
    # every draw lies in its environment's ranges, and the draws do vary
    for s in fed.train_sites:
        d = make_fleet.ENV_DRAWS[s.environment]
        assert s.sub6.carrier_ghz in d["carriers"]
        assert (s.ue.speed_min_mps, s.ue.speed_max_mps) in d["speeds"]
        assert (s.ue.distance_min_m, s.ue.distance_max_m) in d["distances"]
        assert s.estimation.snr_db_min == s.estimation.snr_db_max in make_fleet.SNRS_DB
    assert len({s.sub6.carrier_ghz for s in fed.train_sites}) > 3
    assert len({s.estimation.snr_db_min for s in fed.train_sites}) > 1
    # the same arguments write the same bytes; another seed other sites
    make_fleet.write_fleet(tmp_path / "b", 10, seed=3, samples={"train": 16, "val": 4, "test": 8})
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    other = load_federation(make_fleet.write_fleet(tmp_path / "c", 10, seed=4))
    assert {s.seed for s in other.train_sites}.isdisjoint({s.seed for s in fed.train_sites})


def test_fleet_refuses_bad_arguments_and_a_used_folder_in_one_line_and_loses_nothing(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("earlier results")
    assert make_fleet.main(["--sites", "4", "--out", str(used)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(used) in err and "nothing was written" in err
    assert _files(used) == {"keep.txt": b"earlier results"}
    for args, says in ((["--sites", "0"], "--sites 0"), (["--sites", "2", "--train", "1"], "--train 1"),
                       (["--sites", "2", "--seed", "-1"], "--seed -1")):
        assert make_fleet.main([*args, "--out", str(tmp_path / "new")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_fleet_checks_its_heldout_sites_before_writing(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / make_fleet.HELDOUT[0]).read_text().replace("codebook_beams: 256", "codebook_beams: 128")
                   .replace("oversampling: 4", "oversampling: 2"))
    monkeypatch.setattr(make_fleet, "HELDOUT", (str(bad),))
    assert make_fleet.main(["--sites", "2", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "codebook_beams is 128" in err and "nothing was written" in err
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("num_sites", [1, 4])
def test_fleet_of_any_size_reads_back_as_a_federation(tmp_path, num_sites, capsys):
    assert make_fleet.main(["--sites", str(num_sites), "--out", str(tmp_path / "f")]) == 0
    assert f"{num_sites} training sites" in capsys.readouterr().out
    assert len(load_federation(tmp_path / "f" / "federation.yaml").train_sites) == num_sites
