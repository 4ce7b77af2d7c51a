#!/usr/bin/env python
"""Rebuild a run's report.md, report.json and plots/ from its files alone.

    python scripts/report.py runs/<run-id>
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.report import load_run, write_report  # noqa: E402
from fedfm.runlog import RunLog  # noqa: E402


def check_rebuildable(run_dir: str) -> None:
    """ValueError naming the file when the folder's files cannot give the run's report: a
    corrupt file (as write_report names it), no scores (metrics.jsonl missing or empty), a
    fine-tuning run without its baselines, or a checkpoint of a later scored round than the
    last one in metrics.jsonl (its scores are lost). Rebuilt from them, report.md would be a
    table of dashes, or say Incomplete and advise a resume that repeats nothing, in place of
    the report the run wrote."""
    d = Path(run_dir)
    run = load_run(d)  # a missing config.json or a corrupt file: one line naming it
    metrics = d / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{metrics}: not found; the run's scores are in it, so nothing was rebuilt")
    if not run["metrics"]:
        raise ValueError(f"{metrics}: is empty; the run's scores are in it, so nothing was rebuilt")
    rc = run["config"].get("run_config") if isinstance(run["config"].get("run_config"), dict) else {}
    if rc.get("stage", "finetune") == "finetune" and not (d / "baselines.json").is_file():
        raise ValueError(f"{d / 'baselines.json'}: not found; the report's ratios need the baselines the run "
                         f"fitted, so nothing was rebuilt")
    scored = [r["round"] for r in run["metrics"]
              if isinstance(r, dict) and r.get("source") == "federated" and isinstance(r.get("round"), int)]
    every, planned = int(rc.get("eval-every", 1) or 1), rc.get("num-server-rounds")
    checkpointed = [r for r in RunLog(d).complete_rounds() if r % every == 0 or r == planned]  # scored ones
    if scored and checkpointed and max(checkpointed) > max(scored):
        raise ValueError(f"{metrics}: its last scored round is {max(scored)} but {d}/checkpoints holds round "
                         f"{max(checkpointed)}; the scores of the rounds after {max(scored)} are missing, so "
                         f"nothing was rebuilt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder (holds config.json, metrics.jsonl, ...)")
    args = p.parse_args(argv)
    try:
        check_rebuildable(args.run_dir)
        path = write_report(args.run_dir)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
