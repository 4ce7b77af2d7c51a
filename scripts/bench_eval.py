#!/usr/bin/env python
"""Central evaluator throughput on a run's checkpoint: what a round's scoring costs on N cores.

    python scripts/bench_eval.py runs/<id>                      # its last complete round, 1 core then all
    python scripts/bench_eval.py runs/<id> --round 0 --cores 2 --repeat 3

For each core count, in a fresh process whose CPU affinity holds that many cores (so
``usable_cores()`` and every thread it starts see only those), it builds the server's
``CentralEvaluator`` on the run's sites (their test views and fitted baselines: "set-up", once
per run on the server) and scores the checkpoint's state ``--repeat`` times as the server
scores a round (the first call also fills the pooled heads' side-input cache, so the later
calls are what a run's later rounds cost). It prints each call's seconds, forward passes per
second (sites × tasks × test samples, last call), the process's peak RSS, and whether the scores
equal, bit for bit, those of the first core count and of the run's own ``metrics.jsonl`` for that
round: the evaluator runs each site on one thread, so they should on the CPU that ran it (a
run's own where this code scored it, or on a CPU that sums alike with one thread and with all).
It scores on the CPU whatever device the run names. Writes nothing into the run folder (the
evaluator's files go to a temporary folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows_by_cell(path: Path, round_: int) -> dict:
    from fedfm.runlog import read_jsonl

    return {(r["site"], r["task"]): r for r in read_jsonl(path)
            if r.get("round") == round_ and r.get("source") == "federated"}


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference between two row sets' metrics, cell by cell: 0 where they are
    equal, inf where a cell or field is in one set only or a value differs otherwise than as two
    numbers do (a NaN metric is logged as null)."""
    if set(a) != set(b):
        return math.inf
    worst = 0.0
    for cell, ra in a.items():
        rb = b[cell]
        if set(ra) != set(rb):
            return math.inf
        for k, x in ra.items():
            y = rb[k]
            if x == y:
                continue
            if not (isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y)):
                return math.inf
            worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    return worst


def main(argv=None) -> int:
    try:
        return bench(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def bench(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder (runs/<id>)")
    ap.add_argument("--round", type=int, default=None, help="the checkpoint to score (default: the last complete one)")
    ap.add_argument("--cores", type=int, nargs="+", default=None,
                    help="core counts to measure, in order (default: 1, then every core this process may use)")
    ap.add_argument("--repeat", type=int, default=2, help="scorings per core count (default 2)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one core count, results to this JSON file
    args = ap.parse_args(argv)

    allowed = sorted(os.sched_getaffinity(0))
    cores = args.cores or sorted({1, len(allowed)})
    if any(c < 1 or c > len(allowed) for c in cores):
        raise ValueError(f"--cores {' '.join(map(str, cores))}: this process may use 1 to {len(allowed)} cores")
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat}: expected an integer >= 1")
    if args.child:  # one core count in this fresh process, set before NumPy or torch start a thread
        os.sched_setaffinity(0, allowed[:cores[0]])
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as run_federation.py starts the server

    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedfm.config import load_federation_sites
    from fedfm.evaluate import own_state
    from fedfm.federated import build_run_model, check_backbone, read_run
    from fedfm.runlog import RunLog
    from server.evaluator import CentralEvaluator

    run = read_run(args.run)  # before RunLog, which would create checkpoints/ in any folder
    if run.cfg.stage == "pretrain":
        raise ValueError(f"{args.run}: a federated pretraining run (stage=pretrain) has no task heads to score")
    log = RunLog(args.run)
    rounds = log.complete_rounds()
    if not rounds:
        raise ValueError(f"{args.run}: no complete round to score")
    round_ = rounds[-1] if args.round is None else args.round
    if round_ not in rounds:
        raise ValueError(f"{args.run}: no complete checkpoint for round {round_}; complete rounds: "
                         f"{', '.join(map(str, rounds))}")
    check_backbone(run.backbone, run.backbone_sha256)
    cfg = dataclasses.replace(run.cfg, device="cpu")  # what the cores do: not a GPU the run may name
    sites = load_federation_sites(cfg.federation)
    glob, strategy_state, _ = log.load_checkpoint(round_)  # here too: one line if it cannot be read
    if args.child:  # its fitted side inputs are its own: the process's caches start empty
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in glob.items()})
        model = build_run_model(cfg, run.num_beams, run.backbone)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            ev = CentralEvaluator(cfg, sites, model, RunLog(tmp), lambda site: own_state(strategy_state, site))
            setup = time.perf_counter() - t0
            passes = sum(len(td.targets) for e in ev.sites for td in ev.test_tasks(e).values())
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ev(round_, arrays)
                times.append(time.perf_counter() - t0)
            rows = list(rows_by_cell(Path(tmp) / "metrics.jsonl", round_).values())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.child).write_text(json.dumps({"setup": setup, "times": times, "passes": passes, "rss": rss,
                                                "rows": rows}))
        return 0

    logged = rows_by_cell(log.dir / "metrics.jsonl", round_)
    print(f"run {args.run}, round {round_}; {sum(e.spec is not None for e in sites)} sites; on the CPU, "
          f"each site on one torch thread; each core count in a fresh process")
    print("| cores | set-up s | scoring s (each call) | forward passes/s (last call) | peak RSS MB | "
          "scores vs the first row | vs the run's metrics.jsonl |")
    print("|---:|---:|---|---:|---:|---|---|")

    def same(d):
        return "equal" if d == 0 else "differ (cells or fields)" if math.isinf(d) else f"max rel diff {d:.1e}"

    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in cores:
            out = Path(tmp) / f"cores{n}.json"
            cmd = [sys.executable, __file__, args.run, "--round", str(round_), "--cores", str(n),
                   "--repeat", str(args.repeat), "--child", str(out)]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["failed"])[-1]
                raise ValueError(f"{n} cores: {last.removeprefix('error: ')}")
            res = json.loads(out.read_text())
            rows = {(r["site"], r["task"]): r for r in res["rows"]}
            vs_first = "—" if first is None else same(max_rel_diff(rows, first))
            first = rows if first is None else first
            times = res["times"]
            print(f"| {n} | {res['setup']:.1f} | {' / '.join(f'{t:.1f}' for t in times)} | "
                  f"{res['passes'] / times[-1]:.0f} | {res['rss']:.0f} | {vs_first} | "
                  f"{same(max_rel_diff(rows, logged))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
