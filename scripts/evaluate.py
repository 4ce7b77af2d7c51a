#!/usr/bin/env python
"""Score a federated run's checkpoint on sites × tasks beside each site's classical baseline.

    python scripts/evaluate.py runs/<id>                                  # its last round, its own sites
    python scripts/evaluate.py runs/<id> --round 0                        # the heads' classical starts
    python scripts/evaluate.py runs/<id> --site my_new_site.yaml          # a base station it never saw
    python scripts/evaluate.py runs/<id> --site my_new_site.yaml --against 0   # and what training changed there
    python scripts/evaluate.py runs/<id> --site scenarios/sites/uma_2g4.yaml \\
        --models runs/<id>/finetune/uma_2g4-0.1-holdout0.2.safetensors   # what finetune_site.py personalised

Each site is scored as the run's central evaluator scores a round (server/evaluator.py): a
training site of the run with its label-fitted starts and, with ``personal-heads`` /
``site-model=local``, its own heads or local model from the checkpoint; a held-out site, or a
site the run's federation does not name ("new"), with the global state and no label of its own.
The baseline is each site's own, fitted on its train split (a new site's data is generated
into the run's cache on first use). On a round the run scored, its own sites get the cells of its
metrics.jsonl (a site the run excluded for its data is left out again, and said so; a round
``eval-every`` skipped is scored as the run would have). ``--models`` scores a site's personalised models instead (``--which kept``:
per task the one the site deploys; ``before`` / ``after``), with its starts and baselines fitted
on the labelled samples it was personalised with, as finetune_site.py's table is.

``--against R`` scores round R too, on the same samples with the same baselines, and adds per
site and task the change of the error ratio with its 95 % paired bootstrap interval.

Writes ``evaluation.md`` (the sites × tasks table of error ratios, with --against the changes,
then every row with its metric and 95 % interval) and ``evaluation.json`` (rows, per-site averages, what was scored)
to ``--out`` (default ``<run>/evaluations/round-NNN[-<sites>][-<models>-<which>][-test<N>][-vsRRR]``);
the JSON, written last, marks the result complete. When anything fails no result is written
(a new site's generated data stays in the cache, as any site's does).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.evaluate import PERSONAL_CHOICES, evaluate_checkpoint, markdown_table  # noqa: E402
from fedfm.runlog import write_json  # noqa: E402
from fedfm.tasks import TASKS  # noqa: E402


def default_out(res: dict, names_given: bool, max_test_given: bool) -> Path:
    """``<run>/evaluations/round-NNN`` plus what makes this evaluation another one: the sites
    when given, the models file and choice, a test budget other than the run's."""
    name = f"round-{res['round']:03d}"
    if names_given:
        sites = "+".join(s["name"] for s in res["sites"])
        if len(sites) > 80:  # many sites: the first and a digest of all
            digest = hashlib.sha256(sites.encode()).hexdigest()[:8]
            sites = f"{res['sites'][0]['name']}+{len(res['sites']) - 1}more-{digest}"
        name += f"-{sites}"
    if res["models"]:
        name += f"-{Path(res['models']['file']).stem}-{res['models']['which']}"
    if max_test_given:
        name += f"-test{res['max_test']}"
    if res["against"]:
        name += f"-vs{res['against']['round']:03d}"
    return Path(res["run"]) / "evaluations" / name


def _cell(row: dict) -> str:
    r, ci = row["ratio"], row.get("ratio_ci")
    if r is None:
        return "—"
    mark = "*" if ci and ci[1] < 1 else "†" if ci and ci[0] > 1 else ""
    return f"{r:.3f}{mark}" if math.isfinite(r) else str(r)


def _avg(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def summary_lines(res: dict) -> list[str]:
    """The sites × tasks table of error ratios, with per-site and per-role averages."""
    rows = {(r["site"], r["task"]): r for r in res["rows"]}
    tasks = [t for t in TASKS if any(k[1] == t for k in rows)]
    s = res["summary"]
    lines = ["| site | role | " + " | ".join(tasks) + " | average |",
             "| --- | --- |" + " ---: |" * (len(tasks) + 1)]
    for site in res["sites"]:
        cells = [_cell(rows[(site["name"], t)]) if (site["name"], t) in rows else "—" for t in tasks]
        lines.append(f"| {site['name']} | {site['role']} | " + " | ".join(cells)
                     + f" | {_avg(s['per_site'].get(site['name']))} |")
    for role, v in s["per_role"].items():
        per_task = [_avg(_mean([rows[(x['name'], t)]["ratio"] for x in res["sites"]
                                if x["role"] == role and (x["name"], t) in rows])) for t in tasks]
        lines.append(f"| mean, {role} sites | | " + " | ".join(per_task) + f" | {_avg(v)} |")
    return lines


def _mean(values: list) -> float | None:
    v = [math.inf if x is not None and math.isnan(x) else x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _num(x: float) -> str:
    # three decimals, as the ratios; a change too small for them (CE's LMMSE start barely moves)
    # in two significant digits, so that a resolved one does not read +0.000 [+0.000, +0.000]
    return f"{x:+.3f}" if abs(x) >= 5e-4 or x == 0 else f"{x:+.1e}"


def _change(c) -> str:
    if c is None:
        return "—"
    mark = "*" if c[2] < 0 else "†" if c[1] > 0 else ""
    return f"{_num(c[0])} [{_num(c[1])}, {_num(c[2])}]{mark}"


def change_lines(res: dict) -> list[str]:
    """With --against: per site and task the change of the error ratio, with its interval."""
    if not res["against"]:
        return []
    change, other = res["against"]["change"], res["against"]["round"]
    tasks = [t for t in TASKS if any(t in c for c in change.values())]
    return [f"Change against round {other}: error ratio at round {res['round']} − at round {other} on the same "
            f"test samples, with its 95 % paired bootstrap interval (the baseline rescored on each draw, a site's "
            f"tasks sharing it for the average); * lower now at 95 %, † higher now at 95 %.", "",
            "| site | " + " | ".join(tasks) + " | average |", "| --- |" + " ---: |" * (len(tasks) + 1),
            *(f"| {site} | " + " | ".join(_change(c.get(t)) for t in tasks) + f" | {_change(c.get('average'))} |"
              for site, c in change.items()), ""]


def _skipped_lines(res: dict) -> list[str]:
    return [f"Left out, as the run's central evaluator left it out: {k['name']} ({k['why']})." for k in res["skipped"]] \
        + ([""] if res["skipped"] else [])


def scored_line(res: dict) -> str:
    m = res["models"]
    what = (f"site {m['site']}'s personalised models ({m['which']}; {m['file']}, from round {m['from_round']}, "
            f"side inputs and baselines fitted on its first {m['labelled_samples']} train samples)"
            if m else f"round {res['round']}'s checkpoint")
    test = "every test sample" if not res["max_test"] else f"the first {res['max_test']} test samples"
    sha = f"backbone sha256 {res['backbone_sha256'][:12]}…" if res["backbone_sha256"] else "backbone hash not recorded"
    return f"Scored: {what}; {sha}; {test} of each site."


def markdown(res: dict) -> str:
    return "\n".join([
        f"# Evaluation of {res['run']}", "",
        scored_line(res), "",
        "Cells: model error ÷ the site's own classical baseline error (NMSE linear for CE/CP/PF, MAE for "
        "DE/PE, 1 − top-1 for BF, 1 − accuracy for LoS; lower is better, 1 = the baseline). * the 95 % "
        "paired-bootstrap interval lies below 1 (beaten at 95 %), † above 1 (lost at 95 %). Roles: train = a "
        "training site of the run, heldout = held out by the run, new = not in the run's federation "
        "(scored as a held-out site).", "",
        *summary_lines(res), "",
        *_skipped_lines(res),
        *change_lines(res),
        "## Every cell", "",
        markdown_table(res["rows"]), ""])


def write_result(res: dict, out: Path) -> tuple[Path, Path]:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "evaluation.md", out / "evaluation.json"
    js.unlink(missing_ok=True)  # the JSON marks a complete result: an earlier one's goes first
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown(res))
    tmp.replace(md)
    write_json(js, res)
    return md, js


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a federated run folder (runs/<id>)")
    p.add_argument("--round", type=int, default=None,
                   help="a complete round (default: the last; with --models the round they were personalised from)")
    p.add_argument("--site", action="append", default=[], metavar="SITE.yaml",
                   help="score this site (repeatable; default: every site of the run's federation)")
    p.add_argument("--models", default=None, help="a site's personalised models (finetune_site.py's .safetensors)")
    p.add_argument("--which", default="kept", help=f"with --models: {', '.join(PERSONAL_CHOICES)} (default kept)")
    p.add_argument("--against", type=int, default=None, metavar="ROUND",
                   help="also score this round on the same samples and give each ratio's change with its 95 %% "
                        "paired interval (e.g. --against 0: what training changed)")
    p.add_argument("--max-test", type=int, default=None,
                   help="the first N test samples of each site (0 = all; default: the run's eval-max-samples)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the run's)")
    p.add_argument("--out", default=None, help="output folder (default: under <run>/evaluations/)")
    args = p.parse_args(argv)
    try:
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():  # before minutes of scoring
            raise ValueError(f"--out {args.out}: is a file, not a folder")
        if args.which in PERSONAL_CHOICES and args.which != "kept" and not args.models:
            raise ValueError(f"--which {args.which!r} chooses among a site's personalised models; give them with "
                             f"--models, or leave --which out")
        res = evaluate_checkpoint(args.run, args.round, args.site, args.models, args.which, args.max_test,
                                  args.device, args.against)
        out = Path(args.out) if args.out else default_out(res, bool(args.site), args.max_test is not None)
        md, js = write_result(res, out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an --out below a file, a full disk
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    print("\n".join([scored_line(res), ""] + summary_lines(res) + [""] + _skipped_lines(res) + change_lines(res)))
    print(f"written: {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
