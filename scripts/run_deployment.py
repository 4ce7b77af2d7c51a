#!/usr/bin/env python
"""Run the federation as a real Flower *deployment* on this host: a SuperLink without
`--simulation`, one `flower-supernode` process per base station, and `flwr run` against that
SuperLink. Checks the real outcome, stops every process it started, prints the report path.

    python scripts/run_deployment.py                                  # default federation, tiny preset
    python scripts/run_deployment.py --federation scenarios/federations/benchmark.yaml \\
        --set num-server-rounds=5 --set strategy=fedprox

Same apps, same run config as scripts/run_federation.py (simulation); what differs:
- `flower-superlink --insecure` (deployment runtime) serves its Fleet, Control and
  ServerAppIo ("Runtime") APIs over HTTP on one free port (Flower 1.41: `--host/--port`;
  the separate `--fleet-api-address/--control-api-address` are deprecated);
- SuperNode i is `flower-supernode --insecure --superlink 127.0.0.1:PORT --node-config
  "partition-id=i num-partitions=N"` with its own ClientAppIo ("Runtime") port (`--port`,
  default 9094, so N nodes on one host need N ports) and its own FLWR_HOME
  ($FLWR_HOME/supernode-i, where it unpacks the app), each in its own session;
- `flwr run` names the SuperLink through a connection `[superlink.fedfm-deployment]` with
  `address = "127.0.0.1:PORT"` and `insecure = true` in $FLWR_HOME/config.toml.
Every process is stopped by process group in a finally (also on failure, Ctrl-C or SIGTERM),
then any process it left behind (the SuperLink starts its SuperExec in a session of its own).
Exit status 0 only if the run finished:completed and its report (or backbone) exists; 1 on
failure; 2 on a bad config.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fedfm.config import RunConfig, federation_site_paths  # noqa: E402
from run_federation import (  # noqa: E402
    add_run_args, check_launch_dir, default_min_train_nodes, flwr_env, free_port, run_outcome, run_overrides,
    run_status, start_superlink, stop_cleanly_on_sigterm, stop_superlink, tee_run_output, timeout_seconds,
    write_run_config)

CONNECTION = "fedfm-deployment"  # the SuperLink connection name in $FLWR_HOME/config.toml


def write_connection(flwr_home: Path, address: str, name: str = CONNECTION) -> None:
    """Add/replace `[superlink.NAME] address=..., insecure=true` in $FLWR_HOME/config.toml,
    keeping whatever else is there (a fresh file gets NAME as its default connection)."""
    import tomli
    import tomli_w

    path = flwr_home / "config.toml"
    conf = tomli.loads(path.read_text()) if path.exists() else {}
    links = conf.setdefault("superlink", {})
    links.setdefault("default", name)
    links[name] = {"address": address, "insecure": True}
    path.write_text(tomli_w.dumps(conf))


def start_supernodes(flwr_home: Path, env: dict[str, str], superlink: str, num_nodes: int, num_partitions: int,
                     timeout_s: float = 60.0) -> list[subprocess.Popen]:
    """SuperNodes for partitions 0..num_nodes-1, each in its own session with its own
    ClientAppIo port and FLWR_HOME; returns once each answers /health on its port."""
    procs: list[subprocess.Popen] = []
    try:
        for i in range(num_nodes):
            home = flwr_home / f"supernode-{i}"
            home.mkdir(parents=True, exist_ok=True)
            port = free_port()
            cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink", superlink,
                   "--node-config", f"partition-id={i} num-partitions={num_partitions}",
                   "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
            with open(home / "supernode.log", "ab") as log:
                proc = subprocess.Popen(cmd, env={**env, "FLWR_HOME": str(home)}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
            proc.port, proc.log = port, home / "supernode.log"  # type: ignore[attr-defined]
            procs.append(proc)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"flower-supernode exited with {proc.returncode}; see {proc.log}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/health", timeout=0.5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower-supernode did not become healthy on port {proc.port} "
                                       f"within {timeout_s:.0f} s; see {proc.log}")
                time.sleep(0.3)
    except BaseException:
        stop_all(procs)
        raise
    return procs


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc; [] elsewhere), also those in other sessions."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Stop each process group (SIGTERM, then SIGKILL), then whatever of their process trees
    outlived them (the SuperLink's SuperExec runs in a session of its own)."""
    tree = [p for proc in procs if proc.poll() is None for p in descendants(proc.pid)]
    for proc in reversed(procs):  # SuperNodes before the SuperLink they would keep reconnecting to
        stop_superlink(proc)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in tree:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.1)
        if not alive:
            return
        tree = alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def run_deployment(overrides: dict, num_supernodes: int, num_partitions: int, flwr_home: Path, log=sys.stdout,
                   timeout_s: float | None = None) -> dict:
    """Start a deployment SuperLink + SuperNodes, `flwr run --stream`, check the outcome, stop
    everything; ``timeout_s`` (None or 0: no limit) stops it that many seconds after the start.
    Returns {'run_id', 'status', 'status_details', 'run_dir', 'report', 'wall_s',
    'ok', 'pids', 'error'}."""
    cfg = RunConfig.from_flower(overrides, base_dir=ROOT)  # validate before starting anything
    run_dir = cfg.run_dir
    check_launch_dir(cfg, num_nodes=num_supernodes)
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = flwr_home.resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    run_config_file = run_dir / "run_config.toml"
    write_run_config(run_config_file, cfg.to_flower())
    port = free_port()
    env = flwr_env(flwr_home, port)
    address = f"127.0.0.1:{port}"
    write_connection(flwr_home, address)
    t0 = time.monotonic()
    result = {"run_dir": str(run_dir), "run_id": None, "status": "not started", "status_details": "",
              "pids": [], "error": ""}
    procs: list[subprocess.Popen] = []
    stream = None
    try:
        procs.append(start_superlink(flwr_home, env, port, simulation=False))
        procs += start_supernodes(flwr_home, env, address, num_supernodes, num_partitions)
        result["pids"] = [p.pid for p in procs]
        cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), CONNECTION, "--stream",
               "--run-config", str(run_config_file)]
        stream = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done = threading.Event()

        def watchdog() -> None:  # the run can wait forever for nodes: time out, and notice dead nodes
            while not done.wait(1.0):
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    result["error"] = f"{dead[0].args[0]} (pid {dead[0].pid}) exited with {dead[0].returncode}"
                elif timeout_s and time.monotonic() - t0 > timeout_s:
                    result["error"] = f"stopped at --timeout {timeout_s:g} s (the run and every process were stopped)"
                else:
                    continue
                stream.kill()
                return

        threading.Thread(target=watchdog, daemon=True).start()
        result["run_id"] = tee_run_output(stream, log, run_dir / "flwr_run.log")
        stream.wait()
        done.set()
        if result["run_id"] and not result["error"]:
            rec = run_status(env, result["run_id"], superlink=CONNECTION)
            result.update(status=rec.get("status", "unknown"), status_details=rec.get("status-details", ""))
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait()
        stop_all(procs)
    return run_outcome(result, cfg, t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--flwr-home", default=str(ROOT / ".flwr" / "deployment"),
                   help="FLWR_HOME of the SuperLink and the CLI; SuperNode i uses FLWR_HOME/supernode-i")
    p.add_argument("--num-supernodes", type=int, default=None,
                   help="SuperNodes to start, playing training sites 0..K-1 (default: all training sites)")
    args = p.parse_args(argv)

    try:
        overrides = run_overrides(args)
        num_sites = len([pth for pth, role in federation_site_paths(overrides["federation"]) if role == "train"])
        num_nodes = num_sites if args.num_supernodes is None else args.num_supernodes
        if not 1 <= num_nodes <= num_sites:
            raise ValueError(f"--num-supernodes {num_nodes}: the federation has {num_sites} training sites "
                             f"(one SuperNode per site, 1..{num_sites})")
        overrides.setdefault("min-train-nodes", default_min_train_nodes(overrides, num_nodes))
        result = run_deployment(overrides, num_nodes, num_sites, Path(args.flwr_home), timeout_s=timeout_seconds(args))
    except ValueError as e:  # bad config: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a SuperLink/SuperNode that did not start
        print(f"fedfm: deployment FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # everything started is stopped by now
        print("fedfm: interrupted", file=sys.stderr)
        return 130
    print(f"\nfedfm: deployment run {result['run_id']} {result['status']} in {result['wall_s']:.0f} s "
          f"{result['status_details'] if result['status_details'] != 'N/A' else ''}".rstrip())
    if not result["ok"]:
        print(f"fedfm: run FAILED{': ' + result['error'] if result['error'] else ''}; logs: "
              f"{result['run_dir']}/flwr_run.log, {args.flwr_home}/superlink/, {args.flwr_home}/supernode-*/",
              file=sys.stderr)
        return 1
    print(f"fedfm: report: {result['report']}")
    return 0


if __name__ == "__main__":
    stop_cleanly_on_sigterm()  # as a command only (not when a test calls main)
    raise SystemExit(main())
