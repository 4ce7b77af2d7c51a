#!/usr/bin/env python
"""Masked-reconstruction pretraining of the backbone on a federation's training sites.

    python scripts/pretrain.py scenarios/federations/default.yaml --out runs/pretrain-tiny --preset tiny --steps 2000

Writes OUT/backbone.safetensors + OUT/backbone.json (config, sha256) and OUT/pretrain.json
(loss history; reconstruction NMSE per mask type on every site's test split, held-out
sites included, with the classical filler's NMSE on the same masked samples beside the time
and frequency masks: the last slot held, AR extrapolation across sub-bands). Data: each
site's train split (generated or loaded from the cache).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.config import check_batch_size  # noqa: E402
from fedfm.data import load_split  # noqa: E402
from fedfm.model import ModelConfig, build_model, parameter_summary, save_backbone  # noqa: E402
from fedfm.model.pretrain import CLASSICAL_MASKS, MASK_PRIORS, MASK_TYPES  # noqa: E402
from fedfm.runlog import check_fresh_output  # noqa: E402
from fedfm.scenarios import load_federation  # noqa: E402
from fedfm.train import pretrain, reconstruction_nmse, resolve_device  # noqa: E402


# what a pretraining writes into --out (pretrain.json last: the run is complete once it exists)
PRETRAIN_OUTPUTS = ("backbone.safetensors", "backbone.json", "pretrain.json")


def run_pretraining(federation: str, out: str, preset: str = "tiny", steps: int = 2000, batch_size: int = 32,
                    lr: float = 1e-3, seed: int = 0, device: str | None = None, cache_dir: str | None = None,
                    log=print) -> dict:
    out_dir = Path(out)
    check_fresh_output(out_dir, PRETRAIN_OUTPUTS)
    if steps <= 0 or batch_size <= 0 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--steps {steps}, --batch-size {batch_size}, --lr {lr}: expected positive integers "
                         f"and a finite learning rate > 0")
    if not 0 <= seed < 2 ** 31:  # as the run config's `seed` and make_fleet.py's --seed
        raise ValueError(f"--seed {seed} is not allowed; expected an integer in [0, 2^31)")
    fed = load_federation(federation)
    check_batch_size("--batch-size", batch_size, fed.train_sites)
    device = resolve_device(device)
    cfg = ModelConfig.from_preset(preset, num_beams=fed.num_beams, seed=seed)
    model = build_model(cfg)
    sites = [(spec, load_split(spec, "train", cache_dir)) for spec in fed.train_sites]
    history: list = []
    t0 = time.perf_counter()
    pre = pretrain(model, sites, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                   history=history, log_every=max(1, steps // 20))
    seconds = time.perf_counter() - t0
    recon, reference = {}, {}
    for spec in fed.sites:
        test = load_split(spec, "test", cache_dir)
        role = "train" if spec in fed.train_sites else "heldout"
        recon[spec.name] = {"role": role, **{k: reconstruction_nmse(pre, spec, test, k, seed=seed, device=device)
                                             for k in MASK_TYPES}}
        reference[spec.name] = {k: reconstruction_nmse(None, spec, test, k, seed=seed, patch=cfg.patch)
                                for k in CLASSICAL_MASKS}
        log(f"{spec.name:14s} {role:8s} " + "  ".join(
            f"{k} {recon[spec.name][k]:.4f}" + (f" ({MASK_PRIORS[k]} {reference[spec.name][k]:.4f})"
                                                if k in reference[spec.name] else "") for k in MASK_TYPES))
    # saved only once scored: a failure above leaves no backbone that looks like a finished pretraining
    digest = save_backbone(out_dir / "backbone.safetensors", model,
                           meta={"federation": fed.name, "steps": steps, "seed": seed,
                                 "sites": [s.name for s in fed.train_sites]})
    report = {"federation": fed.name, "preset": preset, "config": cfg.to_dict(), "steps": steps,
              "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(device), "train_seconds": seconds,
              "backbone": str((out_dir / "backbone.safetensors").resolve()), "sha256": digest,
              "params": parameter_summary(model), "history": history,
              "reconstruction_nmse_linear": recon,
              "classical_reference_nmse_linear": reference}
    (out_dir / "pretrain.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("federation")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: CUDA when available)")
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args(argv)
    try:
        r = run_pretraining(a.federation, a.out, a.preset, a.steps, a.batch_size, a.lr, a.seed, a.device, a.cache_dir)
    except ValueError as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 2
    print(f"backbone {r['backbone']} sha256 {r['sha256']} ({r['train_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
