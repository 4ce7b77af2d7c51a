"""Write a federation of many base stations: N site YAMLs drawn from the TR 38.901 scenarios
and one federation file that trains them and holds out the default federation's two sites.

    python scripts/make_fleet.py --sites 16 --out runs/fleet16/scenarios          # 16 sites, 128 train samples each
    python scripts/run_federation.py --federation runs/fleet16/scenarios/federation.yaml \\
        --out runs/fleet16/run --set fraction-train=0.25 --set num-server-rounds=8

Site i takes environment UMa, UMi, RMa, InH in turn (so every N of at least 4 has each, and
as many of each as N allows), and from a generator seeded by ``--seed`` and i: its carrier
from that environment's FR1 bands, its UE speeds, its cell radius and its estimation SNR
(ranges below, each a deployment an operator runs). The array and grid stay those of the
default training sites (8 antennas, 64 sub-bands, 16 + 4 slots, the 256-beam mmWave
codebook), so that the held-out sites stay what they are in the default federation: an
unseen band for UMa (2.4 GHz; no fleet UMa site draws it) and an unseen system
configuration (16 antennas, 32 sub-bands). The files are plain site YAMLs, validated by
``fedfm.scenarios`` as they are written; the same arguments write the same bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedfm.scenarios import ENVIRONMENTS, ConfigError, derive_seed, load_federation, load_site, site_from_dict  # noqa: E402

HELDOUT = ("scenarios/sites/uma_2g4.yaml", "scenarios/sites/umi_2g1_n16.yaml")
# Per environment: FR1 carriers [GHz] (n28 700 MHz, n8 900 MHz, n2/n25 1.9, n1 2.1, n41 2.6,
# n78 3.5/3.7, n79 4.7, Wi-Fi-like 5.2 indoors); UE speed ranges [m/s]; 2D distance ranges [m]
# from TR 38.901 Table 7.4.1-1's minima to the cell radii those deployments use.
# UMa leaves out 2.4 GHz: the held-out uma_2g4 is the default federation's unseen band.
ENV_DRAWS = {
    "uma": {"carriers": (0.7, 1.9, 2.1, 2.6, 3.5), "speeds": ((0.0, 3.0), (0.0, 15.0), (10.0, 30.0)),
            "distances": ((35.0, 300.0), (35.0, 500.0))},
    "umi": {"carriers": (2.6, 3.5, 3.7, 4.7), "speeds": ((0.0, 3.0), (0.0, 15.0)),
            "distances": ((10.0, 100.0), (10.0, 200.0))},
    "rma": {"carriers": (0.7, 0.9, 1.9), "speeds": ((0.0, 15.0), (20.0, 35.0), (30.0, 42.0)),
            "distances": ((35.0, 1000.0), (35.0, 2000.0))},
    "inh": {"carriers": (2.4, 3.5, 5.2), "speeds": ((0.0, 2.0),), "distances": ((1.0, 30.0), (1.0, 50.0))},
}
SNRS_DB = (5.0, 10.0, 15.0, 20.0)   # each site's estimates at one SNR (the default sites: 10 dB)


def fleet_site(i: int, seed: int, samples: dict[str, int]) -> dict:
    """Site i of the fleet as a site-YAML mapping (name, environment and every section)."""
    env = ENVIRONMENTS[i % len(ENVIRONMENTS)]
    draws = ENV_DRAWS[env]
    rng = np.random.default_rng(derive_seed(seed, "fleet", i))
    fc = float(draws["carriers"][rng.integers(len(draws["carriers"]))])
    vmin, vmax = draws["speeds"][rng.integers(len(draws["speeds"]))]
    dmin, dmax = draws["distances"][rng.integers(len(draws["distances"]))]
    snr = float(SNRS_DB[rng.integers(len(SNRS_DB))])
    return {
        "name": f"fleet{i:03d}_{env}_{str(fc).replace('.', 'g')}",
        "environment": env, "los_mode": "auto",
        "sub6": {"carrier_ghz": fc, "antennas": 8, "subcarriers": 64, "subcarrier_spacing_khz": 240.0},
        "mmwave": {"carrier_ghz": 28.0, "antennas": 64, "subcarriers": 64, "subcarrier_spacing_khz": 1920.0,
                   "codebook_beams": 256, "oversampling": 4},
        "time": {"history_slots": 16, "horizon_slots": 4, "slot_interval_ms": 0.5},
        "ue": {"speed_min_mps": vmin, "speed_max_mps": vmax, "distance_min_m": dmin, "distance_max_m": dmax},
        "estimation": {"pilot_spacing": 4, "snr_db_min": snr, "snr_db_max": snr},
        "samples": dict(samples),
        "seed": derive_seed(seed, "fleet-site", i),
    }


def write_fleet(out: Path, num_sites: int, seed: int = 0, samples: dict[str, int] | None = None) -> Path:
    """Write ``out/sites/*.yaml`` and ``out/federation.yaml``; returns the federation's path.
    Refuses a folder that already holds files (nothing is overwritten)."""
    if num_sites < 1:
        raise ValueError(f"--sites {num_sites} is not allowed; expected an integer >= 1")
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"--seed {seed} is not allowed; expected an integer in [0, 2^31)")
    samples = samples or {"train": 128, "val": 32, "test": 128}
    for split, n in samples.items():
        if n < 2:
            raise ValueError(f"--{split} {n} is not allowed; expected an integer >= 2 (baselines fit on two samples)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty folder; give a new --out (nothing was written)")
    sites = [fleet_site(i, seed, samples) for i in range(num_sites)]
    specs = [site_from_dict(s, f"{out / 'sites' / s['name']}.yaml") for s in sites]   # a run's validation,
    held = [load_site(ROOT / h) for h in HELDOUT]                                     # before anything is written
    for h in held:
        if h.mmwave.codebook_beams != specs[0].mmwave.codebook_beams:
            raise ValueError(f"{h.path}: mmwave.codebook_beams is {h.mmwave.codebook_beams}, the fleet's "
                             f"{specs[0].mmwave.codebook_beams}; one BF head serves every site (nothing was written)")
        if h.name in {s.name for s in specs}:
            raise ValueError(f"{h.path}: site name {h.name!r} is also a fleet site's (nothing was written)")
    (out / "sites").mkdir(parents=True, exist_ok=True)
    header = (f"# fleet site written by scripts/make_fleet.py --sites {num_sites} --seed {seed} "
              f"(train {samples['train']}, val {samples['val']}, test {samples['test']}); "
              f"a plain site YAML: edit it like any other\n")
    for s in sites:
        (out / "sites" / f"{s['name']}.yaml").write_text(header + yaml.safe_dump(s, sort_keys=False))
    heldout = [os.path.relpath(ROOT / h, out.resolve()) for h in HELDOUT]   # relative, as the repository's own
    fed = {"name": f"fleet{num_sites}",
           "train_sites": [f"sites/{s['name']}.yaml" for s in sites],
           "heldout_sites": heldout}
    path = out / "federation.yaml"
    path.write_text(f"# {num_sites} training sites written by scripts/make_fleet.py (seed {seed}); held out: the "
                    f"default federation's two sites\n" + yaml.safe_dump(fed, sort_keys=False))
    load_federation(path)   # the file a run reads, read back as a run reads it
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, required=True, help="training sites to write")
    ap.add_argument("--out", required=True, help="a new folder: sites/*.yaml and federation.yaml go there")
    ap.add_argument("--seed", type=int, default=0, help="draws of the sites' bands, speeds, radii, SNRs and seeds")
    ap.add_argument("--train", type=int, default=128, help="train samples a site (default 128)")
    ap.add_argument("--val", type=int, default=32, help="validation samples a site (default 32)")
    ap.add_argument("--test", type=int, default=128, help="test samples a site (default 128)")
    args = ap.parse_args(argv)
    try:
        path = write_fleet(Path(args.out), args.sites, args.seed,
                           {"train": args.train, "val": args.val, "test": args.test})
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fed = load_federation(path)
    envs = {e: sum(s.environment == e for s in fed.train_sites) for e in ENVIRONMENTS}
    print(f"wrote {path}: {len(fed.train_sites)} training sites ({', '.join(f'{n} {e}' for e, n in envs.items())}), "
          f"held out {', '.join(s.name for s in fed.heldout_sites)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
