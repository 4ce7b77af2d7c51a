"""A real Ray cluster: a head and a second node started with `ray start` on this host (their own
temp dir and ports, one CPU each), a tiny federation simulated on it with ``--ray-address``.
Its sites must train on both nodes' actors, end with the bits an in-process run of the same
config ends with, and leave the cluster running (the launcher stops only what it started);
the test then stops both nodes by their process groups, also on failure. And the launcher's
check of the address: a malformed one, or one where nothing answers (a stale `ray start`
record), is one line naming where the address came from, before anything is written."""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from fl_fixtures import (InProcessGrid, make_backbone, run_config, server_context, task_identity,  # noqa: F401
                         write_federation)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import run_federation as rf  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
ACTOR = "ray::ClientAppActor"


def _ports(n: int) -> list[int]:
    return [rf.free_port() for _ in range(n)]


def _start_node(temp_dir: str, head_port: int, head: bool) -> int:
    """`ray start` a node of one CPU in a session of its own; returns its process group (the
    daemons `ray start` leaves behind keep the group of the CLI that started them)."""
    agent, grpc, env_agent, metrics, client = _ports(5)
    cmd = [RAY, "start", "--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--temp-dir", temp_dir,
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
           "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics), "--disable-usage-stats"]
    cmd += (["--head", "--port", str(head_port), "--include-dashboard", "false", "--dashboard-port",
             str(rf.free_port()), "--ray-client-server-port", str(client)] if head
            else ["--address", f"127.0.0.1:{head_port}"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-2000:]}")
    except BaseException:  # failed, too slow, or Ctrl-C: what it started so far is not left running
        rf.stop_process_groups([proc.pid], term_wait=5, reap=proc.poll)
        raise
    return proc.pid


def _members(temp_dir: str) -> list[psutil.Process]:
    """The live processes of the cluster: those whose command line names its temp dir."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(temp_dir in a for a in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _raylets(temp_dir: str) -> set[int]:
    return {p.pid for p in _members(temp_dir) if p.info["cmdline"] and p.info["cmdline"][0].endswith("/raylet")}


def _actor_parents() -> set[int]:
    """Parent pids of the live ClientApp actors on this host (whichever Ray runs them)."""
    parents = set()
    for p in psutil.process_iter(["cmdline", "ppid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and (p.info["cmdline"] or [""])[0].startswith(ACTOR):
                parents.add(p.info["ppid"])
        except psutil.Error:
            pass
    return parents


@pytest.fixture
def two_node_cluster():
    """(head address, temp dir, raylet pids): a head and a worker node on this host."""
    temp_dir = tempfile.mkdtemp(prefix="fedfm-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, groups = rf.free_port(), []
    try:
        groups.append(_start_node(temp_dir, port, head=True))
        groups.append(_start_node(temp_dir, port, head=False))
        raylets = _raylets(temp_dir)
        assert len(raylets) == 2, f"expected a raylet per node, found {len(raylets)}"
        yield f"127.0.0.1:{port}", temp_dir, raylets
    finally:
        rf.stop_process_groups(groups, term_wait=5)
        left = _members(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"cluster processes left running: {[p.pid for p in left]}"


def test_a_federation_runs_on_a_two_node_ray_cluster_as_in_process(tmp_path, cache_dir, two_node_cluster,
                                                                    task_identity):
    address, temp_dir, raylets = two_node_cluster
    fed = write_federation(tmp_path / "fed")
    backbone, _ = make_backbone(tmp_path / "backbone.safetensors")
    rc = run_config(fed, tmp_path / "run", cache_dir, backbone=backbone, **{"num-server-rounds": 1})

    seen, done = set(), threading.Event()

    def watch():  # which nodes' raylets the ClientApp actors run under, while the run runs
        while not done.wait(0.3):
            seen.update(_actor_parents())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with open(tmp_path / "run.log", "w") as log:
            result = rf.run_federation(rc, num_supernodes=2, flwr_home=tmp_path / "flwr-home", num_cpus=1,
                                       log=log, timeout_s=600, ray_address=address)
    finally:
        done.set()
        watcher.join()
    stream = (tmp_path / "run.log").read_text()
    assert result["ok"], f"{result}\n{stream[-3000:]}"
    assert result["ray_cluster"] == rf.ray_cluster(address)
    assert f"the sites run on the Ray cluster at {result['ray_cluster']}" in stream
    # one actor per node (one CPU each): both nodes trained (`seen` may also hold the raylets of
    # another Ray instance on this host, a concurrent run's: only the cluster's are asserted)
    assert raylets <= seen, f"actors under {seen}, the cluster's raylets {raylets}"

    # the cluster is left running, without the run's actors (Ray ends a job's actors with it)
    assert _raylets(temp_dir) == raylets
    for _ in range(50):
        if not (_actor_parents() & raylets):
            break
        time.sleep(0.2)
    assert not (_actor_parents() & raylets), "the run's ClientApp actors outlived it on the cluster"

    # the same config in process (no Ray, no SuperLink): the same global adapters, bit for bit
    from server.app import main as server_main

    rc_local = {**rc, "out-dir": str(tmp_path / "inproc")}
    server_main(InProcessGrid(rc_local, 2), server_context(rc_local))
    on_cluster = load_file(str(tmp_path / "run" / "checkpoints" / "round-001" / "adapter.safetensors"))
    in_process = load_file(str(tmp_path / "inproc" / "checkpoints" / "round-001" / "adapter.safetensors"))
    assert on_cluster.keys() == in_process.keys() and len(on_cluster) > 0
    assert all(np.array_equal(on_cluster[k], in_process[k]) for k in on_cluster)


def test_a_ray_address_nothing_answers_at_is_one_line_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    rc = rf.main(["--out", str(out), "--ray-address", f"127.0.0.1:{rf.free_port()}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --ray-address 127.0.0.1:") and "no Ray cluster answers at" in err
    assert not out.exists()

    rc = rf.main(["--out", str(out), "--ray-address", "headnode"])  # no port
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--ray-address headnode" in err and "HOST:PORT" in err, err
    assert not out.exists()


def test_a_stale_ray_start_record_is_named_and_local_ignores_it(tmp_path, monkeypatch):
    # what `ray start --head` leaves in Ray's temp dir; its cluster was stopped without `ray stop`
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp dir is then tmp_path/ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(f"127.0.0.1:{rf.free_port()}")
    with pytest.raises(ValueError, match=r"the cluster `ray start` last recorded in .*ray_current_cluster: "
                                         r"no Ray cluster answers at"):
        rf.ray_cluster(None)
    assert rf.ray_cluster("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert rf.ray_cluster(None) is None
    record.unlink()
    monkeypatch.delenv("RAY_ADDRESS")
    assert rf.ray_cluster(None) is None  # no cluster named: the run starts a Ray instance of its own
