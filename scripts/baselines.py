"""Classical baseline scores of every task on every site of a federation, in one table.

    python scripts/baselines.py scenarios/federations/default.yaml [--split test] [--cache-dir DIR]
        [--max-train N] [--tasks CE,CP]

Each baseline is fitted on the site's own train split and scored on ``--split``; held-out
sites too (a baseline has no federation to be held out from). Rows: task, baseline and
headline metric with its unit (first row per task = the baseline of the average score);
columns: sites.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.baselines import BASELINES, evaluate_baselines  # noqa: E402
from fedfm.data import first_samples, load_site_data  # noqa: E402
from fedfm.metrics import HEADLINE  # noqa: E402
from fedfm.scenarios import SPLITS, ConfigError, load_federation  # noqa: E402
from fedfm.tasks import TASKS  # noqa: E402

# headline metric → (label with unit, how to print it)
SHOWN = {"nmse_db": ("NMSE [dB]", "{:.1f}"), "top1": ("top-1 [%]", "{:.1%}"), "mae_m": ("MAE [m]", "{:.1f}"),
         "mae_db": ("MAE [dB]", "{:.2f}"), "accuracy": ("accuracy [%]", "{:.1%}")}
EXTRA = {"BF": ("top3", "top-3 [%]", "{:.1%}"), "LoS": ("f1", "F1", "{:.3f}")}


def baseline_scores(fed, split: str, cache_dir=None, max_train: int = 0,
                    tasks: tuple[str, ...] = TASKS) -> dict[str, dict[str, dict[str, float]]]:
    """{site: {baseline name: metrics}} for every site of the federation, fitted on the first
    ``max_train`` train samples (0 = all: what a model trained on that many labels had)."""
    from fedfm.evaluate import map_sites

    def scores(spec):
        data = load_site_data(spec, ("train", split), cache_dir)
        if max_train:
            data.splits["train"] = first_samples(data.splits["train"], max_train)
        return evaluate_baselines(data, spec, split, variants=True, tasks=tasks)

    # one site per core, each BLAS call on one thread, as the central evaluator fits its baselines
    return {spec.name: res for spec, res in zip(fed.sites, map_sites(scores, fed.sites))}


def format_table(fed, scores: dict) -> str:
    roles = {s.name: "train" for s in fed.train_sites} | {s.name: "held-out" for s in fed.heldout_sites}
    sites = [s.name for s in fed.sites]
    lines = ["| task | baseline | metric | " + " | ".join(f"{s} ({roles[s]})" for s in sites) + " |",
             "|---|---|---|" + "---:|" * len(sites)]
    for task, names in BASELINES.items():
        if names[0] not in scores[sites[0]]:
            continue  # a task left out by --tasks
        key = HEADLINE[task]
        label, fmt = SHOWN[key]
        rows = [(name, key, label, fmt) for name in names]
        if task in EXTRA:
            rows.append((names[0], *EXTRA[task]))
        for name, key, label, fmt in rows:
            cells = [fmt.format(scores[s][name][key]) for s in sites]
            lines.append(f"| {task} | {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("federation", nargs="?", default="scenarios/federations/default.yaml")
    ap.add_argument("--split", default="test", choices=[s for s in SPLITS if s != "train"])
    ap.add_argument("--cache-dir", default=None, help="default: $FEDFM_CACHE_DIR or ~/.cache/fedfm")
    ap.add_argument("--max-train", type=int, default=0, help="fit on the first N train samples (default 0 = all)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    args = ap.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        print(f"error: --tasks {args.tasks!r}: {', '.join(bad) or 'empty'} not allowed; expected a comma-separated "
              f"subset of {','.join(TASKS)}", file=sys.stderr)
        return 2
    if args.max_train < 0:
        print(f"error: --max-train {args.max_train} is not allowed; expected an integer >= 0 (0 = all)", file=sys.stderr)
        return 2
    try:
        fed = load_federation(args.federation)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        scores = baseline_scores(fed, args.split, args.cache_dir, args.max_train, tasks)
    except ValueError as e:  # a site's data cannot be made or read (the message names the file)
        print(f"error: {e}", file=sys.stderr)
        return 2
    fitted = f"the first {args.max_train} samples of its own train split" if args.max_train else "its own train split"
    print(f"Classical baselines, federation {fed.name!r}, {args.split} split; every site's baselines "
          f"(held-out sites included) fitted on {fitted} ({time.perf_counter() - t0:.0f} s).")
    print(format_table(fed, scores))
    print("NMSE = mean over samples of ‖Ĥ−H‖²/‖H‖² in dB; the first row of each task is the baseline of the "
          "average score. DE/PE-logdist see received power (a reference, not a structure-only baseline).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
