"""stage=pretrain in process (real ServerApp and ClientApp handlers, no Ray): full-state
FedAvg of masked reconstruction lowers the reconstruction error and leaves a backbone that
verifies and that a finetune-stage model can load."""
import json

import numpy as np
import pytest

from fedfm.runlog import RunLog, read_jsonl
from fl_fixtures import InProcessGrid, run_config, server_context, task_identity, write_federation  # noqa: F401
from server.app import main as server_main

MASKS = {"MASK-random", "MASK-time", "MASK-frequency"}


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, cache_dir):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    root = tmp_path_factory.mktemp("fedpre")
    rc = run_config(write_federation(root), root / "run", cache_dir, stage="pretrain", **{
        "num-server-rounds": 3, "local-steps": 40, "lr": 0.003, "eval-every": 2})
    server_main(InProcessGrid(rc, 2), server_context(rc))
    return rc, RunLog(rc["out-dir"])


def test_reconstruction_improves_on_every_site(pretrain_run):
    _, log = pretrain_run
    rows = [r for r in read_jsonl(log.dir / "metrics.jsonl") if r["source"] == "federated"]
    assert {r["task"] for r in rows} == MASKS
    assert {r["round"] for r in rows} == {0, 2, 3}  # eval-every=2: round 0, every 2nd and the last
    assert {r["site"] for r in rows} == {"alpha", "beta", "gamma"}  # held-out site scored too
    start = {(r["site"], r["task"]): r["nmse"] for r in rows if r["round"] == 0}
    end = {(r["site"], r["task"]): r["nmse"] for r in rows if r["round"] == 3}
    # summed over masks: each site reconstructs better after 3 rounds than at initialisation
    for site in ("alpha", "beta", "gamma"):
        assert sum(end[site, m] for m in MASKS) < sum(start[site, m] for m in MASKS), (start, end)


def test_classical_reference_is_logged_once_beside_the_model(pretrain_run):
    _, log = pretrain_run
    rows = [r for r in read_jsonl(log.dir / "metrics.jsonl") if r["source"] == "classical"]
    assert sorted((r["site"], r["task"], r["method"], r["round"]) for r in rows) == sorted(
        (s, t, m, 0) for s in ("alpha", "beta", "gamma") for t, m in (("MASK-time", "hold"), ("MASK-frequency", "ar")))
    assert all(0.0 < r["nmse"] < 1.0 for r in rows if r["method"] == "ar")  # AR across sub-bands beats zeros


def test_report_tables_the_logged_reconstruction(pretrain_run):
    from fedfm.runlog import read_json

    _, log = pretrain_run
    rows = [r for r in read_jsonl(log.dir / "metrics.jsonl") if r["source"] in ("federated", "classical")]
    report = read_json(log.dir / "report.json")
    assert report["stage"] == "pretrain" and report["final_round"] == 3 and report["rounds_without_update"] == []
    md = (log.dir / "report.md").read_text()
    for r in rows:
        kind = r["task"][len("MASK-"):]
        site = report["sites"][r["site"]]
        if r["source"] == "classical":
            assert site["classical"][kind]["nmse"] == r["nmse"]
            assert f"({r['method']} {r['nmse']:.3f})" in md
        elif r["round"] == 3:
            assert site["final"][kind] == r["nmse"]
            assert f"{site['start'][kind]:.3f} → {r['nmse']:.3f}" in md
    train_time = [r["nmse"] for r in rows if r["round"] == 3 and r["role"] == "train" and r["task"] == "MASK-time"
                  and r["source"] == "federated"]
    assert report["per_round"][-1]["train_time"] == pytest.approx(np.mean(train_time))
    assert (log.dir / "plots" / "reconstruction_vs_round.png").stat().st_size > 10_000
    assert report["backbone"]["sha256"] and report["backbone"]["sha256"][:12] in md


def test_full_state_travels_and_ledger_counts_it(pretrain_run):
    _, log = pretrain_run
    full = log.read_config()["full_state_bytes"]
    ledger = read_jsonl(log.dir / "ledger.jsonl")
    assert {(r["round"], r["site"]) for r in ledger} == {(rnd, s) for rnd in (1, 2, 3) for s in ("alpha", "beta")}
    assert all(r["bytes_up"] == r["bytes_down"] == full and r["status"] == "ok" for r in ledger)


def test_backbone_verifies_and_loads_for_finetuning(pretrain_run):
    from fedfm.config import RunConfig
    from fedfm.federated import build_run_model, check_backbone
    from fedfm.model import load_backbone

    _, log = pretrain_run
    path = log.dir / "backbone.safetensors"
    state, cfg, digest = load_backbone(path)
    assert check_backbone(str(path), digest) == digest
    assert not any("decoder" in k for k in state)  # the decoder is dropped
    model = build_run_model(RunConfig(preset="tiny", seed=5), 32, str(path))
    assert model is not None and all(np.isfinite(v.numpy()).all() for v in state.values())


def test_round_trains_its_slice_of_the_run_schedule(pretrain_run):
    """lr-schedule=run: round 3 of 3 is steps 8–11 of one 12-step warm-up + cosine schedule
    (decaying towards lr/10), not a restart of a 4-step one; lr-schedule=round restarts it."""
    import dataclasses

    import torch

    from fedfm.config import RunConfig, load_federation_sites
    from fedfm.data import load_split
    from fedfm.fedpretrain import initial_state, local_pretrain, new_pretrainer
    from fedfm.federated import round_seed
    from fedfm.train import lr_at, pretrain

    rc, _ = pretrain_run
    cfg = dataclasses.replace(RunConfig.from_flower(rc), **{"local_steps": 4, "num_server_rounds": 3, "lr": 0.01})
    spec = next(e.spec for e in load_federation_sites(cfg.federation) if e.role == "train")
    state = initial_state(cfg, 32)
    got = local_pretrain(cfg, spec, state, 3, num_beams=32).state
    history: list = []
    want = pretrain(new_pretrainer(cfg, 32, state), [(spec, load_split(spec, "train", cfg.cache_dir))], steps=4,
                    batch_size=cfg.batch_size, lr=0.01, seed=round_seed(cfg, spec.name, 3), device="cpu",
                    history=history, log_every=4, schedule=(8, 12)).state_dict()
    assert history[-1]["lr"] == pytest.approx(lr_at(11, 12, 0.01))
    assert history[-1]["lr"] < 0.0012  # near the end of the decay to lr/10, not a restart
    assert all(torch.equal(torch.from_numpy(got[k]), v) for k, v in want.items())
    restarted = local_pretrain(dataclasses.replace(cfg, lr_schedule="round"), spec, state, 3, num_beams=32).state
    assert not all(np.array_equal(restarted[k], got[k]) for k in got)


class _LostServer(InProcessGrid):
    """The server process dies in round ``die_at`` while the sites train (a killed run)."""

    def __init__(self, run_config, num_nodes, die_at):
        super().__init__(run_config, num_nodes)
        self.die_at, self.train_rounds = die_at, 0

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MessageType

        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_rounds += 1
            if self.train_rounds == self.die_at:
                raise KeyboardInterrupt("server killed")
        return super().send_and_receive(messages, timeout=timeout)


def test_resume_after_a_killed_round_equals_the_uninterrupted_run(pretrain_run, tmp_path):
    """Killed in round 3 of 3, resumed: the same backbone bit for bit and the same metrics
    as the uninterrupted run; only the last round's checkpoint is kept."""
    from safetensors.numpy import load_file

    rc_full, full = pretrain_run
    rc = {**rc_full, "out-dir": str(tmp_path / "run")}
    with pytest.raises(KeyboardInterrupt):
        server_main(_LostServer(rc, 2, die_at=3), server_context(rc))
    log = RunLog(tmp_path / "run")
    assert log.complete_rounds() == [2] and not (log.dir / "backbone.safetensors").exists()
    log.append_ledger([{"round": 3, "site": "alpha", "status": "ok", "bytes_down": 0, "bytes_up": 0}])  # torn round
    with pytest.raises(ValueError, match="already holds a run"):  # no resume: the folder is refused
        server_main(InProcessGrid(rc, 2), server_context(rc))
    server_main(InProcessGrid({**rc, "resume": str(log.dir)}, 2), server_context({**rc, "resume": str(log.dir)}))
    a, b = load_file(str(full.dir / "backbone.safetensors")), load_file(str(log.dir / "backbone.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    def rows(d, name):  # all but the wall-clock seconds
        return sorted(json.dumps({k: v for k, v in r.items() if k != "local_time_s"}, sort_keys=True)
                      for r in read_jsonl(d / name))

    assert rows(log.dir, "metrics.jsonl") == rows(full.dir, "metrics.jsonl")
    assert rows(log.dir, "ledger.jsonl") == rows(full.dir, "ledger.jsonl")
    assert log.complete_rounds() == [3] and log.read_config()["resumed_at_rounds"] == [2]
    assert full.complete_rounds() == [3]


def test_resume_that_changes_the_run_is_refused_and_the_run_kept(pretrain_run, tmp_path):
    import shutil

    rc_full, full = pretrain_run
    run = shutil.copytree(full.dir, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for change, message in (({"lr": 0.01}, r"`lr` is 0.01 here but the run was started with 0.003"),
                            ({"stage": "finetune"}, r"`stage` is 'finetune' here but the run was started with "
                                                     r"'pretrain'")):
        rc = {**rc_full, **change, "resume": str(run)}
        with pytest.raises(ValueError, match=rf"^resume={run}: {message}"):
            server_main(InProcessGrid(rc, 2), server_context(rc))
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
