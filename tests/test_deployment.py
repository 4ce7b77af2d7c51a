"""One real Flower *deployment* end to end: `flower-superlink` without --simulation, one
`flower-supernode` process per training site (2), `flwr run` against that SuperLink, 1 round
at the tiny preset. Own FLWR_HOME in a temp dir; `run_deployment` stops every process it
started in its finally, also on failure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedfm.runlog import read_jsonl
from fl_fixtures import run_config, write_federation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from run_deployment import run_deployment  # noqa: E402


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment (FLWR_HOME of a SuperNode and of the
    SuperExec/ClientApp processes under it) mentions ``text``; not this process."""
    hits = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and (text.encode() in cmdline or text.encode() in environ):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            hits.append(f"{proc.name}: {command[:200]}")
    return hits


def test_deployment_end_to_end(tmp_path, cache_dir):
    fed = write_federation(tmp_path / "fed")
    # with federated evaluation: the SuperNodes score rounds 0 and 1 on their own val splits
    rc = run_config(fed, tmp_path / "run", cache_dir, backbone="", **{"num-server-rounds": 1,
                                                                      "fraction-evaluate": 1.0})
    home = tmp_path / "flwr-home"
    with open(tmp_path / "stream.log", "w") as log:
        result = run_deployment(rc, num_supernodes=2, num_partitions=2, flwr_home=home, log=log, timeout_s=300)
    stream = (tmp_path / "stream.log").read_text()
    assert result["ok"], f"{result}\n{stream[-3000:]}"
    assert result["status"] == "finished:completed"
    assert len(result["pids"]) == 3  # SuperLink + 2 SuperNodes
    # a deployment, not a simulation: the SuperLink ran without --simulation and each site
    # was a SuperNode process of its own
    assert (home / "superlink" / "superlink.log").exists() and not (home / "local-superlink").exists()
    for i in range(2):
        assert any((home / f"supernode-{i}" / "apps").iterdir()), f"SuperNode {i} never received the app"
    # nothing of ours keeps running
    left = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
    assert _processes_mentioning(str(home)) == []

    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "report.md", "report.json"):
        assert (run / name).stat().st_size > 0, name
    report = json.loads((run / "report.json").read_text())
    assert report["rounds"] == [0, 1]
    scores = [s["avg_score"] for s in report["sites"].values()]
    assert len(scores) == 3 and all(np.isfinite(v) and 0 < v < 100 for v in scores)
    comm = report["communication"]
    assert [r["sites_ok"] for r in comm["per_round"]] == [2]
    assert all(r["bytes_up"] == 2 * comm["adapter_bytes"] for r in comm["per_round"])
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["source"] == "site-val"]
    assert sorted({(r["round"], r["site"]) for r in val}) == [(0, "alpha"), (0, "beta"), (1, "alpha"), (1, "beta")]
    assert len(val) == 4 * 7 and all(np.isfinite(r["ratio"]) for r in val)
    choice = report["val_choice"]
    assert choice["rounds"] == [0, 1] and len(choice["per_task"]) == 7 and choice["unchosen"] == []
    assert "### Each task's round chosen on the sites' validation splits" in (run / "report.md").read_text()
