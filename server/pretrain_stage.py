"""stage=pretrain on the server: full-state FedAvg of masked reconstruction (fedfm.fedpretrain)."""
from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedfm.config import RunConfig, load_federation_sites
from fedfm.federated import state_bytes
from fedfm.fedpretrain import evaluate_reconstruction, initial_state, save_federated_backbone
from fedfm.report import write_report
from fedfm.runlog import RunLog, check_fresh_run_dir
from server.strategy import build_strategy


def run_pretrain(grid: Grid, cfg: RunConfig) -> str:
    """Run the rounds; returns the path of the saved backbone."""
    check_fresh_run_dir(cfg.run_dir)  # RunConfig refuses resume with stage=pretrain
    runlog = RunLog(cfg.run_dir)
    sites = load_federation_sites(cfg.federation)
    good = [e for e in sites if e.spec is not None]
    if not any(e.role == "train" for e in good):
        raise ValueError(f"{cfg.federation}: no usable training site")
    num_beams = good[0].spec.mmwave.codebook_beams
    state = initial_state(cfg, num_beams)
    runlog.write_config({"run_config": cfg.to_flower(), "stage": "pretrain",
                         "sites": [{"name": e.name, "role": e.role, "error": e.error} for e in sites],
                         "full_state_bytes": state_bytes(state)})
    strategy = build_strategy(cfg, runlog, state_bytes(state))

    def evaluate_fn(round_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if not cfg.evaluates_round(round_):  # eval-every: round 0, every k-th and the last
            return None
        rows = evaluate_reconstruction(cfg, good, {k: a.numpy() for k, a in arrays.items()}, num_beams, round_)
        runlog.append_metrics(rows)
        return MetricRecord({f"{r['site']}-{r['task']}-nmse": r["nmse"] for r in rows if r["source"] == "federated"})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in state.items()}),
                            num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                            train_config=ConfigRecord({"stage": "pretrain", "num-beams": num_beams}),
                            evaluate_fn=evaluate_fn)
    path = runlog.dir / "backbone.safetensors"
    digest = save_federated_backbone(cfg, {k: a.numpy() for k, a in result.arrays.items()}, num_beams, path)
    report = write_report(runlog.dir)
    print(f"fedfm: federated backbone saved: {path} (sha256 {digest[:12]}); "
          f"fine-tune with backbone={path}; report: {report}", flush=True)
    return str(path)
