"""Score a model beside the classical baselines on sites × tasks.

    pred = predict(model, td)                          # contract prediction format
    rows = evaluate_sites(model, {site: {task: td}}, {site: {task: baseline}})
    print(markdown_table(rows)); summary = summarise(rows)

Prediction format (shared with fedfm.baselines): dense complex64 [S, G, K, N] on the
normalised scale of ``td.targets``; BF float32 [S, B] scores; DE float32 [S] metres;
PE float32 [S] dB; LoS float32 [S] probability of LoS.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from threadpoolctl import threadpool_limits

from fedfm.model.config import DENSE_TASKS
from fedfm.model.lora import base_model, merged_copy
from fedfm.train import as_real, autocast, resolve_device


@torch.no_grad()
def predict(model: nn.Module, td, batch_size: int = 64, device=None, side_cache: dict | None = None) -> np.ndarray:
    """The model's prediction for every sample of a TaskData, in the contract format. A caller
    predicting several tasks with one state passes ``merged_copy(model)`` once instead.

    ``side_cache``: a dict the caller keeps for this ``td`` between calls. The pooled heads'
    classical side inputs of each batch (``FedFM.classical_inputs``: profile features, site
    residual, BF's angular spectra), which depend on the samples and the site's priors but not
    on the weights, are computed on the first call and read back on the later ones: the central
    evaluator scores the same test samples every round, and they were ~15 % of its time on this
    CPU (RESULTS.md, "Model throughput"). The cache holds the inputs array, site context and
    label prior it was filled from and starts afresh for other ones (the same objects, not
    equal ones), another batch size, beam count or device."""
    device = resolve_device(device)
    model.to(device).eval()
    net = merged_copy(model)    # LoRA merged into a copy (a no-op on one already merged)
    x = as_real(td.inputs)
    known = torch.as_tensor(np.asarray(td.known, dtype=bool)).to(device)
    context = td.extras.get("context")
    context = None if context is None else torch.as_tensor(np.asarray(context, np.float32)).to(device)
    stats = td.extras.get("stats")
    fedfm_net, sides = base_model(net), None
    if side_cache is not None and td.task not in DENSE_TASKS:
        of = (td.inputs, td.extras.get("context"), stats)   # held in the cache, so their ids stay theirs
        key = (batch_size, str(device), fedfm_net.cfg.num_beams, *map(id, of))
        if side_cache.get("key") != key:
            side_cache.clear()
            side_cache.update(key=key, of=of, batches={})
        sides = side_cache["batches"]
    outs = []
    # the heads' classical priors run in NumPy (PF's AR start, the LMMSE, the side inputs): one
    # BLAS thread, as on the run's server (OMP_NUM_THREADS=1, scripts/run_federation.py), so a
    # prediction does not depend on how its process was started (with 2 OpenBLAS threads PF's
    # NMSE moved by 7e-4 of itself on a default site). Torch's threads are its own where its BLAS
    # is not the one threadpoolctl sees (the PyPI x86 wheels: MKL linked in, OpenMP for the rest)
    with threadpool_limits(limits=1, user_api="blas"):
        for j, i in enumerate(range(0, x.shape[0], batch_size)):
            xb = x[i:i + batch_size].to(device)
            with autocast(device):
                side = None
                if sides is not None:
                    side = sides.get(j)
                    if side is None:
                        side = sides[j] = fedfm_net.classical_inputs(td.task, xb, context, stats)
                out = net(td.task, xb, known, context, stats, side)
            outs.append(out.float().cpu())
    out = torch.cat(outs)
    model.train()
    if td.task in DENSE_TASKS:
        return torch.view_as_complex(out.contiguous()).numpy().astype(np.complex64)
    if td.task in ("DE", "PE"):
        from fedfm.tasks import denormalise_target

        return np.asarray(denormalise_target(td.task, out.numpy()), dtype=np.float32)
    if td.task == "LoS":
        return torch.softmax(out, dim=1)[:, 1].numpy().astype(np.float32)
    return out.numpy().astype(np.float32)  # BF logits: higher = better beam


def evaluate_sites(model: nn.Module, site_tds: dict, baselines: dict, roles: dict | None = None,
                   batch_size: int = 64, device=None, predictions: dict | None = None,
                   keep_errors: bool = False) -> list[dict]:
    """One row per (site, task): model and baseline metrics on the same TaskData.

    site_tds: {site: {task: TaskData}} (usually test splits); baselines: {site: {task: Baseline}}
    (fitted on that site's train split; a missing one leaves the baseline columns empty);
    roles: {site: "train" | "heldout"}. ``predictions`` {(site, task): prediction} replaces the
    model's forward (used by the single-task ablation, one model per task).
    Row: site, role, task, model {metric: value}, baseline {...}, baseline_name, model_error,
    baseline_error, ratio (model / baseline error; DESIGN.md "Average score") and ratio_ci, its
    95 % paired bootstrap interval over the test samples (``fedfm.metrics.paired_bootstrap`` of
    the model against the baseline: 2 000 draws, seed 0): "beats the baseline" holds at that
    level where the interval's top is below 1. ``keep_errors`` adds the per-sample errors
    (``model_errors``, ``baseline_errors``: float64 [S], fedfm.metrics.sample_errors) for a
    paired comparison of two models on the same rows.
    """
    from fedfm.metrics import error_for_score, error_ratio, ratio_interval, sample_errors, score

    net = merged_copy(model) if predictions is None else None   # one merge for every site and task
    rows = []
    for site, tds in site_tds.items():
        for task, td in tds.items():
            pred = predictions[(site, task)] if predictions is not None else predict(net, td, batch_size, device)
            m = score(task, pred, td)
            e_m = sample_errors(task, pred, td)
            row = {"site": site, "role": (roles or {}).get(site, ""), "task": task, "model": m,
                   "baseline": None, "baseline_name": None, "model_error": float(error_for_score(task, m)),
                   "baseline_error": None, "ratio": None, "ratio_ci": None}
            b = baselines.get(site, {}).get(task)
            if b is not None:
                with threadpool_limits(limits=1, user_api="blas"):  # as predict's, and the evaluator's fit
                    bpred = b.predict(td)
                bm = score(task, bpred, td)
                be = float(error_for_score(task, bm))
                row.update(baseline=bm, baseline_name=b.name, baseline_error=be,
                           ratio=error_ratio(task, row["model_error"], be))
                e_b = sample_errors(task, bpred, td)
                if math.isfinite(row["ratio"]):  # a NaN prediction has no interval to speak of
                    ci = ratio_interval(task, e_m, e_b)
                    row["ratio_ci"] = [ci["lo"], ci["hi"]]
                if keep_errors:
                    row["baseline_errors"] = e_b
            if keep_errors:
                row["model_errors"] = e_m
            rows.append(row)
    return rows




def summarise(rows: list[dict]) -> dict:
    """Average score (mean model/baseline error ratio over tasks) per site, per role and overall;
    per task the mean ratio over sites, how many sites the model beats the baseline on, and on
    how many it beats it (``wins_95``) or loses to it (``losses_95``) at 95 % (``ratio_ci``)."""
    def mean(v):
        # None = not computed (no baseline); a NaN score is a model that failed: a loss (inf),
        # never left out, which would average the site over its good tasks only
        v = [math.inf if math.isnan(x) else x for x in v if x is not None]
        return float(np.mean(v)) if v else None

    sites = {}
    for r in rows:
        sites.setdefault(r["site"], []).append(r)
    per_site = {s: mean([r["ratio"] for r in rs]) for s, rs in sites.items()}
    per_role = {}
    for s, rs in sites.items():
        per_role.setdefault(rs[0]["role"] or "all", []).append(per_site[s])
    tasks = {}
    for r in rows:
        tasks.setdefault(r["task"], []).append(r)
    per_task = {t: {"ratio": mean([r["ratio"] for r in rs]),
                    "wins": sum(1 for r in rs if r["ratio"] is not None and r["ratio"] < 1), "sites": len(rs),
                    # where the 95 % interval of the ratio excludes 1 (rows of evaluate_sites)
                    "wins_95": sum(1 for r in rs if r.get("ratio_ci") and r["ratio_ci"][1] < 1),
                    "losses_95": sum(1 for r in rs if r.get("ratio_ci") and r["ratio_ci"][0] > 1)}
                for t, rs in tasks.items()}
    return {"average_score": mean(list(per_site.values())), "per_site": per_site,
            "per_role": {k: mean(v) for k, v in per_role.items()}, "per_task": per_task}


HEADLINE_KEYS = {"CE": "nmse_db", "CP": "nmse_db", "PF": "nmse_db", "BF": "top1", "DE": "mae_m",
                 "PE": "mae_db", "LoS": "accuracy"}


def _headline(task: str) -> str:
    try:
        from fedfm.metrics import HEADLINE

        return HEADLINE.get(task, HEADLINE_KEYS[task])
    except ImportError:
        return HEADLINE_KEYS[task]


def markdown_table(rows: list[dict]) -> str:
    """site | role | task | metric | model | baseline (name) | error ratio | its 95 % interval — one line per row."""
    lines = ["| site | role | task | metric | model | baseline | baseline method | error ratio | 95 % interval |",
             "| --- | --- | --- | --- | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        key = _headline(r["task"])
        mv = r["model"].get(key)
        bv = r["baseline"].get(key) if r["baseline"] else None
        fmt = (lambda v: "—" if v is None else f"{v:.3f}")
        ci = r.get("ratio_ci")
        lines.append(f"| {r['site']} | {r['role']} | {r['task']} | {key} | {fmt(mv)} | {fmt(bv)} | "
                     f"{r['baseline_name'] or '—'} | {fmt(r['ratio'])} | "
                     f"{f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '—'} |")
    return "\n".join(lines)


def map_sites(fn, items: list) -> list:
    """``[fn(item) for item in items]`` with the items one per core: a site's set-up (its test
    views, its baselines' fits) and its scoring on the central evaluator and in
    scripts/evaluate.py (on 2 cores, for default.yaml's six sites: set-up 64 s → 37 s; a round's
    scoring 15–25 % less than one site after another on both cores, RESULTS.md "Model
    throughput"; a host with more cores than sites leaves the rest idle). NumPy and torch
    release the GIL in their kernels and the sites are independent (fitted once per process
    into keyed caches; each scored with its own model copy, :func:`site_copy`). Each worker runs its BLAS calls (threadpoolctl) and torch's kernels
    (``torch.set_num_threads(1)``: OpenMP's and MKL's thread counts are per thread) on one
    thread, so the numbers depend neither on how many sites run at once nor on the core count or
    OMP_NUM_THREADS: a multi-threaded kernel sums in another order (2.4e-7 of a prediction with 2
    torch threads), and PF's AR start amplifies a BLAS's (7e-4 of its NMSE on a site). A site
    whose data is still to be generated waits for fedfm.data's lock: one thread at a time
    generates (generation seeds and runs Sionna). ``fn``'s exceptions propagate; return one to
    report it per item."""
    from concurrent.futures import ThreadPoolExecutor

    from fedfm.train import usable_cores

    outer = torch.get_num_threads()

    def on_one_thread(item):
        # a thread takes torch's process-wide count at its first call into ATen, whenever that
        # comes, and only then its own: so make that call before setting the thread's count,
        # which no other worker can then change
        torch.get_num_threads()
        torch.set_num_threads(1)
        return fn(item)

    try:
        with threadpool_limits(limits=1), ThreadPoolExecutor(max(1, min(len(items), usable_cores()))) as pool:
            return list(pool.map(on_one_thread, items))
    finally:  # the process-wide count (what threads started later take) back to the caller's
        torch.set_num_threads(outer)


def site_copy(model: nn.Module, state: dict, lock) -> nn.Module:
    """An inference copy of ``model`` with adapter ``state`` loaded and LoRA merged (as
    :func:`merged_copy`), the state loaded and the copy taken under ``lock``: the sites of
    :func:`map_sites` share one model to load their states into, and each scores its own copy."""
    import copy

    from peft import PeftModel

    from fedfm.model import set_adapter_state

    with lock:  # the shared model only: the merge is the copy's own
        set_adapter_state(model, state)
        net = copy.deepcopy(model)
    return net.merge_and_unload() if isinstance(net, PeftModel) else net


# ---- a run's checkpoint, scored again (scripts/evaluate.py) ------------------------------
# A site's role there: "train" (a training site of the run: its label-fitted starts, its own heads
# or local model), "heldout" (one of the run's held-out sites) or "new" (a site the run's
# federation does not name, scored as a held-out one: no label of its own reaches the model)
PERSONAL_CHOICES = ("kept", "before", "after")


def own_state(strategy_state: dict[str, np.ndarray], site: str) -> dict[str, np.ndarray]:
    """What the central evaluator loads over the global state to score training site ``site``,
    read from a checkpoint's strategy state: its last local model (``local/<site>/…``,
    ``site-model=local``), else its own heads and adapters (``personal/<site>/…``), else nothing
    (server/strategy.py ``site_state``)."""
    for prefix in (f"local/{site}/", f"personal/{site}/"):
        mine = {k[len(prefix):]: v for k, v in strategy_state.items() if k.startswith(prefix)}
        if mine:
            return mine
    return {}


# the event server/evaluator.py logs for a site whose data could not be made or read at round 0
EXCLUDED = "site excluded from central evaluation"


def checkpoint_sites(conf: dict, site_paths=(), where: str = "config.json", excluded=()) -> list[tuple]:
    """``[(spec, role, path)]`` to score: the run's own sites (config.json's federation, in its
    order, less those that failed to load and those in ``excluded``) or the given site YAMLs. A
    YAML named as one of the run's sites must be that site (its spec hash), so that a training
    site's own state and label-fitted starts are never applied to another site of the same name."""
    from fedfm.scenarios import load_site, spec_hash

    try:
        record = conf["federation"]["sites"]
        by_name = {s["name"]: s for s in record}
        recorded = [s["path"] for s in record if not s.get("error") and s["name"] not in excluded]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: lacks the federation's sites ({e}); a run of another fedfm version, "
                         f"or an edited file") from None
    paths = list(site_paths) or recorded
    out, seen = [], {}
    for path in paths:
        if not site_paths and not Path(path).is_file():
            raise ValueError(f"{where}: site YAML {path} (recorded by the run) is not there; pass the "
                             f"site files with --site")
        spec = load_site(path)  # ConfigError (a ValueError) naming the file, key and value
        if spec.name in seen:
            raise ValueError(f"{path}: site {spec.name!r} is given twice (also {seen[spec.name]})")
        seen[spec.name] = path
        rec = by_name.get(spec.name)
        role = "new"
        if rec is not None:
            if rec.get("spec_hash") != spec_hash(spec):
                raise ValueError(f"{path}: site {spec.name!r} is a {rec.get('role')} site of the run, but this YAML "
                                 f"is not the run's (spec hash {spec_hash(spec)}, the run's {rec.get('spec_hash')}); "
                                 f"rename the site to score it as a new one")
            role = rec.get("role")
        out.append((spec, role, str(path)))
    return out


def _personal_meta(models_path, meta, run_dir) -> dict:
    """The parts of a personalised-models file's ``meta`` this needs, checked, naming the file."""
    ok = (isinstance(meta, dict) and isinstance(meta.get("site"), str)
          and all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) and meta[k] >= low
                  for k, low in (("from_round", 0), ("labelled_samples", 2))))  # finetune_site needs 2
    if not ok:
        raise ValueError(f"{models_path}: its header lacks the site, round or labelled samples it was personalised "
                         f"with; re-run scripts/finetune_site.py")
    # finetune_site.py writes into <run>/finetune/; `run` is the path as it was given there
    file = Path(models_path).resolve()
    inside = file.parent.name == "finetune" and file.parent.parent == Path(run_dir).resolve()
    if not inside and Path(str(meta.get("run", ""))).resolve() != Path(run_dir).resolve():
        raise ValueError(f"{models_path}: personalised from run {meta.get('run')}, not {run_dir}; pass that run")
    return meta


def evaluate_checkpoint(run_dir, round_: int | None = None, site_paths=(), models_path=None,
                        which: str = "kept", max_test: int | None = None, device=None,
                        against: int | None = None) -> dict:
    """Score round ``round_`` (default: the last complete one) of a federated run on sites ×
    tasks beside each site's classical baseline, as the run's central evaluator scores a round:
    every site of the run's federation (less any it excluded for its data), or the site YAMLs
    given (a new site is scored as a held-out one); a training site with its own heads or local
    model from the checkpoint.

    ``models_path``: a site's personalised models (scripts/finetune_site.py's
    ``finetune/….safetensors``) in place of the checkpoint: ``which`` of them (``kept``: per task
    the one the site deploys), on that site only, with its side inputs and baselines fitted on
    the labelled train samples it was personalised with, as finetune_site's table is scored;
    ``round_``, if given, must be the round they were personalised from.

    ``against``: another complete round, scored on the same test samples with the same
    baselines, and per site and task the change of the error ratio (this round − that one) with
    its 95 % paired bootstrap interval (:func:`fedfm.metrics.paired_bootstrap`, the tasks of a site
    sharing the draw for its average): whether training moved a site, e.g. one it never saw,
    beyond what its test split can resolve (not with ``models_path``, whose before / after
    ``which`` compares).

    ``max_test``: the first N test samples of each site (0 = all; None = the run's
    ``eval-max-samples``). Returns {"run", "round", "models", "max_test", "sites", "skipped",
    "rows", "summary", "against"}: rows of :func:`evaluate_sites` without per-sample errors, the
    summary of :func:`summarise`, ``against`` None or {"round", "rows": that round's rows,
    "change": {site: {"average": [delta, lo, hi], task: [delta, lo, hi], ...}}}. Raises ValueError (one line naming the file or flag) on anything it cannot
    use; it writes nothing but a new site's data, into the run's cache."""
    from fedfm.baselines import fit_baseline
    from fedfm.federated import build_run_model, check_backbone, load_site_tasks, read_run, torch_state
    from fedfm.federated import resolve_device as run_device
    from fedfm.runlog import RunLog, read_jsonl, read_personal_models

    if which not in PERSONAL_CHOICES:
        raise ValueError(f"--which {which!r} is not allowed; expected one of {', '.join(PERSONAL_CHOICES)}")
    if max_test is not None and max_test < 0:
        raise ValueError(f"--max-test {max_test} is not allowed; expected an integer >= 0 (0 = every test sample)")
    run = read_run(run_dir)  # before RunLog, which would create checkpoints/ in any folder
    cfg, num_beams = run.cfg, run.num_beams
    if cfg.stage == "pretrain":
        raise ValueError(f"{run_dir}: a federated pretraining run (stage=pretrain) has no task heads to score; "
                         f"fine-tune from its backbone (backbone=<run>/backbone/backbone.safetensors)")
    log = RunLog(run_dir)
    rounds = log.complete_rounds()
    if not rounds:
        raise ValueError(f"{run_dir}: no complete round to score")
    try:  # the file the run used: one line if it moved or changed
        check_backbone(run.backbone, run.backbone_sha256)
    except (ValueError, OSError) as e:
        raise ValueError(f"{run.where}: the run's backbone cannot be used ({e})") from None
    personal = None
    if models_path is not None:
        models, kept, meta = read_personal_models(models_path)
        meta = _personal_meta(models_path, meta, run_dir)
        if round_ is not None and round_ != meta["from_round"]:
            raise ValueError(f"--round {round_}: {models_path} was personalised from round {meta['from_round']}; "
                             f"leave --round out")
        round_ = meta["from_round"]
        personal = {"file": str(models_path), "which": which, "site": meta["site"], "kept": kept,
                    "from_round": round_, "labelled_samples": meta["labelled_samples"]}
    elif round_ is None:
        round_ = rounds[-1]
    elif round_ not in rounds:
        raise ValueError(f"--round {round_}: {run_dir} has no complete checkpoint for it; complete rounds: "
                         f"{', '.join(map(str, rounds))}")
    if against is not None:
        if personal:
            raise ValueError("--against compares two rounds of the run; a site's personalised models are compared "
                             "with --which before and --which after")
        if against == round_:
            raise ValueError(f"--against {against}: the round scored; give another round to compare it with")
        if against not in rounds:
            raise ValueError(f"--against {against}: {run_dir} has no complete checkpoint for it; complete rounds: "
                             f"{', '.join(map(str, rounds))}")
    excluded = {}
    if not site_paths:  # the sites the run's evaluator left out, as it did
        for e in read_jsonl(log.dir / "events.jsonl") if (log.dir / "events.jsonl").is_file() else []:
            if str(e.get("message", "")).startswith(EXCLUDED):
                excluded[e.get("site")] = e["message"]
    sites = checkpoint_sites(run.conf, site_paths, run.where, excluded)
    if personal:
        from fedfm.scenarios import spec_hash

        sites = [s for s in sites if s[0].name == personal["site"]]
        if not sites:
            raise ValueError(f"{models_path}: the models of site {personal['site']!r}; pass its YAML with --site")
        if meta.get("spec_hash") and spec_hash(sites[0][0]) != meta["spec_hash"]:  # files since stop 42 carry it
            raise ValueError(f"{sites[0][2]}: site {personal['site']!r} is not the one {models_path} was personalised "
                             f"on (spec hash {spec_hash(sites[0][0])}, the file's {meta['spec_hash']})")
    for spec, _, path in sites:
        if spec.mmwave.codebook_beams != num_beams:  # the BF head's width is the run's codebook
            raise ValueError(f"{path}: mmwave.codebook_beams is {spec.mmwave.codebook_beams}, the run's model has "
                             f"{num_beams} beams; score sites with the run's codebook")
    checkpoints = {}
    if personal:
        states = {m: models[m] for m in ("before", "after")}
    else:
        for r in {round_, *(() if against is None else (against,))}:
            glob, strategy_state, _ = log.load_checkpoint(r)
            checkpoints[r] = (glob, strategy_state)
    dev = run_device(cfg.device if device is None else device)
    model = build_run_model(cfg, num_beams, run.backbone, dev)
    n_test = cfg.eval_max_samples if max_test is None else max_test

    def prepare(site):  # its test views and baselines, as the evaluator prepares them
        spec, role, _ = site
        if personal:  # scored as finetune_site.py scores its table
            labelled = personal["labelled_samples"]
            test = load_site_tasks(spec, "test", cfg.cache_dir, n_test, stats_samples=labelled)
            train = load_site_tasks(spec, "train", cfg.cache_dir, max_samples=labelled, labels=False)
        else:  # scored as server/evaluator.py scores a round
            test = load_site_tasks(spec, "test", cfg.cache_dir, n_test, stats_samples=cfg.train_max_samples,
                                   labels=role == "train")
            train = load_site_tasks(spec, "train", cfg.cache_dir, cfg.train_max_samples, labels=False)
        return test, {t: fit_baseline(t, train[t], spec) for t in test}

    lock = threading.Lock()

    def score(spec, role, test, baselines, states, groups, where) -> list[dict]:
        by_task = {}
        for name, tasks in groups.items():  # one merge per state
            try:
                net = site_copy(model, torch_state(states[name]), lock)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            for r in evaluate_sites(net, {spec.name: {t: test[t] for t in tasks}}, {spec.name: baselines},
                                    {spec.name: role}, device=dev, keep_errors=against is not None):
                by_task[r["task"]] = r
        return [by_task[t] for t in test]  # in the tasks' order

    def prepare_and_score(site) -> dict[int, list[dict]]:  # {round: rows}, as the evaluator scores a round
        spec, role, _ = site
        test, baselines = prepare(site)
        if personal:  # per task the model asked for (kept: the one the site deploys)
            if which == "kept" and set(test) - set(kept):
                raise ValueError(f"{models_path}: names no kept model for {', '.join(sorted(set(test) - set(kept)))}; "
                                 f"re-run scripts/finetune_site.py")
            groups = {}
            for t in test:
                groups.setdefault(kept[t] if which == "kept" else which, []).append(t)
            return {round_: score(spec, role, test, baselines, states, groups, models_path)}
        out = {}
        for r, (glob, strategy_state) in checkpoints.items():
            own = own_state(strategy_state, spec.name) if role == "train" else {}
            out[r] = score(spec, role, test, baselines, {"run": {**glob, **own}}, {"run": list(test)},
                           log.checkpoint_dir(r))
        return out

    scored = {r: [] for r in checkpoints} if checkpoints else {round_: []}
    for site_rows in map_sites(prepare_and_score, sites):  # one site per core, each on one thread
        for r, rows in site_rows.items():
            scored[r] += rows  # in the sites' order
    comparison = None
    if against is not None:
        comparison = {"round": against, "rows": [_without_errors(r) for r in scored[against]],
                      "change": ratio_changes(scored[round_], scored[against])}
    rows = [_without_errors(r) for r in scored[round_]]
    return {"run": str(run_dir), "round": round_, "backbone_sha256": run.backbone_sha256, "models": personal,
            "max_test": n_test, "sites": [{"name": s.name, "role": r, "path": p} for s, r, p in sites],
            "skipped": [{"name": k, "why": v} for k, v in excluded.items()], "rows": rows,
            "summary": summarise(rows), "against": comparison}


def _without_errors(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("model_errors", "baseline_errors")}


def ratio_changes(rows_a: list[dict], rows_b: list[dict]) -> dict[str, dict[str, list[float] | None]]:
    """{site: {"average": [delta, lo, hi], task: [delta, lo, hi], ...}}: model a's error ratio
    (its average score for "average") minus model b's on the same test samples, with the 95 %
    paired bootstrap interval (:func:`fedfm.metrics.paired_bootstrap`, the baseline rescored on
    each draw; a site's tasks share the draw). Rows of :func:`evaluate_sites` with
    ``keep_errors``, the same sites and tasks in both; None where a ratio is not finite."""
    from fedfm.metrics import paired_bootstrap

    b_rows = {(r["site"], r["task"]): r for r in rows_b}
    sites: dict[str, list[tuple[dict, dict]]] = {}
    for a in rows_a:
        b = b_rows[(a["site"], a["task"])]
        sites.setdefault(a["site"], []).append((a, b))
    out = {}
    for site, pairs in sites.items():
        usable = [(a, b) for a, b in pairs if "baseline_errors" in a and all(
            x["ratio"] is not None and math.isfinite(x["ratio"]) for x in (a, b))]

        def change(chosen):
            if not chosen:
                return None
            ci = paired_bootstrap({a["task"]: a["model_errors"] for a, _ in chosen},
                                  {a["task"]: b["model_errors"] for a, b in chosen},
                                  {a["task"]: a["baseline_errors"] for a, _ in chosen})
            return [ci["delta"], ci["lo"], ci["hi"]]

        ok = {id(a) for a, _ in usable}
        out[site] = {a["task"]: change([(a, b)] if id(a) in ok else []) for a, b in pairs}
        out[site]["average"] = change(usable) if len(usable) == len(pairs) else None
    return out
