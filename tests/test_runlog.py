"""Run folder: checkpoints are whole or absent; resume truncates an interrupted round."""
import json
import re

import numpy as np
import pytest

from fedfm.runlog import RunLog, read_jsonl


def test_checkpoint_round_trip_and_last_complete(tmp_path):
    log = RunLog(tmp_path)
    adapter = {"lora.A": np.arange(6, dtype=np.float32).reshape(2, 3)}
    log.save_checkpoint(0, adapter, {}, {"python_random": [3, [1, 2], None]})
    log.save_checkpoint(1, {"lora.A": adapter["lora.A"] + 1}, {"m_t/lora.A": np.ones((2, 3), np.float32)}, {})
    (log.dir / "checkpoints" / "round-002.tmp").mkdir()  # a crash while writing round 2
    assert log.last_complete_round() == 1
    a, s, state = log.load_checkpoint(1)
    np.testing.assert_array_equal(a["lora.A"], adapter["lora.A"] + 1)
    assert set(s) == {"m_t/lora.A"} and state["round"] == 1


def test_truncate_after_drops_an_interrupted_round(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics([{"round": r, "site": "s", "task": "CE"} for r in (0, 1, 2)])
    log.append_ledger([{"round": 2, "site": "s"}])
    log.append_event(2, "s", "error", "boom")
    for r in (0, 1, 2):
        log.save_checkpoint(r, {"x": np.zeros(1, np.float32)}, {}, {})
    log.truncate_after(1)
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]
    assert read_jsonl(tmp_path / "ledger.jsonl") == [] and read_jsonl(tmp_path / "events.jsonl") == []
    assert log.complete_rounds() == [0, 1]


def test_json_has_no_nan(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics([{"round": 0, "nmse": float("nan"), "x": np.float32(1.5), "y": np.float32("nan"),
                         "z": np.float64("inf")}])
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"round": 0, "nmse": None, "x": 1.5,
                                                                     "y": None, "z": None}


def test_corrupt_json_lines_named_by_file_and_line(tmp_path):
    import pytest

    from fedfm.runlog import read_json

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 0}\n{"round": \n{"round": 1}\n')
    with pytest.raises(ValueError, match=rf"^{p}: line 2 is not valid JSON"):
        read_jsonl(p)
    p.write_text('{"round": 0}\n[1]\n')
    with pytest.raises(ValueError, match=rf"^{p}: line 2 is not a JSON object"):
        read_jsonl(p)
    (tmp_path / "b.json").write_text("{oops")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'b.json'}: not valid JSON"):
        read_json(tmp_path / "b.json")
    assert read_json(tmp_path / "absent.json", {}) == {}


def test_resume_drops_a_torn_last_line(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics([{"round": 0, "site": "s"}, {"round": 1, "site": "s"}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "si')  # killed in the middle of an append
    log.truncate_after(1)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"round": 0, "site": "s"}, {"round": 1, "site": "s"}]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")


def test_report_flags_rounds_in_which_no_update_reached_the_average(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    from fedfm.config import RunConfig
    from fedfm.report import _markdown, load_run, summarize
    from fedfm.runlog import write_json

    write_json(tmp_path / "config.json", {"run_config": {"strategy": "fedavg"},
                                          "federation": {"sites": [{"name": "a", "role": "train"}]}})
    log = RunLog(tmp_path)
    log.append_metrics([{"round": r, "site": "a", "task": "CE", "source": "federated", "nmse": 0.5}
                        for r in (0, 1, 2, 3)])
    row = {"site": "a", "bytes_down": 8, "bytes_up": 0}
    log.append_ledger([{**row, "round": 1, "status": "ok", "bytes_up": 8}, {**row, "round": 2, "status": "error"},
                       {**row, "round": 3, "status": "rejected"}])
    s = summarize(load_run(tmp_path))
    assert s["rounds_without_update"] == [2, 3]
    md = _markdown(s)
    assert "**Incomplete: no site update reached the average in round(s) 2, 3;" in md
    assert "2 site update(s) failed or were rejected" in md
    # the launcher does not call such a run a success
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    spec = importlib.util.spec_from_file_location("run_federation_t", root / "scripts" / "run_federation.py")
    rf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rf)
    write_json(tmp_path / "report.json", s)
    (tmp_path / "report.md").write_text(md)
    cfg = RunConfig(federation="f.yaml", out_dir=str(tmp_path))
    out = rf.run_outcome({"status": "finished:completed"}, cfg, 0.0)
    assert out["ok"] is False and out["rounds_without_update"] == [2, 3]
    write_json(tmp_path / "report.json", {**s, "rounds_without_update": []})
    assert rf.run_outcome({"status": "finished:completed"}, cfg, 0.0)["ok"] is True
    # stage=pretrain also needs its backbone checkpoint
    pre = RunConfig(federation="f.yaml", out_dir=str(tmp_path), stage="pretrain")
    assert rf.run_outcome({"status": "finished:completed"}, pre, 0.0)["ok"] is False
    (tmp_path / "backbone.safetensors").write_bytes(b"weights")
    assert rf.run_outcome({"status": "finished:completed"}, pre, 0.0)["ok"] is True


def test_a_folder_holding_a_run_is_not_a_fresh_run_folder(tmp_path):
    import pytest

    from fedfm.runlog import check_fresh_run_dir

    check_fresh_run_dir(tmp_path / "absent")
    (tmp_path / "run_config.toml").write_text("")   # the launcher's files are not a run
    (tmp_path / "flwr_run.log").write_text("")
    check_fresh_run_dir(tmp_path)
    RunLog(tmp_path)                                  # an empty checkpoints/ folder is not one either
    check_fresh_run_dir(tmp_path)
    for name in ("metrics.jsonl", "config.json"):
        (tmp_path / name).write_text("{}\n")
        with pytest.raises(ValueError, match=rf"^{tmp_path}: already holds a run \({name}\); .*resume={tmp_path}"):
            check_fresh_run_dir(tmp_path)
        (tmp_path / name).unlink()
    RunLog(tmp_path).save_checkpoint(0, {"a": np.zeros(1)}, {}, {})
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints/\)"):
        check_fresh_run_dir(tmp_path)


def test_report_of_an_interrupted_run_says_incomplete(tmp_path):
    from fedfm.report import _markdown, load_run, summarize
    from fedfm.runlog import write_json

    write_json(tmp_path / "config.json", {"run_config": {"strategy": "fedavg", "num-server-rounds": 5},
                                          "federation": {"sites": [{"name": "a", "role": "train"}]}})
    log = RunLog(tmp_path)
    log.append_metrics([{"round": r, "site": "a", "task": "CE", "source": "federated", "nmse": 0.5}
                        for r in (0, 1, 2)])
    s = summarize(load_run(tmp_path))
    assert s["incomplete"] is True and s["final_round"] == 2 and s["planned_rounds"] == 5
    assert "**Incomplete: the run was asked for 5 rounds and its last scored round is 2;" in _markdown(s)
    log.append_metrics([{"round": r, "site": "a", "task": "CE", "source": "federated", "nmse": 0.5} for r in (3, 4, 5)])
    s = summarize(load_run(tmp_path))
    assert s["incomplete"] is False and "was asked for" not in _markdown(s)


def test_a_checkpoint_holding_nan_is_refused_naming_file_and_key(tmp_path):
    import pytest

    log = RunLog(tmp_path)
    log.save_checkpoint(1, {"lora.A": np.array([1.0, np.nan], np.float32)}, {}, {})
    with pytest.raises(ValueError, match=r"adapter.safetensors: `lora.A` holds NaN or inf values; the checkpoint is damaged"):
        log.load_checkpoint(1)
    # a truncated file is named itself, not only its round's folder
    log.save_checkpoint(2, {"lora.A": np.ones(4, np.float32)}, {"m": np.zeros(4, np.float32)}, {})
    target = log.checkpoint_dir(2) / "strategy.safetensors"
    target.write_bytes(target.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"round-002/strategy\.safetensors: checkpoint file cannot be read"):
        log.load_checkpoint(2)


def test_report_averages_each_task_over_sites_at_round_0_and_the_last(tmp_path):
    from fedfm.report import _markdown, load_run, summarize
    from fedfm.runlog import write_json

    write_json(tmp_path / "config.json", {"run_config": {"strategy": "fedavg"}, "federation": {"sites": [
        {"name": "a", "role": "train"}, {"name": "b", "role": "train"}, {"name": "c", "role": "train"},
        {"name": "h", "role": "heldout"}]}})
    # baselines: c's CE is error-free (its ratio is ∞ and left out of CE's mean)
    write_json(tmp_path / "baselines.json", {
        "a": {"CE": {"nmse": 0.4}, "LoS": {"accuracy": 0.8}}, "b": {"CE": {"nmse": 0.6}, "LoS": {"accuracy": 0.995}},
        "c": {"CE": {"nmse": 0.0}}, "h": {"CE": {"nmse": 0.5}}})
    fed = {"source": "federated"}
    RunLog(tmp_path).append_metrics(
        [{**fed, "round": 0, "site": s, "task": "CE", "nmse": 0.4} for s in ("a", "b", "c", "h")]
        + [{**fed, "round": 0, "site": s, "task": "LoS", "accuracy": 0.8} for s in ("a", "b")]
        + [{**fed, "round": 1, "site": "a", "task": "CE", "nmse": 0.2}, {**fed, "round": 1, "site": "b", "task": "CE", "nmse": 0.9},
           {**fed, "round": 1, "site": "c", "task": "CE", "nmse": 0.1}, {**fed, "round": 1, "site": "h", "task": "CE", "nmse": 0.25},
           {**fed, "round": 1, "site": "a", "task": "LoS", "accuracy": 0.9},
           {**fed, "round": 1, "site": "b", "task": "LoS", "accuracy": 1.0}])
    s = summarize(load_run(tmp_path))
    r0, r1 = s["per_round"]
    # round 0: CE (0.4/0.4 + 0.4/0.6) / 2; LoS (0.2/0.2 + 0.2/0.01) / 2 (b's 0.5 % error floored at 1 %)
    assert r0["task_ratio_train"] == pytest.approx({"CE": (1 + 2 / 3) / 2, "LoS": (1 + 20) / 2})
    # round 1: CE (0.5 + 1.5) / 2 = 1.0, not below 1; LoS (0.1/0.2 + 0.01/0.01) / 2 = 0.75
    assert r1["task_ratio_train"] == pytest.approx({"CE": 1.0, "LoS": 0.75})
    assert r1["task_ratio_heldout"] == pytest.approx({"CE": 0.5})
    md = _markdown(s)
    assert "| training | 1 | 1.000 | – | – | – | – | – | 0.750 | 1 of 2 |" in md
    assert "| held-out | 0 | 0.800 | – | – | – | – | – | – | 1 of 1 |" in md


def test_personal_models_round_trip_and_damaged_files_are_named(tmp_path):
    from fedfm.runlog import read_personal_models, write_json, write_personal_models

    a = {"lora.A": np.arange(6, dtype=np.float32).reshape(2, 3), "head.w": np.ones(4, np.float32)}
    b = {k: v + 0.5 for k, v in a.items()}
    kept = {"CE": "after", "BF": "before"}
    path = tmp_path / "finetune" / "gamma-0.1-holdout0.2.safetensors"

    def table(p, choice=kept, models_file=None):  # the JSON finetune_site.py writes after the models
        write_json(p.with_suffix(".json"), {"models_file": models_file or p.name,
                                            "rows": [{"task": t, "kept": k} for t, k in choice.items()]})

    write_personal_models(path, {"before": a, "after": b}, kept,
                          {"site": "gamma", "labelled_samples": 7, "ratio": float("nan")})
    # written, but its table not yet: the result is not complete
    with pytest.raises(ValueError, match=r"gamma-0.1-holdout0.2.json is missing, so the run that wrote it did not"):
        read_personal_models(path)
    table(path)
    models, got, meta = read_personal_models(path)
    assert got == kept
    assert meta == {"site": "gamma", "labelled_samples": 7, "ratio": None}  # JSON has no NaN
    for name, want in (("before", a), ("after", b)):
        assert set(models[name]) == set(want) and all(np.array_equal(models[name][k], want[k]) for k in want)
    assert not list(path.parent.glob("*.tmp"))
    table(path, {"CE": "before", "BF": "before"})  # a table of another result beside it
    with pytest.raises(ValueError, match="is the table of another result"):
        read_personal_models(path)
    table(path)
    # the writer refuses what the reader would, and leaves the file as it was
    for models, choice, why in (({"after": b}, kept, "expected the models before, after"),
                                ({"before": a, "after": b}, {"CE": "global"}, "`kept` is not"),
                                ({"before": a, "after": b}, {}, "`kept` is not"),
                                ({"before": a, "after": {"lora.A": b["lora.A"]}}, kept, "other keys"),
                                ({"before": a, "after": {**b, "head.w": np.full(4, np.nan, np.float32)}}, kept,
                                 r"`after/head.w` holds NaN")):
        with pytest.raises(ValueError, match=why):
            write_personal_models(path, models, choice, {})
    assert read_personal_models(path)[1] == kept

    with pytest.raises(ValueError, match=r"no such file; scripts/finetune_site.py writes it"):
        read_personal_models(tmp_path / "missing.safetensors")
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(torn))}: not a personalised-models file"):
        read_personal_models(torn)
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.safetensors"  # a checkpoint's adapter file: no `kept` in its header
    save_file(a, str(plain))
    with pytest.raises(ValueError, match="not a personalised-models file .*KeyError"):
        read_personal_models(plain)
    forged = tmp_path / "forged.safetensors"  # tensors of a file edited by hand
    save_file({**{f"before/{k}": v for k, v in a.items()}, "after/lora.A": b["lora.A"],
               "after/head.w": np.full(4, np.inf, np.float32)}, str(forged),
              metadata={"kept": '{"CE": ["after"]}', "meta": "{}"})
    with pytest.raises(ValueError, match=r"forged.safetensors: `after/head.w` holds NaN or inf values; the file is "
                                         r"damaged"):
        read_personal_models(forged)


def test_each_tasks_round_is_chosen_on_the_sites_val_ratios_alone():
    from fedfm.metrics import HEADLINE
    from fedfm.report import TASK_ORDER, _site_val, _val_choice, _val_choice_lines

    def val(rnd, site, ratios):  # a site's site-val rows of one round (headline metrics unused here)
        return [{"round": rnd, "site": site, "source": "site-val", "task": t, "ratio": ratios.get(t, 0.8),
                 HEADLINE[t]: 0.0, "samples": 8} for t in TASK_ORDER]

    # rounds 0–2 scored by both sites; round 3 by a alone (not compared: another mean); BF's
    # means 1.0, 1.03, 0.99 → round 2; CE's 0.9, 0.7, 0.8 → round 1; the rest tie at 0.8 → round 0
    rows = (val(0, "a", {"BF": 1.0, "CE": 0.9}) + val(0, "b", {"BF": 1.0, "CE": 0.9})
            + val(1, "a", {"BF": 1.1, "CE": 0.6}) + val(1, "b", {"BF": 0.96, "CE": 0.8})
            + val(2, "a", {"BF": 0.98, "CE": 0.8}) + val(2, "b", {"BF": 1.0, "CE": 0.8})
            + val(3, "a", {"BF": 0.1, "CE": 0.1}))
    sv = _site_val({"metrics": rows})
    assert sorted(sv["task_means"]) == [0, 1, 2] and sv["task_mean_sites"] == ["a", "b"]
    assert sv["task_means"][1]["BF"] == pytest.approx(1.03) and sv["task_means"][2]["CE"] == pytest.approx(0.8)
    # the central evaluator's test ratios per round (round 1 unscored centrally: eval-every)
    test = {0: {"BF": 1.0, "CE": 0.5}, 2: {"BF": 1.2, "CE": 0.4}}
    per_round = [{"round": rnd, "task_ratio_train": {t: m.get(t, 0.9) for t in TASK_ORDER},
                  "task_ratio_heldout": {t: 2 * m.get(t, 0.9) for t in TASK_ORDER}} for rnd, m in test.items()]
    c = _val_choice(sv, per_round)
    assert c["rounds"] == [0, 2]  # round 1 has no test score to report: not a candidate
    assert c["per_task"]["BF"] == {"round": 2, "val": pytest.approx(0.99), "val_final": pytest.approx(0.99),
                                   "train": 1.2, "train_final": 1.2, "heldout": 2.4, "heldout_final": 2.4}
    # CE: 0.9 at round 0, 0.8 at round 2 → 2; the others tie at 0.8 → the earliest, round 0
    assert c["per_task"]["CE"]["round"] == 2
    assert all(c["per_task"][t]["round"] == 0 for t in TASK_ORDER if t not in ("BF", "CE"))
    assert c["per_task"]["PE"]["train"] == 0.9 and c["per_task"]["PE"]["train_final"] == 0.9
    # beaten on the training sites' test: CE 0.4 and five at 0.9 with the chosen rounds, BF 1.2 not
    assert c["beaten_train"] == 6 and c["mean_train"] == pytest.approx((0.4 + 1.2 + 5 * 0.9) / 7)
    assert c["beaten_heldout"] == 1  # 0.8, 2.4 and five at 1.8
    lines = "\n".join(_val_choice_lines(c))
    assert "| BF | 2 | 0.990 / 0.990 | 1.200 / 1.200 | 2.400 / 2.400 |" in lines
    assert "training sites: 6 of 7 tasks beaten with the chosen rounds, mean ratio 0.871" in lines
    assert c["final"] == 2 and c["unchosen"] == []
    # fewer than two comparable rounds, or the final round not among them: no choice, and why
    assert "missing" in _val_choice(sv, per_round[:1])
    only0 = _val_choice(_site_val({"metrics": rows[:14]}), per_round)  # round 0 only
    assert "no task has a val mean at round 2 and another round" in only0["missing"]
    assert _val_choice({}, per_round) == {} and _val_choice_lines({}) == []  # no federated evaluation
    # sites sampled per round (fraction-evaluate < 1): no round has them all, the report says so
    sampled = [r for r in rows if (r["round"], r["site"]) in {(0, "a"), (1, "b"), (2, "a")}]
    c3 = _val_choice(_site_val({"metrics": sampled}), per_round)
    assert c3 == {"missing": c3["missing"]} and "the sites scored differ between rounds" in c3["missing"]
    assert _val_choice_lines(c3)[0].startswith("No task's round was chosen on the sites' validation splits: the "
                                               "sites scored differ")
    # a site without a finite LoS ratio at round 2 (a baseline without error on its val samples):
    # LoS goes unchosen, the other tasks keep their choice
    inf = [dict(r, ratio=float("inf")) if (r["round"], r["site"], r["task"]) == (2, "b", "LoS") else r for r in rows]
    c2 = _val_choice(_site_val({"metrics": inf}), per_round)
    assert c2["unchosen"] == ["LoS"] and set(c2["per_task"]) == set(TASK_ORDER) - {"LoS"}
    assert c2["per_task"]["BF"] == c["per_task"]["BF"]
    assert "No round chosen for LoS: some site gave no finite val ratio at round 2" in "\n".join(_val_choice_lines(c2))
    assert "of 6 tasks beaten" in "\n".join(_val_choice_lines(c2))
