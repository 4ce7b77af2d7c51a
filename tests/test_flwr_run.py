"""One real `flwr run .` end to end: local simulation SuperLink + Ray, 2 sites, tiny preset,
2 rounds, server-side pretraining of the backbone (no checkpoint given), personal PE heads;
then a resumed third round, whose new nodes the server must ask which site they are (a
QUERY message through Ray) to hand each its own head, with federated evaluation on the
sites' validation splits switched on. Own FLWR_HOME in a temp dir; the
SuperLink is stopped by PID in `run_federation`'s finally, also on failure."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fedfm.runlog import read_jsonl
from fl_fixtures import run_config, write_federation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from run_federation import run_federation  # noqa: E402


def test_flwr_run_end_to_end(tmp_path, cache_dir):
    fed = write_federation(tmp_path / "fed")
    rc = run_config(fed, tmp_path / "run", cache_dir, backbone="", **{"personal-heads": "PE"})
    _run(rc, tmp_path, "first")

    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "ledger.jsonl", "baselines.json", "report.md", "report.json"):
        assert (run / name).stat().st_size > 0, name
    conf = json.loads((run / "config.json").read_text())
    assert conf["backbone"]["source"].startswith("central masked pretraining")
    report = json.loads((run / "report.json").read_text())
    assert report["rounds"] == [0, 1, 2]
    scores = [s["avg_score"] for s in report["sites"].values()]
    assert len(scores) == 3 and all(np.isfinite(v) and 0 < v < 100 for v in scores)
    comm = report["communication"]
    assert [r["sites_ok"] for r in comm["per_round"]] == [2, 2]
    assert all(r["bytes_up"] == 2 * comm["adapter_bytes"] for r in comm["per_round"])
    assert 0 < comm["adapter_fraction"] < 1
    assert (run / "checkpoints" / "round-002" / "adapter.safetensors").exists()

    # resume for a third round: fresh SuperNodes, so the server asks them which site they are;
    # with federated evaluation switched on (a resume may change it): each site scores round 3 on
    # its own validation split through Flower's evaluate messages
    _run({**rc, "num-server-rounds": 3, "resume": str(run), "fraction-evaluate": 1.0}, tmp_path, "resumed")
    assert read_jsonl(run / "events.jsonl") == []  # no site error, no rejected update, no timeout
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["source"] == "site-val"]
    assert sorted({(r["round"], r["site"]) for r in val}) == [(3, "alpha"), (3, "beta")]
    assert all(len([r for r in val if r["site"] == s]) == 7 for s in ("alpha", "beta"))
    assert all(np.isfinite(r["nmse_db"]) for r in val if r["task"] == "CE")
    ledger = read_jsonl(run / "ledger.jsonl")
    assert sorted((r["round"], r.get("kind", "train"), r["site"], r["status"]) for r in ledger if r["round"] == 3) == [
        (3, "evaluate", "alpha", "ok"), (3, "evaluate", "beta", "ok"), (3, "train", "alpha", "ok"),
        (3, "train", "beta", "ok")]
    state = load_file(str(run / "checkpoints" / "round-003" / "strategy.safetensors"))
    assert {k.split("/")[1] for k in state if k.startswith("personal/")} == {"alpha", "beta"}


def _run(rc: dict, tmp_path: Path, name: str) -> None:
    with open(tmp_path / f"{name}.log", "w") as log:
        result = run_federation(rc, num_supernodes=2, flwr_home=tmp_path / "flwr-home", num_cpus=1,
                                log=log, timeout_s=600)
    stream = (tmp_path / f"{name}.log").read_text()
    assert result["ok"], f"{result}\n{stream[-3000:]}"
    assert result["status"] == "finished:completed"
    # nothing of ours keeps running: no process mentions this test's FLWR_HOME
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "flwr-home")], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_run_federation_stops_a_run_at_its_timeout_and_leaves_nothing_running(tmp_path, cache_dir):
    # a timer, not a check per log line: the server's silent first minutes (baselines, round 0) stop too
    fed = write_federation(tmp_path / "fed")
    rc = run_config(fed, tmp_path / "run", cache_dir, backbone="")
    with open(tmp_path / "timeout.log", "w") as log:
        result = run_federation(rc, num_supernodes=2, flwr_home=tmp_path / "flwr-home", num_cpus=1,
                                log=log, timeout_s=1)  # spent starting the SuperLink: stops at once
    assert result["timed_out"] and not result["ok"] and result["status"] != "finished:completed"
    assert not (tmp_path / "run" / "report.md").exists()
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "flwr-home")], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_stop_superlink_stops_descendants_in_a_session_of_their_own():
    # as Ray's head and workers are: the simulation runtime starts them in their own session
    # under the SuperLink, so its process group alone does not hold them (an interrupted
    # `make run` of 2026-12-06 left Ray's agents and two ClientApp actors running)
    import os
    import signal
    import time

    import psutil

    from run_federation import stop_superlink

    child = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300'], start_new_session=True); "
             "print(p.pid, flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", child], start_new_session=True, stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    try:
        assert os.getpgid(grandchild) != proc.pid            # the premise: another group
        t0 = time.monotonic()
        stop_superlink(proc, term_wait=2.0)
        try:
            gone = psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        assert gone, "a descendant in its own session survived stop_superlink"
        assert time.monotonic() - t0 < 2.0                   # SIGTERM was enough: no wait for SIGKILL
    finally:
        for pid in (grandchild, proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stop_superlink_stops_the_group_members_that_outlive_the_leader():
    # as flwr-simulation and its Ray workers do once the SuperLink exits on SIGTERM
    import os
    import signal

    from run_federation import stop_superlink

    proc = subprocess.Popen(["bash", "-c", "(trap '' TERM; sleep 300) & sleep 300"], start_new_session=True)
    try:
        import time

        time.sleep(0.5)
        stop_superlink(proc, term_wait=1.0)
        import psutil

        running = []   # members still running (a zombie, killed but not yet reaped by init, runs nothing)
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    running.append(p.pid)
            except (OSError, psutil.Error):
                pass
        assert not running, f"members {running} of the SuperLink's process group survived"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_to_the_launcher_stops_the_run_and_everything_it_started(tmp_path, cache_dir):
    # a job scheduler's time limit or `kill PID` sends SIGTERM, whose default action would end the
    # launcher at once and leave its SuperLink, the simulation and Ray's head running
    import os
    import signal
    import time

    import psutil

    fed = write_federation(tmp_path / "fed")
    run, home = tmp_path / "run", tmp_path / "flwr-home"
    rc = run_config(fed, run, cache_dir, backbone="")
    sets = [a for k, v in rc.items() if k not in ("federation", "out-dir") for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, str(ROOT / "scripts" / "run_federation.py"), "--federation", str(fed),
           "--out", str(run), "--flwr-home", str(home), *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    started = []
    try:
        deadline = time.monotonic() + 180
        while not (run / "config.json").exists():  # the ServerApp runs: SuperLink, simulation and Ray are up
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("flower-superlink" in " ".join(p.cmdline()) for p in started)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-2000:]
        assert not (run / "report.md").exists()
        time.sleep(1.0)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [" ".join(p.cmdline())[:120] for p in left]
    finally:
        for p in [*started, psutil.Process(proc.pid)] if proc.poll() is None else started:
            try:
                p.kill()
            except psutil.Error:
                pass
