"""RunConfig from Flower's flat run config; pyproject defaults in sync; lenient federation loading."""
import dataclasses
import itertools
import tomllib
from pathlib import Path

import pytest

from fedfm.config import RunConfig, federation_site_paths, load_federation_sites, train_site_for_partition

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_dataclass_defaults():
    flwr_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    assert set(flwr_cfg) == set(fields)  # every key Flower accepts is a RunConfig field and back
    assert {k: v for k, v in flwr_cfg.items()} == fields


def test_readme_lists_every_run_config_key_with_its_default():
    """README's run-config table: every RunConfig field once, with the dataclass default."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| key | default | what it sets |") + 2
    rows = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start:])]
    listed = {}
    for row in rows:
        keys_cell, defaults_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
        keys = [k.strip().strip("`") for k in keys_cell.split(",")]
        defaults = [tomllib.loads(f"v = {d.strip().strip('`')}")["v"] for d in defaults_cell.split(",")]
        assert len(keys) == len(defaults), row
        for key, default in zip(keys, defaults):
            assert key not in listed, f"{key} listed twice"
            listed[key] = default
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    assert listed == fields


def test_from_flower_resolves_paths_and_coerces_ints(tmp_path):
    cfg = RunConfig.from_flower({"lr": 1, "federation": "fed.yaml", "out-dir": str(tmp_path / "r")}, base_dir=tmp_path)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.federation == str(tmp_path / "fed.yaml") and cfg.run_dir == tmp_path / "r"
    assert RunConfig.from_flower(cfg.to_flower()) == cfg  # round trip


@pytest.mark.parametrize("key, value, needle", [
    ("strategy", "fedsgd", "one of fedavg, fedprox, fedadam, fedavgm"),
    ("head-refit-scope", "embedding", "one of head, features"),
    ("head-prior-tasks", "BF,CE", "'all' or a comma-separated list of BF, DE, PE, LoS (the pooled heads)"),
    ("head-prior-tasks", "", "'all' or a comma-separated list of BF, DE, PE, LoS (the pooled heads)"),
    ("num-server-rounds", 0, "integer >= 1"),
    ("fraction-train", 1.5, "(0, 1]"),
    ("fraction-evaluate", -0.5, "[0, 1] (0 = no federated evaluation)"),
    ("lr", "fast", "expected a number"),
    ("lora-r", True, "expected an integer"),
    ("nonsense-key", 1, "allowed keys"),
])
def test_bad_values_name_key_value_and_allowed(key, value, needle):
    with pytest.raises(ValueError) as e:
        RunConfig.from_flower({key: value})
    assert f"`{key}`" in str(e.value) and needle in str(e.value)


def test_head_prior_tasks_names_the_pooled_heads_it_holds_and_needs_head_prior_mu():
    with pytest.raises(ValueError, match=r"^run config: `head-prior-tasks` = 'BF' is used only with `head-prior-mu` > 0"):
        RunConfig.from_flower({"head-prior-tasks": "BF"})
    assert RunConfig.from_flower({"head-prior-mu": 1.0, "head-prior-tasks": "LoS, BF"}).prior_tasks == ("BF", "LoS")
    assert RunConfig.from_flower({"head-prior-mu": 1.0}).prior_tasks == ("BF", "DE", "PE", "LoS")


@pytest.mark.parametrize("given, needle", [
    ({"fedprox-mu": 0.1}, "used only by strategy=fedprox, and `strategy` is 'fedavg'"),
    ({"strategy": "fedadam", "server-lr": 2.0}, "used only by strategy=fedavgm, and `strategy` is 'fedadam'"),
    ({"strategy": "fedprox", "fedadam-eta": 0.1}, "used only by strategy=fedadam"),
    ({"server-momentum": 0.9}, "used only by strategy=fedavgm"),
    ({"head-refit-scope": "features"}, "used only with `head-refit-epochs` >= 1"),
])
def test_a_knob_the_run_would_ignore_is_refused(given, needle):
    # a FedProx mu under FedAvg ran FedAvg and recorded mu as if it had been used
    with pytest.raises(ValueError) as e:
        RunConfig.from_flower(given)
    key = next(k for k in given if k != "strategy")
    assert f"`{key}` = {given[key]!r}" in str(e.value) and needle in str(e.value)
    # the same knob under its own strategy, and every default under any strategy, is fine
    owner = {"fedprox-mu": "fedprox", "fedadam-eta": "fedadam", "server-lr": "fedavgm",
             "server-momentum": "fedavgm"}.get(key)
    fixed = {key: given[key], **({"strategy": owner} if owner else {"head-refit-epochs": 1})}
    assert RunConfig.from_flower(fixed).to_flower()[key] == given[key]
    for strategy in ("fedavg", "fedprox", "fedadam", "fedavgm"):
        RunConfig.from_flower({**RunConfig().to_flower(), "strategy": strategy})


def test_federated_evaluation_is_refused_under_the_pretrain_stage():
    # the sites' evaluate scores the fine-tuned tasks: under stage=pretrain it would be ignored
    with pytest.raises(ValueError, match=r"^run config: `fraction-evaluate` = 0.5 is used only with stage=finetune"):
        RunConfig.from_flower({"stage": "pretrain", "fraction-evaluate": 0.5})
    assert RunConfig.from_flower({"fraction-evaluate": 0.5}).fraction_evaluate == 0.5


def test_broken_site_yaml_is_isolated(tmp_path):
    (tmp_path / "good.yaml").write_text("name: good\nenvironment: uma\n")
    (tmp_path / "bad.yaml").write_text("name: bad\nenvironment: uma\nsub6: {antennas: -4}\n")
    fed = tmp_path / "fed.yaml"
    (tmp_path / "held.yaml").write_text("name: held\nenvironment: umi\n")
    fed.write_text("name: f\ntrain_sites: [good.yaml, bad.yaml]\nheldout_sites: [held.yaml]\n")
    assert [role for _, role in federation_site_paths(fed)] == ["train", "train", "heldout"]
    entries = load_federation_sites(fed)
    assert entries[0].spec.name == "good" and not entries[0].error
    assert entries[1].spec is None and entries[1].name == "bad"
    assert "sub6.antennas" in entries[1].error and "-4" in entries[1].error
    assert train_site_for_partition(fed, 1, 2).error == entries[1].error
    with pytest.raises(ValueError, match="num-supernodes=2"):
        train_site_for_partition(fed, 0, 3)


def test_eval_every_schedule():
    cfg = RunConfig(num_server_rounds=7, eval_every=3)
    assert [r for r in range(8) if cfg.evaluates_round(r)] == [0, 3, 6, 7]
    assert all(RunConfig(num_server_rounds=4).evaluates_round(r) for r in range(5))
    with pytest.raises(ValueError, match=r"`eval-every` = 0 is not allowed; expected an integer >= 1"):
        RunConfig(eval_every=0)


def test_resume_mismatch_names_the_first_changed_training_key():
    from fedfm.config import resume_mismatch

    recorded = RunConfig(federation="/f.yaml", lr=1e-3).to_flower()
    assert resume_mismatch(RunConfig(federation="/g.yaml", lr=1e-3, num_server_rounds=9, device="cpu",
                                     eval_every=2, round_timeout=5.0), recorded) is None
    why = resume_mismatch(RunConfig(federation="/f.yaml", lr=2e-3, seed=3), recorded)
    assert why.startswith("`lr` is 0.002 here but the run was started with 0.001") and "set lr=0.001" in why
    # a key the run's fedfm did not record yet (a run from before head-prior-tasks) had its
    # default: the same value resumes, another one is refused
    older = {k: v for k, v in RunConfig(head_prior_mu=1.0).to_flower().items() if k != "head-prior-tasks"}
    assert resume_mismatch(RunConfig(head_prior_mu=1.0), older) is None
    why = resume_mismatch(RunConfig(head_prior_mu=1.0, head_prior_tasks="BF"), older)
    assert why.startswith("`head-prior-tasks` is 'BF' here but the run was started with 'all'"), why


def test_with_recorded_settings_fills_what_is_not_given(tmp_path):
    import json

    from fedfm.config import with_recorded_settings

    rec = {**RunConfig(federation="/f.yaml", lr=5e-3, strategy="fedavgm").to_flower(), "a-removed-key": 1}
    (tmp_path / "config.json").write_text(json.dumps({"run_config": rec}))
    got = with_recorded_settings({"resume": str(tmp_path), "num-server-rounds": 7})
    assert got["lr"] == 5e-3 and got["strategy"] == "fedavgm" and got["num-server-rounds"] == 7
    assert "a-removed-key" not in got and "out-dir" not in got and got["resume"] == str(tmp_path)
    assert with_recorded_settings({"lr": 1.0}) == {"lr": 1.0}
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: cannot read the run's recorded settings"):
        with_recorded_settings({"resume": str(tmp_path)})
