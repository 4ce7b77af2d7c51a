"""Generate (or load from each site's cache) a federation's data and print one table.

    python scripts/dataset_summary.py scenarios/federations/default.yaml [--cache-dir DIR]
    python scripts/dataset_summary.py scenarios/federations/benchmark.yaml --jobs 16   # one process per site and split

``--jobs N`` fills the caches first with N worker processes, one (site, split) each, one
thread each: generation is host work that one process does on one core, so a many-core
machine fills a federation up to N times faster (the benchmark's 6 × 13 000 samples: 176 s
with one process per site and split on the 16 cores of an H100 host, 645 s one after another
here). The arrays are the same bit for bit (each
split has its own seed); each worker holds one split, ~1.4 GB for a benchmark train split.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.data import fill_caches, load_site_data, summarize  # noqa: E402
from fedfm.scenarios import ConfigError, load_federation  # noqa: E402

COLUMNS = [("site", "{:14s}"), ("role", "{:8s}"), ("env", "{:4s}"), ("los_mode", "{:5s}"), ("fc_ghz", "{:5.1f}"),
           ("N", "{:3d}"), ("K", "{:3d}"), ("T+P", "{:3d}"), ("train_n", "{:6d}"), ("val_n", "{:5d}"),
           ("test_n", "{:5d}"), ("los_frac", "{:5.2f}"), ("dist_m_mean", "{:7.1f}"), ("pl_db_mean", "{:6.1f}"),
           ("speed_mps_mean", "{:5.1f}"), ("beams_used", "{:4d}")]


def summary_table(fed, cache_dir=None) -> list[dict]:
    rows = []
    for role, sites in (("train", fed.train_sites), ("held-out", fed.heldout_sites)):
        for spec in sites:
            rows.append({"role": role, **summarize(load_site_data(spec, cache_dir=cache_dir))})
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(f.format(r[c]) for c, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("federation", nargs="?", default="scenarios/federations/default.yaml")
    ap.add_argument("--cache-dir", default=None, help="default: $FEDFM_CACHE_DIR or ~/.cache/fedfm")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes generating (site, split) pairs at once (default 1: one after another)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs} is not allowed; expected an integer >= 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        fed = load_federation(args.federation)
        if args.jobs > 1:
            fill_caches(fed.sites, args.cache_dir, args.jobs)
        rows = summary_table(fed, args.cache_dir)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Federation {fed.name!r}: {len(fed.train_sites)} training sites, {len(fed.heldout_sites)} held out "
          f"(data ready in {time.perf_counter() - t0:.0f} s; means over each site's train split)")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
