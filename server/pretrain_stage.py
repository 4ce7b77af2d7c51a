"""stage=pretrain on the server: full-state FedAvg of masked reconstruction (fedfm.fedpretrain).

Every round ends in a checkpoint of the full state (only the last is kept), so ``resume=``
continues an interrupted run from its last complete round, as stage=finetune does."""
from __future__ import annotations

import random

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedfm.config import RunConfig
from fedfm.federated import python_random_state, set_python_random_state, state_bytes
from fedfm.fedpretrain import (evaluate_reconstruction, save_federated_backbone, save_pretrain_checkpoint,
                               setup_pretrain_run)
from fedfm.report import write_report
from server.strategy import build_strategy


def run_pretrain(grid: Grid, cfg: RunConfig) -> str:
    """Run the rounds; returns the path of the saved backbone."""
    run = setup_pretrain_run(cfg)
    good = [e for e in run.sites if e.spec is not None]
    offset = run.round_offset
    strategy = build_strategy(cfg, run.runlog, state_bytes(run.state), round_offset=offset)
    strategy.set_state(run.strategy_state)
    if run.random_state:  # Flower's own draws, as an uninterrupted run would have them
        set_python_random_state(random, run.random_state)

    def checkpoint(round_: int, arrays: ArrayRecord) -> None:
        if not strategy.round_complete(round_):
            return
        save_pretrain_checkpoint(run.runlog, round_, {k: a.numpy() for k, a in arrays.items()}, strategy.get_state(),
                                 {"python_random": python_random_state(random), "seed": cfg.seed,
                                  "sites": strategy.last_round_sites})

    def evaluate_fn(round_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if round_ == 0 and offset > 0:
            return None  # resumed: round `offset` was evaluated and checkpointed already
        round_ += offset
        metrics = None
        if cfg.evaluates_round(round_):  # eval-every: round 0, every k-th and the last
            rows = evaluate_reconstruction(cfg, good, {k: a.numpy() for k, a in arrays.items()}, run.num_beams,
                                           round_)
            run.runlog.append_metrics(rows)
            metrics = MetricRecord({f"{r['site']}-{r['task']}-nmse": r["nmse"] for r in rows
                                    if r["source"] == "federated"})
        checkpoint(round_, arrays)  # after the round's metrics: a checkpoint marks a fully logged round
        return metrics

    remaining = cfg.num_server_rounds - offset
    arrays = ArrayRecord({k: Array(v) for k, v in run.state.items()})
    if remaining > 0:
        arrays = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=remaining, timeout=cfg.round_timeout,
                                train_config=ConfigRecord({"stage": "pretrain", "num-beams": run.num_beams}),
                                evaluate_fn=evaluate_fn).arrays
    path = run.runlog.dir / "backbone.safetensors"
    digest = save_federated_backbone(cfg, {k: a.numpy() for k, a in arrays.items()}, run.num_beams, path)
    report = write_report(run.runlog.dir)
    print(f"fedfm: federated backbone saved: {path} (sha256 {digest[:12]}); "
          f"fine-tune with backbone={path}; report: {report}", flush=True)
    return str(path)
