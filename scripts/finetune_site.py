#!/usr/bin/env python
"""Personalise a federated run's global adapters on one site and print before/after.

    python scripts/finetune_site.py --run runs/<id> --site scenarios/sites/uma_2g4.yaml --fraction 0.1

A training site of a run with ``personal-heads`` starts from its own copy of those heads,
of a run with ``site-model=local`` from its own last local model (as the evaluator scored it).
The site may be a held-out one: with ``--fraction 0.1`` it fine-tunes on 10% of its
train-split labels (of its first ``train-max-samples`` when the run capped them), as in
LLM4WM's generalisation experiment.

The classical baselines are fitted on those labelled samples, and so are the heads'
site-specific starts (its channel statistics, BF spectrum, DE/PE kNN and LoS regression) that
the test split is scored with: for a held-out site "before" is therefore not the score the
federation's evaluator gave it, which used none of its labels. Of the labelled samples the last
``--holdout`` share (default a fifth) is held back from training: the site fine-tunes on the
others (with its starts fitted on those), and the held-back samples choose, per task, which
model it keeps: the fine-tuned one where its error on them is lower at 95 % (a paired
bootstrap of their ratio), else the start ("kept").
``--holdout 0`` trains on every labelled sample and keeps the fine-tuned model. Scores are on
the site's full test split. On one of the run's training sites the held-back samples were
trained on by the federation, i.e. by the start, so there the choice leans towards the start;
on a held-out site neither model has seen them.
``--refit-epochs N`` then refits the pooled heads (BF, DE, PE, LoS) alone on the samples it fine-tunes on
(``fedfm.train.refit_heads``; ``--refit-scope features`` moves only their paths from the classical
side inputs). Writes ``<run>/finetune/<site>-<fraction>[-steps<N>][-refit<N>[-features]]-holdout<F>.json``
(other flags, another file) and beside it ``….safetensors``: the start and the fine-tuned adapter
state and, per task, the one kept (``fedfm.runlog.read_personal_models``). Either is scored with
side inputs fitted on the first ``labelled_samples`` train samples, as the table's are.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.runlog import RunLog, write_json, write_personal_models  # noqa: E402


# the share of the labelled samples held back to choose, per task, between the start and the
# fine-tuned model (refit_heads holds back the same share of what it trains on to choose its epoch)
HOLDOUT = 0.2


def finetune_site(run_dir: str, site_path: str, fraction: float = 1.0, steps: int | None = None,
                  refit_epochs: int = 0, refit_scope: str = "head", holdout: float = HOLDOUT) -> dict:
    from fedfm.baselines import fit_baseline
    from fedfm.evaluate import evaluate_sites, own_state, ratio_changes
    from fedfm.federated import build_run_model, load_site_tasks, local_train, numpy_state, read_run, torch_state
    from fedfm.model import get_adapter_state, set_adapter_state
    from fedfm.scenarios import load_site, spec_hash
    from fedfm.tasks import sample_range
    from fedfm.train import REFIT_SCOPES

    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction} is not allowed; expected a number in (0, 1]")
    if steps is not None and steps <= 0:
        raise ValueError(f"--steps {steps} is not allowed; expected an integer > 0")
    if refit_epochs < 0:
        raise ValueError(f"--refit-epochs {refit_epochs} is not allowed; expected an integer >= 0 (0 = no refit)")
    if refit_scope not in REFIT_SCOPES:
        raise ValueError(f"--refit-scope {refit_scope!r} is not allowed; expected one of {', '.join(REFIT_SCOPES)}")
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout {holdout} is not allowed; expected a number in [0, 1) (0 = no held-back choice)")
    run = read_run(run_dir)  # before RunLog, which would create checkpoints/ in any folder
    cfg, num_beams, backbone = run.cfg, run.num_beams, run.backbone
    log = RunLog(run_dir)
    last = log.last_complete_round()
    if last is None:
        raise ValueError(f"{run_dir}: no complete round to start from")
    adapter, strategy_state, _ = log.load_checkpoint(last)
    spec = load_site(site_path)
    if spec.mmwave.codebook_beams != num_beams:  # the BF head's width is the run's codebook
        raise ValueError(f"{site_path}: mmwave.codebook_beams is {spec.mmwave.codebook_beams}, the run's model "
                         f"has {num_beams} beams; fine-tune a site with the run's codebook")
    # a training site starts from what the evaluator scored it with: its own last local model
    # (`site-model=local`), else its own heads (`personal-heads`), over the global state
    adapter = {**adapter, **own_state(strategy_state, spec.name)}
    # the fraction is of the labels a site has in this run: train-max-samples caps them as it
    # capped the federation's sites (a benchmark's "250 labels per site")
    available = cfg.train_samples(spec)
    labelled = max(1, math.ceil(fraction * available))
    if labelled < 2:  # the kNN start (fedfm.baselines.KnnPrior) and the baselines need two labels
        raise ValueError(f"--fraction {fraction:g} gives {labelled} labelled sample of the site's {available}; "
                         f"expected a fraction giving at least 2")
    held_n = round(holdout * labelled)
    fit_n = labelled - held_n
    if holdout and (held_n < 1 or fit_n < 2):
        raise ValueError(f"--holdout {holdout:g} of the {labelled} labelled samples holds back {held_n} and leaves "
                         f"{fit_n} to train on; expected at least 1 held back and 2 left (a larger --fraction, "
                         f"or --holdout 0)")
    # the baselines, and the heads' starts the test is scored with, are fitted on every labelled
    # sample; the site trains on the first fit_n of them, with starts fitted on those, and the
    # last held_n, unseen by that training and its starts, choose per task between the start and
    # the fine-tuned model (select on held-back samples, then refit the closed-form parts on all)
    labelled_tds = load_site_tasks(spec, "train", cfg.cache_dir, max_samples=labelled)
    train, held = labelled_tds, None
    if held_n:
        train = load_site_tasks(spec, "train", cfg.cache_dir, max_samples=fit_n)
        held = {spec.name: {t: sample_range(td, fit_n) for t, td in load_site_tasks(
            spec, "train", cfg.cache_dir, max_samples=labelled, stats_samples=fit_n).items()}}
    test = {spec.name: load_site_tasks(spec, "test", cfg.cache_dir, cfg.eval_max_samples, stats_samples=labelled)}
    baselines = {spec.name: {t: fit_baseline(t, td, spec) for t, td in labelled_tds.items()}}
    model = build_run_model(cfg, num_beams, backbone)
    set_adapter_state(model, torch_state(adapter))
    start = numpy_state(get_adapter_state(model))
    before = evaluate_sites(model, test, baselines, keep_errors=True)
    held_before = evaluate_sites(model, held, {}, keep_errors=True) if held else None
    res = local_train(cfg, spec, start, last + 1, num_beams=num_beams,
                      backbone=backbone, tasks=train,
                      steps=steps if steps is not None else cfg.local_steps * max(cfg.num_server_rounds, 1))
    set_adapter_state(model, torch_state(res.state))
    refit = {}
    if refit_epochs:  # the pooled heads to convergence on the same labels (fedfm.train.refit_heads)
        from fedfm.federated import resolve_device
        from fedfm.train import refit_heads

        refit = refit_heads(model, train, epochs=refit_epochs, seed=res.seed, device=resolve_device(cfg.device),
                            scope=refit_scope)
    after = evaluate_sites(model, test, baselines, keep_errors=True)
    held_after = evaluate_sites(model, held, {}, keep_errors=True) if held else None
    choice = kept_models(held_before, held_after) if held else {}
    # each ratio's change after − before with its paired interval over the site's test samples
    change = ratio_changes(after, before)[spec.name]
    rows = []
    for b, a in zip(before, after):
        c = choice.get(b["task"], {"kept": "after", "held_back_ratio": None})
        k = a if c["kept"] == "after" else b
        rows.append({"task": b["task"], "baseline": b["baseline"], "before": b["model"], "after": a["model"],
                     "ratio_before": b["ratio"], "ratio_after": a["ratio"], "ratio_after_ci": a["ratio_ci"],
                     "change_ci": change[b["task"]], "kept": c["kept"], "ratio_kept": k["ratio"],
                     "held_back_ratio": c["held_back_ratio"]})
    name = result_name(spec.name, fraction, steps, refit_epochs, refit_scope, holdout)
    models_file = name.removesuffix(".json") + ".safetensors"
    out = {"run": str(run_dir), "site": spec.name, "fraction": fraction, "labelled_samples": labelled,
           "trained_samples": fit_n, "held_back_samples": held_n, "holdout": holdout,
           "from_round": last, "refit_epochs": refit_epochs, "refit_scope": refit_scope, "refit": refit,
           "models_file": models_file, "rows": rows}
    # what the site deploys: both models and, per task, which one. The table (JSON), written
    # last, marks the result complete (read_personal_models requires it): an earlier result's
    # table of the same flags goes first, so a stop between the two writes leaves no table
    # describing another models file
    (log.dir / "finetune" / name).unlink(missing_ok=True)
    write_personal_models(log.dir / "finetune" / models_file,
                          {"before": start, "after": numpy_state(get_adapter_state(model))},
                          {r["task"]: r["kept"] for r in rows},
                          {**{k: out[k] for k in ("run", "site", "fraction", "labelled_samples", "trained_samples",
                                                  "held_back_samples", "from_round")}, "spec_hash": spec_hash(spec)})
    write_json(log.dir / "finetune" / name, out)
    return out


def kept_models(held_before: list[dict], held_after: list[dict]) -> dict[str, dict]:
    """{task: {"kept": "after" | "before", "held_back_ratio": [ratio, lo, hi]}}: per task the
    fine-tuned model's error on the held-back labelled samples over the start's, with its 95 %
    paired bootstrap interval (``fedfm.metrics.ratio_interval``, the start as the baseline), and
    the model kept: the fine-tuned one only where that interval lies below 1, else the start.
    Rows of ``fedfm.evaluate.evaluate_sites(..., keep_errors=True)``, in the same order.
    Early stopping at two candidates, step 0 and the last, and on the side of the start: with
    tens of labels fine-tuning costs most tasks more than it gains (RESULTS.md), and a point
    estimate on ten held-back samples once kept a PE head that lost 0.1 of its ratio on the test."""
    from fedfm.metrics import ratio_interval

    out = {}
    for b, a in zip(held_before, held_after):
        ci = ratio_interval(b["task"], a["model_errors"], b["model_errors"])
        out[b["task"]] = {"kept": "after" if ci["hi"] < 1 else "before",
                          "held_back_ratio": [ci["ratio"], ci["lo"], ci["hi"]]}
    return out


def result_name(site: str, fraction: float, steps: int | None, refit_epochs: int, refit_scope: str,
                holdout: float = HOLDOUT) -> str:
    """``<site>-<fraction>[-steps<N>][-refit<N>[-features]]-holdout<F>.json``: other flags, another
    file (a run with --steps or --refit-epochs once overwrote the default run's result); the same
    flags on the same run reproduce the same result, which rewrites its file."""
    name = f"{site}-{fraction:g}"
    if steps is not None:
        name += f"-steps{steps}"
    if refit_epochs:
        name += f"-refit{refit_epochs}" + ("" if refit_scope == "head" else f"-{refit_scope}")
    # always named: a result from before --holdout existed (`<site>-<fraction>.json`, every label
    # trained) is not overwritten by the default's, another experiment
    return name + f"-holdout{holdout:g}.json"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def table_lines(rows: list[dict], held_back: int = 0) -> list[str]:
    """``finetune_site``'s rows as a markdown table; a missing value (no baseline) is "—".
    ``held_back`` > 0 adds the held-back errors and the model kept per task, and a line with the
    mean error ratio before, after and of the kept models."""
    from fedfm.metrics import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, HEADLINE

    chooses = held_back > 0 and all(r.get("held_back_ratio") for r in rows)
    lines = ["| task | metric | baseline | before | after | error ratio before → after | change [95 %] |"
             + (" held back: after ÷ before [95 %] | kept |" if chooses else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if chooses else "")]
    for r in rows:
        key = HEADLINE[r["task"]]
        cells = [(r[k] or {}).get(key) for k in ("baseline", "before", "after")]
        ch = r.get("change_ci")
        change = f"{ch[0]:+.3f} [{ch[1]:+.3f}, {ch[2]:+.3f}]" if ch else "—"
        line = (f"| {r['task']} | {key} | " + " | ".join(map(_num, cells))
                + f" | {_num(r['ratio_before'])} → {_num(r['ratio_after'])} | {change} |")
        if chooses:
            ratio, lo, hi = r["held_back_ratio"]
            line += f" {_num(ratio)} [{_num(lo)}, {_num(hi)}] | {r['kept']} |"
        lines.append(line)
    lines += ["", "change: after − before error ratio, with its 95 % paired bootstrap interval over the "
                  f"site's test samples ({BOOTSTRAP_DRAWS} draws, seed {BOOTSTRAP_SEED}); an interval "
                  "excluding 0 is a change the test split resolves."]
    if chooses:
        means = {k: _mean([r[f"ratio_{k}"] for r in rows]) for k in ("before", "after", "kept")}
        lines.append(f"kept: per task, what the site would deploy: the fine-tuned model only where its error on "
                     f"the {held_back} held-back labelled samples is below the start's at 95 % (the interval of "
                     f"their ratio below 1), else the start. Mean error ratio over the tasks: "
                     f"before {_num(means['before'])}, after {_num(means['after'])}, kept {_num(means['kept'])}.")
    return lines


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else float(sum(values) / len(values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a federated run folder")
    p.add_argument("--site", required=True, help="site YAML (a training or a held-out site)")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of the train split's labels used")
    p.add_argument("--steps", type=int, default=None, help="local steps (default: rounds × local-steps of the run)")
    p.add_argument("--refit-epochs", type=int, default=0,
                   help="then refit the BF/DE/PE/LoS heads alone on frozen features for up to N epochs, keeping "
                        "the best epoch on a held-back fifth of the samples it trains on (0 = off)")
    p.add_argument("--refit-scope", default="head",
                   help="what the refit moves: head (all of each pooled head) or features (only its paths from "
                        "the classical side inputs, not the MLP over the embedding)")
    p.add_argument("--holdout", type=float, default=HOLDOUT,
                   help=f"share of the labelled samples held back from training to choose, per task, between the "
                        f"start and the fine-tuned model (default {HOLDOUT:g}; 0 = train on all, keep the fine-tuned)")
    args = p.parse_args(argv)
    try:
        out = finetune_site(args.run, args.site, args.fraction, args.steps, args.refit_epochs, args.refit_scope,
                            args.holdout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trained = out.get("trained_samples", out["labelled_samples"])
    held = out.get("held_back_samples", 0)
    print(f"{out['site']}: fine-tuned on {trained} of {out['labelled_samples']} labelled samples from round "
          f"{out['from_round']}" + (f", {held} held back" if held else "") + "; before = that round's state with "
          f"the site's own starts (channel statistics, BF spectrum, DE/PE kNN, LoS regression) fitted on the "
          f"{out['labelled_samples']} labelled samples, as the baselines are")
    print("\n".join(table_lines(out["rows"], held)))
    where = Path(out["run"]) / "finetune" / out["models_file"]
    print(f"written: {where.with_suffix('.json')} (this table) and {where} (both models and the one each task "
          f"keeps; fedfm.runlog.read_personal_models)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
