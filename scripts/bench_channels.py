"""Channel synthesis throughput: fedfm's pipeline vs a bare Sionna call with the same shapes.

    python scripts/bench_channels.py [scenarios/federations/default.yaml] [--samples 1024]

For every site of the federation it prints samples/s of `fedfm.data.generate_split`
(topology, two bands, labels, best beam, numpy arrays) and of the bare Sionna calls that
produce the same tensors (sub-6 CIR over T+P slots + OFDM response, mmWave CIR + OFDM
response, on a Sionna-generated single-sector topology), measured in the same process,
and their ratio. Target: ratio ≥ 0.8.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.data import CHUNK, generate_split  # noqa: E402
from fedfm.scenarios import ConfigError, load_federation  # noqa: E402


def bare_sionna(spec, samples: int) -> float:
    """Seconds for the bare Sionna calls producing the same tensors as `generate_split`."""
    from sionna.phy import config
    from sionna.phy.channel import cir_to_ofdm_channel, gen_single_sector_topology, subcarrier_frequencies
    from fedfm.channels.synthesis import _model

    config.seed = 1
    sub6 = _model(spec, spec.sub6.carrier_ghz, spec.sub6.antennas)
    mmw = _model(spec, spec.mmwave.carrier_ghz, spec.mmwave.antennas)
    f6 = subcarrier_frequencies(spec.sub6.subcarriers, spec.sub6.subcarrier_spacing_khz * 1e3)
    fm = subcarrier_frequencies(spec.mmwave.subcarriers, spec.mmwave.subcarrier_spacing_khz * 1e3)
    slot_s = spec.time.slot_interval_ms * 1e-3
    t0 = time.perf_counter()
    for i in range(0, samples, CHUNK):
        b = min(CHUNK, samples - i)
        # Sionna has no InH single-sector drop: use its UMi drop with every UT indoor there.
        env = "umi" if spec.environment == "inh" else spec.environment
        topo = gen_single_sector_topology(b, 1, env, min_ut_velocity=spec.ue.speed_min_mps,
                                          max_ut_velocity=spec.ue.speed_max_mps)
        if spec.environment == "inh":
            topo = (*topo[:5], torch.ones_like(topo[5]))
        for model, n_t, fs, freqs in ((sub6, spec.num_slots, 1 / slot_s, f6),
                                      (mmw, 2, 1 / ((spec.time.history_slots - 1) * slot_s), fm)):
            model.set_topology(*topo)
            a, tau = model(n_t, fs)
            cir_to_ofdm_channel(freqs, a[..., -1:] if n_t == 2 else a, tau, normalize=False)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("federation", nargs="?", default="scenarios/federations/default.yaml")
    ap.add_argument("--samples", type=int, default=1024)
    args = ap.parse_args()
    if args.samples <= 0:
        ap.error(f"--samples {args.samples}: expected an integer > 0")
    try:
        fed = load_federation(args.federation)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"torch threads: {torch.get_num_threads()}, samples per site: {args.samples}")
    print(f"{'site':14s} {'env':4s} {'fedfm samp/s':>13s} {'sionna samp/s':>14s} {'ratio':>6s}")
    ratios = []
    for spec in fed.sites:
        generate_split(spec, "test", samples=min(args.samples, 64))  # warm-up (imports, first-call costs)
        t0 = time.perf_counter()
        generate_split(spec, "test", samples=args.samples)
        ours = args.samples / (time.perf_counter() - t0)
        bare = args.samples / bare_sionna(spec, args.samples)
        ratios.append(ours / bare)
        print(f"{spec.name:14s} {spec.environment:4s} {ours:13.0f} {bare:14.0f} {ours / bare:6.2f}", flush=True)
    print(f"min ratio {min(ratios):.2f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
