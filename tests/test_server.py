"""ServerApp end to end in process (real ClientApp handlers, no Ray): what a run writes,
resume equivalence, and a broken site YAML that leaves the other sites' rounds intact."""
import json
import time

import numpy as np
import pytest

from fedfm.metrics import HEADLINE
from fedfm.runlog import RunLog, read_json, read_jsonl, read_samples, samples_path
from fl_fixtures import (NUM_BEAMS, InProcessGrid, make_backbone, run_config, server_context, task_identity,  # noqa: F401
                         write_federation)
from server.app import main as server_main

TASKS = {"CE", "CP", "PF", "BF", "DE", "PE", "LoS"}


def run_server(rc: dict, nodes: int = 2) -> RunLog:
    server_main(InProcessGrid(rc, nodes), server_context(rc))
    return RunLog(rc.get("resume") or rc["out-dir"])


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return make_backbone(tmp_path_factory.mktemp("bb") / "backbone.safetensors")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir, backbone):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    root = tmp_path_factory.mktemp("server")
    rc = run_config(write_federation(root), root / "run-a", cache_dir, backbone[0])
    return rc, run_server(rc)


def test_run_folder_contents(full_run, backbone):
    rc, log = full_run
    conf = log.read_config()
    assert conf["backbone"] == {"path": backbone[0], "sha256": backbone[1], "source": "given"}
    assert [s["name"] for s in conf["federation"]["sites"]] == ["alpha", "beta", "gamma"]
    assert conf["versions"]["flwr"].startswith("1.") and conf["run_config"]["seed"] == 5
    fed = [r for r in read_jsonl(log.dir / "metrics.jsonl") if r["source"] == "federated"]
    assert {(r["round"], r["site"], r["task"]) for r in fed} == {
        (rnd, s, t) for rnd in (0, 1, 2) for s in ("alpha", "beta", "gamma") for t in TASKS}
    assert len(fed) == 3 * 3 * 7  # no duplicates
    assert {r["role"] for r in fed if r["site"] == "gamma"} == {"heldout"}
    baselines = json.loads((log.dir / "baselines.json").read_text())
    assert set(baselines) == {"alpha", "beta", "gamma"} and set(baselines["gamma"]) == TASKS
    adapter = conf["model"]["adapter_bytes"]
    ledger = read_jsonl(log.dir / "ledger.jsonl")
    assert {(r["round"], r["site"], r["status"]) for r in ledger} == {
        (rnd, s, "ok") for rnd in (1, 2) for s in ("alpha", "beta")}
    assert all(r["bytes_down"] == r["bytes_up"] == adapter for r in ledger)
    assert 0 < adapter < conf["model"]["full_model_bytes"]
    assert log.complete_rounds() == [0, 1, 2]


def test_report_files(full_run):
    _, log = full_run
    report = json.loads((log.dir / "report.json").read_text())
    assert report["final_round"] == 2 and report["rounds"] == [0, 1, 2]
    assert set(report["sites"]) == {"alpha", "beta", "gamma"}
    for site in report["sites"].values():  # every task: finite headline for model and baseline
        assert set(site["tasks"]) == TASKS
        for task, entry in site["tasks"].items():
            key = HEADLINE[task]
            assert np.isfinite(entry["federated"][key]) and np.isfinite(entry["baseline"][key])
        # avg score: a positive number, or null where a baseline is error-free on a task (ratio ∞)
        assert site["avg_score"] is None or site["avg_score"] > 0
    md = (log.dir / "report.md").read_text()
    assert md.index("## Training sites") < md.index("## Held-out sites") < md.index("## Communication")
    assert "| alpha |" in md and "| gamma |" in md
    # the cells' legend in full under the training table, once; the held-out table points to it
    assert md.count("The baselines are the headline ones") == 1
    assert md.index("The baselines are the headline ones") < md.index("## Held-out sites")
    assert "Cells: federated / baseline; avg score and baselines as in the training sites' table." in md
    # each task averaged over the training sites, at round 0 and the final round with intervals
    # from the run's per-sample errors, and the same means as the per-round summary
    means = report["cells_95"]["train"]["task_means"]
    final = report["per_round"][-1]["task_ratio_train"]
    assert set(means) == set(final) and all(means[t]["lo"] <= means[t]["hi"] for t in means)
    assert all(means[t]["ratio"] == pytest.approx(final[t], rel=1e-4) for t in means)
    assert "| training | 0 |" in md and "| training | 2 |" in md and " at 95 %) |" in md
    assert {"CE_vs_round.png", "final_vs_baseline.png", "bytes_per_round.png"} <= set(report["plots"])
    assert "val_and_test_by_round.png" not in report["plots"]  # no federated evaluation in this run
    assert all((log.dir / "plots" / p).stat().st_size > 1000 for p in report["plots"])


def test_resume_matches_uninterrupted_run(full_run, tmp_path, cache_dir, backbone, task_identity):
    rc_full, full = full_run
    rc = run_config(rc_full["federation"], tmp_path / "run-b", cache_dir, backbone[0], **{"num-server-rounds": 1})
    run_server(rc)
    # an interrupted round 2: stray lines that resume must drop
    RunLog(tmp_path / "run-b").append_ledger([{"round": 2, "site": "alpha", "status": "ok", "bytes_down": 0,
                                               "bytes_up": 0}])
    resumed = run_server({**rc, "num-server-rounds": 2, "resume": str(tmp_path / "run-b")})
    a, _, _ = full.load_checkpoint(2)
    b, _, state = resumed.load_checkpoint(2)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert resumed.read_config()["resumed_at_rounds"] == [1]
    fed = [r for r in read_jsonl(resumed.dir / "metrics.jsonl") if r["source"] == "federated"]
    assert len(fed) == 3 * 3 * 7
    assert len(read_jsonl(resumed.dir / "ledger.jsonl")) == 2 * 2


def test_a_run_stopped_in_round_1_resumes_without_scoring_round_0_twice(full_run, tmp_path, cache_dir, backbone,
                                                                       task_identity):
    import shutil

    rc_full, full = full_run
    rc = run_config(rc_full["federation"], tmp_path / "run", cache_dir, backbone[0],
                    **{"num-server-rounds": 1, "fraction-evaluate": 1.0})
    log = run_server(rc)
    once = read_jsonl(log.dir / "metrics.jsonl")
    # the run as a stop in round 1 leaves it: round 0 checkpointed and logged, round 1 not
    shutil.rmtree(log.checkpoint_dir(1))
    log.truncate_after(0)
    assert log.last_complete_round() == 0
    run_server({**rc, "resume": str(log.dir)})
    rows = read_jsonl(log.dir / "metrics.jsonl")
    keys = [(r["round"], r["source"], r["site"], r["task"]) for r in rows if r["source"] in ("federated", "site-val")]
    assert len(keys) == len(set(keys))  # no row twice
    assert [r for r in rows if r["round"] == 0] == [r for r in once if r["round"] == 0]
    assert {r["round"] for r in rows if r["source"] == "site-val"} == {0, 1}
    evaluated = [(r["round"], r["site"]) for r in read_jsonl(log.dir / "ledger.jsonl") if r.get("kind") == "evaluate"]
    assert sorted(evaluated) == [(0, "alpha"), (0, "beta"), (1, "alpha"), (1, "beta")]
    assert log.read_config()["resumed_at_rounds"] == [0] and log.complete_rounds() == [0, 1]


def test_broken_site_yaml_logged_and_round_completes(tmp_path, cache_dir, backbone, task_identity):
    rc = run_config(write_federation(tmp_path / "fed", broken_site=True), tmp_path / "run", cache_dir, backbone[0])
    log = run_server(rc)
    events = read_jsonl(log.dir / "events.jsonl")
    beta = [e for e in events if e["site"] == "beta"]
    assert beta and all("sub6.antennas" in e["message"] for e in beta)
    assert {e["round"] for e in beta} == {0, 1, 2}  # excluded at setup, then an error reply each round
    status = {(r["round"], r["site"]): r["status"] for r in read_jsonl(log.dir / "ledger.jsonl")}
    assert status == {(1, "alpha"): "ok", (1, "beta"): "error", (2, "alpha"): "ok", (2, "beta"): "error"}
    assert log.complete_rounds() == [0, 1, 2]
    assert "sub6.antennas" in (log.dir / "report.md").read_text()


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_of_a_checkpoint_that_does_not_fit_stops_and_keeps_the_run(full_run, tmp_path, task_identity):
    from safetensors.numpy import load_file, save_file

    rc, full = full_run
    run = _copy_run(full.dir, tmp_path / "old")
    ckpt = run / "checkpoints" / "round-002" / "adapter.safetensors"
    state = load_file(str(ckpt))
    key = sorted(state)[0]
    state[key] = np.zeros(state[key].shape[:-1] + (state[key].shape[-1] + 1,), np.float32)  # an older head size
    save_file(state, str(ckpt))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError) as e:
        run_server({**rc, "num-server-rounds": 3, "resume": str(run)})
    assert str(e.value).startswith(f"{ckpt.parent}: adapter state does not fit this model")
    assert f"`{key}` has shape" in str(e.value) and "start a new run" in str(e.value)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert RunLog(run).complete_rounds() == [0, 1, 2]


def test_corrupt_baselines_cache_is_named_and_refitted(full_run, tmp_path, capsys, task_identity):
    rc, full = full_run
    run = _copy_run(full.dir, tmp_path / "run")
    good = json.loads((run / "baselines.json").read_text())
    (run / "baselines.json").write_text('{"alpha": [')
    run_server({**rc, "resume": str(run)})  # all rounds done: evaluator set-up and report only
    assert f"{run / 'baselines.json'}: not valid JSON" in capsys.readouterr().err
    assert json.loads((run / "baselines.json").read_text()) == good


def _files(run):
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_a_new_run_in_a_folder_that_holds_one_is_refused_and_the_folder_kept(full_run, tmp_path, task_identity):
    rc, full = full_run
    run = _copy_run(full.dir, tmp_path / "run")
    before = _files(run)
    with pytest.raises(ValueError, match=rf"^{run}: already holds a run \(config.json\); .*resume={run}"):
        run_server({**rc, "out-dir": str(run)})
    assert _files(run) == before


def test_a_bare_flwr_run_with_a_batch_past_a_sites_samples_is_refused_before_writing(full_run, tmp_path,
                                                                                     task_identity):
    # the launchers refuse it first; a bare `flwr run` reaches the ServerApp, which must too (a
    # batch of 10^6 repeated samples ran a site's actor out of memory mid-round)
    rc, _ = full_run
    with pytest.raises(ValueError, match=r"`batch-size` = 65 is not allowed: training site alpha .* has 64 "
                                         r"training samples.*expected an integer in \[1, 64\]"):
        run_server({**rc, "out-dir": str(tmp_path / "run"), "batch-size": 65})
    assert not (tmp_path / "run").exists()


def test_resume_keeps_the_run_backbone_and_refuses_a_replaced_one(full_run, tmp_path, backbone, task_identity):
    rc, full = full_run
    run = _copy_run(full.dir, tmp_path / "run")
    other = make_backbone(tmp_path / "other.safetensors")[0]
    before = _files(run)
    with pytest.raises(ValueError, match=rf"^resume={run}: backbone={other} differs from the run's {backbone[0]}"):
        run_server({**rc, "backbone": other, "resume": str(run)})
    assert _files(run) == before
    conf = json.loads((run / "config.json").read_text())  # the file at that path was replaced
    conf["backbone"]["sha256"] = "0" * 64
    (run / "config.json").write_text(json.dumps(conf))
    before = _files(run)
    with pytest.raises(ValueError, match=r"the run was trained on 000000000000… \(the file was replaced\)"):
        run_server({**rc, "resume": str(run)})
    assert _files(run) == before


@pytest.mark.parametrize("change, needle", [
    ({"lr": 0.5}, "`lr` is 0.5 here but the run was started with"),
    ({"strategy": "fedavgm"}, "`strategy` is 'fedavgm' here but the run was started with 'fedavg'"),
    ({"personal-heads": "PE"}, "`personal-heads` is 'PE' here but the run was started with ''"),
    ({"federation": "other"}, "differs from the run's sites (first difference: site 'alpha'"),
])
def test_resume_that_changes_what_the_run_trains_is_refused_and_the_run_kept(full_run, tmp_path, task_identity,
                                                                            change, needle):
    rc, full = full_run
    run = _copy_run(full.dir, tmp_path / "run")
    if change.get("federation") == "other":  # the same site names, one site's YAML edited
        fed = write_federation(tmp_path / "fed2")
        (fed.parent / "alpha.yaml").write_text((fed.parent / "alpha.yaml").read_text().replace("seed: ", "seed: 1"))
        change = {"federation": str(fed)}
    before = _files(run)
    with pytest.raises(ValueError) as e:
        run_server({**rc, "num-server-rounds": 3, **change, "resume": str(run)})
    assert str(e.value).startswith(f"resume={run}: ") and needle in str(e.value)
    assert _files(run) == before


def test_a_site_whose_test_data_cannot_be_made_is_excluded_from_evaluation(tmp_path, cache_dir, backbone,
                                                                           task_identity, monkeypatch, capsys):
    import server.evaluator

    real = server.evaluator.load_site_tasks

    def load_site_tasks(spec, split, *args, **kw):
        if spec.name == "gamma":
            raise OSError(f"[Errno 28] No space left on device: '{cache_dir}/gamma'")
        return real(spec, split, *args, **kw)

    monkeypatch.setattr(server.evaluator, "load_site_tasks", load_site_tasks)
    rc = run_config(write_federation(tmp_path / "fed"), tmp_path / "runs" / "{run-id}", cache_dir, backbone[0],
                    **{"num-server-rounds": 1})
    server_main(InProcessGrid(rc, 2), server_context(rc))
    log = RunLog(tmp_path / "runs" / "1")  # the default out-dir's {run-id}: Flower's run id (1 here)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["1"]
    assert log.complete_rounds() == [0, 1]
    assert {r["site"] for r in read_jsonl(log.dir / "metrics.jsonl") if r["source"] == "federated"} == {"alpha", "beta"}
    events = [e for e in read_jsonl(log.dir / "events.jsonl") if e["site"] == "gamma"]
    assert len(events) == 1 and "excluded from central evaluation" in events[0]["message"]
    assert "No space left on device" in capsys.readouterr().err


def test_the_evaluators_sites_prepared_and_scored_on_several_threads_equal_one_after_another(tmp_path, cache_dir,
                                                                                             backbone, monkeypatch):
    import fedfm.federated
    import fedfm.train
    from fedfm.config import RunConfig, load_federation_sites
    from fedfm.federated import build_run_model
    from fl_fixtures import NUM_BEAMS
    from server.evaluator import CentralEvaluator

    cfg = RunConfig.from_flower(run_config(write_federation(tmp_path / "fed"), tmp_path / "run", cache_dir,
                                           backbone[0]))
    sites = load_federation_sites(cfg.federation)
    model = build_run_model(cfg, NUM_BEAMS, backbone[0])
    import threading

    import server.evaluator

    threads, real_fit = {}, server.evaluator.fit_site_baselines

    def fit(cfg, entry, tds):  # which thread prepared which site
        threads.setdefault(len(made), set()).add(threading.get_ident())
        return real_fit(cfg, entry, tds)

    monkeypatch.setattr(server.evaluator, "fit_site_baselines", fit)
    made = {}
    for cores in (1, 3):
        monkeypatch.setattr(fedfm.train, "usable_cores", lambda: cores)
        # fitted afresh each time: the side inputs are cached per process
        monkeypatch.setattr(fedfm.federated, "_STATS", {})
        monkeypatch.setattr(fedfm.federated, "_LABEL_PRIORS", {})
        log = RunLog(tmp_path / f"cores{cores}")
        ev = CentralEvaluator(cfg, sites, model, log)
        made[cores] = (ev, read_samples(samples_path(log.dir, "baseline")),
                       (log.dir / "baselines.json").read_text())
    (one, e1, j1), (three, e3, j3) = made[1], made[3]
    assert len(threads[0]) == 1  # one worker
    assert len(threads[1]) > 1  # three sites on up to three threads: more than one ran
    assert [e.name for e in three.sites] == [e.name for e in one.sites] == ["alpha", "beta", "gamma"]
    assert j3 == j1 and list(three.baselines) == ["alpha", "beta", "gamma"]
    assert all(np.array_equal(e3[s][t], e1[s][t]) for s in e1 for t in e1[s])
    def same(a, b) -> bool:  # a fitted side input (ChannelStats, KnnPrior, ...) attribute by attribute
        if isinstance(a, (np.ndarray, tuple, list)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)) if not isinstance(a, np.ndarray) \
                else np.array_equal(a, b)
        if hasattr(a, "__dict__"):
            return type(a) is type(b) and all(same(v, vars(b)[k]) for k, v in vars(a).items() if k != "factors")
        return a == b

    for s in ("alpha", "gamma"):  # the test views' side inputs alike (a training and a held-out site)
        for t, td in one._tds[s].items():
            a, b = td.extras.get("stats"), three._tds[s][t].extras.get("stats")
            assert same(a, b), (s, t)
            assert a is None or a is not b  # fitted twice, not one cached object
    # a round scored with the sites on three threads (one torch thread each, one shared model to
    # load their states into) equals it scored one after another, bit for bit; the state is not
    # the model's own, so a site scored with the state it was built with would show
    import torch
    from flwr.app import Array, ArrayRecord

    import fedfm.evaluate

    from fedfm.model import get_adapter_state

    rng = np.random.default_rng(0)
    arrays = ArrayRecord({k: Array((v.numpy() + 0.05 * rng.standard_normal(v.shape)).astype(np.float32))
                          for k, v in get_adapter_state(model).items()})
    scored_by, real_predict = {}, fedfm.evaluate.predict

    def predict(net, td, **kw):
        scored_by.setdefault(cores, set()).add(threading.get_ident())
        assert torch.get_num_threads() == 1  # each site on one core, whatever the process's count
        return real_predict(net, td, **kw)

    monkeypatch.setattr(fedfm.evaluate, "predict", predict)
    outer = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count, which no site may score on (conftest sets 1)
    try:
        for cores, ev in ((1, one), (3, three)):
            monkeypatch.setattr(fedfm.train, "usable_cores", lambda: cores)
            ev(1, arrays)
            assert torch.get_num_threads() == 2  # the caller's again
    finally:
        torch.set_num_threads(outer)
    assert len(scored_by[1]) == 1 and len(scored_by[3]) > 1
    rows = {c: [r for r in read_jsonl(tmp_path / f"cores{c}" / "metrics.jsonl") if r["round"] == 1] for c in (1, 3)}
    assert len(rows[1]) == 21 and rows[3] == rows[1]
    e = {c: read_samples(samples_path(tmp_path / f"cores{c}", "round-001")) for c in (1, 3)}
    assert all(np.array_equal(e[3][s][t], e[1][s][t]) for s in e[1] for t in e[1][s])
    # and it is the state given that was scored (here on the test's thread, torch's own thread count)
    from fedfm.federated import torch_state
    from fedfm.metrics import score
    from fedfm.model import set_adapter_state

    set_adapter_state(model, torch_state({k: a.numpy() for k, a in arrays.items()}))
    td = one._tds["beta"]["PE"]
    logged = next(r for r in rows[1] if r["site"] == "beta" and r["task"] == "PE")
    assert logged["mae_db"] == pytest.approx(score("PE", real_predict(model, td), td)["mae_db"], rel=1e-6)


def test_personal_heads_resume_and_score_each_site_with_its_own(tmp_path, cache_dir, backbone, task_identity):
    from fedfm.config import RunConfig
    from fedfm.evaluate import predict
    from fedfm.federated import build_run_model, load_site_tasks, personal_keys, torch_state
    from fedfm.metrics import score
    from fedfm.model import set_adapter_state
    from fedfm.scenarios import load_site
    from fl_fixtures import NUM_BEAMS

    fed = write_federation(tmp_path / "fed")
    personal = {"personal-heads": "PE,LoS", "personal-adapters": "CE", "local-optimizer": "keep"}
    full = run_server(run_config(fed, tmp_path / "full", cache_dir, backbone[0], **personal))
    rc = run_config(fed, tmp_path / "cut", cache_dir, backbone[0], **personal, **{"num-server-rounds": 1})
    run_server(rc)
    key = RunLog(tmp_path / "cut").read_config()["run_key"]
    resumed = run_server({**rc, "num-server-rounds": 2, "resume": str(tmp_path / "cut")})  # new nodes: a query
    # the resumed run keeps its key, so each site continues its own Adam moments of round 1
    # (local-optimizer=keep): the bit-identical end below covers them too
    resumed_key = resumed.read_config()["run_key"]
    assert resumed_key == key != full.read_config()["run_key"]
    assert (cache_dir / "optimizer" / key / "alpha" / "round-002.safetensors").is_file()
    a, sa, _ = full.load_checkpoint(2)
    b, sb, _ = resumed.load_checkpoint(2)
    assert set(a) == set(b) and set(sa) == set(sb)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    # one copy of the PE and LoS heads and of the CE input adapter per training site, and they differ
    own = {s: {k.split("/", 2)[2]: v for k, v in sa.items() if k.startswith(f"personal/{s}/")} for s in ("alpha", "beta")}
    assert set(own["alpha"]) == set(own["beta"]) == set(personal_keys(a, ("PE", "LoS"), ("CE",)))
    assert any(".adapters.CE." in k for k in own["alpha"]) and any(".heads.PE." in k for k in own["alpha"])
    assert any(not np.array_equal(own["alpha"][k], own["beta"][k]) for k in own["alpha"])
    # the evaluator scored alpha's PE with alpha's own head, gamma (held out) with the global one
    rows = {(r["site"], r["task"]): r for r in read_jsonl(full.dir / "metrics.jsonl")
            if r["source"] == "federated" and r["round"] == 2}
    assert rows[("alpha", "PE")]["head"] == rows[("alpha", "CE")]["head"] == "own" and "head" not in rows[("alpha", "CP")]
    assert "head" not in rows[("gamma", "PE")]
    cfg = RunConfig.from_flower({**rc, "num-server-rounds": 2})
    model = build_run_model(cfg, NUM_BEAMS, backbone[0]).eval()
    td = load_site_tasks(load_site(fed.parent / "alpha.yaml"), "test", str(cache_dir))["PE"]
    mae = {}
    for name, state in (("own", {**a, **own["alpha"]}), ("global", a)):
        set_adapter_state(model, torch_state(state))
        mae[name] = score("PE", predict(model, td), td)["mae_db"]
    assert rows[("alpha", "PE")]["mae_db"] == pytest.approx(mae["own"], rel=1e-6)
    assert mae["own"] != pytest.approx(mae["global"], rel=1e-6)
    # scripts/evaluate.py's scoring of the checkpoint loads each training site's own heads and
    # adapters as the evaluator did: every cell of round 2 as logged
    from fedfm.evaluate import evaluate_checkpoint

    again = evaluate_checkpoint(full.dir)
    assert again["round"] == 2 and len(again["rows"]) == len(rows) == 21
    for r in again["rows"]:
        logged = rows[(r["site"], r["task"])]
        assert r["model"] == pytest.approx({k: logged[k] for k in r["model"]}, rel=1e-9), (r["site"], r["task"])
    report = (full.dir / "report.md").read_text()
    assert "Personal heads (`personal-heads = PE,LoS`)" in report and "(`personal-adapters = CE`)" in report
    assert "(`local-optimizer = keep`)" in report


def test_site_model_local_scores_each_training_site_with_its_last_local_model(tmp_path, cache_dir, backbone,
                                                                            task_identity):
    from fedfm.config import RunConfig
    from fedfm.evaluate import predict
    from fedfm.federated import build_run_model, load_site_tasks, torch_state
    from fedfm.metrics import score
    from fedfm.model import set_adapter_state
    from fedfm.scenarios import load_site
    from fl_fixtures import NUM_BEAMS

    fed = write_federation(tmp_path / "fed")
    rc = run_config(fed, tmp_path / "run", cache_dir, backbone[0], **{"site-model": "local", "num-server-rounds": 1,
                                                                        "fraction-evaluate": 1.0})
    log = run_server(rc)
    glob, state, _ = log.load_checkpoint(1)
    local = {k.split("/", 2)[2]: v for k, v in state.items() if k.startswith("local/alpha/")}
    assert set(local) == set(glob) and not any(k.startswith("local/gamma/") for k in state)  # held out: none
    rows = {(r["site"], r["task"]): r for r in read_jsonl(log.dir / "metrics.jsonl")
            if r["source"] == "federated" and r["round"] == 1}
    assert rows[("alpha", "CE")]["model"] == "local" and "model" not in rows[("gamma", "CE")]
    model = build_run_model(RunConfig.from_flower(rc), NUM_BEAMS, backbone[0]).eval()
    td = load_site_tasks(load_site(fed.parent / "alpha.yaml"), "test", str(cache_dir))["CE"]
    nmse = {}
    for name, adapters in (("local", local), ("global", glob)):
        set_adapter_state(model, torch_state(adapters))
        nmse[name] = score("CE", predict(model, td), td)["nmse_db"]
    assert rows[("alpha", "CE")]["nmse_db"] == pytest.approx(nmse["local"], rel=1e-6)
    assert nmse["local"] != pytest.approx(nmse["global"], rel=1e-6)
    report = (log.dir / "report.md").read_text()
    assert "Local models (`site-model = local`)" in report
    # federated evaluation (fraction-evaluate=1): both training sites scored rounds 0 (the
    # initial state) and 1 on their own val split, alpha at round 1 with its local model as the
    # central evaluator scores it, by site and task
    val = [r for r in read_jsonl(log.dir / "metrics.jsonl") if r["source"] == "site-val"]
    assert {(r["round"], r["site"], r["task"]) for r in val} == {
        (rnd, s, t) for rnd in (0, 1) for s in ("alpha", "beta") for t in TASKS}
    vtd = load_site_tasks(load_site(fed.parent / "alpha.yaml"), "val", str(cache_dir))["CE"]
    set_adapter_state(model, torch_state(log.load_checkpoint(0)[0]))
    alpha_ce0 = next(r for r in val if r["site"] == "alpha" and r["task"] == "CE" and r["round"] == 0)
    assert alpha_ce0["nmse_db"] == pytest.approx(score("CE", predict(model, vtd), vtd)["nmse_db"], rel=1e-6)
    val = [r for r in val if r["round"] == 1]
    set_adapter_state(model, torch_state(local))
    alpha_ce = next(r for r in val if r["site"] == "alpha" and r["task"] == "CE")
    assert alpha_ce["samples"] == vtd.num_samples
    alpha_scored = score("CE", predict(model, vtd), vtd)
    assert alpha_ce["nmse_db"] == pytest.approx(alpha_scored["nmse_db"], rel=1e-6)
    # its ratio to the site's own baseline, fitted on its train split and scored on the same val samples
    from fedfm.baselines import fit_baseline

    spec = load_site(fed.parent / "alpha.yaml")
    train_ce = load_site_tasks(spec, "train", str(cache_dir), labels=False)["CE"]
    base = score("CE", fit_baseline("CE", train_ce, spec).predict(vtd), vtd)
    assert alpha_ce["ratio"] == pytest.approx(alpha_scored["nmse"] / base["nmse"], rel=1e-6)
    alpha_rows = [r for r in val if r["site"] == "alpha"]
    assert alpha_ce["avg_score"] == pytest.approx(np.mean([r["ratio"] for r in alpha_rows]), rel=1e-9)
    assert "Mean over the sites, by round: round 0 " in report and ", round 1 " in report
    assert (log.dir / "plots" / "val_and_test_by_round.png").stat().st_size > 10_000
    assert "## Sites' own validation splits (federated evaluation)" in report and "| alpha | 1 | " in report
    evaluated = [r for r in read_jsonl(log.dir / "ledger.jsonl") if r.get("kind") == "evaluate"]
    assert sorted((r["round"], r["site"], r["status"]) for r in evaluated) == [
        (rnd, s, "ok") for rnd in (0, 1) for s in ("alpha", "beta")]
    adapter = log.read_config()["model"]["adapter_bytes"]
    assert all(r["bytes_down"] == adapter for r in evaluated)
    assert f"Federated evaluation (`fraction-evaluate`) sent the state down again to the sites it sampled: " \
           f"{4 * adapter:,} B over the run" in report


def test_eval_every_scores_round_0_every_kth_and_the_last_and_checkpoints_all(tmp_path, cache_dir, backbone,
                                                                             task_identity):
    rc = run_config(write_federation(tmp_path / "fed"), tmp_path / "run", cache_dir, backbone[0],
                    **{"num-server-rounds": 3, "eval-every": 2, "local-steps": 1})
    log = run_server(rc)
    fed = read_jsonl(log.dir / "metrics.jsonl")
    assert sorted({r["round"] for r in fed if r["source"] == "federated"}) == [0, 2, 3]
    assert sorted({r["round"] for r in fed if r["source"] == "train"}) == [1, 2, 3]  # every round trained
    assert log.complete_rounds() == [0, 1, 2, 3]
    report = json.loads((log.dir / "report.json").read_text())
    assert report["rounds"] == [0, 2, 3] and report["final_round"] == 3 and report["rounds_without_update"] == []
    assert "3 rounds after round 0 (final round 3; central evaluation at rounds 0, 2, 3)" in \
        (log.dir / "report.md").read_text()


def test_a_round_without_any_update_writes_no_checkpoint_and_a_resume_repeats_it(full_run, tmp_path, cache_dir,
                                                                                  backbone, task_identity,
                                                                                  monkeypatch, capsys):
    # Every site fails in the last round (as when Ray kills them for memory): the run is
    # reported incomplete, round 2 has no checkpoint, and a resume repeats round 2 and ends
    # where the uninterrupted run ended. Before, round 2 was checkpointed unchanged and a resume
    # had nothing left to do.
    import clients.app as client

    rc_full, full = full_run
    rc = run_config(rc_full["federation"], tmp_path / "run-c", cache_dir, backbone[0])
    real = client.local_train

    def out_of_memory_in_round_2(cfg, spec, state, round_, **kw):
        if round_ == 2:
            raise MemoryError("simulated: the site was killed for memory")
        return real(cfg, spec, state, round_, **kw)

    monkeypatch.setattr(client, "local_train", out_of_memory_in_round_2)
    capsys.readouterr()
    log = run_server(rc)
    assert log.complete_rounds() == [0, 1]
    assert read_json(log.dir / "report.json")["rounds_without_update"] == [2]
    said = capsys.readouterr().out  # a bare `flwr run` user reads this line, not "run complete"
    assert "fedfm: run INCOMPLETE: no site update reached the average in round(s) 2 of 2" in said
    assert "run complete" not in said
    assert "a resume repeats it" in (log.dir / "report.md").read_text()
    monkeypatch.setattr(client, "local_train", real)
    resumed = run_server({**rc, "resume": str(tmp_path / "run-c")})
    assert resumed.complete_rounds() == [0, 1, 2] and resumed.read_config()["resumed_at_rounds"] == [1]
    a, _, _ = full.load_checkpoint(2)
    b, _, _ = resumed.load_checkpoint(2)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert read_json(resumed.dir / "report.json")["rounds_without_update"] == []


def test_central_pretraining_is_cached_by_its_inputs_and_a_damaged_entry_pretrained_again(tmp_path, capsys,
                                                                                          monkeypatch):
    import dataclasses

    import fedfm.train
    from fedfm.config import RunConfig, load_federation_sites
    from fedfm.backbone_cache import pretrain_backbone_centrally
    from fedfm.files import sha256_file

    fed = write_federation(tmp_path / "fed")
    specs = [e.spec for e in load_federation_sites(str(fed)) if e.role == "train"]
    cache = tmp_path / "cache"
    cfg = RunConfig(preset="tiny", seed=5, pretrain_steps=2, batch_size=8, cache_dir=str(cache), device="cpu")
    first, reused = pretrain_backbone_centrally(cfg, specs, NUM_BEAMS, tmp_path / "a")
    assert reused == ""
    digest = sha256_file(first)
    (entry,) = (cache / "backbones").iterdir()
    assert (tmp_path / "a" / "key.json").read_bytes() == (entry / "key.json").read_bytes()  # the run keeps its key
    calls = []
    real = fedfm.train.pretrain
    monkeypatch.setattr(fedfm.train, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))

    # the same inputs: copied from the cache into the run's own folder, not pretrained
    second, reused = pretrain_backbone_centrally(cfg, specs, NUM_BEAMS, tmp_path / "b")
    assert (reused, calls) == (str(entry), [])
    assert second == str(tmp_path / "b" / "backbone.safetensors") and sha256_file(second) == digest
    assert (tmp_path / "b" / "backbone.json").read_bytes() == (tmp_path / "a" / "backbone.json").read_bytes()

    # another input (one more step, another seed): another entry, pretrained
    for change in ({"pretrain_steps": 3}, {"seed": 6}, {"lr": cfg.lr / 2}):
        other, reused = pretrain_backbone_centrally(dataclasses.replace(cfg, **change), specs, NUM_BEAMS,
                                                    tmp_path / f"c{len(calls)}")
        assert reused == "" and sha256_file(other) != digest
    assert len(calls) == 3 and len(list((cache / "backbones").iterdir())) == 4
    # the sites in another order: another entry (the pooled batches differ)
    _, reused = pretrain_backbone_centrally(cfg, specs[::-1], NUM_BEAMS, tmp_path / "r")
    assert reused == "" and len(calls) == 4

    # a damaged entry is named on stderr and pretrained again, to the same bits (the premise of the cache)
    blob = entry / "backbone.safetensors"
    blob.write_bytes(blob.read_bytes()[:-8] + bytes(b ^ 0xFF for b in blob.read_bytes()[-8:]))
    capsys.readouterr()
    again, reused = pretrain_backbone_centrally(cfg, specs, NUM_BEAMS, tmp_path / "d")
    err = capsys.readouterr().err
    assert reused == "" and len(calls) == 5
    assert f"{entry}: cached backbone unusable" in err and "hash mismatch" in err and "pretraining again" in err
    assert sha256_file(again) == digest and sha256_file(blob) == digest  # the entry mended

    # fedfm's source is in the key: other code, another entry
    monkeypatch.setattr("fedfm.files.package_digest", lambda: "0" * 64)
    _, reused = pretrain_backbone_centrally(cfg, specs, NUM_BEAMS, tmp_path / "e")
    assert reused == "" and len(calls) == 6

    # the site's data made again by other code (the data cache is keyed by the spec alone): another entry
    monkeypatch.undo()
    monkeypatch.setattr(fedfm.train, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    from fedfm.data import _write_atomic, load_split, split_path
    arrays = load_split(specs[0], "train", cache)
    _write_atomic(split_path(specs[0], "train", cache), {**arrays, "h_sub6": arrays["h_sub6"] * np.float32(1.01)},
                  specs[0], "train")
    _, reused = pretrain_backbone_centrally(cfg, specs, NUM_BEAMS, tmp_path / "f")
    assert len(calls) == 7 and reused == ""


def test_the_backbone_cache_keeps_its_most_recently_used_entries(tmp_path, capsys, monkeypatch):
    import dataclasses
    import os

    import fedfm.backbone_cache as backbone_cache
    from fedfm.config import RunConfig, load_federation_sites
    from fedfm.backbone_cache import pretrain_backbone_centrally

    fed = write_federation(tmp_path / "fed")
    specs = [e.spec for e in load_federation_sites(str(fed)) if e.role == "train"]
    cache = tmp_path / "cache"
    root = cache / "backbones"
    root.mkdir(parents=True)
    # five older complete entries, used 1..5 hours ago, and one another run is writing (no key.json)
    for age in range(1, 6):
        old = root / f"old{age}"
        old.mkdir()
        (old / "key.json").write_text("{}")
        os.utime(old / "key.json", (time.time() - 3600 * age,) * 2)
    (root / "partial").mkdir()
    monkeypatch.setattr(backbone_cache, "BACKBONE_CACHE_KEEP", 3)
    cfg = RunConfig(preset="tiny", seed=5, pretrain_steps=2, batch_size=8, cache_dir=str(cache), device="cpu")
    pretrain_backbone_centrally(cfg, specs, NUM_BEAMS, tmp_path / "a")
    new = [p for p in root.iterdir() if p.name not in {f"old{a}" for a in range(1, 6)} | {"partial"}]
    assert len(new) == 1
    # kept: the new entry, the two most recently used old ones, and the partial one
    assert sorted(p.name for p in root.iterdir()) == sorted([new[0].name, "old1", "old2", "partial"])
    assert "removed 3 least recently used cached backbone(s) (keeping 3)" in capsys.readouterr().out

    # a reuse counts as a use: old1 used now and the new entry reused, then a run of another input drops old2
    (root / "old1" / "key.json").touch()
    os.utime(new[0] / "key.json", (time.time() - 7200 * 3,) * 2)   # the new entry looks old ...
    _, reused = pretrain_backbone_centrally(cfg, specs, NUM_BEAMS, tmp_path / "b")
    assert reused == str(new[0])                                     # ... until it is reused
    assert (new[0] / "key.json").stat().st_mtime > time.time() - 60
    assert sorted(p.name for p in root.iterdir()) == sorted([new[0].name, "old1", "old2", "partial"])
    pretrain_backbone_centrally(dataclasses.replace(cfg, seed=6), specs, NUM_BEAMS, tmp_path / "c")
    names = {p.name for p in root.iterdir()}
    assert len(names) == 4 and {new[0].name, "old1", "partial"} <= names and "old2" not in names
