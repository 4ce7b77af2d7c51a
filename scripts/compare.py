#!/usr/bin/env python
"""Local-only vs federated vs centralized, at equal per-site compute, on one federation.

    python scripts/compare.py scenarios/federations/benchmark.yaml --set num-server-rounds=5

- federated: a real `flwr run .` (scripts/run_federation.py): R rounds × S local steps per site;
- local-only: each training site alone, R·S steps from the same backbone and initial adapters
  (the sites one per core, each on one thread with a model of its own, as the federated arm's
  sites train one per Ray actor on one thread);
- centralized: one model on the pooled data of all training sites, R·S·(number of sites)
  steps (the same total gradient computations at the same batch size).
All three are scored on every training site's test split against the same classical
baselines (the federated run's ``baselines.json``). Writes ``compare.json`` into the
federated run folder, rebuilds its report (which then shows all columns) and prints one
table with the issue's targets: federated within 10% of centralized on the average
score, and better than local-only on every training site.

Comparing several strategies costs one federated run each, not three trainings each:
local-only and centralized depend on the data, backbone, initial adapters and budget, not on
the strategy, so ``--reference RUN`` takes them from RUN's ``compare.json`` after checking
that RUN shares all of those (else one line naming what differs, and nothing is written):

    python scripts/run_federation.py --federation FED.yaml --out runs/b --set strategy=fedavgm
    python scripts/compare.py FED.yaml --skip-federated --out runs/b --reference runs/a

Beside the table, each training site's federated minus local-only (and minus centralized)
average score with its 95 % paired bootstrap interval over the test samples (2 000 draws,
seed 0; fedfm.metrics.paired_bootstrap), from the per-sample errors the central evaluator
and this script write under ``samples/``: a site counts as won or lost only where the
interval excludes 0.

``--skip-centralized`` trains the local-only arm alone (the centralized arm costs as much as all
local-only trainings together); the table then has no centralized column to compare with.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import threading
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fedfm.config import RunConfig, load_federation_sites  # noqa: E402
from fedfm.runlog import (RunLog, read_json, read_jsonl, read_run_config, read_samples,  # noqa: E402
                          samples_path, write_json, write_samples)
from run_federation import _parse_value, default_min_train_nodes, run_federation, stop_cleanly_on_sigterm  # noqa: E402


ARMS = ("local_only", "centralized")


def score_model(model, tds: dict) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """({task: metrics}, {task: per-sample errors}) of ``model`` on a site's test views."""
    from fedfm.evaluate import predict
    from fedfm.metrics import sample_errors, score
    from fedfm.model.lora import merged_copy

    net = merged_copy(model)   # LoRA merged once for all the site's tasks
    metrics, errors = {}, {}
    for task, td in tds.items():
        pred = predict(net, td)
        metrics[task], errors[task] = score(task, pred, td), sample_errors(task, pred, td)
    return metrics, errors


def local_and_central(run_dir: Path, centralized: bool = True) -> dict:
    """Train local-only and (unless ``centralized`` is False) centralized models with the
    federated run's settings and backbone; their per-sample test errors go to
    ``samples/local_only.safetensors`` and ``samples/centralized.safetensors``."""
    from fedfm.evaluate import map_sites
    from fedfm.federated import build_run_model, local_train, torch_state
    from fedfm.model import set_adapter_state
    from fedfm.scenarios import derive_seed
    from fedfm.train import finetune, refit_heads

    conf = read_run_config(run_dir)  # before RunLog, which would create checkpoints/ in any folder
    log = RunLog(run_dir)
    cfg = RunConfig.from_flower(conf["run_config"])
    backbone, num_beams = conf["backbone"]["path"], conf["model"]["config"]["num_beams"]
    init, _, _ = log.load_checkpoint(0)
    sites = [e for e in load_federation_sites(cfg.federation) if e.role == "train" and e.spec]
    budget = cfg.local_steps * cfg.num_server_rounds
    out = {"local_only": {}, "centralized": {},
           "steps": {"per_site": budget, **({"centralized": budget * len(sites)} if centralized else {})}}
    views = map_sites(lambda e: (_site_tasks(e, "train", cfg.cache_dir, cfg.train_max_samples),  # one per core,
                                 _site_tasks(e, "test", cfg.cache_dir, cfg.eval_max_samples,   # as the evaluator
                                             cfg.train_max_samples)), sites)                   # prepares them
    train = {e.name: v[0] for e, v in zip(sites, views)}
    test = {e.name: v[1] for e, v in zip(sites, views)}
    errors = {arm: {} for arm in ARMS}
    building = threading.Lock()

    def local_only(e):  # a model of its own, trained and scored on one thread (map_sites), as the
        with building:  # federated arm's sites train on one thread each in their Ray actors
            own = build_run_model(cfg, num_beams, backbone)
        local_train(cfg, e.spec, init, 0, num_beams=num_beams, backbone=backbone, steps=budget,
                    tasks=train[e.name], model=own)
        return score_model(own, test[e.name])

    for e, scored in zip(sites, map_sites(local_only, sites)):  # one site per core
        out["local_only"][e.name], errors["local_only"][e.name] = scored
    write_samples(samples_path(run_dir, "local_only"), errors["local_only"])
    if not centralized:
        return out
    model = build_run_model(cfg, num_beams, backbone)
    set_adapter_state(model, torch_state(init))
    pooled = {task: [train[e.name][task] for e in sites] for task in train[sites[0].name]}
    finetune(model, pooled, steps=budget * len(sites), batch_size=cfg.batch_size, lr=cfg.lr,
             dwa_temperature=cfg.dwa_temperature, seed=derive_seed(cfg.seed, "centralized"),
             prior_mu=cfg.head_prior_mu, prior_tasks=cfg.prior_tasks, head_lr_scale=cfg.head_lr_scale)  # anchored at the call's start: the initial heads, as built
    if cfg.head_refit_epochs > 0:  # as every site's local training ends (fedfm.federated.local_train)
        refit_heads(model, pooled, epochs=cfg.head_refit_epochs, seed=derive_seed(cfg.seed, "centralized"),
                    scope=cfg.head_refit_scope)
    for e in sites:
        out["centralized"][e.name], errors["centralized"][e.name] = score_model(model, test[e.name])
    write_samples(samples_path(run_dir, "centralized"), errors["centralized"])
    return out


def bootstrap_arms(run_dir: Path, result: dict) -> dict:
    """Per training site, federated minus each computed arm's average score with its paired
    bootstrap interval over the test samples (fedfm.metrics.paired_bootstrap), from the
    per-sample errors of the federated run's last round, the baselines and the arms.
    {"level", "n_boot", "seed", arm: {site: {delta, lo, hi, ...}}}, or {"missing": why} when
    a file is absent (a run of an earlier fedfm, or arms from a reference without them)."""
    from fedfm.metrics import BOOTSTRAP_DRAWS, BOOTSTRAP_LEVEL, BOOTSTRAP_SEED, paired_bootstrap

    planned = int(read_run_config(run_dir)["run_config"]["num-server-rounds"])
    fed = read_samples(samples_path(run_dir, f"round-{planned:03d}"))
    base = read_samples(samples_path(run_dir, "baseline"))
    if fed is None or base is None:
        return {"missing": f"{run_dir} has no per-sample errors of its round {planned} and baselines "
                           f"(a run of an earlier fedfm)"}
    out = {"level": BOOTSTRAP_LEVEL, "n_boot": BOOTSTRAP_DRAWS, "seed": BOOTSTRAP_SEED}
    for arm in ARMS:
        if not result.get(arm):
            continue
        other = read_samples(samples_path(run_dir, arm))
        if other is None:
            return {"missing": f"no per-sample errors of the {arm.replace('_', '-')} arm "
                               f"({samples_path(run_dir, arm)})"}
        out[arm] = {}
        for site in result[arm]:
            if not (site in fed and site in other and site in base):
                continue
            entry = paired_bootstrap(fed[site], other[site], base[site])
            # each task's share (its ratio difference / number of tasks is its part of delta):
            # where the arms differ beyond the test split's noise, and where only noise is
            entry["per_task"] = {t: {k: v for k, v in paired_bootstrap({t: fed[site][t]}, {t: other[site][t]},
                                                                       {t: base[site][t]}).items()
                                     if k in ("delta", "lo", "hi")} for t in entry["tasks"]}
            out[arm][site] = entry
    return out


def _site_tasks(entry, split: str, cache_dir: str, max_samples: int, stats_samples: int | None = None) -> dict:
    """A training site's task views, or ValueError naming the site: the arms train and score
    every training site, so one whose data cannot be made (a full disk, a corrupt cache the
    generator cannot replace) stops the comparison with one line instead of a traceback."""
    from fedfm.federated import load_site_tasks

    try:
        return load_site_tasks(entry.spec, split, cache_dir, max_samples, stats_samples=stats_samples)
    except (OSError, ValueError) as e:
        raise ValueError(f"site {entry.name} ({entry.path}): cannot load its {split} split ({e}); "
                         f"local-only and centralized need every training site") from None


def federated_steps(run_dir: Path) -> dict[str, int]:
    """Local steps each training site trained in the federated run: its rounds with an
    accepted update (ledger status ``ok``) × local-steps. ValueError when the run has fewer
    complete rounds than it was asked for: comparing it with arms trained for the full budget
    would not be at equal compute."""
    conf = read_run_config(run_dir)
    rc = conf["run_config"]
    planned = int(rc["num-server-rounds"])
    last = RunLog(run_dir).last_complete_round() or 0
    if last < planned:
        raise ValueError(f"{run_dir}: the federated run has {last} of its {planned} rounds complete; "
                         f"finish it (resume={run_dir}) before comparing")
    ok: dict[str, int] = {}
    for r in read_jsonl(run_dir / "ledger.jsonl"):
        if r.get("status") == "ok" and r.get("kind", "train") == "train" and 0 < r.get("round", 0) <= planned:
            ok[r["site"]] = ok.get(r["site"], 0) + 1
    return {s["name"]: ok.get(s["name"], 0) * int(rc["local-steps"])
            for s in conf["federation"]["sites"] if s["role"] == "train" and not s.get("error")}


# run-config keys the local-only and centralized trainings and their scoring read (besides the
# federation, backbone, model config and initial adapters, checked separately); the per-site
# budget is num-server-rounds × local-steps, so 5 × 40 and 10 × 20 share a reference
REFERENCE_KEYS = ("preset", "batch-size", "lr", "lora-r", "lora-alpha", "dwa-temperature", "head-prior-mu", "head-prior-tasks", "head-lr-scale",
                  "head-refit-epochs", "head-refit-scope", "train-max-samples", "eval-max-samples", "seed", "device")


def reference_mismatch(run_dir: Path, ref_dir: Path) -> str | None:
    """Why RUN's local-only/centralized results are not this run's (None: they are)."""
    a, b = read_run_config(run_dir), read_run_config(ref_dir)
    try:
        ra, rb = a["run_config"], b["run_config"]
        checks = [("federation (sites, seeds)", a["federation"], b["federation"]),
                  ("backbone sha256", a["backbone"]["sha256"], b["backbone"]["sha256"]),
                  ("model config", a["model"]["config"], b["model"]["config"]),
                  ("per-site steps (num-server-rounds × local-steps)",
                   ra["num-server-rounds"] * ra["local-steps"], rb["num-server-rounds"] * rb["local-steps"])]
    except (KeyError, TypeError) as e:
        return f"a config.json lacks {e} (a run of another fedfm version?)"
    default = RunConfig().to_flower()  # a key a run predates had its default then
    checks += [(k, ra.get(k, default[k]), rb.get(k, default[k])) for k in REFERENCE_KEYS]
    for what, mine, theirs in checks:
        if mine != theirs:
            return f"{what} is {theirs} there, {mine} here"
    if not (ref_dir / "compare.json").is_file():
        return "it has no compare.json (run compare.py on it first)"
    init_a, init_b = RunLog(run_dir).load_checkpoint(0)[0], RunLog(ref_dir).load_checkpoint(0)[0]
    if init_a.keys() != init_b.keys() or any(not np.array_equal(init_a[k], init_b[k]) for k in init_a):
        return "its initial (round-0) adapter state differs from this run's"
    return None


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def comparison_lines(summary: dict) -> list[str]:
    """The training sites' average scores (a report summary's) as a table, then the two targets.
    A site that shares no task with its baselines has no score: "—" in the table, and the
    targets use only the sites that have the scores they compare."""
    rows = {name: (s["avg_score"], s.get("avg_score_local_only"), s.get("avg_score_centralized"))
            for name, s in summary["sites"].items() if s["role"] == "train"}
    lines = ["| site | federated | local-only | centralized |", "|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(map(_num, r)) + " |" for name, r in rows.items()]
    return lines + ["", _within_centralized(rows), _beats_local(rows)]


def _within_centralized(rows: dict) -> str:
    pairs = [(f, c) for f, _, c in rows.values() if f is not None and c is not None]
    if not pairs:
        return "average score: not computed (no training site has a federated and a centralized score)"
    f, c = np.mean(pairs, axis=0)
    # the means are over the same sites, or the comparison would mix different sites' difficulty
    subset = f" (over {len(pairs)} of {len(rows)} training sites)" if len(pairs) < len(rows) else ""
    return f"average score: federated {f:.3f}, centralized {c:.3f} → within 10%: {f <= 1.10 * c}{subset}"


def _beats_local(rows: dict) -> str:
    head = "federated better than local-only on every training site: "
    if any(f >= lo for f, lo, _ in rows.values() if f is not None and lo is not None):
        return head + "False"  # one losing site settles it, whatever the sites without scores
    missing = [name for name, (f, lo, _) in rows.items() if f is None or lo is None]
    if missing or not rows:
        return head + f"not computed (no score for {', '.join(missing) or 'any training site'})"
    return head + "True"


def main(argv=None) -> int:
    from fedfm.report import bootstrap_lines, load_run, summarize, write_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("federation")
    p.add_argument("--out", default=None, help="federated run folder (default: runs/compare-<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--skip-federated", action="store_true", help="reuse the run in --out")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--skip-centralized", action="store_true",
                   help="train only the local-only arm (no centralized column)")
    g.add_argument("--reference", default=None, metavar="RUN",
                   help="take local-only and centralized from RUN's compare.json (checked to share "
                        "data, backbone, initial adapters and budget) instead of training them")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    written = False
    try:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE")
            overrides[key] = _parse_value(value)
        for key, flag in (("federation", "its first argument"), ("out-dir", "--out")):
            if key in overrides:
                raise ValueError(f"--set {key}={overrides[key]}: compare.py takes the {key} from {flag}")
        overrides.update(federation=str(Path(args.federation).resolve()), **{"out-dir": str(out)})
        RunConfig.from_flower(overrides, base_dir=ROOT)  # every key's type and range, before any is used
        held = read_json(out / "compare.json", None)
        ref = Path(args.reference).resolve() if args.reference else None
        # its arms' per-sample errors would be deleted and replaced; taking them again from the
        # reference they were copied from, or from the folder itself, loses nothing
        reuse = ref is not None and (ref == out or (isinstance(held, dict) and held.get("reference") == str(ref)))
        if held is not None and not reuse:
            raise ValueError(f"{out}: already holds a comparison (compare.json); move it away to compare again, "
                             f"or recompute its intervals with --reference {out}")
        if not args.skip_federated:
            n = sum(1 for e in load_federation_sites(overrides["federation"]) if e.role == "train")
            overrides.setdefault("min-train-nodes", default_min_train_nodes(overrides, n))
            result = run_federation(overrides, n, ROOT / ".flwr")
            if not result["ok"]:
                print(f"error: federated run {result['status']}: {result['status_details']}", file=sys.stderr)
                return 1
        fed_steps = federated_steps(out)
        if summarize(load_run(out)).get("incomplete"):  # its files are read before any training, too
            raise ValueError(f"{out}: the federated run's last scored round is before its last round (report.md "
                             f"says Incomplete); finish it (resume={out}) before comparing")
        if args.reference:
            ref = Path(args.reference).resolve()
            why = reference_mismatch(out, ref)
            if why:
                raise ValueError(f"--reference {args.reference}: its local-only/centralized results "
                                 f"do not apply to {out}: {why}")
            theirs = read_json(ref / "compare.json")
            # a folder that is its own reference keeps where its arms came from
            result = {**theirs, "reference": theirs.get("reference", str(ref)) if ref == out else str(ref)}
            for arm in ARMS if ref != out else ():  # the same test samples (checked): its per-sample errors apply
                samples_path(out, arm).unlink(missing_ok=True)
                if samples_path(ref, arm).is_file():
                    samples_path(out, arm).parent.mkdir(exist_ok=True)
                    shutil.copyfile(samples_path(ref, arm), samples_path(out, arm))
        else:
            for arm in ARMS:  # an earlier comparison's arms are not this one's
                samples_path(out, arm).unlink(missing_ok=True)
            result = local_and_central(out, centralized=not args.skip_centralized)
        result["bootstrap"] = bootstrap_arms(out, result)
        result["steps"] = {**result.get("steps", {}), "federated_per_site": fed_steps}
        short = {site: n for site, n in fed_steps.items() if n < result["steps"].get("per_site", 0)}
        if short:  # a site error or rejected update cost that site rounds: say so beside the table
            print(f"warning: not at equal compute: federated sites trained fewer than the "
                  f"{result['steps']['per_site']} steps local-only had: "
                  + ", ".join(f"{site} {n}" for site, n in short.items()), file=sys.stderr)
        write_json(out / "compare.json", result)
        written = True
        report = write_report(out)
        summary = summarize(load_run(out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a federated arm's SuperLink is stopped by now
        print(f"fedfm: interrupted; {out / 'compare.json'} " + ("was written, the report not rebuilt (scripts/report.py "
              f"{out})" if written else "was not written"), file=sys.stderr)
        return 130
    print("\n".join(comparison_lines(summary) + [""] + bootstrap_lines(summary.get("bootstrap") or {})))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    stop_cleanly_on_sigterm()  # as a command only (not when a test calls main)
    raise SystemExit(main())
