"""report.md / report.json / plots/*.png from a run folder's files alone.

    python scripts/report.py runs/<run-id>

Inputs (fedfm.runlog): config.json, metrics.jsonl, baselines.json, ledger.jsonl,
events.jsonl, samples/ (per-sample test errors of the final round and the baselines: each
error ratio's 95 % paired bootstrap interval) and, when scripts/compare.py wrote it,
compare.json (local-only and centralized scores of the same sites, and its bootstrap).
Nothing is recomputed from data or models. A
``stage=pretrain`` run gets a reconstruction report instead: NMSE per site and mask type
beside the classical fillers (its metrics.jsonl rows), bytes, and backbone.json's hash.

Average score (DESIGN.md): per task, model error / baseline error on the same split
(NMSE for CE/CP/PF, MAE for DE/PE, 1 − top-1 for BF, 1 − accuracy for LoS); a site's
score is the mean over tasks. Lower is better; 1.0 = no better than the baseline.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fedfm.metrics import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, HEADLINE, average_score, error_for_score, error_ratio
from fedfm.runlog import read_json, read_jsonl, read_run_config, write_json

TASK_ORDER = ("CE", "CP", "PF", "BF", "DE", "PE", "LoS")
_UNITS = {"nmse_db": " dB", "mae_m": " m", "mae_db": " dB"}


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if metric in ("top1", "top3", "accuracy", "f1", "beam_se_ratio", "se_ratio"):
        return f"{value:.2f}"
    return f"{value:.1f}{_UNITS.get(metric, '')}"


def load_run(run_dir: str | Path) -> dict:
    d = Path(run_dir)
    config = read_run_config(d)

    def opt_json(name):
        value = read_json(d / name, {})
        if not isinstance(value, dict):  # its reader would fail on it with no file named
            raise ValueError(f"{d / name}: not a JSON object; a run folder's {name} is one fedfm writes")
        return value

    baselines = opt_json("baselines.json")
    _check_baselines(d / "baselines.json", baselines)
    return {"dir": d, "config": config,
            "metrics": read_jsonl(d / "metrics.jsonl"), "ledger": read_jsonl(d / "ledger.jsonl"),
            "events": read_jsonl(d / "events.jsonl"), "baselines": baselines,
            "compare": opt_json("compare.json")}


def _check_baselines(path: Path, baselines: dict) -> None:
    """ValueError naming the file and the cell when baselines.json is not {site: {task: {metric:
    number, "baseline": name}}}, as the central evaluator writes it: the report formats every
    metric as a number, and would otherwise fail with no file named, or write half its files."""
    for site, tasks in baselines.items():
        if not isinstance(tasks, dict):
            raise ValueError(f"{path}: `{site}` = {tasks!r} is not allowed; expected {{task: {{metric: number}}}}")
        for task, cell in tasks.items():
            if not isinstance(cell, dict):
                raise ValueError(f"{path}: `{site}.{task}` = {cell!r} is not allowed; expected {{metric: number}}")
            for metric, value in cell.items():
                ok = isinstance(value, str) if metric == "baseline" else (
                    value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)))
                if not ok:
                    expected = "the baseline method's name" if metric == "baseline" else "a number"
                    raise ValueError(f"{path}: `{site}.{task}.{metric}` = {value!r} is not allowed; expected {expected}")


def summarize(run: dict) -> dict:
    """The report's numbers (report.json)."""
    fed = [r for r in run["metrics"] if r.get("source") == "federated"]
    rounds = sorted({r["round"] for r in fed})
    roles = {s["name"]: s["role"] for s in run["config"]["federation"]["sites"]}
    by_round: dict[int, dict[str, dict[str, dict]]] = {}
    for r in fed:
        by_round.setdefault(r["round"], {}).setdefault(r["site"], {})[r["task"]] = _metrics_only(r)
    final = rounds[-1] if rounds else None
    sites = {}
    for site, role in roles.items():
        model = by_round.get(final, {}).get(site, {})
        base = {t: _metrics_only(m) for t, m in run["baselines"].get(site, {}).items()}
        entry = {"role": role, "tasks": {}, "avg_score": _avg(model, base)}
        for task in TASK_ORDER:
            if task in model or task in base:
                entry["tasks"][task] = {"federated": model.get(task), "baseline": base.get(task)}
        for kind in ("local_only", "centralized"):
            other = run["compare"].get(kind, {}).get(site)
            if other:
                for task, m in other.items():
                    entry["tasks"].setdefault(task, {})[kind] = m
                entry[f"avg_score_{kind}"] = _avg(other, base)
        sites[site] = entry
    per_round = []
    for rnd in rounds:
        row = {"round": rnd}
        for role in ("train", "heldout"):
            vals = [_avg(m, run["baselines"].get(s, {})) for s, m in by_round[rnd].items() if roles.get(s) == role]
            vals = [v for v in vals if v is not None and math.isfinite(v)]  # ∞ sites listed in the table
            row[f"avg_score_{role}"] = float(np.mean(vals)) if vals else None
            row[f"task_ratio_{role}"] = task_ratios({s: m for s, m in by_round[rnd].items() if roles.get(s) == role},
                                                    run["baselines"])
        per_round.append(row)
    cells_95 = _intervals_vs_baseline(run["dir"], final, sites)
    comm = _communication(run)
    ok = {r["round"]: r["sites_ok"] for r in comm["per_round"]}
    planned = run["config"]["run_config"].get("num-server-rounds")
    return {"run_dir": str(run["dir"]), "final_round": final, "rounds": rounds,
            "planned_rounds": planned,
            # the run stopped before its last round was scored (interrupted, not yet resumed):
            # the tables are an earlier round's, not the run's result
            "incomplete": planned is not None and (final is None or final < int(planned)),
            "strategy": run["config"]["run_config"].get("strategy"),
            "personal_heads": run["config"]["run_config"].get("personal-heads", ""),
            "personal_adapters": run["config"]["run_config"].get("personal-adapters", ""),
            "local_optimizer": run["config"]["run_config"].get("local-optimizer", "reset"),
            "site_model": run["config"]["run_config"].get("site-model", "global"),
            "backbone": run["config"].get("backbone"), "sites": sites, "per_round": per_round,
            "avg_score": per_round[-1] if per_round else {},
            # rounds after round 0 in which no site's update reached the average: the global
            # adapters did not change, so the run did less training than it was asked for
            "rounds_without_update": sorted(r for r in set(rounds) | set(ok) if r > 0 and not ok.get(r)),
            "communication": comm, "events": run["events"], "cells_95": cells_95,
            # federated minus each comparison arm per training site, with its paired bootstrap
            # interval (scripts/compare.py), when compare.json holds one
            "bootstrap": run["compare"].get("bootstrap"),
            "site_val": (site_val := _site_val(run)),
            "val_choice": _val_choice(site_val, per_round)}


def _site_val(run: dict) -> dict:
    """Federated evaluation (``fraction-evaluate``): {"sites": {site: {"round", "samples",
    "avg_score", "tasks": {task: value}, "ratios": {task: ratio}}} of the last round each site
    scored the global state on its own validation split (headline metrics, and error ratios
    to the site's baseline on the same samples), "per_round": {round: mean avg score over the
    sites that scored it}, "task_means": {round: {task: mean val ratio over "task_mean_sites"}}
    for the rounds and tasks all of those sites scored}; {} when the run had none."""
    sites: dict[str, dict] = {}
    by_round: dict[int, dict[str, float]] = {}
    ratios: dict[int, dict[str, dict[str, float]]] = {}  # round → site → task → val error ratio
    for r in run["metrics"]:
        if r.get("source") != "site-val" or r.get("task") not in HEADLINE or HEADLINE[r["task"]] not in r:
            continue
        if isinstance(r.get("avg_score"), (int, float)):
            by_round.setdefault(r["round"], {})[r["site"]] = float(r["avg_score"])
        if isinstance(r.get("ratio"), (int, float)) and math.isfinite(r["ratio"]):
            ratios.setdefault(r["round"], {}).setdefault(r["site"], {})[r["task"]] = float(r["ratio"])
        entry = sites.get(r["site"])
        if entry is None or r["round"] > entry["round"]:
            entry = sites[r["site"]] = {"round": r["round"], "samples": r.get("samples"),
                                        "avg_score": r.get("avg_score"), "tasks": {}, "ratios": {}}
        if r["round"] == entry["round"]:
            entry["tasks"][r["task"]] = r[HEADLINE[r["task"]]]
            entry["ratios"][r["task"]] = r.get("ratio")
    if not sites:
        return {}
    per_round = {rnd: float(np.mean([v for v in vals.values() if math.isfinite(v)]))
                 for rnd, vals in sorted(by_round.items()) if any(math.isfinite(v) for v in vals.values())}
    # each task's val ratio averaged over the sites, in the rounds every site that ever scored
    # gave that task a finite ratio in: rounds scored by other sites (fraction-evaluate < 1, a
    # failed site) are not compared, a mean over other sites being another quantity
    everyone = sorted({site for by_site in ratios.values() for site in by_site})
    task_means: dict[int, dict[str, float]] = {}
    for rnd, by_site in sorted(ratios.items()):
        if sorted(by_site) != everyone:
            continue
        means = {t: float(np.mean([m[t] for m in by_site.values()])) for t in TASK_ORDER
                 if all(t in m for m in by_site.values())}
        if means:
            task_means[rnd] = means
    return {"sites": {site: sites[site] for site in sorted(sites)}, "per_round": per_round,
            "task_means": task_means, "task_mean_sites": everyone}


def _val_choice(site_val: dict, per_round: list[dict]) -> dict:
    """Model selection on the sites' own val splits: per task, the round whose mean val error
    ratio over the sites is lowest (the earliest of equals), among the rounds the sites all
    scored and the central evaluator scored too; and beside it the test split's mean ratio of
    that round and of the final one, training and held-out sites. The choice reads only val
    scores, so the test numbers of the chosen rounds are an honest estimate of deploying, per
    task, that round's checkpoint. A task goes without a choice (listed in "unchosen") when the
    final round, the one every other table shows, or a second round lacks its val mean; {} without
    federated evaluation, {"missing": why} when it ran but no task could be chosen."""
    if not site_val or not per_round:
        return {}
    test = {r["round"]: r for r in per_round}
    means = {rnd: m for rnd, m in site_val.get("task_means", {}).items() if rnd in test}
    final = per_round[-1]["round"]
    why = ("the sites scored differ between rounds (fraction-evaluate < 1, or a site that failed or did not "
           "answer): a mean over other sites is another quantity, so no two rounds compare")
    if not means:
        return {"missing": why if not site_val.get("task_means") else
                "no round both the sites and the central evaluator scored (eval-every)"}
    out: dict = {"rounds": sorted(means), "final": final, "sites": site_val["task_mean_sites"], "per_task": {},
                 "unchosen": []}
    for t in TASK_ORDER:
        cands = [rnd for rnd in sorted(means) if t in means[rnd]]
        if final not in cands or len(cands) < 2:
            out["unchosen"].append(t)
            continue
        best = min(cands, key=lambda rnd: means[rnd][t])
        row = {"round": best, "val": means[best][t], "val_final": means[final][t]}
        for role in ("train", "heldout"):
            row[role] = (test[best].get(f"task_ratio_{role}") or {}).get(t)
            row[f"{role}_final"] = (test[final].get(f"task_ratio_{role}") or {}).get(t)
        out["per_task"][t] = row
    if not out["per_task"]:
        return {"missing": f"no task has a val mean at round {final} and another round ({why}, or a site's "
                           f"baseline without error on its val samples)"}
    for role in ("train", "heldout"):
        for key in (role, f"{role}_final"):
            vals = [r[key] for r in out["per_task"].values()]
            out[f"beaten_{key}"] = None if None in vals else sum(v < 1 for v in vals)
            out[f"mean_{key}"] = None if None in vals else float(np.mean(vals))
    return out


def _val_choice_lines(choice: dict) -> list[str]:
    if not choice:
        return []
    if "missing" in choice:
        return [f"No task's round was chosen on the sites' validation splits: {choice['missing']}.", ""]
    lines = ["### Each task's round chosen on the sites' validation splits", "",
             "| task | round chosen | val: chosen / final round | test, training sites: chosen / final | "
             "test, held-out sites: chosen / final |", "|---|---|---|---|---|"]
    for t, r in choice["per_task"].items():
        lines.append(f"| {t} | {r['round']} | {_ratio(r['val'], 3)} / {_ratio(r['val_final'], 3)} | "
                     f"{_ratio(r['train'], 3)} / {_ratio(r['train_final'], 3)} | "
                     f"{_ratio(r['heldout'], 3)} / {_ratio(r['heldout_final'], 3)} |")
    final = choice["final"]
    lines += ["", f"Cells: error ÷ baseline error averaged over the sites. Per task the round (of "
                  f"{', '.join(map(str, choice['rounds']))}) with the lowest mean val ratio over "
                  f"{', '.join(choice['sites'])}, read from their val scores alone (a point estimate: "
                  f"no per-sample errors leave a site); deploying it means that round's checkpoint "
                  f"(`checkpoints/round-NNN/`) for that task. The test columns are the central evaluator's "
                  f"scores of those rounds, read after the choice."]
    parts = []
    for role, name in (("train", "training"), ("heldout", "held-out")):
        if choice.get(f"beaten_{role}") is not None and choice.get(f"beaten_{role}_final") is not None:
            parts.append(f"{name} sites: {choice[f'beaten_{role}']} of {len(choice['per_task'])} tasks beaten "
                         f"with the chosen rounds, mean ratio {_ratio(choice[f'mean_{role}'], 3)}, against "
                         f"{choice[f'beaten_{role}_final']} and {_ratio(choice[f'mean_{role}_final'], 3)} at round "
                         f"{final}")
    if parts:
        lines.append("On the test split, " + "; ".join(parts) + ".")
    if choice.get("unchosen"):
        lines.append(f"No round chosen for {', '.join(choice['unchosen'])}: some site gave no finite val ratio "
                     f"at round {final} or at every other round (a baseline without error on its val samples, "
                     f"or a site that did not answer).")
    return lines + [""]


def _site_val_lines(site_val: dict) -> list[str]:
    if not site_val:
        return []
    lines = ["## Sites' own validation splits (federated evaluation)", "",
             "| site | round | samples | " + " | ".join(f"{t} {HEADLINE[t]}" for t in TASK_ORDER) + " | avg score |",
             "|" + "---|" * (len(TASK_ORDER) + 4)]
    for site, e in site_val["sites"].items():
        cells = [_fmt(HEADLINE[t], e["tasks"].get(t)) for t in TASK_ORDER]
        lines.append(f"| {site} | {e['round']} | {e['samples'] if e['samples'] is not None else '–'} | "
                     + " | ".join(cells) + f" | {_ratio(e.get('avg_score'))} |")
    lines += ["", "Each site scored the global state of that round on its own validation split (no data left "
                  "it; `fraction-evaluate`), a training site with what the central evaluator scores it with. "
                  "Avg score: the mean over tasks of its error ÷ the site's baseline error on the same samples "
                  "(the baselines fitted on the site's train split, as the central evaluator's)."]
    if site_val.get("per_round"):
        lines.append("Mean over the sites, by round: " + ", ".join(
            f"round {rnd} {_ratio(v, 3)}" for rnd, v in site_val["per_round"].items()) + ".")
    return lines + [""]


def _intervals_vs_baseline(run_dir: Path, final: int | None, sites: dict) -> dict:
    """Each (site, task) of the final round: the federated/baseline error ratio's 95 % paired
    bootstrap interval over the test samples, from ``samples/`` (what the central evaluator
    wrote), added to ``sites[site]["tasks"][task]["ratio_ci"]``; returns per role the cells
    beaten and lost at 95 % ({"missing": why} when the files are absent or unreadable)."""
    from fedfm.metrics import mean_ratio_interval, ratio_interval
    from fedfm.runlog import read_samples, samples_path

    if final is None:
        return {"missing": "no round was scored"}
    try:
        model = read_samples(samples_path(run_dir, f"round-{final:03d}"))
        base = read_samples(samples_path(run_dir, "baseline"))
    except ValueError as e:  # a report is still worth writing without intervals: say why
        return {"missing": str(e)}
    if model is None or base is None:
        return {"missing": f"no per-sample errors of round {final} and the baselines under "
                           f"{Path(run_dir) / 'samples'} (a run of an earlier fedfm)"}
    out: dict = {}
    pairs: dict = {}   # role → task → [(model errors, baseline errors) per site]
    for site, entry in sites.items():
        role = out.setdefault(entry["role"], {"cells": 0, "beaten": [], "lost": []})
        for task in TASK_ORDER:
            m, b = model.get(site, {}).get(task), base.get(site, {}).get(task)
            if m is None or b is None or len(m) != len(b):
                continue
            pairs.setdefault(entry["role"], {}).setdefault(task, []).append((m, b))
            ci = ratio_interval(task, m, b)
            lo, hi = ci["lo"], ci["hi"]
            entry["tasks"].setdefault(task, {})["ratio_ci"] = [lo, hi]
            role["cells"] += 1
            cell = {"site": site, "task": task, "ratio": ci["ratio"], "ci": [lo, hi]}
            if hi < 1:
                role["beaten"].append(cell)
            elif lo > 1:
                role["lost"].append(cell)
    for role, by_task in pairs.items():   # each task averaged over the role's sites (the per-task table)
        means = {}
        for task, p in by_task.items():
            try:
                means[task] = mean_ratio_interval(task, p)
            except ValueError:            # every site's baseline error-free on it: no finite mean
                pass
        out[role]["task_means"] = means
    return out


def _cells_line(cells_95: dict | None, role: str, say_missing: bool = True) -> list[str]:
    """How many site × task cells of ``role`` beat / lose to the baseline at 95 %; why not,
    when the intervals are missing and ``say_missing``."""
    if not cells_95:
        return []
    if "missing" in cells_95:
        return [f"Intervals against the baseline: not computed ({cells_95['missing']}).", ""] if say_missing else []
    c = cells_95.get(role)
    if not c or not c["cells"]:
        return []
    lost = "; ".join(f"{x['site']} {x['task']} {x['ratio']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"
                     for x in c["lost"])
    return [f"At 95 % (each error ratio's paired bootstrap interval over the test samples, {BOOTSTRAP_DRAWS} "
            f"draws, seed {BOOTSTRAP_SEED}): the federated model beats the baseline on {len(c['beaten'])} of {c['cells']} site × task "
            f"cells and loses on {len(c['lost'])}{': ' + lost if lost else ''}; the test split cannot tell "
            f"the rest apart.", ""]


def _metrics_only(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("round", "site", "role", "task", "source", "baseline", "head")}


def task_ratios(models: dict[str, dict], baselines: dict[str, dict]) -> dict[str, float]:
    """Per task, the mean over sites of model error ÷ that site's baseline error
    (``error_ratio``): {task: ratio} over the sites that have both, finite ratios only (a site
    whose baseline is error-free on a task is left out of that task's mean, as from the
    average score). What "beats the baseline on a task, averaged over sites" reads (issue 3)."""
    out = {}
    for task in TASK_ORDER:
        vals = [error_ratio(task, error_for_score(task, _metrics_only(m[task])),
                            error_for_score(task, _metrics_only(baselines[s][task])))
                for s, m in models.items() if task in m and task in baselines.get(s, {})]
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            out[task] = float(np.mean(vals))
    return out


def _task_ratio_table(s: dict) -> list[str]:
    """Per task averaged over sites, at round 0 (the untrained heads) and the final round."""
    rows = [r for r in s["per_round"] if r["round"] in {0, s["final_round"]}]
    cells = [(role, r) for role in ("train", "heldout") for r in rows if r.get(f"task_ratio_{role}")]
    if not cells:
        return []
    lines = ["## Per task, averaged over sites", "",
             "| sites | round | " + " | ".join(TASK_ORDER) + " | tasks beaten |", "|" + "---|" * (len(TASK_ORDER) + 3)]
    c95 = s.get("cells_95") or {}
    for role, r in cells:
        t = r[f"task_ratio_{role}"]
        ci = (c95.get(role) or {}).get("task_means", {}) if r["round"] == s["final_round"] else {}
        beaten = f"{sum(v < 1 for v in t.values())} of {len(t)}"
        if ci:
            beaten += f" ({sum(ci[k]['hi'] < 1 for k in ci)} at 95 %)"

        def cell(k):
            v = _ratio(t.get(k), 3)
            return v + (f" [{ci[k]['lo']:.3f}, {ci[k]['hi']:.3f}]" if k in ci and k in t else "")
        lines.append(f"| {'training' if role == 'train' else 'held-out'} | {r['round']} | "
                     + " | ".join(cell(k) for k in TASK_ORDER) + f" | {beaten} |")
    return lines + ["", "Cells: the mean over the sites of model error ÷ baseline error (below 1: the model is "
                        "better on average; round 0 is the untrained model, i.e. its heads' classical start); "
                        f"at the final round with its 95 % interval ({BOOTSTRAP_DRAWS} draws of each site's test "
                        "samples, the sites drawn independently; `fedfm.metrics.mean_ratio_interval`). A mean "
                        "below 1 is not a win on every site; the 95 % lines above say which cells are.", ""]


def _avg(model: dict, base: dict) -> float | None:
    tasks = [t for t in model if t in base]
    if not tasks:
        return None
    v = average_score({t: model[t] for t in tasks}, {t: base[t] for t in tasks})
    return None if v is None or math.isnan(v) else float(v)  # inf: a baseline is error-free on a task


def _communication(run: dict) -> dict:
    model = run["config"].get("model", {})
    per_round, evaluate_down = {}, 0
    for r in run["ledger"]:
        if r.get("kind", "train") != "train":  # federated evaluation (fraction-evaluate): counted apart
            evaluate_down += int(r.get("bytes_down", 0))
            continue
        row = per_round.setdefault(r["round"], {"round": r["round"], "bytes_down": 0, "bytes_up": 0,
                                                "sites_ok": 0, "sites_failed": 0})
        row["bytes_down"] += r["bytes_down"]
        row["bytes_up"] += r["bytes_up"]
        row["sites_ok" if r["status"] == "ok" else "sites_failed"] += 1
    return {"adapter_bytes": model.get("adapter_bytes"), "full_model_bytes": model.get("full_model_bytes"),
            "adapter_fraction": model.get("adapter_fraction"), "per_round": [per_round[k] for k in sorted(per_round)],
            "evaluate_bytes_down": evaluate_down}


# ---- markdown -------------------------------------------------------------------------
def _ratio(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    return "∞" if math.isinf(v) else f"{v:.{digits}f}"


def _cell(task: str, entry: dict, arms=()) -> str:
    key = HEADLINE[task]
    return " / ".join(_fmt(key, (entry.get(k) or {}).get(key)) for k in ("federated", "baseline", *arms))


def _site_table(summary: dict, role: str) -> list[str]:
    sites = {n: s for n, s in summary["sites"].items() if s["role"] == role}
    if not sites:
        return ["(none)", ""]
    # the comparison arms computed for these sites (compare.py --skip-centralized: local-only alone)
    arms = [k for k in ("local_only", "centralized") if any(f"avg_score_{k}" in s for s in sites.values())]
    head = "| site | " + " | ".join(f"{t} {HEADLINE[t]}" for t in TASK_ORDER) + " | avg score |"
    lines = [head, "|" + "---|" * (len(TASK_ORDER) + 2)]
    for name, s in sites.items():
        cells = [_cell(t, s["tasks"].get(t, {}), arms) for t in TASK_ORDER]
        avg = " / ".join(_ratio(s.get(k)) for k in ("avg_score", *(f"avg_score_{a}" for a in arms)))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    cols = " / ".join(["federated", "baseline", *(a.replace("_", "-") for a in arms)])
    if role == "heldout" and any(s["role"] == "train" for s in summary["sites"].values()):
        return lines + ["", f"Cells: {cols}; avg score and baselines as in the training sites' table.", ""]
    return lines + ["", f"Cells: {cols}. Avg score: mean over tasks of model error ÷ baseline error "
                        "(lower is better, 1.0 = baseline). " + CE_CP_PRIOR_NOTE, ""]


CE_CP_PRIOR_NOTE = ("The baselines are the headline ones (CE: comb interpolation, CP: last slot held, PF: per-sample "
                    "AR); the CE and CP heads start from the site's Kronecker LMMSE and PF from AR on the band that "
                    "LMMSE denoises, stronger classical estimators whose own scores (CE-LMMSE3D, CP-LMMSE3D, "
                    "PF-ARLMMSE) `scripts/baselines.py` prints. On a training site the BF, DE, PE and LoS heads start "
                    "at its own BF-AoA, DE-kNN, PE-kNN and LoS-logistic (fitted on the labels it trains on), so there "
                    "round 0 equals those baselines (LoS-logistic: the headline LoS-Kfactor's logistic regression on "
                    "five profile features instead of a threshold on one, a variant `scripts/baselines.py` prints); a "
                    "held-out site's start at the Capon beam, the deployment prior and the K-factor rule.")


def bootstrap_lines(boot: dict) -> list[str]:
    """Federated minus each arm's average score per training site, with the paired bootstrap
    interval and what it lets one claim; [] without a comparison, one line when the
    per-sample errors were missing."""
    if not boot:
        return []
    if "missing" in boot:
        return [f"Paired bootstrap: not computed ({boot['missing']}).", ""]
    lines = []
    for arm in ("local_only", "centralized"):
        sites = boot.get(arm)
        if not sites:
            continue
        name = arm.replace("_", "-")
        pct = f"{100 * boot['level']:g} %"
        lines += [f"Federated − {name}, average score ({pct} paired bootstrap over the test samples, "
                  f"{boot['n_boot']} draws, seed {boot['seed']}; negative: federated better):", "",
                  f"| site | federated − {name} | {pct} interval | verdict | tasks apart at {pct} (ratio difference) |",
                  "|---|---|---|---|---|"]
        better = worse = 0
        for site, b in sites.items():
            verdict = "not distinguishable"
            if b["hi"] < 0:
                verdict, better = "federated better", better + 1
            elif b["lo"] > 0:
                verdict, worse = f"{name} better", worse + 1
            per_task = b.get("per_task") or {}
            apart = ", ".join(f"{t} {per_task[t]['delta']:+.3f}" for t in TASK_ORDER
                              if t in per_task and (per_task[t]["hi"] < 0 or per_task[t]["lo"] > 0)) or "none"
            lines.append(f"| {site} | {b['delta']:+.4f} | [{b['lo']:+.4f}, {b['hi']:+.4f}] | {verdict} | {apart} |")
        lines += ["", f"At {pct}: federated better than {name} on {better} of {len(sites)} training sites, "
                      f"worse on {worse}, not distinguishable on {len(sites) - better - worse}. Per task, a "
                      f"negative difference of error ratios is the federated model's gain.", ""]
    return lines


def _markdown(s: dict) -> str:
    bb = s.get("backbone") or {}
    lines = [f"# fedfm run report — {Path(s['run_dir']).name}", "",
             f"Strategy `{s['strategy']}`, {s['final_round'] or 0} rounds after round 0 "
             f"(final round {s['final_round']}"
             + (f"; central evaluation at rounds {', '.join(map(str, s['rounds']))}"
                if s["rounds"] and len(s["rounds"]) <= s["final_round"] else "")
             + f"). Backbone: {bb.get('source', '?')} "
             f"(sha256 {str(bb.get('sha256', ''))[:12]}). NMSE in dB.", ""]
    if s.get("incomplete"):
        lines += [f"**Incomplete: the run was asked for {s['planned_rounds']} rounds and its last scored round is "
                  f"{s['final_round']}; the tables below are that round's, not the run's result. Continue it with "
                  f"`resume={s['run_dir']}`.**", ""]
    if s.get("personal_heads"):
        lines += [f"Personal heads (`personal-heads = {s['personal_heads']}`): each training site keeps and is "
                  f"scored with its own head of those tasks; held-out sites use their average.", ""]
    if s.get("personal_adapters"):
        lines += [f"Personal input adapters (`personal-adapters = {s['personal_adapters']}`): each training site "
                  f"keeps and is scored with its own input adapter of those tasks; held-out sites use their "
                  f"average.", ""]
    if s.get("local_optimizer") == "keep":
        lines += ["Site optimizers kept (`local-optimizer = keep`): each site continued its own AdamW moments "
                  "and DWA loss windows from round to round.", ""]
    if s.get("site_model") == "local":
        lines += ["Local models (`site-model = local`): each training site is scored with its own model after its "
                  "last local training from the aggregate (FedAvg + local fine-tuning); held-out sites with the "
                  "aggregate.", ""]
    if s.get("rounds_without_update"):
        lines += [f"**Incomplete: no site update reached the average in round(s) "
                  f"{', '.join(map(str, s['rounds_without_update']))}; the global adapters did not change there "
                  f"(see 'Site errors and rejected updates'). Such a round writes no checkpoint: a resume "
                  f"repeats it when it was the last.**", ""]
    failed = sum(r["sites_failed"] for r in s["communication"]["per_round"])
    if failed:
        lines += [f"{failed} site update(s) failed or were rejected; see 'Site errors and rejected updates'.", ""]
    lines += ["## Training sites (test split, final round)", ""]
    lines += _site_table(s, "train")
    lines += _cells_line(s.get("cells_95"), "train")
    lines += bootstrap_lines(s.get("bootstrap") or {})
    lines += ["## Held-out sites (never trained on)", ""]
    lines += _site_table(s, "heldout")
    lines += _cells_line(s.get("cells_95"), "heldout", say_missing=False)  # said once, under the training sites
    lines += _task_ratio_table(s)
    lines += ["BF/LoS error rates are floored at 1 % before dividing (`fedfm.metrics.ERROR_FLOOR`).", "",
              "## Average score per round", "", "| round | train sites | held-out sites |", "|---|---|---|"]
    for r in s["per_round"]:
        lines.append(f"| {r['round']} | " + " | ".join(
            _ratio(r[k], 3) for k in ("avg_score_train", "avg_score_heldout")) + " |")
    lines += [""] + _site_val_lines(s.get("site_val") or {}) + _val_choice_lines(s.get("val_choice") or {})
    lines += ["## Communication", ""]
    c = s["communication"]
    if c.get("full_model_bytes"):
        lines.append(f"Adapter state {c['adapter_bytes']:,} B vs full model {c['full_model_bytes']:,} B "
                     f"({100 * c['adapter_fraction']:.2f}% of the model per site and direction).")
    return "\n".join(lines + _bytes_and_events(s))


def _bytes_and_events(s: dict) -> list[str]:
    """The bytes-per-round table, site errors and the rebuild line: the end of either report."""
    lines = ["", "| round | bytes down | bytes up | sites ok | sites failed |", "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['bytes_down']:,} | {r['bytes_up']:,} | {r['sites_ok']} | {r['sites_failed']} |"
              for r in s["communication"]["per_round"]]
    if s["communication"].get("evaluate_bytes_down"):
        lines += ["", f"Federated evaluation (`fraction-evaluate`) sent the state down again to the sites it "
                      f"sampled: {s['communication']['evaluate_bytes_down']:,} B over the run, beside the training "
                      f"traffic above."]
    if s["events"]:
        lines += ["", "## Site errors and rejected updates", ""]
        lines += [f"- round {e['round']}, site `{e['site']}`: {e['message']}" for e in s["events"]]
    return lines + ["", "Plots: `plots/`. Rebuild: `python scripts/report.py " + s["run_dir"] + "`.", ""]


# ---- plots ------------------------------------------------------------------------------
def _plots(run: dict, s: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(exist_ok=True)
    written = []
    fed = [r for r in run["metrics"] if r.get("source") == "federated"]
    for task in TASK_ORDER:
        key = HEADLINE[task]
        rows = [r for r in fed if r["task"] == task and r.get(key) is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, site in enumerate(sorted({r["site"] for r in rows})):
            pts = sorted((r["round"], r[key]) for r in rows if r["site"] == site)
            line, = ax.plot(*zip(*pts), marker="o", label=f"{site} ({s['sites'][site]['role']})")
            base = (run["baselines"].get(site, {}).get(task) or {}).get(key)
            if base is not None:
                ax.axhline(base, color=line.get_color(), ls="--", lw=0.8)
        ax.set(xlabel="round", ylabel=f"{task} {key}", title=f"{task}: {key} vs round (dashed: baseline)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / f"{task}_vs_round.png"))
    names = list(s["sites"])
    ratios = np.full((len(names), len(TASK_ORDER)), np.nan)
    from fedfm.metrics import error_for_score, error_ratio
    for i, n in enumerate(names):
        for j, t in enumerate(TASK_ORDER):
            e = s["sites"][n]["tasks"].get(t, {})
            if e.get("federated") and e.get("baseline"):  # the table's ratio (BF/LoS floored at 1 %)
                r = error_ratio(t, error_for_score(t, e["federated"]), error_for_score(t, e["baseline"]))
                ratios[i, j] = r if math.isfinite(r) else np.nan
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(TASK_ORDER)) + i * width, ratios[i], width, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(TASK_ORDER)) + 0.4 - width / 2, TASK_ORDER)
    ax.set(ylabel="model error / baseline error", title="final round vs classical baseline (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "final_vs_baseline.png"))
    means = (s.get("site_val") or {}).get("task_means") or {}
    if len(means) >= 2:  # federated evaluation: each task's val and test ratio by round, the choice marked
        choice = (s.get("val_choice") or {}).get("per_task", {})
        test = {r["round"]: r.get("task_ratio_train") or {} for r in s["per_round"]}
        fig, axes = plt.subplots(1, len(TASK_ORDER), figsize=(16, 3.2))
        for ax, t in zip(axes, TASK_ORDER):
            val = sorted((rnd, m[t]) for rnd, m in means.items() if t in m)
            tst = sorted((rnd, m[t]) for rnd, m in test.items() if t in m)
            if val:
                ax.plot(*zip(*val), marker="o", label="val (sites' own)")
            if tst:
                ax.plot(*zip(*tst), marker="s", label="test (central, training sites)")
            if t in choice:
                ax.axvline(choice[t]["round"], color="k", ls=":", lw=1, label="chosen on val")
            ax.set(title=t, xlabel="round")   # no line at 1: CE and CP sit far below it, flattened by it
        axes[0].set_ylabel("error ÷ baseline error (1 = baseline)")
        axes[0].legend(fontsize=6)
        fig.suptitle("mean error ratio over the training sites by round: their val splits and the test splits")
        fig.tight_layout()
        written.append(_save(fig, out / "val_and_test_by_round.png"))
    comm = s["communication"]["per_round"]
    if comm:
        fig, ax = plt.subplots(figsize=(6, 4))
        r = [c["round"] for c in comm]
        ax.plot(r, [c["bytes_down"] for c in comm], marker="o", label="down (all sites)")
        ax.plot(r, [c["bytes_up"] for c in comm], marker="s", label="up (all sites)")
        full = s["communication"]["full_model_bytes"]
        if full:
            ax.axhline(full * max(c["sites_ok"] + c["sites_failed"] for c in comm), color="k", ls="--",
                       label="full model, all sites")
        ax.set(xlabel="round", ylabel="bytes", yscale="log", title="bytes per round")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "bytes_per_round.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


# ---- stage=pretrain: reconstruction NMSE per site and mask type --------------------------
MASKS = ("random", "time", "frequency")   # fedfm.fedpretrain.MASK_TASKS: task "MASK-<kind>"


def summarize_pretrain(run: dict) -> dict:
    """report.json of a federated pretraining run: reconstruction NMSE (linear) per site and
    mask type at every scored round, the classical fillers' NMSE beside them, bytes."""
    if not isinstance(run["config"].get("sites"), list):
        raise ValueError(f"{run['dir'] / 'config.json'}: a stage=pretrain run's config has no `sites` list")
    roles = {e["name"]: e["role"] for e in run["config"]["sites"]}
    fed = [r for r in run["metrics"] if r.get("source") == "federated" and r["task"].startswith("MASK-")]
    rounds = sorted({r["round"] for r in fed})
    nmse = {(r["round"], r["site"], r["task"][len("MASK-"):]): r["nmse"] for r in fed}
    classical = {(r["site"], r["task"][len("MASK-"):]): {"method": r.get("method"), "nmse": r["nmse"]}
                 for r in run["metrics"] if r.get("source") == "classical"}
    final = rounds[-1] if rounds else None
    sites = {site: {"role": role,
                    "start": {m: nmse.get((0, site, m)) for m in MASKS},
                    "final": {m: nmse.get((final, site, m)) for m in MASKS},
                    "classical": {m: classical[site, m] for m in MASKS if (site, m) in classical}}
             for site, role in roles.items()}
    per_round = [{"round": rnd, **{f"{role}_{m}": _mean([nmse.get((rnd, s, m)) for s, r in roles.items() if r == role])
                                   for role in ("train", "heldout") for m in MASKS}} for rnd in rounds]
    cells_95 = _intervals_vs_baseline(run["dir"], final, sites)
    comm = _communication(run)
    ok = {r["round"]: r["sites_ok"] for r in comm["per_round"]}
    comm["full_state_bytes"] = run["config"].get("full_state_bytes")
    backbone = read_json(run["dir"] / "backbone.json", {}) if (run["dir"] / "backbone.safetensors").exists() else {}
    return {"run_dir": str(run["dir"]), "stage": "pretrain", "final_round": final, "rounds": rounds,
            "strategy": run["config"]["run_config"].get("strategy"),
            "local_steps": run["config"]["run_config"].get("local-steps"),
            "backbone": {"path": str(run["dir"] / "backbone.safetensors"), "sha256": backbone.get("sha256")}
            if backbone else None,
            "sites": sites, "per_round": per_round, "communication": comm, "events": run["events"],
            "rounds_without_update": sorted(r for r in set(rounds) | set(ok) if r > 0 and not ok.get(r))}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _markdown_pretrain(s: dict) -> str:
    bb = s["backbone"]
    lines = [f"# fedfm pretraining report — {Path(s['run_dir']).name}", "",
             f"Stage `pretrain`: strategy `{s['strategy']}` over the whole backbone + decoder state, "
             f"{s['final_round'] or 0} rounds × {s['local_steps']} local steps of masked reconstruction per site. "
             + (f"Backbone: `{bb['path']}` (sha256 {str(bb['sha256'])[:12]}; decoder dropped)."
                if bb else "**No backbone was saved: the run did not finish.**"), ""]
    if s.get("rounds_without_update"):
        lines += [f"**Incomplete: no site update reached the average in round(s) "
                  f"{', '.join(map(str, s['rounds_without_update']))}.**", ""]
    lines += [f"## Reconstruction NMSE (linear, test split): round 0 → round {s['final_round']}", "",
              "| site | role | " + " | ".join(f"{m} mask" for m in MASKS) + " |", "|---|---|---|---|---|"]
    for name, e in s["sites"].items():
        cells = []
        for m in MASKS:
            cell = f"{_ratio(e['start'][m], 3)} → {_ratio(e['final'][m], 3)}"
            if m in e["classical"]:
                cell += f" ({e['classical'][m]['method']} {_ratio(e['classical'][m]['nmse'], 3)})"
            cells.append(cell)
        lines.append(f"| {name} | {e['role']} | " + " | ".join(cells) + " |")
    lines += ["", "In brackets: the classical filler of the same hidden elements on the same samples "
                  "(last slot held, AR across sub-bands); the random mask has none (zeros = 1.0). Lower is better.",
              "", "## Mean NMSE per round", "",
              "| round | " + " | ".join(f"{role} {m}" for role in ("train", "heldout") for m in MASKS) + " |",
              "|---|" + "---|" * 6]
    for r in s["per_round"]:
        lines.append(f"| {r['round']} | " + " | ".join(_ratio(r[f'{role}_{m}'], 3)
                                                       for role in ("train", "heldout") for m in MASKS) + " |")
    c = s["communication"]
    lines += ["", "## Communication", "", f"The whole state travels: {c['full_state_bytes'] or 0:,} B per site "
              "and direction."]
    return "\n".join(lines + _bytes_and_events(s))


def _plots_pretrain(run: dict, s: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(exist_ok=True)
    fed = [r for r in run["metrics"] if r.get("source") == "federated" and r["task"].startswith("MASK-")]
    fig, axes = plt.subplots(1, len(MASKS), figsize=(13, 4), sharey=True)
    for ax, m in zip(axes, MASKS):
        for site, e in s["sites"].items():
            pts = sorted((r["round"], r["nmse"]) for r in fed if r["site"] == site and r["task"] == f"MASK-{m}")
            if not pts:
                continue
            line, = ax.plot(*zip(*pts), marker="o", label=f"{site} ({e['role']})")
            if m in e["classical"]:
                ax.axhline(e["classical"][m]["nmse"], color=line.get_color(), ls="--", lw=0.8)
        ax.set(xlabel="round", title=f"{m} mask" + (" (dashed: classical)" if m != "random" else ""))
    axes[0].set(ylabel="reconstruction NMSE (linear)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return [_save(fig, out / "reconstruction_vs_round.png")]


def write_report(run_dir: str | Path) -> Path:
    """Write report.md, report.json and plots/ into ``run_dir``; return report.md's path.
    A ``stage=pretrain`` run (config.json's ``stage``) gets the reconstruction report."""
    run = load_run(run_dir)
    pre = run["config"].get("stage") == "pretrain"
    markdown = _markdown_pretrain if pre else _markdown
    plots = run["dir"] / "plots"
    if plots.exists() and not plots.is_dir():
        raise ValueError(f"{plots}: is a file; a run folder's plots/ is the folder the report's figures go "
                         f"into: move the file away; nothing was written")
    try:  # everything computed and rendered before the first file is written
        s = (summarize_pretrain if pre else summarize)(run)
        markdown({**s, "plots": []})
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:  # a hand-edited or foreign file
        raise ValueError(f"{run['dir']}: a run file does not have the shape fedfm writes ({type(e).__name__}: "
                         f"{e}); config.json, metrics.jsonl, ledger.jsonl and baselines.json are read; "
                         f"nothing was written") from None
    # the figures into a folder of their own first: a plot that fails leaves plots/ as it was
    staging = Path(tempfile.mkdtemp(prefix=".plots-", dir=run["dir"]))
    try:
        s["plots"] = (_plots_pretrain if pre else _plots)(run, s, staging)
        plots.mkdir(exist_ok=True)
        for f in staging.iterdir():
            os.replace(f, plots / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(run["dir"] / "report.json", s)
    path = run["dir"] / "report.md"
    path.write_text(markdown(s))
    return path
