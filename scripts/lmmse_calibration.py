"""Is the Kronecker LMMSE's own error prediction right? Per site, CE and CP: the mean error
variance the estimator predicts for itself over the scored region
(``fedfm.estimators.kron_error_variance``, at the site's nominal SNR, as the dense heads use it
to scale their correction) against the squared error it makes on the test split.

    python scripts/lmmse_calibration.py scenarios/federations/benchmark.yaml [--max-train 2500]
        [--max-test 300] [--cache-dir DIR]

Covariances from the first ``--max-train`` train samples (0 = all), as the heads' prior has
them; both numbers on the per-sample unit-power scale of the task views.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.estimators import kron_error_variance, kron_lmmse, kron_observed  # noqa: E402
from fedfm.federated import load_site_tasks  # noqa: E402
from fedfm.scenarios import ConfigError, load_federation  # noqa: E402


def calibration(spec, cache_dir: str = "", max_train: int = 0, max_test: int = 0) -> dict[str, tuple[float, float]]:
    """{task: (predicted, measured)} mean squared error per scored entry, CE and CP."""
    tds = load_site_tasks(spec, "test", cache_dir, max_samples=max_test, tasks=("CE", "CP"), stats_samples=max_train)
    out = {}
    for task, td in tds.items():
        stats, G = td.extras["stats"], td.known.shape[0]
        obs = kron_observed(td.known)
        snr = 10.0 ** (stats.snr_db / 10.0)
        y = td.inputs[:, obs[0]][:, :, obs[1]][:, :, :, obs[2]]
        est = kron_lmmse(y, stats.covs, obs, snr, G)
        predicted = kron_error_variance(stats.covs, obs, snr, G)[td.region].mean()
        measured = np.mean(np.abs(est - td.targets) ** 2, axis=0)[td.region].mean()
        out[task] = (float(predicted), float(measured))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("federation")
    ap.add_argument("--max-train", type=int, default=0, help="train samples the covariances come from (0 = all)")
    ap.add_argument("--max-test", type=int, default=0, help="test samples scored (0 = all)")
    ap.add_argument("--cache-dir", default="")
    a = ap.parse_args(argv)
    for flag in ("max_train", "max_test"):
        if getattr(a, flag) < 0:
            print(f"--{flag.replace('_', '-')} {getattr(a, flag)} is not allowed; expected an integer >= 0 (0 = all)")
            return 2
    try:
        fed = load_federation(a.federation)
    except ConfigError as e:
        print(e)
        return 2
    print("| site | task | predicted error | measured error | measured / predicted |")
    print("| --- | --- | ---: | ---: | ---: |")
    for spec in fed.sites:
        for task, (pred, meas) in calibration(spec, a.cache_dir, a.max_train, a.max_test).items():
            print(f"| {spec.name} | {task} | {pred:.4f} | {meas:.4f} | {meas / pred:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
