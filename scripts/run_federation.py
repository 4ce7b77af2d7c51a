#!/usr/bin/env python
"""Run the federation with `flwr run .` on a local simulation SuperLink, check the real
outcome, stop the SuperLink, print where the report is. What `make run` calls.

    python scripts/run_federation.py                                  # default federation, tiny preset
    python scripts/run_federation.py --federation scenarios/federations/benchmark.yaml \\
        --set num-server-rounds=5 --set strategy=fedprox --num-cpus 1 --num-gpus 0.25

Why not a bare `flwr run .` (FLOWER_NOTES.md): the local SuperLink it starts keeps running,
re-installs the project for every run unless told not to, and `--stream` exits 0 even when
the run failed. So this script
- uses a project-local FLWR_HOME (.flwr/) and its own free port, so it never talks to
  someone else's SuperLink, and disables runtime dependency installation / update checks;
- starts the SuperLink itself and stops it by PID when done, also on failure or Ctrl-C,
  with every process group under it (Ray's head runs in a session of its own);
- passes absolute paths (the apps run from $FLWR_HOME/apps/... in a cwd nobody chooses);
- sets one simulated SuperNode per training site and Ray resources per site;
- reads the run status with `flwr ls --run-id ID --format json` and checks report.md exists
  (and backbone.safetensors for stage=pretrain).
Exit status 0 only if the run finished:completed and its report (or backbone) exists.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FEDERATION = "scenarios/federations/default.yaml"
sys.path.insert(0, str(ROOT))

from fedfm.config import (RunConfig, check_batch_fits, check_resume_settings, federation_site_paths,  # noqa: E402
                          load_federation_sites, with_recorded_settings)
from fedfm.runlog import check_fresh_run_dir, read_json, read_run_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), PYTHONUNBUFFERED="1",
               # one OpenMP thread per process unless told otherwise: Ray runs one site per CPU,
               # and oversubscribed busy-waiting threads slow small models ~50× on 2 cores
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               # flower-superlink / flower-superexec must be this venv's
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


RAY_LOCAL = "local"  # Ray's own word for "start an instance of this run's own"


def ray_cluster(ray_address: str | None = None) -> str | None:
    """The Ray cluster a run's simulation joins, resolved as Ray's ``ray.init()`` resolves it in
    the simulation process: ``ray_address`` (``--ray-address``), else ``RAY_ADDRESS``, else the
    cluster the last ``ray start --head`` on this host recorded; None when none is named (or
    "local"): a Ray instance of the run's own. ValueError, before anything is started, naming the
    address and where it came from when it is malformed or nothing answers there (a cluster
    stopped without ``ray stop`` leaves its record, and the run would fail deep in its log)."""
    # Ray's own resolution, not a copy of it (private modules: pyproject pins ray==2.55.1, which has them)
    from ray._common.utils import get_ray_address_file
    from ray._private.services import canonicalize_bootstrap_address

    value = ray_address or os.environ.get("RAY_ADDRESS") or ""
    if ray_address:
        source = f"--ray-address {ray_address}"
    elif value:
        source = f"RAY_ADDRESS={value}"
    else:
        source = f"the cluster `ray start` last recorded in {get_ray_address_file(None)}"
    if value == RAY_LOCAL:
        return None
    expected = f"expected HOST:PORT of a running cluster's head (what `ray start --head` prints), or {RAY_LOCAL}"
    if value.startswith("ray://"):
        raise ValueError(f"{source}: a Ray Client address is not supported; {expected}")
    if value and value != "auto" and not _host_port(value):  # here: Ray logs a traceback for some before raising
        raise ValueError(f"{source}: not a HOST:PORT with a port in 1–65535; {expected}")
    try:
        address = canonicalize_bootstrap_address(value or None)
    except (ValueError, ConnectionError) as e:
        raise ValueError(f"{source}: {e}; {expected}") from None
    if address is None:
        return None
    host_port = _host_port(address)  # also a recorded address, which the first check did not see
    if not host_port:
        raise ValueError(f"{source}: {address} is not a HOST:PORT with a port in 1–65535; {expected}")
    try:
        socket.create_connection(host_port, timeout=5).close()
    except OSError as e:
        raise ValueError(f"{source}: no Ray cluster answers at {address} ({e.strerror or e}); start it "
                         f"(`ray start --head`), point --ray-address at a running one, or pass --ray-address "
                         f"{RAY_LOCAL} for a Ray instance of the run's own (`ray stop` clears a stale record)") from None
    return address


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` (IPv6 brackets stripped), None unless the port is in 1–65535."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    return (host, int(port)) if sep and host and port.isdigit() and 0 < int(port) < 65536 else None


def start_superlink(flwr_home: Path, env: dict[str, str], port: int, timeout_s: float = 60.0,
                    simulation: bool = True) -> subprocess.Popen:
    """A SuperLink in its own session (so its SuperExec children stop with it): the simulation
    runtime by default, the deployment runtime (real SuperNodes connect) with simulation=False."""
    state = flwr_home / ("local-superlink" if simulation else "superlink")
    state.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", *(["--simulation"] if simulation else []),
           "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
           "--database", str(state / "state.db"), "--log-file", str(state / "superlink.log"),
           "--disable-runtime-dependency-installation"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {proc.returncode}; see {state}/superlink.log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not become healthy on port {port} within {timeout_s:.0f} s")
    except BaseException:  # not healthy, Ctrl-C or SIGTERM while waiting: not left running
        stop_superlink(proc)
        raise


def _descendant_groups(pid: int) -> list[int]:
    """Process groups of ``pid``'s live descendants other than its own: the simulation runtime
    puts Ray's head (GCS, raylet, agents, actors) in a session of its own under the SuperLink,
    so killing the SuperLink's group alone orphans them (seen 2026-12-06 on an interrupted
    run: Ray's dashboard and runtime-env agents and two ClientApp actors left running).
    psutil (declared in pyproject.toml; peft needs it too) walks the process tree."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    groups = set()
    for c in children:
        try:
            groups.add(os.getpgid(c.pid))
        except OSError:
            pass
    groups.discard(pid)
    return sorted(groups)


def _alive(pgid: int) -> bool:
    """Whether the group has a member that is not a zombie (a container's init may never reap
    the orphans it inherits, and a zombie answers signal 0 but runs nothing)."""
    import psutil

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                return True
        except (OSError, psutil.Error):
            pass
    return False


def stop_superlink(proc: subprocess.Popen, term_wait: float = 15.0) -> None:
    """SIGTERM the SuperLink's process group (it and the SuperExec/simulation it spawned) and
    the groups of its descendants (Ray's head and workers, in a session of their own), then
    SIGKILL what is left of them. The groups, not the leader, decide: the SuperLink exits on
    SIGTERM at once, but the `flwr-simulation` it spawned does not, and once orphaned it runs
    the rest of the federation with its Ray workers (seen 2026-11-24)."""
    groups = [proc.pid, *_descendant_groups(proc.pid)]  # before any signal: the tree is intact now
    stop_process_groups(groups, term_wait, reap=proc.poll)


def stop_process_groups(groups: list[int], term_wait: float = 15.0, reap=None) -> None:
    """SIGTERM every process group in ``groups``, wait up to ``term_wait`` s for them to empty,
    then SIGKILL the ones still running (e.g. the groups of a `ray start` node: its GCS server
    outlives SIGTERM by more than 10 s here). ``reap``: called while waiting, so an exited
    leader that is our child does not keep its group alive as a zombie."""
    reap = reap or (lambda: None)
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
        if sig == signal.SIGKILL:  # only groups still running: an emptied one's id may be reused by now
            groups = [g for g in groups if _alive(g)]
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap()
            if not any(_alive(g) for g in groups):
                return
            time.sleep(0.2)
    reap()


def tee_run_output(stream: subprocess.Popen, log, path: Path) -> str | None:
    """Copy `flwr run --stream`'s output to ``log`` and append it to ``path`` until it ends;
    returns the run id Flower printed (None if it printed none)."""
    run_id = None
    with open(path, "a") as tee:
        for line in stream.stdout:
            log.write(line)
            tee.write(line)
            m = re.search(r"Successfully started run (\d+)", line)
            if m:
                run_id = m.group(1)
    return run_id


def write_run_config(path: Path, values: dict) -> None:
    """A flat TOML file for `flwr run --run-config FILE.toml` (avoids shell quoting of paths)."""
    lines = []
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}")
    path.write_text("\n".join(lines) + "\n")


def run_status(env: dict[str, str], run_id: str, timeout_s: float = 30.0, superlink: str | None = None) -> dict:
    """The run's `flwr ls` record once it is finished (or the last one seen). ``superlink``:
    a SuperLink connection name in $FLWR_HOME/config.toml (default: the configured default)."""
    deadline, rec = time.monotonic() + timeout_s, {}
    conn = [superlink] if superlink else []
    while time.monotonic() < deadline:
        out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", *conn, "--run-id", run_id,
                              "--format", "json"], env=env, capture_output=True, text=True, cwd=ROOT)
        try:
            runs = json.loads(out.stdout).get("runs", [])
            rec = runs[0] if runs else rec
        except json.JSONDecodeError:
            pass
        if str(rec.get("status", "")).startswith("finished"):
            return rec
        time.sleep(1.0)
    return rec


def check_launch_dir(cfg: RunConfig, num_nodes: int | None = None) -> None:
    """ValueError, before anything is written or started, when a launcher cannot run ``cfg``:
    ``{run-id}`` left for the ServerApp (the launcher reads the folder back after the run, so it
    must know its name), a run folder that is a file or already holds a run (unless resuming
    it), a resume of a folder that holds no run or that changes what the run trains (a setting,
    a site YAML: the server's own check), a federation whose sites do not fit together (a site
    twice, two beam counts), a backbone or cache path that cannot be one, or more
    ``min-train-nodes`` than the ``num_nodes`` SuperNodes (default: one per training site) that
    will connect, for which Flower would wait forever."""
    if "{run-id}" in str(cfg.run_dir):
        raise ValueError(f"out-dir {cfg.run_dir}: `{{run-id}}` is filled in by the ServerApp of a bare `flwr run`; "
                         f"a launcher needs the folder's name (--out DIR, default runs/<timestamp>)")
    if cfg.run_dir.exists() and not cfg.run_dir.is_dir():
        raise ValueError(f"{'resume' if cfg.resume else 'out-dir'} {cfg.run_dir}: is a file, not a folder")
    sites = load_federation_sites(cfg.federation)  # one line naming the federation file on a structural fault
    if cfg.resume:
        if not (cfg.run_dir / "config.json").is_file():  # e.g. stopped in the server's backbone pretraining
            raise ValueError(f"resume={cfg.run_dir}: not a run folder (no config.json); "
                             f"start a new run there with --out {cfg.run_dir}")
        check_resume_settings(cfg, read_run_config(cfg.run_dir), sites, cfg.run_dir)
    else:
        check_fresh_run_dir(cfg.run_dir)
    check_batch_fits(cfg, sites)
    num_nodes = sum(e.role == "train" for e in sites) if num_nodes is None else num_nodes
    if cfg.min_train_nodes > num_nodes:
        raise ValueError(f"min-train-nodes={cfg.min_train_nodes} is not allowed: {num_nodes} SuperNode(s) will "
                         f"connect; expected at most {num_nodes} (--set min-train-nodes={num_nodes})")
    if cfg.backbone and not Path(cfg.backbone).is_file():
        raise ValueError(f"backbone={cfg.backbone}: no such file; expected a backbone .safetensors from "
                         f"scripts/pretrain.py, or leave it unset to pretrain one")
    if cfg.cache_dir and Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        raise ValueError(f"cache-dir={cfg.cache_dir}: is a file, not a folder")


def run_federation(overrides: dict, num_supernodes: int, flwr_home: Path, num_cpus: int = 1,
                   num_gpus: float = 0.0, log=sys.stdout, timeout_s: float | None = None,
                   ray_address: str | None = None) -> dict:
    """Start a SuperLink, `flwr run . --stream`, check the outcome, stop the SuperLink.

    ``timeout_s`` (None or 0: no limit) stops the run, and the SuperLink with it, that many
    seconds after the start; the result then has ``timed_out`` True and ``ok`` False.
    ``ray_address``: the Ray cluster the sites run on (:func:`ray_cluster`; default Ray's own
    choice, RAY_ADDRESS or this host's `ray start` cluster, else an instance of the run's own).
    Only what this call started is stopped: a joined cluster keeps running.
    Returns {'run_id', 'status', 'status_details', 'run_dir', 'report', 'wall_s', 'ok', 'timed_out',
    'ray_cluster'}."""
    cfg = RunConfig.from_flower(overrides, base_dir=ROOT)  # validate before starting anything
    run_dir = cfg.run_dir
    check_launch_dir(cfg)
    cluster = ray_cluster(ray_address)
    if cluster:
        log.write(f"fedfm: the sites run on the Ray cluster at {cluster}\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home.mkdir(parents=True, exist_ok=True)
    run_config_file = run_dir / "run_config.toml"
    write_run_config(run_config_file, cfg.to_flower())
    port = free_port()
    env = flwr_env(flwr_home, port)
    if ray_address:  # the simulation's ray.init() reads it; the SuperLink's children inherit env
        env["RAY_ADDRESS"] = ray_address
    t0 = time.monotonic()
    proc = start_superlink(flwr_home, env, port)
    result = {"run_dir": str(run_dir), "run_id": None, "status": "not started", "status_details": "",
              "ray_cluster": cluster}
    try:
        # Flower wants an integer CPU count (a float fails with "'float' object cannot be interpreted
        # as an integer"); the GPU share may be fractional.
        fed = (f"num-supernodes={num_supernodes} client-resources-num-cpus={max(1, int(num_cpus))} "
               f"client-resources-num-gpus={float(num_gpus)}")
        cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "--stream",
               "--run-config", str(run_config_file), "--federation-config", fed]
        stream = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timed_out = threading.Event()

        def stop_at_timeout():  # a timer, not a check per output line: a silent run stops too
            timed_out.set()
            stream.kill()

        timer = threading.Timer(max(0.0, timeout_s - (time.monotonic() - t0)), stop_at_timeout) if timeout_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            result["run_id"] = tee_run_output(stream, log, run_dir / "flwr_run.log")
            stream.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if stream.poll() is None:  # interrupted (Ctrl-C, SIGTERM): the CLI goes with the SuperLink
                stream.kill()
                stream.wait()
        result["timed_out"] = timed_out.is_set()
        if result["run_id"]:
            rec = run_status(env, result["run_id"])
            result.update(status=rec.get("status", "unknown"), status_details=rec.get("status-details", ""))
    finally:
        stop_superlink(proc)
    return run_outcome(result, cfg, t0)


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM (``kill``, a job scheduler's time limit, a cancelled CI job) → SystemExit(143) in
    the main thread, so the launchers' ``finally`` blocks stop what they started, as on Ctrl-C;
    Python's default SIGTERM action ends the process at once and leaves the SuperLink, the
    simulation and Ray running."""
    def stop(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)


def run_outcome(result: dict, cfg: RunConfig, t0: float) -> dict:
    """Adds report, wall_s and ok: the run finished:completed, left its report, every round
    changed the global state, and stage=pretrain saved its backbone checkpoint."""
    report = cfg.run_dir / "report.md"
    try:  # read_json gives {} when there is no report.json
        idle = read_json(cfg.run_dir / "report.json", {}).get("rounds_without_update", [])
    except ValueError:
        idle = ["unknown (report.json unreadable)"]
    made = report.exists() and (cfg.stage != "pretrain" or (cfg.run_dir / "backbone.safetensors").exists())
    result.update(report=str(report), wall_s=time.monotonic() - t0, rounds_without_update=idle,
                  ok=result["status"] == "finished:completed" and made and not idle and not result.get("timed_out"))
    return result


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--federation, --out, --set: the run options every launcher shares."""
    p.add_argument("--federation", default=None,
                   help=f"federation YAML (default: {DEFAULT_FEDERATION}, or the resumed run's)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<timestamp> in the current directory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override, e.g. --set num-server-rounds=5 (repeatable)")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="stop the run after this many seconds (default 0: no limit; `round-timeout` "
                        "bounds a round's wait for sites)")


def timeout_seconds(args: argparse.Namespace) -> float | None:
    """--timeout as a limit in seconds (None: no limit); ValueError when negative or not finite."""
    if not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise ValueError(f"--timeout {args.timeout} is not allowed; expected seconds >= 0 (0 = no limit)")
    return args.timeout or None


def default_min_train_nodes(overrides: dict, num_sites: int) -> int:
    """Every training site each round; with fraction-train f < 1 the ⌊f·N⌋ (at least 1) that
    Flower samples: min-train-nodes is also the floor of Flower's sample, so N would make
    fraction-train a no-op."""
    try:
        f = float(overrides.get("fraction-train", 1.0))
    except (TypeError, ValueError):
        return num_sites  # RunConfig's check names the key and what is allowed
    return num_sites if not 0 < f < 1 else max(1, int(num_sites * f))


def run_overrides(args: argparse.Namespace) -> dict:
    """Run-config overrides from add_run_args' options (absolute federation and out-dir paths);
    ValueError on a --set without '='. With ``--set resume=RUN`` every key not given is the
    resumed run's recorded one (its federation included), not the default."""
    overrides: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _parse_value(value)
    if overrides.get("resume"):
        overrides["resume"] = str(Path(str(overrides["resume"])).expanduser().resolve())
    if args.federation:
        overrides["federation"] = str(Path(args.federation).resolve())
    if "out-dir" in overrides:
        raise ValueError(f"--set out-dir={overrides['out-dir']}: the launchers take the run folder from --out; "
                         f"use --out {overrides['out-dir']}")
    if overrides.get("resume") and args.out and Path(args.out).resolve() != Path(overrides["resume"]):
        raise ValueError(f"--out {args.out} with resume={overrides['resume']}: a resume writes into the resumed "
                         f"run's folder; leave --out unset")
    overrides = with_recorded_settings(overrides)
    overrides.setdefault("federation", str((ROOT / DEFAULT_FEDERATION).resolve()))
    overrides["out-dir"] = str(Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}").resolve())
    RunConfig.from_flower(overrides, base_dir=ROOT)  # every key's type and range, before any is used
    return overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--num-cpus", type=int, default=1, help="Ray CPUs per simulated site (integer)")
    p.add_argument("--num-gpus", type=float, default=None, help="Ray GPU fraction per site (default: 0, or "
                   "1/num-sites when a GPU is visible)")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="the running Ray cluster to simulate the sites on (its head's address, as `ray start "
                        "--head` prints it), or local for a Ray instance of this run's own (default: "
                        "RAY_ADDRESS, else the cluster `ray start` started on this host, else local)")
    p.add_argument("--flwr-home", default=str(ROOT / ".flwr"))
    args = p.parse_args(argv)

    try:
        if args.num_cpus < 1:
            raise ValueError(f"--num-cpus {args.num_cpus} is not allowed; expected an integer >= 1 (Ray CPUs per site)")
        if args.num_gpus is not None and not (math.isfinite(args.num_gpus) and args.num_gpus >= 0):
            raise ValueError(f"--num-gpus {args.num_gpus} is not allowed; expected a GPU share >= 0 per site")
        overrides = run_overrides(args)
        train_sites = [pth for pth, role in federation_site_paths(overrides["federation"]) if role == "train"]
        overrides.setdefault("min-train-nodes", default_min_train_nodes(overrides, len(train_sites)))
        num_gpus = args.num_gpus if args.num_gpus is not None else _default_gpus(len(train_sites))
        result = run_federation(overrides, len(train_sites), Path(args.flwr_home), args.num_cpus, num_gpus,
                                timeout_s=timeout_seconds(args), ray_address=args.ray_address)
    except ValueError as e:  # bad config: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the SuperLink and everything under it are stopped by now
        print("fedfm: interrupted; the run's SuperLink was stopped", file=sys.stderr)
        return 130
    print(f"\nfedfm: run {result['run_id']} {result['status']} in {result['wall_s']:.0f} s "
          f"{result['status_details'] if result['status_details'] != 'N/A' else ''}".rstrip())
    if not result["ok"]:
        for line in first_errors(Path(result["run_dir"]) / "flwr_run.log"):
            print(line, file=sys.stderr)
        if result.get("rounds_without_update"):
            print(f"fedfm: no site update reached the average in round(s) "
                  f"{', '.join(map(str, result['rounds_without_update']))} (site errors: "
                  f"{result['run_dir']}/events.jsonl); such a round writes no checkpoint, so "
                  f"`--set resume={result['run_dir']}` repeats it when it was the last", file=sys.stderr)
        if result.get("timed_out"):
            print(f"fedfm: stopped at --timeout {args.timeout:g} s (the run and its SuperLink were stopped)",
                  file=sys.stderr)
        print(f"fedfm: run FAILED; logs: {result['run_dir']}/flwr_run.log", file=sys.stderr)
        return 1
    print(f"fedfm: report: {result['report']}")
    return 0


def first_errors(log_path: Path, limit: int = 3) -> list[str]:
    """The apps' own one-line errors (``fedfm: error: ...``) in a run's log, first ``limit``."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found = [ln[ln.index("fedfm: error:"):] for ln in lines if "fedfm: error:" in ln]
    return list(dict.fromkeys(found))[:limit]


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _default_gpus(num_sites: int) -> float:
    try:
        import torch

        return round(1.0 / max(num_sites, 1), 3) if torch.cuda.is_available() else 0.0
    except ImportError:
        return 0.0


if __name__ == "__main__":
    stop_cleanly_on_sigterm()  # as a command only (not when a test calls main)
    raise SystemExit(main())
