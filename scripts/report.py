#!/usr/bin/env python
"""Rebuild a run's report.md, report.json and plots/ from its files alone.

    python scripts/report.py runs/<run-id>
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.report import load_run, write_report  # noqa: E402
from fedfm.runlog import CHECKPOINTS, samples_path  # noqa: E402


def check_rebuildable(run_dir: str) -> None:
    """ValueError naming the file when the folder's files cannot give the run's report: a
    corrupt file (as write_report names it), no scores (metrics.jsonl missing or empty), a
    fine-tuning run without its baselines, or a round the central evaluator scored (its
    checkpoint and per-sample errors are there) whose rows metrics.jsonl lacks. Rebuilt from
    them, report.md would be a table of dashes, or say Incomplete and advise a resume that
    repeats nothing, in place of the report the run wrote."""
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
    for line, r in enumerate(run["metrics"], 1):
        if not isinstance(r, dict) or not isinstance(r.get("round"), int) or "source" not in r:
            raise ValueError(f"{metrics}: line {line} is not a row fedfm writes (an object with an integer "
                             f"`round` and a `source`); nothing was rebuilt")
    scored = {r["round"] for r in run["metrics"]
              if isinstance(r, dict) and r.get("source") == "federated" and isinstance(r.get("round"), int)}
    # rounds the central evaluator scored: a complete checkpoint and that round's per-sample errors
    # (written just before its metrics rows); read from the files, since eval-every may change on a
    # resume. Globbed, not through RunLog, which would create checkpoints/ in the folder.
    lost = sorted(r for r in (int(c.name[len("round-"):]) for c in (d / CHECKPOINTS).glob("round-[0-9][0-9][0-9]")
                              if (c / "state.json").is_file() and (c / "adapter.safetensors").is_file())
                  if samples_path(d, f"round-{r:03d}").is_file() and r not in scored)
    if lost:
        raise ValueError(f"{metrics}: lacks the scores of round(s) {', '.join(map(str, lost))}, which "
                         f"{d}/checkpoints and samples/ hold; nothing was rebuilt")


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
