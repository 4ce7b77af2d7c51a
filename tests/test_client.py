"""ClientApp handlers, message in → message out (no Ray): a site trains and replies with
float32 adapter state + metrics; a broken site, a wrong backbone or a bad partition count
reply with an error that names the site."""
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from clients.app import train
from fedfm.config import RunConfig
from fedfm.federated import build_run_model, numpy_state
from fl_fixtures import NUM_BEAMS, make_backbone, run_config, task_identity, train_message, write_federation  # noqa: F401

TASKS = ("CE", "CP", "PF", "BF", "DE", "PE", "LoS")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("client")
    backbone, digest = make_backbone(root / "backbone.safetensors")
    from fedfm.model import get_adapter_state

    state = numpy_state(get_adapter_state(build_run_model(RunConfig(seed=5), NUM_BEAMS, backbone)))
    return root, backbone, digest, state, cache_dir


def _context(rc, pid=0, n=2):
    return Context(run_id=1, node_id=100, node_config={"partition-id": pid, "num-partitions": n},
                   state=RecordDict(), run_config=rc)


def _message(state, backbone, digest, round_=1):
    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    conf = ConfigRecord({"server-round": round_, "backbone-path": backbone, "backbone-sha256": digest,
                         "num-beams": NUM_BEAMS})
    return train_message(arrays, conf)


def test_train_replies_adapter_state_and_metrics(setup, task_identity):
    root, backbone, digest, state, cache = setup
    rc = run_config(write_federation(root / "ok"), root / "run", cache, backbone)
    reply = train(_message(state, backbone, digest), _context(rc))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert set(arrays.keys()) == set(state)
    out = {k: a.numpy() for k, a in arrays.items()}
    assert all(v.dtype == np.float32 and v.shape == state[k].shape and np.isfinite(v).all() for k, v in out.items())
    assert any(not np.array_equal(out[k], state[k]) for k in state)  # it trained
    assert metrics["num-examples"] == 64
    assert metrics["bytes-up"] == sum(v.nbytes for v in out.values())
    assert {f"loss-{t}" for t in TASKS} <= set(metrics.keys())
    assert reply.content["site"]["name"] == "alpha"


def test_same_round_same_state(setup, task_identity):
    # Explicit per-(site, round) seeds: a repeated round reproduces the update bit for bit.
    root, backbone, digest, state, cache = setup
    rc = run_config(write_federation(root / "rep"), root / "run", cache, backbone)
    a = train(_message(state, backbone, digest, 3), _context(rc))
    b = train(_message(state, backbone, digest, 3), _context(rc))
    for k in state:
        np.testing.assert_array_equal(a.content["arrays"][k].numpy(), b.content["arrays"][k].numpy())


def test_broken_site_yaml_replies_named_error(setup, task_identity):
    root, backbone, digest, state, cache = setup
    rc = run_config(write_federation(root / "broken", broken_site=True), root / "run", cache, backbone)
    reply = train(_message(state, backbone, digest), _context(rc, pid=1))
    assert reply.has_error()
    assert reply.error.reason.startswith("site=beta:") and "sub6.antennas" in reply.error.reason


def test_wrong_backbone_hash_refuses_to_train(setup, task_identity):
    root, backbone, digest, state, cache = setup
    rc = run_config(write_federation(root / "hash"), root / "run", cache, backbone)
    reply = train(_message(state, backbone, "0" * 64), _context(rc))
    assert reply.has_error() and "site=alpha:" in reply.error.reason
    assert "backbone.safetensors" in reply.error.reason and "hash" in reply.error.reason


def test_partition_count_mismatch_is_explained(setup, task_identity):
    root, backbone, digest, state, cache = setup
    rc = run_config(write_federation(root / "count"), root / "run", cache, backbone)
    reply = train(_message(state, backbone, digest), _context(rc, pid=0, n=3))
    assert reply.has_error() and "num-supernodes=2" in reply.error.reason


def test_train_max_samples_caps_what_a_site_trains_on(setup, task_identity):
    root, backbone, digest, state, cache = setup
    rc = run_config(write_federation(root / "cap"), root / "run", cache, backbone, **{"train-max-samples": 24})
    reply = train(_message(state, backbone, digest), _context(rc))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] == 24


def test_head_prior_anchors_at_the_heads_as_built_not_as_received(setup, task_identity):
    # head-prior-mu: a site pulls its BF/DE/PE/LoS heads towards the classical start the factory
    # builds, whatever the round hands it. Received 0.5 above that start, with a weight that
    # dwarfs the data gradient, every element of those heads comes back closer to it.
    root, backbone, digest, state, cache = setup
    pooled = [k for k in state if any(f"heads.{t}." in k for t in ("BF", "DE", "PE", "LoS"))]
    assert pooled
    shifted = {k: v + np.float32(0.5) if k in pooled else v for k, v in state.items()}
    rc = run_config(write_federation(root / "prior"), root / "run", cache, backbone,
                    **{"local-steps": 1, "head-prior-mu": 1e6})
    reply = train(_message(shifted, backbone, digest), _context(rc))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    out = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    for k in pooled:
        gap = out[k] - state[k]
        assert (gap < 0.5).all() and (gap > 0).all(), k


def test_head_lr_scale_reaches_the_sites_training(setup, task_identity):
    # head-lr-scale: AdamW's first step moves each parameter by about lr_at(0) (times the scale
    # for the BF/DE/PE/LoS heads), with the same sign whatever the scale, so one local step at
    # scale 5 moves those heads 5x as far as at scale 1 and everything else the same.
    root, backbone, digest, state, cache = setup
    pooled = [k for k in state if any(f"heads.{t}." in k for t in ("BF", "DE", "PE", "LoS"))]
    moved = {}
    for scale in (1.0, 5.0):
        rc = run_config(write_federation(root / f"lrs{scale:g}"), root / f"run-lrs{scale:g}", cache, backbone,
                        **{"local-steps": 1, "head-lr-scale": scale})
        reply = train(_message(state, backbone, digest), _context(rc))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        moved[scale] = {k: a.numpy() - state[k] for k, a in reply.content["arrays"].items()}
    big = [k for k in pooled if np.abs(moved[1.0][k]).max() > 1e-7]
    assert big
    for k in big:
        np.testing.assert_allclose(moved[5.0][k], 5.0 * moved[1.0][k], rtol=1e-3, atol=1e-8, err_msg=k)
    others = [k for k in state if k not in pooled and np.abs(moved[1.0][k]).max() > 1e-7]
    assert others
    for k in others:
        np.testing.assert_allclose(moved[5.0][k], moved[1.0][k], rtol=1e-3, atol=1e-8, err_msg=k)


def test_local_optimizer_keep_continues_the_sites_adam_moments(setup, task_identity, capsys):
    # local-optimizer=keep: a site keeps its AdamW moments on its own disk under the server's
    # run key, continues them the next round (step counts add up), keeps its last two files,
    # and starts afresh, with one line, from a file it cannot read.
    from safetensors.torch import load_file

    root, backbone, digest, state, cache = setup
    rc = run_config(write_federation(root / "keep"), root / "run", cache, backbone,
                    **{"local-steps": 2, "local-optimizer": "keep"})
    folder = cache / "optimizer" / "k1" / "alpha"

    def round_(r, sent):
        msg = _message(sent, backbone, digest, r)
        msg.content["config"]["run-key"] = "k1"
        reply = train(msg, _context(rc))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return {k: a.numpy() for k, a in reply.content["arrays"].items()}

    def steps(r):
        return {float(v) for k, v in load_file(str(folder / f"round-{r:03d}.safetensors")).items() if k.endswith("/step")}

    sent = state
    for r in (1, 2, 3):
        sent = round_(r, sent)
    assert steps(2) == {4.0} and steps(3) == {6.0}
    assert sorted(f.name for f in folder.iterdir()) == ["round-002.safetensors", "round-003.safetensors"]
    (folder / "round-003.safetensors").write_bytes(b"not a safetensors file")
    round_(4, sent)
    assert "round-003.safetensors: unreadable optimizer state" in capsys.readouterr().out
    assert steps(4) == {2.0}
    # the default (reset) writes nothing
    plain = run_config(write_federation(root / "reset"), root / "run", cache, backbone, **{"local-steps": 2})
    msg = _message(state, backbone, digest, 1)
    msg.content["config"]["run-key"] = "k2"
    assert not train(msg, _context(plain)).has_error()
    assert not (cache / "optimizer" / "k2").exists()


def test_head_refit_epochs_refits_only_the_pooled_heads_after_local_training(setup, task_identity):
    # head-refit-epochs: the reply is the plain round's update with the BF/DE/PE/LoS heads then
    # refitted by fedfm.train.refit_heads on the site's own labels, seeded by the round's seed
    import torch

    from fedfm.federated import load_site_tasks, round_seed, torch_state
    from fedfm.model import get_adapter_state, set_adapter_state
    from fedfm.scenarios import load_federation
    from fedfm.train import refit_heads

    root, backbone, digest, state, cache = setup
    fed = write_federation(root / "refit")
    replies = {}
    for epochs, scope in ((0, "head"), (3, "head"), (3, "features")):
        rc = run_config(fed, root / "run", cache, backbone,
                        **{"local-steps": 2, "head-refit-epochs": epochs, "head-refit-scope": scope})
        reply = train(_message(state, backbone, digest, 2), _context(rc))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies[epochs if scope == "head" else scope] = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    pooled = [k for k in state if any(f"heads.{t}." in k for t in ("BF", "DE", "PE", "LoS"))]
    assert pooled and all(np.array_equal(replies[0][k], replies[3][k]) for k in state if k not in pooled)
    # head-refit-scope=features: only the heads' paths from the classical side inputs moved
    moved = {k for k in state if not np.array_equal(replies[0][k], replies["features"][k])}
    paths = {re.search(r"heads\.\w+\.(?:modules_to_save\.default\.)?(\w+)", k).group(1) for k in moved}
    assert moved <= set(pooled) and moved and paths <= {"skip", "gate", "feature_mlp", "spectrum_weight", "spectrum_conv"}
    cfg = RunConfig.from_flower(rc)
    model = build_run_model(cfg, NUM_BEAMS, backbone)
    set_adapter_state(model, torch_state(replies[0]))
    spec = load_federation(fed).train_sites[0]
    info = refit_heads(model, load_site_tasks(spec, "train", str(cache)), epochs=3,
                       seed=round_seed(cfg, spec.name, 2), device="cpu")
    assert any(r["epoch"] > 0 for r in info.values())  # something was refitted, and it is what the site sent
    mine = get_adapter_state(model)
    assert all(torch.equal(mine[k], torch.from_numpy(replies[3][k])) for k in pooled)


@pytest.mark.parametrize("options", [{}, {"head-prior-mu": 1.0, "head-refit-epochs": 2, "local-optimizer": "keep"}],
                         ids=["plain", "prior-refit-keep"])
def test_a_process_keeps_its_sites_tasks_and_a_site_trained_after_another_equals_one_trained_afresh(
        setup, monkeypatch, options):
    import fedfm.federated as fed
    from fedfm.config import load_federation_sites

    root, backbone, _, state, cache = setup
    fed_yaml = write_federation(root / "keep")
    entries = {e.name: e.spec for e in load_federation_sites(str(fed_yaml))}
    cfg = RunConfig.from_flower(run_config(fed_yaml, root / f"run-{len(options)}", cache, backbone, **options),
                                base_dir=root)
    loads, builds = [], []
    real_load, real_build = fed.load_site_tasks, fed.build_run_model
    monkeypatch.setattr(fed, "load_site_tasks", lambda spec, *a, **k: loads.append(spec.name) or real_load(spec, *a, **k))
    monkeypatch.setattr(fed, "build_run_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))

    def trained(name, fresh=False):
        if fresh:  # as in a new process
            fed._TASKS.clear(), fed._MODEL.clear()
        return fed.local_train(cfg, entries[name], state, 1, num_beams=NUM_BEAMS, backbone=backbone,
                               run_key=f"keep-{len(options)}-{name}-{fresh}").state

    try:
        first = trained("alpha", fresh=True)
        trained("beta")
        again = trained("alpha")  # the model as beta's training left it, alpha's tasks from the cache
        assert loads == ["alpha", "beta"] and builds == [1]  # one model for both sites
        assert all(np.array_equal(again[k], first[k]) for k in first)
        assert any(not np.array_equal(again[k], state[k]) for k in state)  # it trained
        assert len(fed._TASKS) == 2 and list(fed._TASKS)[-1][0] == fed.spec_hash(entries["alpha"])  # most recent last

        # a budget below one site's tasks: a new site evicts the others, then a site left out loads again
        monkeypatch.setattr(fed, "site_cache_budget", lambda: 1)
        trained("gamma")
        assert loads == ["alpha", "beta", "gamma"] and list(fed._TASKS)[0][0] == fed.spec_hash(entries["gamma"])
        assert len(fed._TASKS) == 1
        trained("alpha")
        assert loads == ["alpha", "beta", "gamma", "alpha"] and len(fed._TASKS) == 1
        tasks, size = next(iter(fed._TASKS.values()))
        assert size == fed._nbytes(tasks) >= sum(td.inputs.nbytes + td.targets.nbytes for td in tasks.values()) > 0

        # a caller with its own tasks (compare.py, finetune_site.py) adds none to the cache
        fed.local_train(cfg, entries["beta"], state, 1, num_beams=NUM_BEAMS, backbone=backbone, tasks=tasks)
        assert loads == ["alpha", "beta", "gamma", "alpha"] and len(fed._TASKS) == 1
    finally:
        fed._TASKS.clear(), fed._MODEL.clear()
