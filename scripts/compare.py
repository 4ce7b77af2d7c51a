#!/usr/bin/env python
"""Local-only vs federated vs centralized, at equal per-site compute, on one federation.

    python scripts/compare.py scenarios/federations/benchmark.yaml --set num-server-rounds=5

- federated: a real `flwr run .` (scripts/run_federation.py): R rounds × S local steps per site;
- local-only: each training site alone, R·S steps from the same backbone and initial adapters;
- centralized: one model on the pooled data of all training sites, R·S·(number of sites)
  steps (the same total gradient computations at the same batch size).
All three are scored on every training site's test split against the same classical
baselines (the federated run's ``baselines.json``). Writes ``compare.json`` into the
federated run folder, rebuilds its report (which then shows all columns) and prints one
table with the issue's targets: federated within 10% of centralized on the average
score, and better than local-only on every training site.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fedfm.config import RunConfig, load_federation_sites  # noqa: E402
from fedfm.runlog import RunLog, read_run_config, write_json  # noqa: E402
from run_federation import _parse_value, run_federation  # noqa: E402


def score_model(model, tds: dict) -> dict[str, dict[str, float]]:
    from fedfm.evaluate import predict
    from fedfm.metrics import score

    return {task: score(task, predict(model, td), td) for task, td in tds.items()}


def local_and_central(run_dir: Path) -> dict:
    """Train local-only and centralized models with the federated run's settings and backbone."""
    from fedfm.federated import build_run_model, load_site_tasks, local_train, torch_state
    from fedfm.model import set_adapter_state
    from fedfm.scenarios import derive_seed
    from fedfm.train import finetune

    conf = read_run_config(run_dir)  # before RunLog, which would create checkpoints/ in any folder
    log = RunLog(run_dir)
    cfg = RunConfig.from_flower(conf["run_config"])
    backbone, num_beams = conf["backbone"]["path"], conf["model"]["config"]["num_beams"]
    init, _, _ = log.load_checkpoint(0)
    sites = [e for e in load_federation_sites(cfg.federation) if e.role == "train" and e.spec]
    budget = cfg.local_steps * cfg.num_server_rounds
    out = {"local_only": {}, "centralized": {}, "steps": {"per_site": budget, "centralized": budget * len(sites)}}
    train = {e.name: load_site_tasks(e.spec, "train", cfg.cache_dir, cfg.train_max_samples) for e in sites}
    test = {e.name: load_site_tasks(e.spec, "test", cfg.cache_dir, cfg.eval_max_samples) for e in sites}
    model = build_run_model(cfg, num_beams, backbone)
    for e in sites:
        res = local_train(cfg, e.spec, init, 0, num_beams=num_beams, backbone=backbone, steps=budget,
                          tasks=train[e.name])
        set_adapter_state(model, torch_state(res.state))
        out["local_only"][e.name] = score_model(model, test[e.name])
    set_adapter_state(model, torch_state(init))
    pooled = {task: [train[e.name][task] for e in sites] for task in train[sites[0].name]}
    finetune(model, pooled, steps=budget * len(sites), batch_size=cfg.batch_size, lr=cfg.lr,
             dwa_temperature=cfg.dwa_temperature, seed=derive_seed(cfg.seed, "centralized"))
    for e in sites:
        out["centralized"][e.name] = score_model(model, test[e.name])
    return out


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
    from fedfm.report import summarize, load_run, write_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("federation")
    p.add_argument("--out", default=None, help="federated run folder (default: runs/compare-<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--skip-federated", action="store_true", help="reuse the run in --out")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    overrides = {k: _parse_value(v) for k, _, v in (s.partition("=") for s in args.set)}
    overrides.update(federation=str(Path(args.federation).resolve()), **{"out-dir": str(out)})
    try:
        if not args.skip_federated:
            n = sum(1 for e in load_federation_sites(overrides["federation"]) if e.role == "train")
            overrides.setdefault("min-train-nodes", n)
            result = run_federation(overrides, n, ROOT / ".flwr")
            if not result["ok"]:
                print(f"error: federated run {result['status']}: {result['status_details']}", file=sys.stderr)
                return 1
        write_json(out / "compare.json", local_and_central(out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = write_report(out)
    print("\n".join(comparison_lines(summarize(load_run(out)))))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
