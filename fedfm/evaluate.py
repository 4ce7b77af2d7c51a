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

import numpy as np
import torch
import torch.nn as nn

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
