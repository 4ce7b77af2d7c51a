"""ServerApp: run config → run setup → strategy.start() with central evaluation → report.

    flwr run . --run-config "num-server-rounds=3 strategy=fedprox fedprox-mu=0.01"

Only adapter state travels. Each round: broadcast the global adapters → sites train
locally → the strategy aggregates (server/strategy.py) → the central evaluator scores
every site (server/evaluator.py; each k-th round with ``eval-every=k``) → a checkpoint
marks the round complete.
"""
from __future__ import annotations

import random
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedfm.config import RunConfig
from fedfm.federated import python_random_state, set_python_random_state, setup_run
from fedfm.report import write_report
from fedfm.runlog import read_json
from server.evaluator import get_evaluate_fn
from server.pretrain_stage import run_pretrain
from server.strategy import build_strategy

# The app folder (a checkout, or $FLWR_HOME/apps/<fab>/): relative input paths resolve here.
APP_DIR = Path(__file__).resolve().parents[1]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)  # out-dir "runs/{run-id}": each `flwr run` its own folder
    if "out-dir" in run_config:
        run_config["out-dir"] = str(run_config["out-dir"]).replace("{run-id}", str(context.run_id))
    cfg = RunConfig.from_flower(run_config, base_dir=APP_DIR)
    try:
        if cfg.stage == "pretrain":
            run_pretrain(grid, cfg)
            return
        run = setup_run(cfg)
    except ValueError as e:  # the line scripts/run_federation.py shows; Flower logs the rest
        print(f"fedfm: error: {e}", flush=True)
        raise
    offset = run.round_offset
    strategy = build_strategy(cfg, run.runlog, run.full_model_bytes, round_offset=offset)
    strategy.set_state(run.strategy_state)
    if run.random_state:  # Flower's own draws; which sites train is seeded per round (server/strategy.py)
        set_python_random_state(random, run.random_state)

    def checkpoint(round_: int, arrays: ArrayRecord) -> None:
        if not strategy.round_complete(round_):
            return
        run.runlog.save_checkpoint(round_, {k: a.numpy() for k, a in arrays.items()}, strategy.get_state(),
                                   {"python_random": python_random_state(random), "seed": cfg.seed,
                                    "backbone_sha256": run.backbone_sha256, "sites": strategy.last_round_sites})

    evaluate = get_evaluate_fn(cfg, run.sites, run.model, run.runlog, on_round_end=checkpoint,
                               personal_for=strategy.site_state)

    site_config = ConfigRecord({"backbone-path": run.backbone, "backbone-sha256": run.backbone_sha256,
                                "num-beams": run.num_beams, "run-key": run.run_key})

    def evaluate_fn(round_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if round_ == 0 and run.resumed:
            # round `offset` was evaluated and checkpointed already, round 0 included (a run
            # stopped in round 1): scoring it again would log its rows twice
            return None
        if not cfg.evaluates_round(round_ + offset):  # eval-every: the round is complete all the same
            checkpoint(round_ + offset, arrays)
            return None
        scores = evaluate(round_ + offset, arrays)
        if round_ == 0 and cfg.fraction_evaluate > 0:
            # Flower's start() evaluates on the sites after rounds 1.. only; round 0 (the heads'
            # classical starts) through the same strategy methods, so a round can be chosen on
            # the sites' val splits against the untrained model too (fedfm.report)
            strategy.aggregate_evaluate(0, grid.send_and_receive(
                strategy.configure_evaluate(0, arrays, ConfigRecord(dict(site_config)), grid),
                timeout=cfg.round_timeout))
        return scores
    remaining = cfg.num_server_rounds - offset
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(v) for k, v in run.initial_state.items()}),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=site_config,
            evaluate_config=ConfigRecord(dict(site_config)),
            evaluate_fn=evaluate_fn,
        )
    report = write_report(run.runlog.dir)
    idle = read_json(run.runlog.dir / "report.json", {}).get("rounds_without_update") or []  # what write_report found
    if idle:  # as report.md says: no checkpoint for those rounds, the run is not its result yet
        print(f"fedfm: run INCOMPLETE: no site update reached the average in round(s) {', '.join(map(str, idle))} "
              f"of {cfg.num_server_rounds}; report at {report}; resume={run.runlog.dir} repeats the last such round",
              flush=True)
    else:
        print(f"fedfm: run complete: {cfg.num_server_rounds} rounds; report at {report}", flush=True)
