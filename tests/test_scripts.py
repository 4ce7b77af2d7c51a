"""scripts/finetune_site.py and scripts/compare.py on a tiny federated run made in process
(real ServerApp/ClientApp handlers through fl_fixtures.InProcessGrid: no Ray, no flwr run)."""
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfm.metrics import HEADLINE
from fedfm.runlog import RunLog, read_jsonl, samples_path
from fl_fixtures import NUM_BEAMS, InProcessGrid, make_backbone, run_config, server_context, write_federation

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"CE", "CP", "PF", "BF", "DE", "PE", "LoS"}
ROUNDS, LOCAL_STEPS = 2, 2


def _load_script(name: str):
    if str(ROOT / "scripts") not in sys.path:  # compare.py imports run_federation
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _num_samples(tds) -> list[int]:
    return [int(td.targets.shape[0]) for td in (tds if isinstance(tds, (list, tuple)) else [tds])]


class FinetuneCalls:
    """Wraps fedfm.train.finetune (looked up at call time by local_train and compare.py):
    records each call's steps, seed and per-task sample counts."""

    def __init__(self, mp: pytest.MonkeyPatch):
        import fedfm.train

        self.calls, real = [], fedfm.train.finetune

        def wrapped(model, tasks, steps, **kw):
            self.calls.append({"steps": steps, "seed": kw.get("seed"),
                               "samples": {t: _num_samples(td) for t, td in tasks.items()}})
            return real(model, tasks, steps, **kw)

        mp.setattr(fedfm.train, "finetune", wrapped)


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory, cache_dir):
    """A 2-round federation (alpha, beta train; gamma held out) and the finetune calls it made."""
    from flwr.supercore.task_identity import TaskIdentity
    from server.app import main as server_main

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    root = tmp_path_factory.mktemp("scripts")
    fed = write_federation(root)
    backbone, _ = make_backbone(root / "backbone.safetensors")
    rc = run_config(fed, root / "run", cache_dir, backbone,
                    **{"num-server-rounds": ROUNDS, "local-steps": LOCAL_STEPS})
    with pytest.MonkeyPatch.context() as mp:
        calls = FinetuneCalls(mp)
        server_main(InProcessGrid(rc, 2), server_context(rc))
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    log = RunLog(rc["out-dir"])
    assert log.complete_rounds() == list(range(ROUNDS + 1))
    return {"fed": fed, "root": root, "run": Path(rc["out-dir"]), "backbone": backbone, "calls": calls.calls}


# ---- finetune_site.py -------------------------------------------------------------------
def test_finetune_site_heldout_fraction(fed_run, capsys, monkeypatch):
    import fedfm.baselines
    import fedfm.federated
    from fedfm.config import RunConfig
    from fedfm.federated import build_run_model, torch_state
    from fedfm.model import set_adapter_state
    from fedfm.train import task_losses

    script = _load_script("finetune_site")
    trained, fitted = [], []
    real_train, real_fit = fedfm.federated.local_train, fedfm.baselines.fit_baseline

    def local_train(cfg, spec, state, round_, **kw):
        res = real_train(cfg, spec, state, round_, **kw)
        trained.append({"state_in": state, "res": res, "round": round_, **kw})
        return res

    def fit_baseline(task, td, spec):
        fitted.append((task, int(td.targets.shape[0])))
        return real_fit(task, td, spec)

    monkeypatch.setattr(fedfm.federated, "local_train", local_train)
    monkeypatch.setattr(fedfm.baselines, "fit_baseline", fit_baseline)
    fitted_on = {"stats": [], "labels": []}  # how many train samples each start was fitted on
    real_stats, real_labels = fedfm.federated.site_channel_stats, fedfm.federated.site_label_priors

    def stats(spec, cache_dir, n, loaded):
        fitted_on["stats"].append(n)
        return real_stats(spec, cache_dir, n, loaded)

    def labels(spec, tasks, cache_dir, n, loaded):
        fitted_on["labels"].append(n)
        return real_labels(spec, tasks, cache_dir, n, loaded)

    monkeypatch.setattr(fedfm.federated, "site_channel_stats", stats)
    monkeypatch.setattr(fedfm.federated, "site_label_priors", labels)
    site = fed_run["root"] / "gamma.yaml"
    steps = 40
    rc = script.main(["--run", str(fed_run["run"]), "--site", str(site), "--fraction", "0.5",
                      "--steps", str(steps)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"gamma: fine-tuned on 26 of 32 labelled samples from round {ROUNDS}, 6 held back" in out
    assert sum(line.startswith("| ") and line.split("|")[1].strip() in TASKS for line in out.splitlines()) == 7

    path = fed_run["run"] / "finetune" / f"gamma-0.5-steps{steps}-holdout0.2.json"
    assert path.exists()
    res = json.loads(path.read_text())
    assert res["site"] == "gamma" and res["fraction"] == 0.5 and res["from_round"] == ROUNDS
    assert res["labelled_samples"] == 32  # ceil(0.5 × 64 train samples)
    assert res["trained_samples"] == 26 and res["held_back_samples"] == 6  # round(0.2 × 32) held back
    assert {r["task"] for r in res["rows"]} == TASKS and len(res["rows"]) == 7
    for r in res["rows"]:
        key = HEADLINE[r["task"]]
        for col in ("before", "after", "baseline"):
            assert math.isfinite(r[col][key]), (r["task"], col)
        assert r["ratio_before"] is not None and r["ratio_after"] is not None
        # the change with its paired interval: after − before of the same rows' ratios
        delta, lo, hi = r["change_ci"]
        assert delta == pytest.approx(r["ratio_after"] - r["ratio_before"], abs=1e-9) and lo <= delta <= hi
        assert r["ratio_after_ci"][0] <= r["ratio_after"] <= r["ratio_after_ci"][1]
    assert any(r["change_ci"][1] < r["change_ci"][2] for r in res["rows"])
    assert sum(f"| {r['change_ci'][0]:+.3f} [" in out for r in res["rows"]) == 7
    # per task the fine-tuned model is kept only where its held-back error ratio to the start is
    # below 1 at 95 %, and the kept ratio on the test is that model's
    for r in res["rows"]:
        ratio, lo, hi = r["held_back_ratio"]
        assert lo <= ratio <= hi and r["kept"] == ("after" if hi < 1 else "before"), r
        assert r["ratio_kept"] == r["ratio_after" if r["kept"] == "after" else "ratio_before"]
    kept_mean = np.mean([r["ratio_kept"] for r in res["rows"]])
    assert f"kept {kept_mean:.3f}." in out

    # one personalisation: from the run's last global adapters, on the labelled half less the
    # held-back samples, for the requested steps
    (call,) = trained
    assert call["steps"] == steps and call["round"] == ROUNDS + 1
    train_tasks = call["tasks"]
    assert set(train_tasks) == TASKS
    assert all(_num_samples(td) == [26] for td in train_tasks.values())
    assert sorted(fitted) == sorted((t, 32) for t in TASKS)  # the baselines: every labelled sample
    # the starts: on the 26 trained on for the training views and for the held-back ones (which
    # must not see themselves), on all 32 for the labelled views and the test the table scores
    for kind in ("stats", "labels"):
        assert fitted_on[kind][:4] == [32, 26, 26, 32], (kind, fitted_on[kind])
    last, _, _ = RunLog(fed_run["run"]).load_checkpoint(ROUNDS)
    assert set(call["state_in"]) == set(last)
    assert all(np.array_equal(call["state_in"][k], last[k]) for k in last)

    after = [r["ratio_after"] for r in res["rows"] if r["task"] in train_tasks]
    assert not math.isnan(float(np.mean(after)))
    # the rows differ before/after: the written "after" is the personalised model
    assert any(r["before"] != r["after"] for r in res["rows"])

    # the personalised adapters fit the labelled subset better than the global ones did
    cfg = RunConfig.from_flower(RunLog(fed_run["run"]).read_config()["run_config"])
    model = build_run_model(cfg, RunLog(fed_run["run"]).read_config()["model"]["config"]["num_beams"],
                            fed_run["backbone"])
    set_adapter_state(model, torch_state(call["state_in"]))
    before = task_losses(model, train_tasks)
    set_adapter_state(model, torch_state(call["res"].state))
    after_loss = task_losses(model, train_tasks)
    # (measured 2026-12-07: summed task loss 3.50 → 3.10 and 3.43 → 3.15 in 40 steps, two code
    # versions whose runs differ in float rounding; 12 steps, the test's earlier budget, gave
    # 3.48 → 3.43 or 3.50 → 3.53 there, within the noise of batches of 8 drawn from 26 samples)
    assert sum(after_loss.values()) < 0.98 * sum(before.values()), (before, after_loss)

    # the models file holds exactly the two models the table scored, and the choice per task:
    # each, with side inputs fitted on the 32 labelled samples, reproduces its column's ratio
    from fedfm.baselines import fit_baseline as fit
    from fedfm.evaluate import evaluate_sites
    from fedfm.federated import load_site_tasks
    from fedfm.runlog import read_personal_models
    from fedfm.scenarios import load_site

    models_path = fed_run["run"] / "finetune" / res["models_file"]
    assert res["models_file"] == path.name.removesuffix(".json") + ".safetensors"
    assert f"written: {path} (this table) and {models_path}" in out
    models, kept, meta = read_personal_models(models_path)
    assert kept == {r["task"]: r["kept"] for r in res["rows"]}
    assert meta["labelled_samples"] == 32 and meta["site"] == "gamma" and meta["from_round"] == ROUNDS
    assert all(np.array_equal(models["before"][k], last[k]) for k in last)  # gamma: no own heads, the global state
    assert all(np.array_equal(models["after"][k], call["res"].state[k]) for k in call["res"].state)
    spec = load_site(site)
    test = {"gamma": load_site_tasks(spec, "test", cfg.cache_dir, cfg.eval_max_samples, stats_samples=32)}
    base = {"gamma": {t: fit(t, td, spec) for t, td in load_site_tasks(spec, "train", cfg.cache_dir,
                                                                        max_samples=32).items()}}
    for which in ("before", "after"):
        set_adapter_state(model, torch_state(models[which]))
        scored = {r["task"]: r["ratio"] for r in evaluate_sites(model, test, base)}
        assert scored == pytest.approx({r["task"]: r[f"ratio_{which}"] for r in res["rows"]}, rel=1e-9), which


def test_finetune_site_refits_the_pooled_heads_on_the_labelled_fraction(fed_run, capsys):
    script = _load_script("finetune_site")
    assert script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"), "--fraction",
                        "0.5", "--steps", "2"]) == 0
    plain = (fed_run["run"] / "finetune" / "gamma-0.5-steps2-holdout0.2.json").read_bytes()
    rc = script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"), "--fraction",
                      "0.5", "--steps", "2", "--refit-epochs", "3"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((fed_run["run"] / "finetune" / "gamma-0.5-steps2-refit3-holdout0.2.json").read_text())
    assert res["refit_epochs"] == 3 and set(res["refit"]) == {"BF", "DE", "PE", "LoS"}
    assert all(r["samples"] == 26 and r["val_loss_after"] <= r["val_loss_before"] for r in res["refit"].values())
    assert (fed_run["run"] / "finetune" / "gamma-0.5-steps2-holdout0.2.json").read_bytes() == plain  # not overwritten
    assert script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"),
                        "--refit-epochs", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --refit-epochs -1 is not allowed")
    assert script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"),
                        "--refit-epochs", "3", "--refit-scope", "mlp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --refit-scope 'mlp' is not allowed; expected one of head, features") and err.count("\n") == 1


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_finetune_site_bad_fraction_one_line_error(fed_run, capsys, fraction):
    script = _load_script("finetune_site")
    rc = script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"),
                      "--fraction", fraction])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --fraction {float(fraction)} is not allowed") and "(0, 1]" in err
    assert not (fed_run["run"] / "finetune" / f"gamma-{float(fraction):g}-holdout0.2.json").exists()


def test_finetune_site_fraction_giving_one_label_one_line_error(fed_run, capsys):
    # the heads' kNN start and the baselines need two labels: a fraction that leaves one is
    # refused before anything is trained or written
    script = _load_script("finetune_site")
    rc = script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"),
                      "--fraction", "0.001"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: --fraction 0.001 gives 1 labelled sample of the site's") and "at least 2" in err
    assert not (fed_run["run"] / "finetune" / "gamma-0.001-holdout0.2.json").exists()


# ---- evaluate.py ------------------------------------------------------------------------
def _evaluation(out: Path) -> dict:
    res = json.loads((out / "evaluation.json").read_text())
    assert (out / "evaluation.md").is_file()
    return res


def _close(a: dict, b: dict, rel: float = 1e-9) -> bool:
    return set(a) <= set(b) and all(v == pytest.approx(b[k], rel=rel, abs=1e-12) for k, v in a.items())


@pytest.mark.parametrize("round_", [None, 0])
def test_evaluate_reproduces_the_central_evaluator_s_rows(fed_run, tmp_path, capsys, round_):
    script = _load_script("evaluate")
    run, out = fed_run["run"], tmp_path / "ev"
    rc = script.main([str(run), "--out", str(out)] + ([] if round_ is None else ["--round", str(round_)]))
    printed, err = capsys.readouterr()
    assert rc == 0, err
    res = _evaluation(out)
    scored = ROUNDS if round_ is None else round_  # default: the last complete round
    assert res["round"] == scored and res["models"] is None
    assert [(s["name"], s["role"]) for s in res["sites"]] == [("alpha", "train"), ("beta", "train"), ("gamma", "heldout")]
    # every cell is the run's own: its model metrics in metrics.jsonl, its baselines in baselines.json
    logged = {(r["site"], r["task"]): r for r in read_jsonl(run / "metrics.jsonl")
              if r["source"] == "federated" and r["round"] == scored}
    baselines = json.loads((run / "baselines.json").read_text())
    assert {(r["site"], r["task"]) for r in res["rows"]} == set(logged) and len(res["rows"]) == 21
    for r in res["rows"]:
        ref = {k: v for k, v in logged[(r["site"], r["task"])].items() if k in r["model"]}
        assert _close(r["model"], ref), (r["site"], r["task"], r["model"], ref)
        assert _close(r["baseline"], {k: v for k, v in baselines[r["site"]][r["task"]].items() if k != "baseline"})
        assert r["baseline_name"] == baselines[r["site"]][r["task"]]["baseline"]
        assert r["ratio_ci"][0] <= r["ratio"] <= r["ratio_ci"][1]
    per_site = {s: np.mean([r["ratio"] for r in res["rows"] if r["site"] == s]) for s in ("alpha", "beta", "gamma")}
    assert res["summary"]["per_site"] == pytest.approx(per_site, rel=1e-12)
    assert res["summary"]["per_role"]["train"] == pytest.approx((per_site["alpha"] + per_site["beta"]) / 2, rel=1e-12)
    # printed: the sites × tasks table of ratios, each site's average, and where it wrote
    line = next(ln for ln in printed.splitlines() if ln.startswith("| gamma | heldout |"))
    assert line.endswith(f"| {per_site['gamma']:.3f} |")
    assert f"written: {out / 'evaluation.md'} and {out / 'evaluation.json'}" in printed
    md = (out / "evaluation.md").read_text()
    assert md.count("| alpha | train |") == 8  # the summary line and one per task


def test_evaluate_scores_a_site_the_run_never_saw_as_a_held_out_one(fed_run, capsys):
    script = _load_script("evaluate")
    run, root = fed_run["run"], fed_run["root"]
    (root / "delta.yaml").write_text((root / "gamma.yaml").read_text().replace("name: gamma", "name: delta")
                                     .replace("seed: 13", "seed: 14"))
    assert script.main([str(run), "--site", str(root / "gamma.yaml"), "--site", str(root / "delta.yaml")]) == 0, \
        capsys.readouterr().err
    out = run / "evaluations" / f"round-{ROUNDS:03d}-gamma+delta"  # the default folder names the sites
    res = _evaluation(out)
    assert [(s["name"], s["role"]) for s in res["sites"]] == [("gamma", "heldout"), ("delta", "new")]
    assert set(res["summary"]["per_role"]) == {"heldout", "new"}
    delta = {r["task"]: r for r in res["rows"] if r["site"] == "delta"}
    assert set(delta) == TASKS and all(math.isfinite(r["ratio"]) for r in delta.values())
    # gamma given by its YAML is scored as in the run's own evaluation
    logged = {r["task"]: r for r in read_jsonl(run / "metrics.jsonl")
              if r["source"] == "federated" and r["round"] == ROUNDS and r["site"] == "gamma"}
    for r in res["rows"]:
        if r["site"] == "gamma":
            assert _close(r["model"], {k: v for k, v in logged[r["task"]].items() if k in r["model"]})
    # the new site is scored with the checkpoint's state: its round-0 scores (the starts) differ
    assert script.main([str(run), "--round", "0", "--site", str(root / "delta.yaml")]) == 0
    start = {r["task"]: r for r in _evaluation(run / "evaluations" / "round-000-delta")["rows"]}
    assert any(start[t]["model"] != delta[t]["model"] for t in TASKS)
    assert start["BF"]["baseline"] == delta["BF"]["baseline"]  # its own baseline, fitted on its train split


def test_evaluate_scores_a_personalised_site_as_finetune_site_s_table(fed_run, capsys):
    run, gamma = fed_run["run"], fed_run["root"] / "gamma.yaml"
    assert _load_script("finetune_site").main(["--run", str(run), "--site", str(gamma), "--fraction", "0.5",
                                               "--steps", "4"]) == 0
    table = json.loads((run / "finetune" / "gamma-0.5-steps4-holdout0.2.json").read_text())
    models = run / "finetune" / table["models_file"]
    script = _load_script("evaluate")
    for which in ("kept", "before", "after"):
        capsys.readouterr()
        assert script.main([str(run), "--site", str(gamma), "--models", str(models), "--which", which]) == 0, \
            capsys.readouterr().err
        res = _evaluation(run / "evaluations" / f"round-{ROUNDS:03d}-gamma-{models.stem}-{which}")
        assert res["models"]["which"] == which and res["models"]["labelled_samples"] == 32
        ratios = {r["task"]: r["ratio"] for r in res["rows"]}
        assert ratios == pytest.approx({r["task"]: r[f"ratio_{which}"] for r in table["rows"]}, rel=1e-9), which


def test_evaluate_against_another_round_gives_each_ratio_s_change_with_its_interval(fed_run, capsys):
    # --against 0: the round-0 cells on the same samples (those the run logged), and per site and
    # task the ratio's change round 2 − round 0 with its paired interval; the site's average change
    # is the difference of its average scores
    script = _load_script("evaluate")
    run = fed_run["run"]
    assert script.main([str(run), "--against", "0"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    res = _evaluation(run / "evaluations" / f"round-{ROUNDS:03d}-vs000")
    assert res["round"] == ROUNDS and res["against"]["round"] == 0
    logged = {(r["site"], r["task"]): r for r in read_jsonl(run / "metrics.jsonl")
              if r["source"] == "federated" and r["round"] == 0}
    then = {(r["site"], r["task"]): r for r in res["against"]["rows"]}
    assert set(then) == set(logged)
    for key, r in then.items():
        assert _close(r["model"], {k: v for k, v in logged[key].items() if k in r["model"]}), key
    now = {(r["site"], r["task"]): r for r in res["rows"]}
    change = res["against"]["change"]
    assert set(change) == {"alpha", "beta", "gamma"}
    for (site, task), r in now.items():
        delta, lo, hi = change[site][task]
        assert delta == pytest.approx(r["ratio"] - then[(site, task)]["ratio"], abs=1e-12) and lo <= delta <= hi
    for site in change:
        avg = np.mean([now[(site, t)]["ratio"] - then[(site, t)]["ratio"] for t in TASKS])
        assert change[site]["average"][0] == pytest.approx(avg, abs=1e-12)
    assert any(c[1] < c[2] for site in change.values() for c in site.values())  # intervals, not points
    # the script's own number format: three decimals, two significant digits below 5e-4 (a tiny
    # change of a held-out site read as +0.000 otherwise; which it is depends on the run's floats)
    gamma = change["gamma"]["average"][0]
    assert "Change against round 0" in printed
    assert (f"{gamma:+.3f} [" if abs(gamma) >= 5e-4 or gamma == 0 else f"{gamma:+.1e} [") in printed


def test_evaluate_leaves_out_a_site_the_run_excluded_and_says_so(fed_run, tmp_path, capsys):
    # a site whose data the run's evaluator could not make or read was left out of every round
    # (an event); scoring the run again leaves it out too, by name, rather than score it anew
    import shutil

    from fedfm.evaluate import EXCLUDED

    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    RunLog(run).append_event(0, "gamma", "error", f"{EXCLUDED}: gamma.yaml: its cache is unreadable")
    assert _load_script("evaluate").main([str(run), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    res = _evaluation(tmp_path / "ev")
    assert [s["name"] for s in res["sites"]] == ["alpha", "beta"] and {r["site"] for r in res["rows"]} == {"alpha", "beta"}
    assert res["skipped"] == [{"name": "gamma", "why": f"{EXCLUDED}: gamma.yaml: its cache is unreadable"}]
    line = f"Left out, as the run's central evaluator left it out: gamma ({EXCLUDED}: gamma.yaml: its cache is unreadable)."
    assert line in printed and line in (tmp_path / "ev" / "evaluation.md").read_text()


def test_evaluate_refuses_personalised_models_on_another_site_of_the_same_name(fed_run, tmp_path, capsys):
    # a site the run never saw, personalised, then a YAML of the same name but another seed: its
    # models file records the site's spec hash, so they are not scored on the other site
    root = tmp_path
    gamma = (fed_run["root"] / "gamma.yaml").read_text()
    (root / "eps.yaml").write_text(gamma.replace("name: gamma", "name: eps").replace("seed: 13", "seed: 15"))
    (root / "eps2.yaml").write_text(gamma.replace("name: gamma", "name: eps").replace("seed: 13", "seed: 16"))
    run = fed_run["run"]
    assert _load_script("finetune_site").main(["--run", str(run), "--site", str(root / "eps.yaml"), "--fraction", "0.5",
                                               "--steps", "2"]) == 0
    models = run / "finetune" / "eps-0.5-steps2-holdout0.2.safetensors"
    capsys.readouterr()
    assert _load_script("evaluate").main([str(run), "--site", str(root / "eps2.yaml"), "--models", str(models)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {root / 'eps2.yaml'}: site 'eps' is not the one {models} was personalised on")
    assert _load_script("evaluate").main([str(run), "--site", str(root / "eps.yaml"), "--models", str(models),
                                          "--out", str(tmp_path / "ev")]) == 0  # its own site: scored
    assert _evaluation(tmp_path / "ev")["sites"][0]["role"] == "new"


@pytest.mark.parametrize("case, message", [
    ("round", "error: --round 7: {run} has no complete checkpoint for it; complete rounds: 0, 1, 2"),
    ("which", "error: --which 'best' is not allowed; expected one of kept, before, after"),
    ("max-test", "error: --max-test -1 is not allowed"),
    ("renamed", "error: {root}/alpha2.yaml: site 'alpha' is a train site of the run, but this YAML is not the run's"),
    ("beams", "error: {root}/wide.yaml: mmwave.codebook_beams is 64, the run's model has 32 beams"),
    ("models", "error: {models}: the models of site 'gamma'; pass its YAML with --site"),
    ("models-round", "error: --round 1: {models} was personalised from round 2; leave --round out"),
    ("which-alone", "error: --which 'after' chooses among a site's personalised models; give them with --models"),
    ("out-file", "error: --out {root}/gamma.yaml: is a file, not a folder"),
    ("against", "error: --against 9: {run} has no complete checkpoint for it; complete rounds: 0, 1, 2"),
    ("models-against", "error: --against compares two rounds of the run; a site's personalised models are compared"),
    ("yaml", "error: {root}/broken.yaml: `sub6.antennas` = -4 is not allowed"),
])
def test_evaluate_bad_input_is_one_line_and_writes_nothing(fed_run, capsys, case, message):
    run, root = fed_run["run"], fed_run["root"]
    gamma = (root / "gamma.yaml").read_text()
    (root / "alpha2.yaml").write_text((root / "alpha.yaml").read_text().replace("seed: 11", "seed: 99"))
    (root / "wide.yaml").write_text(gamma.replace("name: gamma", "name: wide").replace(
        "antennas: 8, subcarriers: 16, codebook_beams: 32", "antennas: 16, subcarriers: 16, codebook_beams: 64"))
    (root / "broken.yaml").write_text(gamma.replace("antennas: 4,", "antennas: -4,"))
    args = {"round": ["--round", "7"], "which": ["--which", "best"], "max-test": ["--max-test", "-1"],
            "renamed": ["--site", str(root / "alpha2.yaml")], "beams": ["--site", str(root / "wide.yaml")],
            "yaml": ["--site", str(root / "broken.yaml")]}
    models = run / "finetune" / "gamma-0.5-steps2-holdout0.2.safetensors"
    if case.startswith("models"):  # gamma's personalised models, with alpha's YAML or another round
        assert _load_script("finetune_site").main(["--run", str(run), "--site", str(root / "gamma.yaml"),
                                                   "--fraction", "0.5", "--steps", "2"]) == 0
        capsys.readouterr()
        args["models"] = ["--site", str(root / "alpha.yaml"), "--models", str(models)]
        args["models-round"] = ["--site", str(root / "gamma.yaml"), "--models", str(models), "--round", "1"]
    args["models-against"] = ["--site", str(root / "gamma.yaml"), "--models", str(models), "--against", "0"]
    args["against"] = ["--against", "9"]
    args["which-alone"] = ["--which", "after"]
    args["out-file"] = ["--out", str(root / "gamma.yaml")]
    before = sorted((run / "evaluations").rglob("*")) if (run / "evaluations").exists() else []
    rc = _load_script("evaluate").main([str(run), *args[case]])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(message.format(run=run, root=root, models=models)), err
    after = sorted((run / "evaluations").rglob("*")) if (run / "evaluations").exists() else []
    assert after == before


# ---- compare.py -------------------------------------------------------------------------
def test_compare_equal_per_site_compute(fed_run, capsys):
    from fedfm.scenarios import derive_seed

    script = _load_script("compare")
    run = fed_run["run"]
    with pytest.MonkeyPatch.context() as mp:
        calls = FinetuneCalls(mp)
        rc = script.main([str(fed_run["fed"]), "--out", str(run), "--skip-federated"])
    out, err = capsys.readouterr()
    assert rc == 0, err

    budget = ROUNDS * LOCAL_STEPS
    # federated (the fixture's run): every training site trained `budget` steps in all
    fed_steps = {}
    for site in ("alpha", "beta"):
        seeds = {derive_seed(5, site, "round", r) for r in range(1, ROUNDS + 1)}
        fed_steps[site] = sum(c["steps"] for c in fed_run["calls"] if c["seed"] in seeds)
    assert fed_steps == {"alpha": budget, "beta": budget}
    assert sum(c["steps"] for c in fed_run["calls"]) == 2 * budget  # nothing else trained

    # compare: one local-only training per site on its own data, one centralized on the pool
    local = [c for c in calls.calls if all(len(n) == 1 for n in c["samples"].values())]
    central = [c for c in calls.calls if all(len(n) == 2 for n in c["samples"].values())]
    assert len(local) == 2 and len(central) == 1 and len(calls.calls) == 3
    assert [c["steps"] for c in local] == [budget, budget]
    assert central[0]["steps"] == 2 * budget  # same total steps as the federation
    assert all(set(c["samples"]) == TASKS for c in calls.calls)

    res = json.loads((run / "compare.json").read_text())
    assert res["steps"] == {"per_site": budget, "centralized": 2 * budget,
                            "federated_per_site": {"alpha": budget, "beta": budget}}
    for kind in ("local_only", "centralized"):
        assert set(res[kind]) == {"alpha", "beta"}  # training sites only
        for site, tasks in res[kind].items():
            assert set(tasks) == TASKS
            assert all(math.isfinite(tasks[t][HEADLINE[t]]) for t in TASKS), (kind, site)

    # the printed table: one row per training site, three finite columns
    lines = out.splitlines()
    assert "| site | federated | local-only | centralized |" in lines
    first = lines[lines.index("| site | federated | local-only | centralized |"):]
    first = first[:first.index("")]
    rows = {ln.split("|")[1].strip(): ln.split("|")[2:5] for ln in first
            if ln.startswith("| ") and ln.split("|")[1].strip() in {"alpha", "beta", "gamma"}}
    assert set(rows) == {"alpha", "beta"}
    assert all(math.isfinite(float(v)) for cols in rows.values() for v in cols)

    report = json.loads((run / "report.json").read_text())
    for site in ("alpha", "beta"):
        s = report["sites"][site]
        vals = [s["avg_score"], s["avg_score_local_only"], s["avg_score_centralized"]]
        assert [float(v) for v in rows[site]] == pytest.approx(vals, abs=6e-4)
    assert "avg_score_local_only" not in report["sites"]["gamma"]

    # per-sample errors: the central evaluator's (every scored round), the baselines' and each arm's
    # average to the errors its metrics hold; the bootstrap's point difference is the report's
    from fedfm.metrics import error_for_score
    from fedfm.runlog import read_samples

    metrics = read_jsonl(run / "metrics.jsonl")
    baselines = json.loads((run / "baselines.json").read_text())
    for rnd in range(ROUNDS + 1):
        errs = read_samples(samples_path(run, f"round-{rnd:03d}"))
        assert set(errs) == {"alpha", "beta", "gamma"}  # held-out sites too
        for r in (r for r in metrics if r["source"] == "federated" and r["round"] == rnd):
            assert errs[r["site"]][r["task"]].mean() == pytest.approx(error_for_score(r["task"], r), rel=1e-9)
    base = read_samples(samples_path(run, "baseline"))
    for site, tasks in baselines.items():
        for t, m in tasks.items():
            assert base[site][t].mean() == pytest.approx(error_for_score(t, m), rel=1e-9), (site, t)
    boot = res["bootstrap"]
    assert (boot["level"], boot["n_boot"]) == (0.95, 2000)
    for kind in ("local_only", "centralized"):
        arm = read_samples(samples_path(run, kind))
        assert set(arm) == set(boot[kind]) == {"alpha", "beta"}
        for site in ("alpha", "beta"):
            for t in TASKS:
                assert arm[site][t].mean() == pytest.approx(error_for_score(t, res[kind][site][t]), rel=1e-9)
            b = boot[kind][site]
            s = report["sites"][site]
            assert b["delta"] == pytest.approx(s["avg_score"] - s[f"avg_score_{kind}"], abs=1e-9)
            assert set(b["tasks"]) == TASKS and b["lo"] <= b["delta"] <= b["hi"]
            # the tasks' ratio differences add up to the site's (its score is their mean)
            assert set(b["per_task"]) == TASKS
            assert sum(v["delta"] for v in b["per_task"].values()) / 7 == pytest.approx(b["delta"], abs=1e-12)
            assert all(v["lo"] <= v["hi"] for v in b["per_task"].values())
            assert b["lo"] < b["hi"]  # a few test samples a site: an interval, not a point
    table = lines[lines.index("| site | federated − local-only | 95 % interval | verdict | tasks apart at 95 % "
                              "(ratio difference) |"):]
    assert sum(ln.startswith(("| alpha |", "| beta |")) for ln in table[:table.index("")]) == 2
    assert any(ln.startswith("At 95 %: federated better than local-only on ") for ln in lines)
    assert "| site | federated − centralized | 95 % interval | verdict |" in (run / "report.md").read_text()
    from fedfm.report import bootstrap_lines

    fake = {"level": 0.95, "n_boot": 10, "seed": 0, "local_only": {"s": {
        "delta": -0.01, "lo": -0.03, "hi": 0.01,
        "per_task": {"CE": {"delta": -0.02, "lo": -0.03, "hi": -0.01}, "CP": {"delta": 0.0, "lo": -0.01, "hi": 0.01},
                     "LoS": {"delta": 0.05, "lo": 0.01, "hi": 0.1}}}}}
    assert "| s | -0.0100 | [-0.0300, +0.0100] | not distinguishable | CE -0.020, LoS +0.050 |" in bootstrap_lines(fake)

    # local-only and centralized are scored after their training, not at the initial adapters
    # (the federation's round-0 evaluation: same test samples, same initial state)
    round0 = {(r["site"], r["task"]): r for r in read_jsonl(run / "metrics.jsonl")
              if r["source"] == "federated" and r["round"] == 0}
    for kind in ("local_only", "centralized"):
        for site in ("alpha", "beta"):
            assert any(res[kind][site][t][HEADLINE[t]] != pytest.approx(round0[(site, t)][HEADLINE[t]], rel=1e-6)
                       for t in TASKS), (kind, site)


def test_compare_local_only_sites_train_on_threads_as_one_after_another(fed_run, monkeypatch):
    import threading

    import torch

    import fedfm.train

    script = _load_script("compare")
    seen, real = {}, fedfm.train.finetune

    def finetune(model, tasks, steps, **kw):  # which thread trained, on how many torch threads
        seen.setdefault(cores, set()).add(threading.get_ident())
        assert torch.get_num_threads() == 1
        return real(model, tasks, steps, **kw)

    monkeypatch.setattr(fedfm.train, "finetune", finetune)
    out, outer = {}, torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count, which no site may train on (conftest sets 1)
    try:
        for cores in (1, 2):
            monkeypatch.setattr(fedfm.train, "usable_cores", lambda: cores)
            out[cores] = script.local_and_central(fed_run["run"], centralized=False)
    finally:
        torch.set_num_threads(outer)
    assert len(seen[1]) == 1 and len(seen[2]) == 2  # one worker; two sites on two
    assert set(out[1]["local_only"]) == {"alpha", "beta"}
    assert out[2]["local_only"] == out[1]["local_only"]  # every metric of both sites, bit for bit
    assert out[1]["local_only"]["alpha"] != out[1]["local_only"]["beta"]


def test_compare_skip_centralized_trains_only_the_local_only_arm(fed_run, tmp_path, capsys):
    import shutil

    script = _load_script("compare")
    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    (run / "compare.json").unlink(missing_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        calls = FinetuneCalls(mp)
        rc = script.main([str(fed_run["fed"]), "--out", str(run), "--skip-federated", "--skip-centralized"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # two local-only trainings, each on one site's data; nothing on the pool
    assert [sorted(set(len(n) for n in c["samples"].values())) for c in calls.calls] == [[1], [1]]
    res = json.loads((run / "compare.json").read_text())
    assert set(res["local_only"]) == {"alpha", "beta"} and res["centralized"] == {}
    assert "centralized" not in res["steps"]
    lines = out.splitlines()
    table = lines[lines.index("| site | federated | local-only | centralized |"):]
    rows = [ln.split("|")[2:5] for ln in table[:table.index("")] if ln.startswith(("| alpha ", "| beta "))]
    assert len(rows) == 2 and all(math.isfinite(float(f)) and math.isfinite(float(lo)) and c.strip() == "—"
                                  for f, lo, c in rows)
    assert "average score: not computed (no training site has a federated and a centralized score)" in out
    assert "federated better than local-only on every training site: " in out
    assert set(res["bootstrap"]) == {"level", "n_boot", "seed", "local_only"}  # no centralized arm to compare
    md = (run / "report.md").read_text()  # the report names the arms it shows: no centralized column
    assert "Cells: federated / baseline / local-only. Avg score" in md and "centralized" not in md.split("## Held-out")[0]


def test_compare_refuses_an_unfinished_run_and_warns_about_lost_rounds(fed_run, tmp_path, capsys, monkeypatch):
    import shutil

    script = _load_script("compare")
    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    (run / "compare.json").unlink(missing_ok=True)  # the fixture's own comparison
    shutil.rmtree(run / "checkpoints" / f"round-{ROUNDS:03d}")  # interrupted in its last round
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert script.main([str(fed_run["fed"]), "--out", str(run), "--skip-federated"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run}: the federated run has {ROUNDS - 1} of its {ROUNDS} rounds complete; "
                   f"finish it (resume={run}) before comparing")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # a finished run in which beta's round-1 update was rejected: beta trained one round fewer
    shutil.rmtree(run)
    shutil.copytree(fed_run["run"], run)
    (run / "compare.json").unlink(missing_ok=True)  # the fixture's own comparison
    ledger = [{**r, "status": "rejected"} if (r["round"], r["site"]) == (1, "beta") else r
              for r in read_jsonl(run / "ledger.jsonl")]
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ledger))
    monkeypatch.setattr(script, "local_and_central", lambda d, centralized=True: {"steps": {"per_site": ROUNDS * LOCAL_STEPS}})
    assert script.main([str(fed_run["fed"]), "--out", str(run), "--skip-federated"]) == 0
    assert (f"warning: not at equal compute: federated sites trained fewer than the {ROUNDS * LOCAL_STEPS} "
            f"steps local-only had: beta {(ROUNDS - 1) * LOCAL_STEPS}") in capsys.readouterr().err
    assert json.loads((run / "compare.json").read_text())["steps"]["federated_per_site"] == {
        "alpha": ROUNDS * LOCAL_STEPS, "beta": (ROUNDS - 1) * LOCAL_STEPS}


def test_compare_stops_with_one_line_when_a_site_s_data_cannot_be_loaded(fed_run, tmp_path, capsys, monkeypatch):
    import shutil

    import fedfm.federated

    script = _load_script("compare")
    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    (run / "compare.json").unlink(missing_ok=True)  # the fixture's own comparison
    real = fedfm.federated.load_site_tasks

    def load_site_tasks(spec, split, *a, **kw):
        if spec.name == "beta" and split == "test":
            raise OSError("[Errno 28] No space left on device")
        return real(spec, split, *a, **kw)

    monkeypatch.setattr(fedfm.federated, "load_site_tasks", load_site_tasks)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert script.main([str(fed_run["fed"]), "--out", str(run), "--skip-federated"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: site beta (") and "cannot load its test split ([Errno 28]" in err
    assert "\n" not in err and {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_launchers_refuse_a_folder_that_holds_a_run(fed_run, tmp_path, capsys):
    run = fed_run["run"]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    why = f"{run}: already holds a run (config.json); choose another out-dir, continue that run with resume={run}"
    assert _load_script("run_federation").main(["--federation", str(fed_run["fed"]), "--out", str(run)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {why}, or delete the folder"
    deployment = _load_script("run_deployment")  # its main installs a SIGTERM handler: call the function
    with pytest.raises(ValueError, match=f"^{re.escape(why)}"):
        deployment.run_deployment({"federation": str(fed_run["fed"]), "out-dir": str(run)}, 1, 2, tmp_path / "flwr")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not (tmp_path / "flwr").exists()  # nothing was started
    # the launchers read the run folder back: a {run-id} left to the ServerApp is refused
    assert _load_script("run_federation").main(["--federation", str(fed_run["fed"]),
                                                "--out", str(tmp_path / "runs" / "{run-id}")]) == 2
    assert "`{run-id}` is filled in by the ServerApp of a bare `flwr run`" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_both_launchers_take_timeout_and_refuse_a_negative_one_before_starting(tmp_path, capsys):
    import signal

    for name in ("run_federation", "run_deployment"):
        saved = signal.getsignal(signal.SIGTERM)  # run_deployment's main installs its own handler
        try:
            assert _load_script(name).main(["--out", str(tmp_path / name), "--timeout", "-5"]) == 2
        finally:
            signal.signal(signal.SIGTERM, saved)
        assert capsys.readouterr().err.strip() == \
            "error: --timeout -5.0 is not allowed; expected seconds >= 0 (0 = no limit)", name
        assert not (tmp_path / name).exists()  # nothing was written or started


def test_launcher_resume_takes_the_run_s_recorded_settings(fed_run, tmp_path):
    # `run_federation.py --set resume=RUN` must resume RUN as it was started (its federation,
    # strategy, lr...), not with the defaults of every key it was not given
    rf = _load_script("run_federation")
    run, recorded = fed_run["run"], json.loads((fed_run["run"] / "config.json").read_text())["run_config"]
    args = rf.argparse.Namespace(set=[f"resume={run}", "num-server-rounds=9"], federation=None, out=None)
    got = rf.run_overrides(args)
    assert got["federation"] == recorded["federation"] == str(fed_run["fed"])
    assert got["num-server-rounds"] == 9 and got["resume"] == str(run)
    assert {k: got[k] for k in ("lr", "seed", "local-steps", "strategy")} == \
        {k: recorded[k] for k in ("lr", "seed", "local-steps", "strategy")}
    assert recorded["seed"] != 0  # the default: the recorded value really came through
    args = rf.argparse.Namespace(set=[], federation=None, out=None)  # no resume: the default federation
    assert rf.run_overrides(args)["federation"] == str(ROOT / "scenarios" / "federations" / "default.yaml")


def test_finetune_site_holdout_0_trains_on_every_label_and_keeps_the_fine_tuned_model(fed_run, capsys, monkeypatch):
    import fedfm.federated

    script = _load_script("finetune_site")
    trained, real_train = [], fedfm.federated.local_train
    monkeypatch.setattr(fedfm.federated, "local_train", lambda *a, **kw: trained.append(kw) or real_train(*a, **kw))
    assert script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"), "--fraction",
                        "0.5", "--steps", "2", "--holdout", "0"]) == 0
    out = capsys.readouterr().out
    res = json.loads((fed_run["run"] / "finetune" / "gamma-0.5-steps2-holdout0.json").read_text())
    assert res["trained_samples"] == 32 and res["held_back_samples"] == 0
    assert all(_num_samples(td) == [32] for td in trained[0]["tasks"].values())
    assert all(r["kept"] == "after" and r["held_back_ratio"] is None for r in res["rows"])
    assert "held-back" not in out and f"fine-tuned on 32 of 32 labelled samples from round {ROUNDS};" in out


@pytest.mark.parametrize("flags, message", [
    (["--fraction", "0.03125"], "error: --holdout 0.2 of the 2 labelled samples holds back 0 and leaves 2 to train "
                                "on; expected at least 1 held back and 2 left"),
    (["--holdout", "1"], "error: --holdout 1.0 is not allowed; expected a number in [0, 1)"),
    (["--holdout", "-0.1"], "error: --holdout -0.1 is not allowed; expected a number in [0, 1)")])
def test_finetune_site_bad_holdout_one_line_error(fed_run, capsys, flags, message):
    script = _load_script("finetune_site")
    before = sorted((fed_run["run"] / "finetune").glob("*")) if (fed_run["run"] / "finetune").exists() else []
    assert script.main(["--run", str(fed_run["run"]), "--site", str(fed_run["root"] / "gamma.yaml"), *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message) and err.count("\n") == 1
    after = sorted((fed_run["run"] / "finetune").glob("*")) if (fed_run["run"] / "finetune").exists() else []
    assert after == before  # nothing trained or written


def test_finetune_site_keeps_the_fine_tuned_model_only_where_it_is_better_at_95_percent():
    script = _load_script("finetune_site")
    n = 40
    base = np.linspace(1.0, 2.0, n)
    rows = lambda errs: [{"task": t, "model_errors": e} for t, e in errs.items()]  # noqa: E731
    before = rows({"CE": base, "DE": base, "PE": base, "LoS": np.zeros(n)})
    after = rows({"CE": 0.5 * base,                                  # halved on every sample: kept
                  "DE": base * np.where(np.arange(n) % 2, 0.7, 1.25),  # mean ratio < 1, but not at 95 %
                  "PE": 1.5 * base,                                  # worse: the start
                  "LoS": np.zeros(n)})                               # no errors either way: the start
    got = script.kept_models(before, after)
    assert {t: c["kept"] for t, c in got.items()} == {"CE": "after", "DE": "before", "PE": "before", "LoS": "before"}
    # by hand: CE's ratio is 0.5 in every draw; PE's 1.5; LoS is floored at 1 % both ways, 1.0
    assert got["CE"]["held_back_ratio"] == pytest.approx([0.5, 0.5, 0.5])
    assert got["PE"]["held_back_ratio"] == pytest.approx([1.5, 1.5, 1.5])
    assert got["LoS"]["held_back_ratio"] == pytest.approx([1.0, 1.0, 1.0])
    de = got["DE"]["held_back_ratio"]
    assert de[0] == pytest.approx(np.mean(after[1]["model_errors"]) / np.mean(base)) and de[0] < 1 < de[2]


def test_finetune_site_fraction_is_of_the_labels_the_run_capped(fed_run, tmp_path, capsys):
    import shutil

    script = _load_script("finetune_site")
    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    conf = json.loads((run / "config.json").read_text())
    conf["run_config"]["train-max-samples"] = 10
    (run / "config.json").write_text(json.dumps(conf))
    assert script.main(["--run", str(run), "--site", str(fed_run["root"] / "alpha.yaml"), "--fraction", "0.5",
                        "--steps", "1"]) == 0
    out = json.loads((run / "finetune" / "alpha-0.5-steps1-holdout0.2.json").read_text())
    assert out["labelled_samples"] == 5  # half of the 10 the run gave each site, not of its whole train split


def test_compare_reference_reuses_only_a_matching_run(fed_run, tmp_path, capsys):
    """--reference takes local-only/centralized from a run that shares data, backbone, initial
    adapters and budget (no training), and refuses one that differs, writing nothing."""
    import shutil

    from safetensors.numpy import save_file

    script = _load_script("compare")
    ref, other = tmp_path / "ref", tmp_path / "other"
    for d in (ref, other):
        shutil.copytree(fed_run["run"], d)
        (d / "compare.json").unlink(missing_ok=True)
    assert script.main([str(fed_run["fed"]), "--out", str(ref), "--skip-federated"]) == 0
    capsys.readouterr()
    # another strategy's run is the same run here: what --reference checks is in config.json
    conf = json.loads((other / "config.json").read_text())
    conf["run_config"].update({"strategy": "fedavgm", "server-lr": 2.0,   # differ, may
                               "num-server-rounds": ROUNDS * LOCAL_STEPS, "local-steps": 1})  # same budget
    del conf["run_config"]["head-prior-mu"]  # a run that predates a key had its default (0) then
    (other / "config.json").write_text(json.dumps(conf))
    for r in range(ROUNDS + 1, ROUNDS * LOCAL_STEPS + 1):  # and it has those rounds, every site in each
        shutil.copytree(RunLog(other).checkpoint_dir(ROUNDS), RunLog(other).checkpoint_dir(r))
        shutil.copyfile(samples_path(other, f"round-{ROUNDS:03d}"), samples_path(other, f"round-{r:03d}"))
        RunLog(other).append_ledger([{**row, "round": r} for row in read_jsonl(other / "ledger.jsonl")
                                     if row["round"] == 1])
        with open(other / "metrics.jsonl", "a") as f:  # and is scored in each, as a finished run is
            f.writelines(json.dumps({**row, "round": r}) + "\n" for row in read_jsonl(other / "metrics.jsonl")
                         if row["round"] == ROUNDS)
    with pytest.MonkeyPatch.context() as mp:
        calls = FinetuneCalls(mp)
        rc = script.main([str(fed_run["fed"]), "--out", str(other), "--skip-federated", "--reference", str(ref)])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert calls.calls == []  # nothing trained
    mine, theirs = (json.loads((d / "compare.json").read_text()) for d in (other, ref))
    assert mine["reference"] == str(ref)
    # the same again: a folder whose arms came from that reference may take them from it again
    assert script.main([str(fed_run["fed"]), "--out", str(other), "--skip-federated", "--reference", str(ref)]) == 0
    assert json.loads((other / "compare.json").read_text()) == mine
    capsys.readouterr()
    assert {k: mine[k] for k in theirs} == theirs  # the bootstrap too: the reference's per-sample errors
    assert mine["bootstrap"]["local_only"].keys() == {"alpha", "beta"}
    # a run as its own reference (the table again, no training) keeps its per-sample errors
    assert script.main([str(fed_run["fed"]), "--out", str(ref), "--skip-federated", "--reference", str(ref)]) == 0
    again = json.loads((ref / "compare.json").read_text())
    assert again["bootstrap"] == theirs["bootstrap"] and again["local_only"] == theirs["local_only"]
    capsys.readouterr()
    report = json.loads((other / "report.json").read_text())
    assert all("avg_score_centralized" in report["sites"][s] for s in ("alpha", "beta"))

    def refused(edit, words):
        bad = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(fed_run["run"], bad)
        (bad / "compare.json").unlink(missing_ok=True)
        edit(bad)
        rc = script.main([str(fed_run["fed"]), "--out", str(bad), "--skip-federated", "--reference", str(ref)])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"error: --reference {ref}: ") and all(w in err for w in words), err
        assert not (bad / "compare.json").exists()

    def set_key(key, value):
        def edit(d):
            c = json.loads((d / "config.json").read_text())
            c["run_config"][key] = value
            (d / "config.json").write_text(json.dumps(c))
        return edit

    def other_backbone(d):
        c = json.loads((d / "config.json").read_text())
        c["backbone"]["sha256"] = "0" * 64
        (d / "config.json").write_text(json.dumps(c))

    def other_init(d):
        ck = RunLog(d).checkpoint_dir(0) / "adapter.safetensors"
        state = RunLog(d).load_checkpoint(0)[0]
        k = sorted(state)[0]
        save_file({**state, k: state[k] + 1.0}, str(ck))

    refused(set_key("lr", 0.5), ["lr is", "0.5 here"])
    refused(set_key("local-steps", LOCAL_STEPS + 1), ["per-site steps"])
    refused(set_key("eval-max-samples", 3), ["eval-max-samples"])
    refused(set_key("head-prior-mu", 1.0), ["head-prior-mu"])
    refused(other_backbone, ["backbone sha256"])
    refused(other_init, ["initial (round-0) adapter state"])


def test_finetune_site_prints_a_zero_ratio_as_zero(monkeypatch, capsys):
    script = _load_script("finetune_site")
    rows = [{"task": "CE", "baseline": {"nmse_db": -10.0}, "before": {"nmse_db": -12.0},
             "after": {"nmse_db": -14.0}, "ratio_before": 0.0, "ratio_after": 0.0},
            {"task": "BF", "baseline": None, "before": {"top1": 0.5}, "after": {"top1": 0.6},
             "ratio_before": None, "ratio_after": None}]
    out = {"site": "gamma", "labelled_samples": 8, "from_round": 2, "rows": rows,
           "run": "unused", "models_file": "gamma-1-holdout0.2.safetensors"}
    monkeypatch.setattr(script, "finetune_site", lambda *a, **kw: out)
    assert script.main(["--run", "unused", "--site", "unused.yaml"]) == 0
    lines = {ln.split("|")[1].strip(): ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")}
    assert lines["CE"] == "| CE | nmse_db | -10.000 | -12.000 | -14.000 | 0.000 → 0.000 | — |"
    # no baseline on BF: no ratio either, shown as missing rather than as a number
    assert lines["BF"] == "| BF | top1 | — | 0.500 | 0.600 | — → — | — |"


def _site(role, fed, local=None, central=None):
    s = {"role": role, "avg_score": fed}
    s.update({k: v for k, v in (("avg_score_local_only", local), ("avg_score_centralized", central)) if v is not None})
    return s


def test_compare_table_leaves_out_missing_scores(monkeypatch, capsys, tmp_path):
    import fedfm.report

    script = _load_script("compare")
    # beta shares no task with its baselines (no scores); gamma is held out (not in the table)
    summary = {"sites": {"alpha": _site("train", 0.5, 0.8, 0.45), "beta": _site("train", None),
                         "delta": _site("train", 0.6, 0.7, None), "gamma": _site("heldout", 0.9)}}
    monkeypatch.setattr(script, "local_and_central", lambda run_dir, centralized=True: {})
    monkeypatch.setattr(script, "federated_steps", lambda run_dir: {})
    monkeypatch.setattr(script, "bootstrap_arms", lambda run_dir, result: {})
    monkeypatch.setattr(fedfm.report, "write_report", lambda run_dir: tmp_path / "report.md")
    monkeypatch.setattr(fedfm.report, "load_run", lambda run_dir: None)
    monkeypatch.setattr(fedfm.report, "summarize", lambda run: summary)
    assert script.main(["unused.yaml", "--out", str(tmp_path), "--skip-federated"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln for ln in out if ln.startswith("| ") and "site" not in ln] == [
        "| alpha | 0.500 | 0.800 | 0.450 |", "| beta | — | — | — |", "| delta | 0.600 | 0.700 | — |"]
    # alpha is the only site with both a federated and a centralized score
    assert "average score: federated 0.500, centralized 0.450 → within 10%: False (over 1 of 3 training sites)" in out
    # alpha and delta beat local-only, beta has no score: "every site" is unknown
    assert "federated better than local-only on every training site: not computed (no score for beta)" in out


def test_compare_lines_targets():
    script = _load_script("compare")
    both = {"sites": {"a": _site("train", 0.5, 0.8, 0.5), "b": _site("train", 0.7, 0.6, 0.6)}}
    lines = script.comparison_lines(both)
    assert "average score: federated 0.600, centralized 0.550 → within 10%: True" in lines
    assert "federated better than local-only on every training site: False" in lines
    # a site that loses to local-only settles "every site" even when another site has no score
    both["sites"]["c"] = _site("train", None)
    assert "federated better than local-only on every training site: False" in script.comparison_lines(both)
    none = {"sites": {"a": _site("train", None), "g": _site("heldout", 0.5, 0.6, 0.4)}}
    lines = script.comparison_lines(none)
    assert lines[:3] == ["| site | federated | local-only | centralized |", "|---|---|---|---|", "| a | — | — | — |"]
    assert "average score: not computed (no training site has a federated and a centralized score)" in lines
    assert "federated better than local-only on every training site: not computed (no score for a)" in lines


# ---- bench_eval.py -----------------------------------------------------------------------
def test_bench_eval_scores_the_run_s_round_as_logged_on_each_core_count(fed_run):
    import subprocess

    cores = sorted({1, min(2, len(os.sched_getaffinity(0)))})
    before = sorted(p.relative_to(fed_run["run"]) for p in fed_run["run"].rglob("*"))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_eval.py"), str(fed_run["run"]),
                        "--cores", *map(str, cores), "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"run {fed_run['run']}, round {ROUNDS}; 3 sites"), p.stdout
    rows = [line.split("|")[1:-1] for line in lines[3:]]
    assert [int(r[0]) for r in rows] == cores and len(lines) == 3 + len(cores)
    for i, r in enumerate(rows):  # every cell's score equal, bit for bit, to the first core count's and the run's
        assert r[5].strip() == ("—" if i == 0 else "equal") and r[6].strip() == "equal", lines
        assert float(r[1]) > 0 and float(r[2]) > 0 and float(r[3]) > 0
    assert sorted(p.relative_to(fed_run["run"]) for p in fed_run["run"].rglob("*")) == before  # wrote nothing there
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_eval.py"), str(fed_run["run"]),
                          "--round", "7"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith(f"error: {fed_run['run']}: no complete checkpoint for round 7; complete rounds: 0, 1, 2")


def test_bench_eval_compares_row_sets_cell_by_cell():
    diff = _load_script("bench_eval").max_rel_diff
    a = {("s", "CE"): {"site": "s", "nmse": 0.5, "n": 3}, ("s", "BF"): {"site": "s", "top1": 0.25}}
    assert diff(a, {k: dict(v) for k, v in a.items()}) == 0
    assert diff({**a, ("s", "BF"): {"site": "s", "top1": 0.2500025}}, a) == pytest.approx(1e-5, rel=1e-6)
    assert diff({**a, ("s", "BF"): {"site": "s", "top1": None}}, a) == math.inf   # NaN, logged as null
    assert diff({**a, ("s", "BF"): {"site": "s", "top1": float("nan")}}, a) == math.inf
    assert diff({("s", "CE"): a[("s", "CE")]}, a) == math.inf                     # a cell in one set only
    assert diff({**a, ("s", "CE"): {"site": "s", "nmse": 0.5}}, a) == math.inf    # a field in one set only


# ---- a folder that is not a run -----------------------------------------------------------
_NOT_A_RUN = {
    "report": ["{run}"],
    "finetune_site": ["--run", "{run}", "--site", "unused.yaml"],
    "compare": ["unused.yaml", "--skip-federated", "--out", "{run}"],
    "evaluate": ["{run}"],
    "bench_eval": ["{run}"],
}


@pytest.mark.parametrize("config", [None, "{not json", "[1, 2]"], ids=["missing", "corrupt", "not-an-object"])
@pytest.mark.parametrize("name", list(_NOT_A_RUN))
def test_scripts_on_a_folder_without_a_valid_config_one_line_error(tmp_path, name, config):
    import subprocess

    if config is not None:
        (tmp_path / "config.json").write_text(config)
    before = sorted(tmp_path.iterdir())
    args = [a.format(run=tmp_path) for a in _NOT_A_RUN[name]]
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"error: {tmp_path / 'config.json'}: "), p.stderr
    assert "expected a run folder written by scripts/run_federation.py" in p.stderr
    assert sorted(tmp_path.iterdir()) == before  # nothing written into a folder that is not a run


@pytest.mark.parametrize("name,text", [("metrics.jsonl", '{"round": 0}\n{"rou'), ("baselines.json", "{"),
                                       ("compare.json", "[]"), ("baselines.json", "[1]")])
def test_report_on_a_corrupt_run_file_names_it(tmp_path, name, text):
    import subprocess

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_text(text)
    before = sorted(tmp_path.iterdir())
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"error: {tmp_path / name}: "), p.stderr
    assert sorted(tmp_path.iterdir()) == before


def test_train_central_fits_its_sites_one_per_core_as_one_after_another(tmp_path, cache_dir, monkeypatch):
    import fedfm.train
    from fedfm.federated import load_site_tasks
    from fedfm.scenarios import load_federation

    central = _load_script("train_central")
    fed = load_federation(write_federation(tmp_path / "fed"))
    got = {}
    for cores in (1, 2):
        monkeypatch.setattr(fedfm.train, "usable_cores", lambda: cores)
        got[cores] = central.load_train_views(fed, str(cache_dir), 16)
    (train1, base1), (train2, base2) = got[1], got[2]
    assert list(base2) == list(base1) == [s.name for s in fed.sites] and set(train2) == set(train1) == {"alpha", "beta"}
    for spec in fed.sites:  # each site's baselines predict the same test samples alike, bit for bit
        test = load_site_tasks(spec, "test", str(cache_dir), 8, labels=False)
        for task, b in base1[spec.name].items():
            np.testing.assert_array_equal(np.asarray(base2[spec.name][task].predict(test[task])),
                                          np.asarray(b.predict(test[task])))
        if spec.name in train1:
            assert all(np.array_equal(train2[spec.name][t].targets, td.targets) for t, td in train1[spec.name].items())


def test_train_central_small_budget_scores_every_site(tmp_path, cache_dir):
    central = _load_script("train_central")
    fed_path = write_federation(tmp_path / "fed")
    backbone = make_backbone(tmp_path / "bb.safetensors")[0]
    lines: list[str] = []
    r = central.run_central(str(fed_path), str(tmp_path / "out"), steps=1, backbone=backbone, batch_size=4,
                            cache_dir=str(cache_dir), max_test=8, max_train=16, refit_epochs=2, log=lines.append)
    # where a long run stands: each phase, and fine-tuning's progress with every task's loss
    step_line = next(line for line in lines if line.startswith("fine-tuning step 1/1 ("))
    assert all(f" {t} " in step_line + " " for t in ("CE", "CP", "PF", "BF", "DE", "PE", "LoS"))
    assert [line.split(" ")[0] for line in lines] == ["loading", "loaded", "fine-tuning", "saved", "scoring",
                                                      "refitted", "scoring"]
    # the pooled heads scored before their refit, and refitted on both sites' 16 train samples each
    assert set(r["refit"]) == set(r["summary_before_refit"]["per_task"]) == {"BF", "DE", "PE", "LoS"}
    assert all(v["samples"] == 32 and 0 <= v["epoch"] <= 2 and v["val_loss_after"] <= v["val_loss_before"]
               for v in r["refit"].values())
    assert "| task | mean ratio before refit (sites beaten) |" in (tmp_path / "out" / "report.md").read_text()
    assert [h["step"] for h in r["history"]] == [1]
    sites = {row["site"] for row in r["rows"]}
    assert len(r["rows"]) == 7 * len(sites) and {row["role"] for row in r["rows"]} == {"train", "heldout"}
    assert all(row["ratio"] is not None and math.isfinite(row["ratio"]) for row in r["rows"])
    # each ratio with its bootstrap interval over the 8 test samples, and the tasks' counts at 95 %
    assert all(row["ratio_ci"][0] <= row["ratio"] <= row["ratio_ci"][1] for row in r["rows"])
    assert any(row["ratio_ci"][0] < row["ratio_ci"][1] for row in r["rows"])
    for t, v in r["summary"]["per_task"].items():
        cis = [row["ratio_ci"] for row in r["rows"] if row["task"] == t]
        assert (v["wins_95"], v["losses_95"]) == (sum(hi < 1 for _, hi in cis), sum(lo > 1 for lo, _ in cis))
    assert "| task | mean ratio | sites beaten | beaten at 95 % | lost at 95 % |" in (tmp_path / "out" / "report.md").read_text()
    assert (r["max_train"], r["max_test"]) == (16, 8)
    assert "train samples per site: 16, test samples per site: 8" in (tmp_path / "out" / "report.md").read_text()
    # the fine-tuned state was saved before and after the refit; taken back, it scores the same
    # without fine-tuning (the saved fine-tuning settings are reported, not this call's defaults)
    lines.clear()
    kw = dict(backbone=backbone, batch_size=4, cache_dir=str(cache_dir), max_test=8, max_train=16, log=lines.append)
    again = central.run_central(str(fed_path), str(tmp_path / "again"), adapter=str(tmp_path / "out" / "adapter.safetensors"),
                                refit_epochs=2, **kw)
    assert again["summary_before_refit"] == r["summary_before_refit"] and again["rows"] == r["rows"]
    assert again["refit"] == r["refit"] and again["history"] == [] and again["steps"] == 1
    assert [line.split(" ")[0] for line in lines] == ["loading", "loaded", "fine-tuned", "scoring", "refitted", "scoring"]
    refitted = central.run_central(str(fed_path), str(tmp_path / "refitted"),
                                   adapter=str(tmp_path / "out" / "adapter-refit.safetensors"), **kw)
    assert refitted["rows"] == r["rows"] and refitted["summary_before_refit"] is None
    assert "fine-tuned state loaded from" in (tmp_path / "refitted" / "report.md").read_text()
    assert not (tmp_path / "refitted" / "adapter.safetensors").exists()  # nothing new was fine-tuned
    # --refit-scope features: only the heads' paths from the side inputs differ from the fine-tuned state
    feat = central.run_central(str(fed_path), str(tmp_path / "feat"), refit_epochs=2, refit_scope="features",
                               adapter=str(tmp_path / "out" / "adapter.safetensors"), **kw)
    import torch
    from safetensors.torch import load_file

    tuned, refit = load_file(tmp_path / "out" / "adapter.safetensors"), load_file(tmp_path / "feat" / "adapter-refit.safetensors")
    changed = {tuple(k.split(".")[3:5]) for k in tuned if not torch.equal(tuned[k], refit[k])}  # (task, path)
    assert all(k.startswith("base_model.model.heads.") for k in tuned if not torch.equal(tuned[k], refit[k]))
    assert feat["refit_scope"] == "features" and {p for _, p in changed} <= {"skip", "gate", "feature_mlp",
                                                                                   "spectrum_weight", "spectrum_conv"}
    assert "--refit-scope features" in (tmp_path / "feat" / "report.md").read_text()
    assert {t for t, _ in changed} == {t for t, v in feat["refit"].items() if v["epoch"] > 0} != set()
    from fedfm.scenarios import load_federation

    train, baselines = central.load_train_views(load_federation(fed_path), str(cache_dir), 16)
    assert set(train) == {s.name for s in load_federation(fed_path).train_sites} and set(baselines) == sites
    assert all(td.num_samples == 16 for views in train.values() for td in views.values())


def test_launchers_leave_room_for_fraction_train():
    # min-train-nodes is also the floor of Flower's sample: N of N would make fraction-train a no-op
    rf = _load_script("run_federation")
    assert rf.default_min_train_nodes({}, 4) == 4
    assert rf.default_min_train_nodes({"fraction-train": 0.5}, 4) == 2
    assert rf.default_min_train_nodes({"fraction-train": 0.1}, 4) == 1


def test_output_scripts_refuse_a_folder_with_results_and_check_flags_before_writing(tmp_path, cache_dir):
    central, pre = _load_script("train_central"), _load_script("pretrain")
    fed_path = write_federation(tmp_path / "fed")
    backbone = make_backbone(tmp_path / "bb.safetensors")[0]
    out = tmp_path / "out"
    kw = dict(steps=1, backbone=backbone, batch_size=4, cache_dir=str(cache_dir), max_test=8, max_train=16,
              log=lambda *a: None)
    central.run_central(str(fed_path), str(out), **kw)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=rf"^--out {out}: already holds results \(report.json\)"):
        central.run_central(str(fed_path), str(out), **{**kw, "batch_size": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    for flag, change in (("--max-test", {"max_test": -5}), ("--batch-size", {"batch_size": 0}),
                         ("--lr", {"lr": float("nan")}), ("--refit-epochs", {"refit_epochs": -1}),
                         ("--refit-scope", {"refit_scope": "mlp"}), ("--seed", {"seed": -1}),
                         ("--batch-size", {"batch_size": 17})):  # past max_train=16: a batch is one site's
        with pytest.raises(ValueError, match=rf"^{flag} \S+ is not allowed"):
            central.run_central(str(fed_path), str(tmp_path / "fresh"), **{**kw, **change})
        assert not (tmp_path / "fresh").exists()  # refused before anything was written
    for change, message in (({"head_prior_tasks": "CE", "head_prior_mu": 1.0},
                             r"^--head-prior-tasks = 'CE' is not allowed; expected 'all' or a comma-separated list of BF"),
                            ({"head_prior_tasks": "BF"}, r"^--head-prior-tasks BF is used only with --head-prior-mu > 0")):
        with pytest.raises(ValueError, match=message):
            central.run_central(str(fed_path), str(tmp_path / "fresh"), **{**kw, **change})
        assert not (tmp_path / "fresh").exists()
    # a saved state that does not belong to the model asked for: one line naming the file, nothing written
    saved = out / "adapter.safetensors"
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    other_bb = make_backbone(tmp_path / "bb2.safetensors", seed=1)[0]
    for change, message in (
            ({"adapter": str(saved), "preset": "small", "backbone": None, "no_pretrain": True}, rf"^{saved}: made for another model: config `\w+` is "),
            ({"adapter": str(saved), "backbone": other_bb}, rf"^{saved}: made on another backbone \(sha256 \w+, "),
            ({"adapter": str(saved), "backbone": None}, r"^--adapter \S+: give the --backbone it was fine-tuned on"),
            ({"adapter": str(saved), "ablation": "single-task"}, r"^--adapter is not allowed with --ablation single"),
            ({"adapter": str(tmp_path / "junk.safetensors")}, r"junk.safetensors: not an adapter state written by fedfm")):
        with pytest.raises(ValueError, match=message):
            central.run_central(str(fed_path), str(tmp_path / "fresh"), **{**kw, **change})
        assert not (tmp_path / "fresh").exists()
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "pretrain.json").write_text("{}")
    assert pre.main([str(fed_path), "--out", str(tmp_path / "pre"), "--steps", "1"]) == 2
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["pretrain.json"]
    assert pre.main([str(fed_path), "--out", str(tmp_path / "pre0"), "--steps", "1", "--batch-size", "0"]) == 2
    assert not (tmp_path / "pre0").exists()
    assert pre.main([str(fed_path), "--out", str(tmp_path / "pre0"), "--steps", "1", "--seed", "-1"]) == 2
    assert not (tmp_path / "pre0").exists()
    with pytest.raises(ValueError, match=r"^--batch-size 100000 is not allowed: training site alpha \(\S+\) has \d+ "
                                         r"training samples .*expected an integer in \[1, \d+\]$"):
        pre.run_pretraining(str(fed_path), str(tmp_path / "pre0"), steps=1, batch_size=100000, cache_dir=str(cache_dir))
    assert not (tmp_path / "pre0").exists()


def test_pretrain_that_fails_while_scoring_leaves_no_backbone(tmp_path, cache_dir, monkeypatch):
    pre = _load_script("pretrain")
    fed_path = write_federation(tmp_path / "fed")

    def broken(*a, **k):
        raise ValueError("scoring failed")

    monkeypatch.setattr(pre, "reconstruction_nmse", broken)
    out = tmp_path / "pre"
    with pytest.raises(ValueError, match="scoring failed"):
        pre.run_pretraining(str(fed_path), str(out), steps=1, batch_size=2, cache_dir=str(cache_dir),
                            log=lambda *a: None)
    assert not out.exists() or not any(out.iterdir())  # nothing a later --backbone could take for finished
    with pytest.raises(ValueError, match="scoring failed"):  # not "already holds results": --out stays free
        pre.run_pretraining(str(fed_path), str(out), steps=1, batch_size=2, cache_dir=str(cache_dir),
                            log=lambda *a: None)


def test_report_and_finetune_site_on_files_of_the_wrong_shape_are_one_line(fed_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    rows = read_jsonl(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "round"}) + "\n"
                                               for r in rows))  # valid JSON lines, no round
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert _load_script("report").main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / 'metrics.jsonl'}: line 1 is not a row fedfm writes") and "\n" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # a site whose codebook is not the run's: one line before any data is generated
    site = tmp_path / "wide.yaml"
    site.write_text((fed_run["fed"].parent / "gamma.yaml").read_text()
                    .replace(f"codebook_beams: {NUM_BEAMS}, oversampling: 4",
                             f"codebook_beams: {2 * NUM_BEAMS}, oversampling: 8"))
    assert f"codebook_beams: {2 * NUM_BEAMS}" in site.read_text()
    assert _load_script("finetune_site").main(["--run", str(run), "--site", str(site)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {site}: mmwave.codebook_beams is {2 * NUM_BEAMS}, the run's model has {NUM_BEAMS} "
                   f"beams; fine-tune a site with the run's codebook")


def test_dataset_summary_fills_caches_in_parallel_with_the_same_arrays(tmp_path, capsys):
    summary = _load_script("dataset_summary")
    fed = write_federation(tmp_path / "fed")
    assert summary.main([str(fed), "--cache-dir", str(tmp_path / "par"), "--jobs", "2"]) == 0
    assert summary.main([str(fed), "--cache-dir", str(tmp_path / "seq")]) == 0
    par, seq = (sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d).rglob("*.npz")) for d in ("par", "seq"))
    assert par == seq and len(par) == 3 * 3  # every split of every site, under the same names
    for rel in par:
        with np.load(tmp_path / "par" / rel) as a, np.load(tmp_path / "seq" / rel) as b:
            assert sorted(a.files) == sorted(b.files)
            assert all(np.array_equal(a[k], b[k]) for k in a.files), rel
    out = capsys.readouterr().out
    assert out.count("| alpha ") == 2 and out.count("2 training sites, 1 held out") == 2
    assert summary.main([str(fed), "--jobs", "0"]) == 2
    (tmp_path / "file").write_text("not a folder")  # a worker's one-line error reaches the user
    assert summary.main([str(fed), "--cache-dir", str(tmp_path / "file"), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--jobs 0 is not allowed" in err and f"{tmp_path / 'file'}" in err and "Traceback" not in err


def test_compare_bootstrap_says_why_it_is_missing(fed_run, tmp_path):
    """A run without per-sample errors (one of an earlier fedfm, or an arm's file gone) gets a
    one-line reason in compare.json and the report instead of an interval."""
    import shutil

    from fedfm.report import bootstrap_lines

    script = _load_script("compare")
    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    arms = {"local_only": {"alpha": {}}}
    samples_path(run, "local_only").unlink(missing_ok=True)
    boot = script.bootstrap_arms(run, arms)
    assert boot == {"missing": f"no per-sample errors of the local-only arm ({samples_path(run, 'local_only')})"}
    samples_path(run, f"round-{ROUNDS:03d}").unlink()
    boot = script.bootstrap_arms(run, arms)
    assert boot["missing"].startswith(f"{run} has no per-sample errors of its round {ROUNDS}")
    assert bootstrap_lines(boot)[0] == f"Paired bootstrap: not computed ({boot['missing']})."
    samples_path(run, "baseline").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="per-sample errors cannot be read"):
        script.bootstrap_arms(run, arms)


def test_report_gives_each_cell_its_interval_against_the_baseline(fed_run, tmp_path):
    """report.py reads the evaluator's per-sample errors: every site × task of the final round gets
    the federated/baseline ratio's 95 % interval, and the cells beaten / lost at 95 % are counted;
    without the files the report is still written and says why there are no intervals."""
    import shutil

    from fedfm.metrics import error_for_score, error_ratio
    from fedfm.report import load_run, summarize, write_report

    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    (run / "compare.json").unlink(missing_ok=True)
    s = summarize(load_run(run))
    for role, n_sites in (("train", 2), ("heldout", 1)):
        c = s["cells_95"][role]
        assert c["cells"] == 7 * n_sites
        cis = [(name, t, e["ratio_ci"]) for name, site in s["sites"].items() if site["role"] == role
               for t, e in site["tasks"].items()]
        assert len(cis) == 7 * n_sites
        assert [(x["site"], x["task"]) for x in c["beaten"]] == [(n, t) for n, t, ci in cis if ci[1] < 1]
        assert [(x["site"], x["task"]) for x in c["lost"]] == [(n, t) for n, t, ci in cis if ci[0] > 1]
        for name, t, ci in cis:  # each interval holds the ratio of the scores the table shows
            e = s["sites"][name]["tasks"][t]
            want = error_ratio(t, error_for_score(t, e["federated"]), error_for_score(t, e["baseline"]))
            assert ci[0] - 1e-9 <= want <= ci[1] + 1e-9, (name, t, ci, want)
        for x in c["beaten"] + c["lost"]:
            e = s["sites"][x["site"]]["tasks"][x["task"]]
            assert x["ratio"] == pytest.approx(error_ratio(x["task"], error_for_score(x["task"], e["federated"]),
                                                           error_for_score(x["task"], e["baseline"])), rel=1e-9)
    assert any(ci[0] < ci[1] for site in s["sites"].values() for ci in (e["ratio_ci"] for e in site["tasks"].values()))
    md = write_report(run).read_text()
    assert md.count("the federated model beats the baseline on ") == 2  # training and held-out sites
    assert f"beats the baseline on {len(s['cells_95']['train']['beaten'])} of 14 site × task cells" in md
    (run / "samples" / f"round-{ROUNDS:03d}.safetensors").unlink()
    md = write_report(run).read_text()
    assert "Intervals against the baseline: not computed (no per-sample errors of round 2" in md
    assert "beats the baseline on" not in md


def test_baselines_script_fits_on_the_first_train_samples_and_takes_a_task_subset(tmp_path, cache_dir, capsys):
    # --max-train N fits every baseline on the first N train samples (the Kronecker LMMSE's
    # covariances then differ from the full split's), --tasks prints only those rows; a bad
    # task is one line and exit 2.
    from fedfm.data import load_site_data
    from fedfm.baselines import evaluate_baselines
    from fedfm.scenarios import load_federation

    fed_path = write_federation(tmp_path / "fed")
    script = _load_script("baselines")
    fed = load_federation(fed_path)
    few = script.baseline_scores(fed, "test", str(cache_dir), max_train=8, tasks=("CE",))
    spec = fed.sites[0]
    data = load_site_data(spec, ("train", "test"), str(cache_dir))
    data.splits["train"] = {k: (v[:8] if k != "codebook" else v) for k, v in data.splits["train"].items()}
    assert few[spec.name]["CE-LMMSE3D"]["nmse_db"] == pytest.approx(
        evaluate_baselines(data, spec, "test", variants=True, tasks=("CE",))["CE-LMMSE3D"]["nmse_db"])
    full = script.baseline_scores(fed, "test", str(cache_dir), tasks=("CE",))
    assert few[spec.name]["CE-LMMSE3D"]["nmse_db"] != pytest.approx(full[spec.name]["CE-LMMSE3D"]["nmse_db"], abs=1e-6)
    import fedfm.train  # the sites fitted one per core equal them fitted one after another, bit for bit

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fedfm.train, "usable_cores", lambda: 1)
        assert script.baseline_scores(fed, "test", str(cache_dir), tasks=("CE",)) == full
    assert list(full) == [s.name for s in fed.sites]  # in the federation's order
    assert set(full[spec.name]) == {"CE-interp", "CE-LMMSE", "CE-LMMSE3D"}
    assert script.main([str(fed_path), "--cache-dir", str(cache_dir), "--tasks", "CP", "--max-train", "8"]) == 0
    out = capsys.readouterr().out
    assert "| CP | CP-LMMSE3D |" in out and "| CE |" not in out and "first 8 samples" in out
    assert script.main([str(fed_path), "--tasks", "CE,XX"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_lmmse_calibration_predicted_error_matches_the_measured_one(tmp_path, cache_dir, capsys):
    # The Kronecker LMMSE's own error variance (what the CE/CP heads scale their correction by)
    # against the squared error it makes on real generated test channels: within a factor of 2
    # on every site and task (benchmark.yaml: within 20 %; here the covariances come from a
    # tiny train split). A variance that left out the noise or the prior term would miss by far more.
    script = _load_script("lmmse_calibration")
    from fedfm.scenarios import load_federation

    fed_path = write_federation(tmp_path / "fed")
    for spec in load_federation(fed_path).sites:
        for task, (predicted, measured) in script.calibration(spec, str(cache_dir)).items():
            assert 0.5 < measured / predicted < 2.0, (spec.name, task, predicted, measured)
    assert script.main([str(fed_path), "--cache-dir", str(cache_dir), "--max-test", "8"]) == 0
    assert capsys.readouterr().out.count("| CP |") == len(load_federation(fed_path).sites)
    assert script.main([str(fed_path), "--max-train", "-1"]) == 2
    assert capsys.readouterr().out.strip().count("\n") == 0


def test_run_federation_refuses_before_starting_what_would_fail_hang_or_mislead_later(fed_run, tmp_path, capsys):
    # each of these once reached Flower: a site twice (counted twice in FedAvg and the report), a
    # 64-beam site beside 32-beam ones (scored by a 32-beam head), a min-train-nodes no SuperNode
    # count can meet (Flower waits forever), a resume the server would refuse after rewriting the
    # run's run_config.toml, a resume of a folder that does not exist (created), --out a file
    import signal

    root, run, fed = fed_run["root"], fed_run["run"], fed_run["fed"]
    (root / "twice.yaml").write_text("name: t\ntrain_sites: [alpha.yaml, alpha.yaml]\n")
    (root / "overlap.yaml").write_text("name: o\ntrain_sites: [alpha.yaml, beta.yaml]\nheldout_sites: [beta.yaml]\n")
    gamma = (root / "gamma.yaml").read_text().replace("name: gamma", "name: gamma64")
    (root / "gamma64.yaml").write_text(gamma.replace("codebook_beams: 32, oversampling: 4",
                                                     "codebook_beams: 64, oversampling: 8"))
    (root / "beams.yaml").write_text("name: b\ntrain_sites: [alpha.yaml, beta.yaml]\nheldout_sites: [gamma64.yaml]\n")
    (root / "alpha-copy.yaml").write_text((root / "alpha.yaml").read_text())  # another file, the same name
    (root / "names.yaml").write_text("name: n\ntrain_sites: [alpha.yaml, alpha-copy.yaml]\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    damaged, not_a_mapping = tmp_path / "damaged", tmp_path / "not-a-mapping"  # a run's config.json, hand-edited
    recorded = json.loads((run / "config.json").read_text())
    damaged.mkdir()
    (damaged / "config.json").write_text(json.dumps({**recorded, "run_config": {**recorded["run_config"], "lr": "x"}}))
    not_a_mapping.mkdir()
    (not_a_mapping / "config.json").write_text(json.dumps({**recorded, "run_config": 5}))
    cases = [
        (["--federation", str(root / "twice.yaml")], "that site is listed twice"),
        (["--federation", str(root / "overlap.yaml")], "in both `train_sites` and `heldout_sites`"),
        (["--federation", str(root / "names.yaml")], "alpha-copy.yaml are both named 'alpha'"),
        (["--federation", str(root / "beams.yaml")], "`mmwave.codebook_beams` differs between sites (alpha 32, beta 32, gamma64 64)"),
        (["--out", str(a_file)], f"out-dir {a_file}: is a file, not a folder"),
        (["--set", f"resume={tmp_path / 'no-run'}"], "not a run folder (no config.json)"),
        (["--set", f"resume={run}", "--set", "strategy=fedprox"], "`strategy` is 'fedprox' here but the run was started with 'fedavg'"),
        (["--set", f"resume={run}", "--out", str(tmp_path / "elsewhere")], "a resume writes into the resumed run's folder"),
        (["--set", "min-train-nodes=3", "--timeout", "30"], "min-train-nodes=3 is not allowed: 2 SuperNode(s) will connect"),
        (["--set", f"backbone={tmp_path / 'none.safetensors'}"], "none.safetensors: no such file"),
        (["--set", f"cache-dir={a_file}"], f"cache-dir={a_file}: is a file, not a folder"),
        (["--set", "out-dir=/tmp/elsewhere"], "the launchers take the run folder from --out"),
        (["--num-gpus", "-1"], "--num-gpus -1.0 is not allowed"),
        (["--num-cpus", "0"], "--num-cpus 0 is not allowed"),
        # a batch past a site's training samples only repeats them, and a huge one ran out of memory
        (["--set", "batch-size=65"], "`batch-size` = 65 is not allowed: training site alpha"),
        (["--set", "batch-size=9", "--set", "train-max-samples=8"], "has 8 training samples"),
        (["--set", "fedprox-mu=0.5"], "`fedprox-mu` = 0.5 is used only by strategy=fedprox"),
        # a value the launcher once used before RunConfig checked it: a traceback, or no key named
        (["--set", "fraction-train=-inf"], "run config: `fraction-train` = -inf is not allowed"),
        (["--set", "fraction-train=foo"], "run config: `fraction-train` = 'foo' is not allowed"),
        (["--ray-address", "headnode:abc"], "--ray-address headnode:abc: not a HOST:PORT with a port in 1–65535"),
        (["--ray-address", ":6379"], "--ray-address :6379: not a HOST:PORT"),  # Ray logged a traceback for it
        (["--ray-address", "127.0.0.1:99999"], "--ray-address 127.0.0.1:99999: not a HOST:PORT"),
        (["--set", f"resume={damaged}"], f"{damaged / 'config.json'}: the run's recorded settings: run config: "
                                         f"`lr` = 'x' is not allowed"),
        (["--set", f"resume={not_a_mapping}"], f"{not_a_mapping / 'config.json'}: `run_config` = 5 is not allowed"),
    ]
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rf = _load_script("run_federation")
    for i, (args, needle) in enumerate(cases):
        new = tmp_path / f"new-{i}"
        argv = [*args, "--flwr-home", str(tmp_path / "flwr")]
        if "--federation" not in args and not any(a.startswith("resume=") for a in args):
            argv += ["--federation", str(fed)]
        if "--out" not in args and not any(a.startswith("resume=") for a in args):
            argv += ["--out", str(new)]
        saved = signal.getsignal(signal.SIGTERM)
        try:
            assert rf.main(argv) == 2, args
        finally:
            signal.signal(signal.SIGTERM, saved)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, (args, err)
        assert not new.exists() and not (tmp_path / "flwr").exists() and not (tmp_path / "no-run").exists(), args
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_compare_refuses_before_training_a_second_comparison_a_corrupt_or_unscored_run(fed_run, tmp_path, capsys):
    import shutil

    script = _load_script("compare")

    def attempt(edit, *extra):
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(fed_run["run"], run)
        edit(run)
        before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        with pytest.MonkeyPatch.context() as mp:
            calls = FinetuneCalls(mp)
            rc = script.main([str(fed_run["fed"]), "--out", str(run), "--skip-federated", *extra])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert calls.calls == []  # refused before any training
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        return err.strip()

    def no_comparison(run):
        (run / "compare.json").unlink(missing_ok=True)

    def arms(run):  # an earlier comparison, with its arms' per-sample errors
        (run / "compare.json").write_text(json.dumps({"local_only": {}, "centralized": {}}))
        samples_path(run, "centralized").parent.mkdir(exist_ok=True)
        samples_path(run, "centralized").write_bytes(b"kept")

    def torn(run):  # metrics.jsonl cut inside its last line
        no_comparison(run)
        text = (run / "metrics.jsonl").read_bytes()
        (run / "metrics.jsonl").write_bytes(text[:-40])

    def unscored(run):  # cut at a line break: the last round's scores are gone, its checkpoint is not
        no_comparison(run)
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("round") != ROUNDS]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert "already holds a comparison (compare.json)" in attempt(arms)
    assert "metrics.jsonl: line" in attempt(torn) and "is not valid JSON" in attempt(torn)
    assert "report.md says Incomplete" in attempt(unscored)
    assert attempt(no_comparison, "--set", "num-server-rounds") == "error: --set 'num-server-rounds': expected KEY=VALUE"


def test_report_refuses_to_rebuild_from_files_that_lost_the_scores(fed_run, tmp_path, capsys):
    # report.py once replaced a complete report.md with a table of dashes (metrics.jsonl gone or
    # empty, baselines.json gone) or with one saying Incomplete and advising a resume (the last
    # round's scores gone, its checkpoint there), exit 0 and nothing on stderr
    import shutil

    script = _load_script("report")

    def attempt(edit):
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(fed_run["run"], run)
        edit(run)
        before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        rc = script.main([str(run)])
        err = capsys.readouterr().err.strip()
        assert (run / "checkpoints").is_dir() == ("checkpoints" in {p.parts[0] for p in before})
        if rc != 0:  # refused: nothing rewritten
            assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        return rc, err

    def last_round_unscored(run):
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("round") != ROUNDS]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    for edit, needle in [(lambda run: (run / "metrics.jsonl").unlink(), "metrics.jsonl: not found"),
                         (lambda run: (run / "metrics.jsonl").write_text(""), "metrics.jsonl: is empty"),
                         (lambda run: (run / "baselines.json").unlink(), "baselines.json: not found"),
                         (last_round_unscored, f"lacks the scores of round(s) {ROUNDS}, which")]:
        rc, err = attempt(edit)
        assert rc == 2 and err.startswith("error: ") and "\n" not in err and needle in err, err
    def every_score_gone(run):  # only the sites' training-loss rows left
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("source") != "federated"]
        assert rows
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = attempt(every_score_gone)
    assert rc == 2 and "lacks the scores of round(s) 0, 1" in err, err
    rc, err = attempt(lambda run: None)  # the run as it is rebuilds (and rewrites the same report)
    assert rc == 0 and err == ""
    # with eval-every=k a checkpoint the evaluator did not score (no per-sample errors) is a round
    # between evaluations, not lost scores: rebuilt, whatever eval-every says now
    def interrupted_between_evaluations(run):
        conf = json.loads((run / "config.json").read_text())
        conf["run_config"].update({"eval-every": 1, "num-server-rounds": ROUNDS + 1})
        (run / "config.json").write_text(json.dumps(conf))
        last_round_unscored(run)
        samples_path(run, f"round-{ROUNDS:03d}").unlink()
    rc, err = attempt(interrupted_between_evaluations)
    assert rc == 0 and err == "", err


def test_scripts_refuse_what_an_audit_found_reaching_a_traceback_in_one_line_writing_nothing(fed_run, tmp_path,
                                                                                            capsys):
    """Each once ended in a traceback, a line naming no file or key, or a half-rewritten report."""
    import shutil
    import signal

    def refused(script: str, argv: list[str], needle: str) -> None:
        saved = signal.getsignal(signal.SIGTERM)  # the launchers set their own handler
        try:
            assert _load_script(script).main(argv) == 2, (script, argv)
        finally:
            signal.signal(signal.SIGTERM, saved)
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, (script, argv, err)

    # a path key given a number: checked with every other key before the launcher reads it
    refused("run_federation", ["--set", "federation=5", "--out", str(tmp_path / "r"), "--flwr-home",
                               str(tmp_path / "flwr")], "run config: `federation` = 5 is not allowed; expected a string")
    refused("compare", [str(fed_run["fed"]), "--out", str(tmp_path / "c"), "--set", "federation=x.yaml"],
            "--set federation=x.yaml: compare.py takes the federation from its first argument")
    assert not any((tmp_path / n).exists() for n in ("r", "flwr", "c"))

    # a device that is none, or a CUDA device this host lacks
    for device, needle in (("foo", "device 'foo' is not allowed; expected auto, cpu, cuda or cuda:N"),
                           ("mps", "device 'mps' is not allowed"),
                           ("cuda:9", "device 'cuda:9'")):
        refused("evaluate", [str(fed_run["run"]), "--device", device, "--out", str(tmp_path / "ev")], needle)
    assert not (tmp_path / "ev").exists()

    # a cache folder that is a file: the site's data cannot be made
    a_file = tmp_path / "cache-file"
    a_file.write_text("")
    refused("baselines", [str(fed_run["fed"]), "--cache-dir", str(a_file)], "cannot write the site's data cache")

    # a missing backbone: refused before any data is made or the output folder created
    with pytest.raises(ValueError, match="backbone checkpoint not found"):
        _load_script("train_central").run_central(str(fed_run["fed"]), str(tmp_path / "tc"),
                                                  backbone=str(tmp_path / "none.safetensors"))
    assert not (tmp_path / "tc").exists()

    # a baseline cell that is not a number: named, and not one of the report's files rewritten
    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    baselines = json.loads((run / "baselines.json").read_text())
    baselines["alpha"]["CE"]["nmse_db"] = "abc"
    (run / "baselines.json").write_text(json.dumps(baselines))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refused("report", [str(run)], f"{run / 'baselines.json'}: `alpha.CE.nmse_db` = 'abc' is not allowed; "
                                  f"expected a number")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_plot_that_fails_leaves_the_report_and_its_plots_as_they_were(fed_run, tmp_path, monkeypatch):
    import shutil

    import fedfm.report as report

    run = tmp_path / "run"
    shutil.copytree(fed_run["run"], run)
    for png in (run / "plots").glob("*.png"):  # so that a figure drawn again, even to the same bits, shows
        png.write_bytes(b"an earlier figure")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert any(p.parts[0] == "plots" for p in before)
    calls, real = [], report._save

    def second_fails(fig, path):  # the first figure is drawn, the second fails (a full disk, matplotlib)
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(fig, path)

    monkeypatch.setattr(report, "_save", second_fails)
    with pytest.raises(OSError, match="No space left"):
        report.write_report(run)
    assert len(calls) == 2
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not [p for p in run.iterdir() if p.name.startswith(".plots-")]
