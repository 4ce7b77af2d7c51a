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
from pathlib import Path

import numpy as np

from fedfm.config import RunConfig
from fedfm.data import load_split
from fedfm.federated import (LocalResult, model_config, numpy_state, resolve_device, round_schedule, round_seed,
                             torch_state)
from fedfm.scenarios import SiteSpec

MASK_TASKS = {"random": "MASK-random", "time": "MASK-time", "frequency": "MASK-frequency"}


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
