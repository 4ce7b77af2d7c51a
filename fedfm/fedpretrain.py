"""Federated pretraining (``stage=pretrain``): full-backbone FedAvg of masked reconstruction.

A federation builds its backbone without pooling data: the server sends the whole
Pretrainer state (backbone + one-block decoder, float32), every site runs ``local-steps``
of masked reconstruction (random / time / frequency masks, ``fedfm.train.pretrain``) on its
own train split and returns the whole state; the server averages, scores reconstruction
NMSE per mask type on every site's test split, and finally saves the backbone (decoder
dropped) with ``save_backbone`` so that ``stage=finetune`` can start from it. No Flower here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfm.config import RunConfig
from fedfm.data import load_split
from fedfm.federated import (LocalResult, model_config, numpy_state, resolve_device, round_schedule, round_seed,
                             torch_state)
from fedfm.scenarios import SiteSpec

MASK_TASKS = {"random": "MASK-random", "time": "MASK-time", "frequency": "MASK-frequency"}


@dataclass
class PretrainSetup:
    """What the server needs before round 1 of a stage=pretrain run, or before the resumed round."""

    runlog: "RunLog"
    sites: list                      # [SiteEntry]; broken ones carry .error
    num_beams: int
    state: dict[str, np.ndarray]     # the Pretrainer's full state: fresh, or the last complete round's
    strategy_state: dict[str, np.ndarray]
    round_offset: int                # rounds already complete (resume)
    random_state: list | None        # python `random` state to restore (Flower's own draws)


def setup_pretrain_run(cfg: RunConfig) -> PretrainSetup:
    """Open the run folder and load the federation; with ``resume``, check that the run
    there is a stage=pretrain run with the same settings and sites, and continue from its
    last complete round (whose checkpoint holds the full state and the strategy's, e.g.
    FedAvgM's momentum), dropping whatever an interrupted round had logged."""
    from fedfm.config import check_batch_fits, load_federation_sites
    from fedfm.federated import check_resume_settings, check_state_fits, federation_record, state_bytes
    from fedfm.runlog import RunLog, check_fresh_run_dir

    if not cfg.resume:
        check_fresh_run_dir(cfg.run_dir)
    sites = load_federation_sites(cfg.federation)
    check_batch_fits(cfg, sites)  # before the run folder is made
    runlog = RunLog(cfg.run_dir)
    good = [e for e in sites if e.spec is not None]
    if not any(e.role == "train" for e in good):
        raise ValueError(f"{cfg.federation}: no usable training site")
    num_beams = good[0].spec.mmwave.codebook_beams
    state, strategy_state, offset, rstate, previous = initial_state(cfg, num_beams), {}, 0, None, {}
    if cfg.resume and (runlog.dir / "config.json").exists():
        previous = runlog.read_config()
        if previous.get("stage") != "pretrain":
            raise ValueError(f"resume={runlog.dir}: the run there is not a stage=pretrain run; resume it with "
                             f"stage={previous.get('run_config', {}).get('stage', 'finetune')}")
        if "federation" not in previous:
            raise ValueError(f"resume={runlog.dir}: the run was written by a fedfm without pretraining "
                             f"checkpoints; it cannot be resumed: start a new run")
        check_resume_settings(cfg, previous, sites, runlog.dir)
        last = runlog.last_complete_round()
        if last is None:
            raise ValueError(f"resume={runlog.dir}: no complete round to continue from "
                             f"({runlog.dir / 'checkpoints'} is empty); start a new run")
        fresh = state
        state, strategy_state, saved = runlog.load_checkpoint(last)
        check_state_fits(state, fresh, runlog.checkpoint_dir(last))
        offset, rstate = last, saved.get("python_random")
        runlog.truncate_after(last)
    runlog.write_config({"run_config": cfg.to_flower(), "stage": "pretrain",
                         "sites": [{"name": e.name, "role": e.role, "error": e.error} for e in sites],
                         "federation": federation_record(cfg, sites), "full_state_bytes": state_bytes(state),
                         "resumed_at_rounds": previous.get("resumed_at_rounds", []) + ([offset] if previous else [])})
    return PretrainSetup(runlog, sites, num_beams, state, strategy_state, offset, rstate)


def save_pretrain_checkpoint(runlog, round_: int, state: dict[str, np.ndarray],
                             strategy_state: dict[str, np.ndarray], extra: dict) -> None:
    """Checkpoint round ``round_`` (the full state: backbone and decoder) and keep only it."""
    runlog.save_checkpoint(round_, state, strategy_state, extra)
    runlog.drop_checkpoints_before(round_)


def new_pretrainer(cfg: RunConfig, num_beams: int, state: dict[str, np.ndarray] | None = None):
    """The Pretrainer every participant builds from the same config and seed."""
    from fedfm.model.pretrain import Pretrainer

    pre = Pretrainer(model_config(cfg, num_beams))
    if state is not None:
        pre.load_state_dict(torch_state(state))
    return pre


def initial_state(cfg: RunConfig, num_beams: int) -> dict[str, np.ndarray]:
    return numpy_state(new_pretrainer(cfg, num_beams).state_dict())


def local_pretrain(cfg: RunConfig, spec: SiteSpec, state: dict[str, np.ndarray], round_: int, *,
                   num_beams: int) -> LocalResult:
    """One site's masked-reconstruction steps from the received full state."""
    from fedfm.train import pretrain

    t0 = time.perf_counter()
    pre = new_pretrainer(cfg, num_beams, state)
    arrays = load_split(spec, "train", cfg.cache_dir or None)
    seed = round_seed(cfg, spec.name, round_)
    history: list = []
    # lr-schedule=run: this round's slice of one run-long schedule, as in fine-tuning; `round`
    # restarts the warm-up and the decay to lr/10 every round.
    schedule = round_schedule(round_, cfg.local_steps, cfg.num_server_rounds) if cfg.lr_schedule == "run" else None
    pretrain(pre, [(spec, arrays)], steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
             device=resolve_device(cfg.device), history=history, log_every=cfg.local_steps, schedule=schedule)
    losses = {MASK_TASKS[k[len("nmse_"):]]: float(v) for k, v in history[-1].items() if k.startswith("nmse_")}
    return LocalResult(numpy_state(pre.state_dict()), int(arrays["h_sub6"].shape[0]), losses,
                       time.perf_counter() - t0, seed)


def evaluate_reconstruction(cfg: RunConfig, entries, state: dict[str, np.ndarray], num_beams: int,
                            round_: int) -> list[dict]:
    """metrics.jsonl rows: reconstruction NMSE (linear, dB) per site and mask type on the
    test split (first ``eval-max-samples``), training and held-out sites. At round 0 also
    rows with ``"source": "classical"``: the time and frequency masks' classical fillers (last
    slot held, AR across sub-bands; ``fedfm.model.pretrain.MASK_PRIORS``) on the same samples,
    the reference a reconstruction has to beat."""
    from fedfm.model.pretrain import CLASSICAL_MASKS, MASK_PRIORS
    from fedfm.train import reconstruction_nmse

    pre = new_pretrainer(cfg, num_beams, state)
    rows = []
    for e in entries:
        if e.spec is None:
            continue
        arrays = load_split(e.spec, "test", cfg.cache_dir or None)
        if cfg.eval_max_samples:
            arrays = {"h_sub6": arrays["h_sub6"][:cfg.eval_max_samples]}
        for kind, task in MASK_TASKS.items():
            nmse = reconstruction_nmse(pre, e.spec, arrays, kind, seed=cfg.seed, device=resolve_device(cfg.device))
            rows.append({"round": round_, "site": e.name, "role": e.role, "task": task, "source": "federated",
                         "nmse": nmse, "nmse_db": float(10 * np.log10(max(nmse, 1e-12)))})
            if round_ == 0 and kind in CLASSICAL_MASKS:  # the model-free reference, once
                ref = reconstruction_nmse(None, e.spec, arrays, kind, seed=cfg.seed, patch=pre.cfg.patch)
                rows.append({"round": 0, "site": e.name, "role": e.role, "task": task, "source": "classical",
                             "method": MASK_PRIORS[kind], "nmse": ref,
                             "nmse_db": float(10 * np.log10(max(ref, 1e-12)))})
    return rows


def save_federated_backbone(cfg: RunConfig, state: dict[str, np.ndarray], num_beams: int, path: Path) -> str:
    """Save the aggregated backbone (decoder dropped); returns its sha256."""
    from fedfm.model import save_backbone

    path.parent.mkdir(parents=True, exist_ok=True)
    pre = new_pretrainer(cfg, num_beams, state)
    return save_backbone(path, pre, meta={"source": "federated masked pretraining (stage=pretrain)",
                                          "rounds": cfg.num_server_rounds, "local_steps": cfg.local_steps})
