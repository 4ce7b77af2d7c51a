#!/usr/bin/env python
"""Rebuild a run's report.md, report.json and plots/ from its files alone.

    python scripts/report.py runs/<run-id>
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.report import write_report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder (holds config.json, metrics.jsonl, ...)")
    args = p.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
