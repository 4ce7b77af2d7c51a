#!/usr/bin/env python
"""Centralized reference: fine-tune on the pooled training sites, score every site beside the baselines.

    python scripts/train_central.py scenarios/federations/default.yaml --out runs/central-tiny --preset tiny --steps 300
    python scripts/train_central.py FED.yaml --out DIR --backbone runs/pre/backbone.safetensors
    python scripts/train_central.py FED.yaml --out DIR --no-pretrain                 # random backbone
    python scripts/train_central.py FED.yaml --out DIR --ablation frozen             # no LoRA
    python scripts/train_central.py FED.yaml --out DIR --ablation single-task        # LLM4WM(s)
    python scripts/train_central.py FED.yaml --out DIR2 --backbone B --adapter DIR/adapter.safetensors \
        --refit-epochs 100                          # score (and refit) a saved model, no fine-tuning

Without --backbone or --no-pretrain it first pretrains a backbone on the training sites
(OUT/pretrain/). Evaluates every task on every training site's test split and on every
held-out site, with each site's classical baselines (fitted on its own train split) beside
the model. Writes OUT/report.json and OUT/report.md, and the fine-tuned trainable state (LoRA,
adapters, heads) as OUT/adapter.safetensors as soon as fine-tuning ends (OUT/adapter-refit.safetensors
after a refit), with the model config and backbone hash in its header: ``--adapter`` takes it back
on the same backbone and preset, so another scoring or a refit does not repeat the fine-tuning.
The single-task ablation trains seven models and saves none of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.config import check_batch_size, parse_prior_tasks  # noqa: E402
from fedfm.evaluate import evaluate_sites, markdown_table, predict, summarise  # noqa: E402
from fedfm.metrics import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED  # noqa: E402
from fedfm.report import CE_CP_PRIOR_NOTE  # noqa: E402
from fedfm.model import (ModelConfig, backbone_hash, build_model, get_adapter_state, load_adapter,  # noqa: E402
                         parameter_summary, save_adapter, set_adapter_state)
from fedfm.runlog import check_fresh_output  # noqa: E402
from fedfm.scenarios import load_federation  # noqa: E402
from fedfm.train import POOLED_TASKS, REFIT_SCOPES, finetune, refit_heads, resolve_device  # noqa: E402

ABLATIONS = ("none", "frozen", "single-task")
# what a run writes into --out: report.json and report.md at the end, pretrain/ first when it pretrains
CENTRAL_OUTPUTS = ("report.json", "report.md", "pretrain", "adapter.safetensors", "adapter-refit.safetensors")


class SiteViews(Mapping):
    """{site: {task: TaskData}} of one split, built when a site is asked for and not kept: a
    benchmark site's 2 000 test samples take ~1.4 GB as seven task views, six sites would not
    fit in this machine's memory together. ``max_samples`` > 0: the first N samples only."""

    def __init__(self, specs, split: str, cache_dir=None, max_samples: int = 0, tasks: tuple[str, ...] | None = None,
                 stats_samples: int | None = None, labelled=()):
        self.specs, self.split, self.cache_dir, self.max_samples = {s.name: s for s in specs}, split, cache_dir, max_samples
        self.tasks, self.stats_samples = tasks, stats_samples
        self.labelled = {s.name for s in labelled}   # sites whose train labels the model may read (the BF/DE/PE/LoS heads' starts)

    def __getitem__(self, name: str) -> dict:
        from fedfm.federated import load_site_tasks

        return load_site_tasks(self.specs[name], self.split, self.cache_dir, self.max_samples, self.tasks,
                               self.stats_samples, labels=name in self.labelled)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def load_train_views(fed, cache_dir=None, max_train: int = 0) -> tuple[dict, dict]:
    """({train site: {task: TaskData}} of train splits, {site: {task: Baseline}} fitted on every
    site's own train split): a held-out site's train views are dropped once its baselines are fit."""
    from fedfm.baselines import fit_baseline
    from fedfm.evaluate import map_sites
    from fedfm.federated import load_site_tasks

    def fit(spec):
        views = load_site_tasks(spec, "train", cache_dir, max_train, labels=spec in fed.train_sites)
        return views, {t: fit_baseline(t, td, spec) for t, td in views.items()}

    train, baselines = {}, {}
    # one site per core, each BLAS call on one thread, as the federated run's evaluator fits them
    for spec, (views, fitted) in zip(fed.sites, map_sites(fit, list(fed.sites))):
        baselines[spec.name] = fitted
        if spec in fed.train_sites:
            train[spec.name] = views
    return train, baselines


class ProgressHistory(list):
    """finetune's ``history`` (one entry per DWA window) that also logs a line about every
    tenth of the run, with the time since fine-tuning started and the window's losses: a long
    run (the benchmark on a GPU) shows where it stands."""

    def __init__(self, steps: int, log):
        super().__init__()
        self.steps, self.log, self.t0 = steps, log, time.perf_counter()
        self.every = max(1, steps // 10)
        self.next = self.every

    def append(self, entry: dict) -> None:
        super().append(entry)
        step = entry["step"]
        if step >= self.next or step == self.steps:
            self.next = step + self.every
            losses = " ".join(f"{t} {v:.3g}" for t, v in entry["losses"].items())
            self.log(f"fine-tuning step {step}/{self.steps} ({time.perf_counter() - self.t0:.0f} s): {losses}")


def run_central(federation: str, out: str, preset: str = "tiny", steps: int = 300, backbone: str | None = None,
                no_pretrain: bool = False, pretrain_steps: int = 1000, ablation: str = "none",
                stage1_steps: int = 0, batch_size: int = 32, lr: float = 1e-3, dwa_temperature: float = 2.0,
                seed: int = 0, device: str | None = None, cache_dir: str | None = None, max_test: int = 0,
                max_train: int = 0, head_prior_mu: float = 0.0, refit_epochs: int = 0, adapter: str | None = None,
                refit_scope: str = "head", log=print, head_prior_tasks: str = "all") -> dict:
    if ablation not in ABLATIONS:
        raise ValueError(f"--ablation {ablation!r} is not allowed; expected one of {', '.join(ABLATIONS)}")
    out_dir = Path(out)
    check_fresh_output(out_dir, CENTRAL_OUTPUTS)
    for flag, value, ok, allowed in (
            ("--steps", steps, steps > 0, "an integer > 0"), ("--batch-size", batch_size, batch_size > 0, "an integer > 0"),
            ("--pretrain-steps", pretrain_steps, pretrain_steps > 0, "an integer > 0"),
            ("--stage1-steps", stage1_steps, 0 <= stage1_steps <= steps, "an integer in [0, --steps]"),
            ("--lr", lr, math.isfinite(lr) and lr > 0, "a finite number > 0"),
            ("--dwa-temperature", dwa_temperature, math.isfinite(dwa_temperature) and dwa_temperature > 0,
             "a finite number > 0"),
            ("--max-test", max_test, max_test >= 0, "an integer >= 0 (0 = all)"),
            ("--max-train", max_train, max_train >= 0, "an integer >= 0 (0 = all)"),
            ("--seed", seed, 0 <= seed < 2 ** 31, "an integer in [0, 2^31)"),
            ("--head-prior-mu", head_prior_mu, math.isfinite(head_prior_mu) and head_prior_mu >= 0,
             "a finite number >= 0"),
            ("--refit-epochs", refit_epochs, refit_epochs >= 0, "an integer >= 0 (0 = no refit)")):
        if not ok:  # checked before anything is written or trained
            raise ValueError(f"{flag} {value} is not allowed; expected {allowed}")
    prior_tasks = parse_prior_tasks(head_prior_tasks, "--head-prior-tasks")
    if head_prior_tasks != "all" and head_prior_mu == 0:
        raise ValueError(f"--head-prior-tasks {head_prior_tasks} is used only with --head-prior-mu > 0, and it is 0")
    if refit_scope not in REFIT_SCOPES:
        raise ValueError(f"--refit-scope {refit_scope!r} is not allowed; expected one of {', '.join(REFIT_SCOPES)}")
    if adapter is not None and ablation == "single-task":
        raise ValueError("--adapter is not allowed with --ablation single-task (seven models, none saved)")
    if adapter is not None and backbone is None and not no_pretrain:
        raise ValueError(f"--adapter {adapter}: give the --backbone it was fine-tuned on (or --no-pretrain); "
                         f"a freshly pretrained backbone cannot match it")
    if backbone is not None:  # missing, or not matching its sidecar: one line before data is made or a folder written
        from fedfm.model import load_backbone

        load_backbone(backbone)
    fed = load_federation(federation)
    if adapter is None:  # a loaded state is scored, not trained: the batch size goes unused
        check_batch_size("--batch-size", batch_size, fed.train_sites, max_train)
    device = resolve_device(device)
    cfg = ModelConfig.from_preset(preset, num_beams=fed.num_beams, seed=seed)
    # what the fine-tuning was: saved in adapter.safetensors' header and reported; a loaded state
    # brings the settings of the run that fine-tuned it instead
    trained = {"steps": steps, "stage1_steps": stage1_steps, "batch_size": batch_size, "lr": lr,
               "head_prior_mu": head_prior_mu, "head_prior_tasks": ",".join(prior_tasks), "ablation": ablation}
    meta = {"federation": fed.name, **trained, "seed": seed, "max_train": max_train, "backbone": backbone}
    loaded = None
    if adapter is not None:  # checked before anything is written: same preset, beams and backbone
        model = build_model(cfg, backbone)
        state, meta = load_adapter(adapter, cfg, backbone_hash(model))
        set_adapter_state(model, state)
        loaded = {"path": str(adapter), "meta": meta}
        trained = {k: meta.get(k) for k in trained}
    out_dir.mkdir(parents=True, exist_ok=True)
    if backbone is None and not no_pretrain:
        from pretrain import run_pretraining  # scripts/pretrain.py, beside this file

        log(f"pretraining a {preset} backbone for {pretrain_steps} steps ...")
        backbone = run_pretraining(federation, str(out_dir / "pretrain"), preset, pretrain_steps, batch_size,
                                   lr, seed, str(device), cache_dir, log=log)["backbone"]
        meta["backbone"] = backbone  # (never with --adapter, which needs --backbone or --no-pretrain)
    t_load = time.perf_counter()
    log("loading the train splits and fitting every site's baselines ...")
    train, baselines = load_train_views(fed, cache_dir, max_train)
    log(f"loaded and fitted in {time.perf_counter() - t_load:.0f} s")
    test = SiteViews(fed.sites, "test", cache_dir, max_test, stats_samples=max_train, labelled=fed.train_sites)
    roles = {s.name: "train" for s in fed.train_sites} | {s.name: "heldout" for s in fed.heldout_sites}
    pooled = {t: [train[s.name][t] for s in fed.train_sites] for t in train[fed.train_sites[0].name]}
    kw = dict(steps=steps, batch_size=batch_size, lr=lr, dwa_temperature=dwa_temperature, seed=seed,
              device=device, stage1_steps=stage1_steps, train_lora=ablation != "frozen",
              prior_mu=head_prior_mu, prior_tasks=prior_tasks)  # anchored at the heads as built: finetune's call-start default
    t0 = time.perf_counter()
    history: list = ProgressHistory(steps, log)
    refit, before = {}, None
    if ablation == "single-task":  # LLM4WM(s): one model per task, same step budget each
        predictions, losses = {}, {}
        models = {}
        for t, tds in pooled.items():
            models[t] = build_model(dataclasses.replace(cfg, tasks=(t,)), backbone)
            losses[t] = finetune(models[t], {t: tds}, **kw)[t]
            if refit_epochs and t in POOLED_TASKS:
                refit.update(refit_heads(models[t], {t: tds}, epochs=refit_epochs, seed=seed, device=device,
                                         scope=refit_scope))
        for site, views in test.items():  # each site's test views built once
            predictions.update({(site, t): predict(m, views[t], device=device) for t, m in models.items()})
        rows = evaluate_sites(None, test, baselines, roles, predictions=predictions)
    else:
        if loaded is None:
            model = build_model(cfg, backbone)
            losses = finetune(model, pooled, history=history, **kw)
            save_adapter(out_dir / "adapter.safetensors", get_adapter_state(model), cfg, backbone_hash(model), meta)
            log(f"saved the fine-tuned state to {out_dir / 'adapter.safetensors'}")
        else:
            losses = {}
            log(f"fine-tuned state loaded from {adapter} ({loaded['meta'].get('steps', '?')} steps); no fine-tuning")
        if refit_epochs:
            log(f"scoring the pooled heads before refitting them ({time.perf_counter() - t0:.0f} s so far) ...")
            before = summarise(evaluate_sites(model, SiteViews(fed.sites, "test", cache_dir, max_test, POOLED_TASKS, max_train,
                                                        fed.train_sites),
                                              baselines, roles, device=device))
            refit = refit_heads(model, pooled, epochs=refit_epochs, seed=seed, device=device, scope=refit_scope)
            log("refitted the pooled heads: " + ", ".join(
                f"{t} epoch {r['epoch']} (held-back loss {r['val_loss_before']:.4g} -> {r['val_loss_after']:.4g})"
                for t, r in refit.items()))
            save_adapter(out_dir / "adapter-refit.safetensors", get_adapter_state(model), cfg, backbone_hash(model),
                         {**meta, "refit_epochs": refit_epochs, "refit_scope": refit_scope,
                          "refit_seed": seed})
        log(f"scoring every task on every site's test split ({time.perf_counter() - t0:.0f} s so far) ...")
        rows = evaluate_sites(model, test, baselines, roles, device=device)
    seconds = time.perf_counter() - t0
    summary = summarise(rows)
    report = {"federation": fed.name, "preset": preset, "backbone": backbone,
              "pretrained": backbone is not None, **trained, "dwa_temperature": dwa_temperature,
              "refit_epochs": refit_epochs, "refit_scope": refit_scope, "refit": refit,
              "summary_before_refit": before, "seed": seed, "adapter_from": loaded,
              "max_train": max_train, "max_test": max_test,
              "device": str(device), "finetune_seconds": seconds, "config": cfg.to_dict(),
              "params": parameter_summary(build_model(cfg)), "final_losses": losses, "history": history,
              "summary": summary, "rows": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(r: dict) -> str:
    s = r["summary"]
    p = r["params"]
    lines = [f"# Centralized reference — {r['federation']}", "",
             f"preset `{r['preset']}` ({p['total']:,} parameters, {p['trainable']:,} trainable = "
             f"{p['trainable_pct']:.2f}%), ablation `{r['ablation']}`, "
             f"backbone {'pretrained: ' + str(r['backbone']) if r['pretrained'] else 'random init (no pretraining)'}, "
             + (f"fine-tuned state loaded from {r['adapter_from']['path']} ({r['steps']} steps × batch "
                f"{r['batch_size']} per task when it was saved), scored on {r['device']} "
                if r.get("adapter_from") else f"{r['steps']} fine-tuning steps × batch {r['batch_size']} per task "
                                              f"on {r['device']} ")
             + f"({r['finetune_seconds']:.0f} s); train samples per site: {r.get('max_train') or 'all'}, "
             f"test samples per site: {r.get('max_test') or 'all'}.", "",
             "Error ratio = model error / baseline error (NMSE linear for CE/CP/PF, MAE for DE/PE, "
             "1 − top-1 for BF, 1 − accuracy for LoS); < 1 beats the baseline. " + CE_CP_PRIOR_NOTE, "",
             markdown_table(r["rows"]), "",
             "| site | average score |", "| --- | ---: |"]
    lines += [f"| {site} | {v:.3f} |" for site, v in s["per_site"].items() if v is not None]
    lines += ["", "| task | mean ratio | sites beaten | beaten at 95 % | lost at 95 % |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {t} | {v['ratio']:.3f} | {v['wins']}/{v['sites']} | {v.get('wins_95', '—')} | "
              f"{v.get('losses_95', '—')} |" for t, v in s["per_task"].items() if v["ratio"] is not None]
    lines += ["", "95 % interval: the error ratio's paired bootstrap interval over the site's test samples "
                  f"({BOOTSTRAP_DRAWS} draws, seed {BOOTSTRAP_SEED}; model and baseline rescored on the same "
                  "draw). A site is beaten, or lost, at 95 % where the interval lies below, or above, 1; "
                  "elsewhere the test split cannot tell the two apart."]
    roles = ", ".join(f"{k} {v:.3f}" for k, v in s["per_role"].items() if v is not None)
    lines += ["", f"Average score: {s['average_score']:.3f} ({roles})."]
    if r.get("summary_before_refit"):
        b, refit = r["summary_before_refit"]["per_task"], r.get("refit", {})
        lines += ["", f"Pooled heads refitted on frozen features after fine-tuning (`--refit-epochs "
                  f"{r['refit_epochs']} --refit-scope {r.get('refit_scope', 'head')}`; the epoch chosen on a "
                  f"held-back fifth of the train samples):", "",
                  "| task | mean ratio before refit (sites beaten) | after (sites beaten) | epoch chosen |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {t} | {v['ratio']:.3f} ({v['wins']}/{v['sites']}) | {s['per_task'][t]['ratio']:.3f} "
                  f"({s['per_task'][t]['wins']}/{s['per_task'][t]['sites']}) | {refit.get(t, {}).get('epoch', '—')} |"
                  for t, v in b.items() if v["ratio"] is not None and t in s["per_task"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("federation")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (one batch per task each)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--backbone", default=None, help="pretrained backbone .safetensors")
    g.add_argument("--no-pretrain", action="store_true", help="random-init backbone (ablation)")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--ablation", default="none", choices=ABLATIONS)
    p.add_argument("--stage1-steps", type=int, default=0, help="two-stage: steps with LoRA frozen first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dwa-temperature", type=float, default=2.0)
    p.add_argument("--head-prior-mu", type=float, default=0.0,
                   help="L2-SP weight pulling the BF/DE/PE/LoS heads towards their classical start (0 = off)")
    p.add_argument("--head-prior-tasks", default="all",
                   help="the heads --head-prior-mu holds: all (BF, DE, PE, LoS) or a comma-separated list of them")
    p.add_argument("--refit-epochs", type=int, default=0,
                   help="after fine-tuning, refit the BF/DE/PE/LoS heads alone on frozen features for up to "
                        "N epochs, keeping the best epoch on a held-back fifth of the train samples (0 = off)")
    p.add_argument("--refit-scope", default="head", choices=REFIT_SCOPES,
                   help="what the refit moves: the whole pooled head, or only its paths from the classical "
                        "side inputs (skip, PE's LoS gate, BF's spectrum weights), not the MLP over the embedding")
    p.add_argument("--adapter", default=None,
                   help="a fine-tuned state this script saved (OUT/adapter.safetensors): load it instead of "
                        "fine-tuning, then refit (--refit-epochs) and score; needs the same --backbone and --preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: CUDA when available)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--max-test", type=int, default=0, help="score only the first N test samples per site")
    p.add_argument("--max-train", type=int, default=0,
                   help="train on (and fit baselines to) the first N train samples per site; 0 = all")
    a = p.parse_args(argv)
    try:
        r = run_central(a.federation, a.out, a.preset, a.steps, a.backbone, a.no_pretrain, a.pretrain_steps,
                        a.ablation, a.stage1_steps, a.batch_size, a.lr, a.dwa_temperature, a.seed, a.device,
                        a.cache_dir, a.max_test, a.max_train, a.head_prior_mu, a.refit_epochs, a.adapter,
                        a.refit_scope, head_prior_tasks=a.head_prior_tasks)
    except ValueError as e:
        print(f"train_central: {e}", file=sys.stderr)
        return 2
    print(render_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
