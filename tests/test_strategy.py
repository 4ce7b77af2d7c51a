"""Strategy factory: aggregation of adapter states vs hand-computed averages, the byte
ledger vs the arrays' sizes, rejection of NaN / malformed updates, site-named errors,
FedAdam state round trip. Messages are built by hand; no Ray, no SuperLink."""
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedfm.config import RunConfig
from fedfm.runlog import RunLog, read_jsonl
from server.strategy import build_strategy

FULL_MODEL_BYTES = 10_000


class FakeGrid:
    """Just what FedAvg.configure_train asks of a Grid: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


@pytest.fixture(autouse=True)
def task_identity():
    # Message() stamps run/node ids from the running task; outside Flower we set them.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def arrays(**named):
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in named.items()})


def reply(to: Message, site: str, n: int, **named) -> Message:
    content = RecordDict({"arrays": arrays(**named),
                          "metrics": MetricRecord({"num-examples": n, "loss-CE": float(n), "local-time-s": 0.5}),
                          "site": ConfigRecord({"name": site})})
    return Message(content, reply_to=to)


def send(strategy, global_arrays, nodes=(11, 22, 33), round_=1):
    msgs = list(strategy.configure_train(round_, global_arrays, ConfigRecord(), FakeGrid(nodes)))
    return {m.metadata.dst_node_id: m for m in msgs}


def test_fedavg_weighted_average_and_ledger(tmp_path):
    # Prepare
    log = RunLog(tmp_path)
    strategy = build_strategy(RunConfig(min_train_nodes=3), log, FULL_MODEL_BYTES)
    glob = arrays(a=np.zeros((2, 3)), b=np.zeros(4))
    sent = send(strategy, glob)
    a1, b1 = np.arange(6.0).reshape(2, 3), np.ones(4)
    a2, b2 = np.full((2, 3), 3.0), np.full(4, 5.0)
    replies = [reply(sent[11], "siteA", 1, a=a1, b=b1), reply(sent[22], "siteB", 3, a=a2, b=b2),
               Message(Error(1, "site=siteC: ValueError: broken YAML"), reply_to=sent[33])]
    # Execute
    agg, metrics = strategy.aggregate_train(1, replies)
    # Assert: (1·x1 + 3·x2) / 4 by hand
    np.testing.assert_allclose(agg["a"].numpy(), (a1 + 3 * a2) / 4, rtol=1e-6)
    np.testing.assert_allclose(agg["b"].numpy(), np.full(4, (1 + 15) / 4), rtol=1e-6)
    assert metrics["loss-CE"] == pytest.approx((1 * 1 + 3 * 3) / 4)
    ledger = {r["site"]: r for r in read_jsonl(tmp_path / "ledger.jsonl")}
    payload = (6 + 4) * 4  # float32 elements × 4 bytes
    assert ledger["siteA"]["bytes_down"] == ledger["siteB"]["bytes_down"] == ledger["siteC"]["bytes_down"] == payload
    assert ledger["siteA"]["bytes_up"] == ledger["siteB"]["bytes_up"] == payload
    assert ledger["siteA"]["wire_bytes_up"] >= payload  # serialised arrays carry small headers
    assert ledger["siteC"] == {**ledger["siteC"], "status": "error", "bytes_up": 0}
    assert all(r["full_model_bytes"] == FULL_MODEL_BYTES and r["round"] == 1 for r in ledger.values())
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["site"] for e in events] == ["siteC"] and "broken YAML" in events[0]["message"]
    losses = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["source"] == "train"]
    assert {(r["site"], r["task"], r["loss"]) for r in losses} == {("siteA", "CE", 1.0), ("siteB", "CE", 3.0)}


def test_nan_and_malformed_updates_are_rejected(tmp_path):
    strategy = build_strategy(RunConfig(min_train_nodes=3), RunLog(tmp_path), FULL_MODEL_BYTES)
    glob = arrays(a=np.zeros(3))
    sent = send(strategy, glob)
    replies = [reply(sent[11], "good", 2, a=[1.0, 2.0, 3.0]),
               reply(sent[22], "nan", 5, a=[np.nan, 0.0, 0.0]),
               reply(sent[33], "wrong", 5, a=[1.0, 2.0])]  # wrong shape
    agg, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(agg["a"].numpy(), [1.0, 2.0, 3.0])  # only the good site counts
    status = {r["site"]: r["status"] for r in read_jsonl(tmp_path / "ledger.jsonl")}
    assert status == {"good": "ok", "nan": "rejected", "wrong": "rejected"}
    # a rejected update was uploaded all the same: its bytes count (3 and 2 float32 values)
    assert {r["site"]: r["bytes_up"] for r in read_jsonl(tmp_path / "ledger.jsonl")} == {
        "good": 12, "nan": 12, "wrong": 8}
    messages = {e["site"]: e["message"] for e in read_jsonl(tmp_path / "events.jsonl")}
    assert "NaN" in messages["nan"] and "shape" not in messages["nan"]
    assert "float32[2]" in messages["wrong"] and "float32[3]" in messages["wrong"]


def test_all_updates_unusable_keeps_global_state(tmp_path):
    strategy = build_strategy(RunConfig(min_train_nodes=2), RunLog(tmp_path), FULL_MODEL_BYTES)
    sent = send(strategy, arrays(a=np.zeros(2)), nodes=(1, 2))
    replies = [Message(Error(1, "site=x: no data"), reply_to=sent[1]), reply(sent[2], "y", 1, a=[np.inf, 0])]
    assert strategy.aggregate_train(1, replies) == (None, None)


def test_missing_reply_is_a_timeout_in_the_ledger(tmp_path):
    strategy = build_strategy(RunConfig(min_train_nodes=2), RunLog(tmp_path), FULL_MODEL_BYTES)
    sent = send(strategy, arrays(a=np.zeros(2)), nodes=(1, 2))
    strategy.aggregate_train(1, [reply(sent[1], "fast", 1, a=[1, 1])])
    status = sorted(r["status"] for r in read_jsonl(tmp_path / "ledger.jsonl"))
    assert status == ["ok", "timeout"]


def test_aggregation_order_does_not_depend_on_reply_order():
    # Resume equivalence needs bit-identical sums: replies are sorted by site name first.
    rng = np.random.default_rng(0)
    vals = {s: (rng.normal(size=257) * 1e3).astype(np.float32) for s in ("a", "b", "c")}
    weight = {"a": 1, "b": 7, "c": 3}
    outs = []
    for order in (("a", "b", "c"), ("c", "b", "a"), ("b", "c", "a")):
        strategy = build_strategy(RunConfig(min_train_nodes=3), None, FULL_MODEL_BYTES)
        msgs = list(send(strategy, arrays(w=np.zeros(257))).values())
        replies = [reply(m, s, weight[s], w=vals[s]) for m, s in zip(msgs, order)]
        outs.append(strategy.aggregate_train(1, replies)[0]["w"].numpy())
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    np.testing.assert_allclose(outs[0], sum(weight[s] * vals[s] for s in vals) / 11, rtol=1e-5)


def test_fedprox_sends_mu_and_fedadam_state_round_trip():
    prox = build_strategy(RunConfig(strategy="fedprox", fedprox_mu=0.3, min_train_nodes=1), None, 1)
    msg = next(iter(send(prox, arrays(a=np.zeros(2)), nodes=(5,)).values()))
    assert msg.content["config"]["proximal-mu"] == pytest.approx(0.3)

    adam = build_strategy(RunConfig(strategy="fedadam", fedadam_eta=0.1, min_train_nodes=1), None, 1)
    sent = send(adam, arrays(a=np.zeros(2)), nodes=(5,))
    agg, _ = adam.aggregate_train(1, [reply(sent[5], "s", 1, a=[1.0, -1.0])])
    state = adam.get_state()
    assert set(state) == {"m_t/a", "v_t/a"}
    np.testing.assert_allclose(state["m_t/a"], 0.1 * np.array([1.0, -1.0]), rtol=1e-6)  # (1-β1)·Δ
    fresh = build_strategy(RunConfig(strategy="fedadam", fedadam_eta=0.1, min_train_nodes=1), None, 1)
    fresh.set_state(state)
    np.testing.assert_array_equal(fresh.m_t["a"], state["m_t/a"])
    assert agg["a"].numpy()[0] > 0 > agg["a"].numpy()[1]


def test_round_offset_numbers_rounds_for_resume(tmp_path):
    strategy = build_strategy(RunConfig(min_train_nodes=1), RunLog(tmp_path), 1, round_offset=4)
    sent = send(strategy, arrays(a=np.zeros(1)), nodes=(9,), round_=1)
    assert sent[9].content["config"]["server-round"] == 5
    strategy.aggregate_train(1, [reply(sent[9], "s", 1, a=[1.0])])
    assert read_jsonl(tmp_path / "ledger.jsonl")[0]["round"] == 5


def test_fedavgm_server_momentum_by_hand_and_its_state_resumes():
    def cfg():
        return RunConfig(strategy="fedavgm", server_lr=2.0, server_momentum=0.5, min_train_nodes=2)

    m = build_strategy(cfg(), None, 1)
    sent = send(m, arrays(a=[1.0, 1.0]), nodes=(1, 2))
    # round 1: average of the sites (weights 1, 3) = [0, 2]; pseudo-gradient g1 = old - avg = [1, -1];
    # momentum v1 = g1; new = old - 2·v1 = [-1, 3]
    agg, _ = m.aggregate_train(1, [reply(sent[1], "s1", 1, a=[0.0, 0.0]), reply(sent[2], "s2", 3, a=[0.0, 8 / 3])])
    np.testing.assert_allclose(agg["a"].numpy(), [-1.0, 3.0], rtol=1e-6)
    state = m.get_state()
    np.testing.assert_allclose(state["momentum/00000"], [1.0, -1.0], rtol=1e-6)
    # round 2 from a resumed strategy: avg [-1, 2] → g2 = [0, 1]; v2 = 0.5·v1 + g2 = [0.5, 0.5];
    # new = [-1, 3] - 2·[0.5, 0.5] = [-2, 2]
    resumed = build_strategy(cfg(), None, 1)
    resumed.set_state(state)
    sent = send(resumed, agg, nodes=(1, 2), round_=2)
    agg2, _ = resumed.aggregate_train(2, [reply(sent[1], "s1", 1, a=[-1.0, 2.0]),
                                          reply(sent[2], "s2", 1, a=[-1.0, 2.0])])
    np.testing.assert_allclose(agg2["a"].numpy(), [-2.0, 2.0], rtol=1e-6)


class QueryGrid(FakeGrid):
    """FakeGrid that also answers QUERY messages: node id → site name, as clients.app.query."""

    def __init__(self, sites):
        super().__init__(list(sites))
        self.sites, self.queried = sites, []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == "query"
            self.queried.append(m.metadata.dst_node_id)
            out.append(Message(RecordDict({"site": ConfigRecord({"name": self.sites[m.metadata.dst_node_id]})}),
                               reply_to=m))
        return out


def test_personal_heads_stay_with_their_site_and_survive_a_resume():
    # Prepare: the PE head is personal, the LoRA weight and the CE head are shared
    cfg = RunConfig(min_train_nodes=2, personal_heads="PE")
    lora, ce, pe = "base_model.model.lora_A", "base_model.model.heads.CE.fc.weight", "base_model.model.heads.PE.fc.weight"
    glob = {lora: np.zeros(2), ce: np.zeros(2), pe: np.zeros(2)}
    strategy = build_strategy(cfg, None, 1)
    grid = QueryGrid({1: "east", 2: "west"})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays(**glob), ConfigRecord(), grid)}
    assert grid.queried == []  # round 1: nothing personal yet, every site starts from the global state
    east = {lora: [1.0, 1.0], ce: [2.0, 2.0], pe: [10.0, 10.0]}
    west = {lora: [3.0, 3.0], ce: [4.0, 4.0], pe: [30.0, 50.0]}
    # Execute: aggregate round 1 (weights 1 and 3), configure round 2
    agg, _ = strategy.aggregate_train(1, [reply(sent[1], "east", 1, **east), reply(sent[2], "west", 3, **west)])
    nxt = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, agg, ConfigRecord(), grid)}
    # Assert: the global state is the weighted FedAvg of everything, PE head included (for the held-out
    # sites and sites not seen yet); each site gets back its own PE head and the global rest
    np.testing.assert_allclose(agg[lora].numpy(), [2.5, 2.5])          # (1·1 + 3·3) / 4
    np.testing.assert_allclose(agg[pe].numpy(), [25.0, 40.0])          # (10 + 3·30)/4, (10 + 3·50)/4
    np.testing.assert_array_equal(nxt[1].content["arrays"][pe].numpy(), [10.0, 10.0])
    np.testing.assert_array_equal(nxt[2].content["arrays"][pe].numpy(), [30.0, 50.0])
    for node in (1, 2):
        np.testing.assert_allclose(nxt[node].content["arrays"][ce].numpy(), [3.5, 3.5])  # (2 + 3·4) / 4
        np.testing.assert_allclose(nxt[node].content["arrays"][lora].numpy(), [2.5, 2.5])
    assert grid.queried == []  # the round-1 replies named the sites
    assert set(strategy.personal) == {"east", "west"} and set(strategy.personal["east"]) == {pe}
    # Resume: a fresh strategy with the checkpointed state and new node ids asks who is who
    state = strategy.get_state()
    resumed = build_strategy(cfg, None, 1, round_offset=1)
    resumed.set_state(state)
    grid2 = QueryGrid({7: "west", 8: "east"})
    again = {m.metadata.dst_node_id: m for m in resumed.configure_train(1, agg, ConfigRecord(), grid2)}
    assert sorted(grid2.queried) == [7, 8]
    np.testing.assert_array_equal(again[7].content["arrays"][pe].numpy(), [30.0, 50.0])
    np.testing.assert_array_equal(again[8].content["arrays"][pe].numpy(), [10.0, 10.0])


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_personal_heads_global_copy_is_their_plain_average_under_a_server_step(strategy):
    # Prepare: a server step (FedAvgM server-lr 2, FedAdam) on everything; the PE head is personal
    cfg = RunConfig(min_train_nodes=2, personal_heads="PE", strategy=strategy,
                    **({"server_lr": 2.0} if strategy == "fedavgm" else {}))  # FedAdam has its own eta
    lora, pe = "base_model.model.lora_A", "base_model.model.heads.PE.fc.weight"
    strat = build_strategy(cfg, None, 1)
    grid = QueryGrid({1: "east", 2: "west"})
    glob = arrays(**{lora: np.zeros(2), pe: np.zeros(2)})
    for rnd, (east, west) in enumerate((([1.0, 1.0], [3.0, 5.0]), ([2.0, 2.0], [4.0, 6.0])), start=1):
        sent = {m.metadata.dst_node_id: m for m in strat.configure_train(rnd, glob, ConfigRecord(), grid)}
        # Execute: sites reply with a LoRA and their own PE heads, weights 1 and 3
        glob, _ = strat.aggregate_train(rnd, [reply(sent[1], "east", 1, **{lora: east, pe: east}),
                                              reply(sent[2], "west", 3, **{lora: west, pe: west})])
        # Assert: the PE head is the weighted average of the copies, never extrapolated; the
        # shared LoRA does get the server step (FedAvgM: 0 + 2·(average − 0) in round 1)
        expected = (np.asarray(east) + 3 * np.asarray(west)) / 4
        assert all(a.numpy().dtype == np.float32 for a in glob.values())  # round 2's float32 replies must fit it
        np.testing.assert_allclose(glob[pe].numpy(), expected, rtol=1e-6)
        if strategy == "fedavgm" and rnd == 1:
            np.testing.assert_allclose(glob[lora].numpy(), 2 * expected, rtol=1e-6)


def test_local_models_are_kept_for_scoring_never_sent_back_and_survive_a_resume():
    # Prepare: site-model=local with a personal PE head; two sites reply with their local models
    cfg = RunConfig(min_train_nodes=2, personal_heads="PE", site_model="local")
    lora, pe = "base_model.model.lora_A", "base_model.model.heads.PE.fc.weight"
    strategy = build_strategy(cfg, None, 1)
    grid = QueryGrid({1: "east", 2: "west"})
    glob = arrays(**{lora: np.zeros(2), pe: np.zeros(2)})
    assert strategy.site_state("east") == {}  # round 0: every site is scored with the global state
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, glob, ConfigRecord(), grid)}
    east = {lora: [1.0, 2.0], pe: [10.0, 10.0]}
    west = {lora: [3.0, 6.0], pe: [30.0, 50.0]}
    # Execute
    agg, _ = strategy.aggregate_train(1, [reply(sent[1], "east", 1, **east), reply(sent[2], "west", 1, **west)])
    nxt = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, agg, ConfigRecord(), grid)}
    # Assert: the average is unchanged by keeping local models, and each site trains on from the
    # aggregate LoRA (not its own local one) with its own PE head; it is scored with its whole reply
    np.testing.assert_allclose(agg[lora].numpy(), [2.0, 4.0])
    for node, own_pe in ((1, [10.0, 10.0]), (2, [30.0, 50.0])):
        np.testing.assert_allclose(nxt[node].content["arrays"][lora].numpy(), [2.0, 4.0])
        np.testing.assert_array_equal(nxt[node].content["arrays"][pe].numpy(), own_pe)
    np.testing.assert_array_equal(strategy.site_state("west")[lora], [3.0, 6.0])
    np.testing.assert_array_equal(strategy.site_state("west")[pe], [30.0, 50.0])
    # a resumed strategy scores each site with the same local model
    resumed = build_strategy(cfg, None, 1, round_offset=1)
    resumed.set_state(strategy.get_state())
    np.testing.assert_array_equal(resumed.site_state("east")[lora], [1.0, 2.0])
    # without site-model=local only the personal heads are loaded over the global state
    plain = build_strategy(RunConfig(min_train_nodes=2, personal_heads="PE"), None, 1)
    plain.set_state(strategy.get_state())
    assert set(plain.site_state("east")) == {pe}
    with pytest.raises(ValueError, match=r"`site-model` = 'own'.*one of global, local"):
        RunConfig(site_model="own")


def test_personal_adapters_stay_with_their_site_and_only_the_rest_takes_the_server_step():
    # Prepare: FedAvgM server-lr 2; the CE input adapter and the PE head are personal, the LoRA and
    # the CP input adapter shared
    cfg = RunConfig(min_train_nodes=2, personal_heads="PE", personal_adapters="CE", strategy="fedavgm",
                    server_lr=2.0)
    lora, a_ce, a_cp, pe = ("base_model.model.lora_A", "base_model.model.adapters.CE.fc.weight",
                            "base_model.model.adapters.CP.fc.weight", "base_model.model.heads.PE.fc.weight")
    strat = build_strategy(cfg, None, 1)
    grid = QueryGrid({1: "east", 2: "west"})
    glob = arrays(**{k: np.zeros(2) for k in (lora, a_ce, a_cp, pe)})
    sent = {m.metadata.dst_node_id: m for m in strat.configure_train(1, glob, ConfigRecord(), grid)}
    east = {lora: [1.0, 1.0], a_ce: [5.0, 5.0], a_cp: [2.0, 2.0], pe: [10.0, 10.0]}
    west = {lora: [3.0, 3.0], a_ce: [-1.0, 7.0], a_cp: [4.0, 4.0], pe: [30.0, 50.0]}
    # Execute: aggregate round 1 (weights 1 and 3), configure round 2
    agg, _ = strat.aggregate_train(1, [reply(sent[1], "east", 1, **east), reply(sent[2], "west", 3, **west)])
    nxt = {m.metadata.dst_node_id: m for m in strat.configure_train(2, agg, ConfigRecord(), grid)}
    # Assert: shared keys take the server step from 0: 2·(1·1 + 3·3)/4 = 5, 2·(2 + 3·4)/4 = 7;
    # the personal adapter's global copy is the plain weighted average (for held-out sites)
    np.testing.assert_allclose(agg[lora].numpy(), [5.0, 5.0])
    np.testing.assert_allclose(agg[a_cp].numpy(), [7.0, 7.0])
    np.testing.assert_allclose(agg[a_ce].numpy(), [0.5, 6.5])          # (5 − 3)/4, (5 + 21)/4
    # each site gets back its own CE adapter and PE head, and the shared rest
    for node, mine in ((1, east), (2, west)):
        got = nxt[node].content["arrays"]
        np.testing.assert_array_equal(got[a_ce].numpy(), mine[a_ce])
        np.testing.assert_array_equal(got[pe].numpy(), mine[pe])
        np.testing.assert_allclose(got[a_cp].numpy(), [7.0, 7.0])
    assert set(strat.personal["west"]) == {a_ce, pe} and set(strat.site_state("west")) == {a_ce, pe}
    # a resume that keeps the heads but no longer the adapters restores only the heads
    heads_only = build_strategy(RunConfig(min_train_nodes=2, personal_heads="PE"), None, 1)
    heads_only.set_state(strat.get_state())
    assert set(heads_only.personal["west"]) == {pe}


def test_personal_heads_config_is_checked():
    assert RunConfig(personal_heads="PE, LoS").personal_tasks == ("PE", "LoS")
    assert RunConfig(personal_heads="all").personal_tasks == ("CE", "CP", "PF", "BF", "DE", "PE", "LoS")
    assert RunConfig().personal_tasks == ()
    assert RunConfig(personal_adapters="all").personal_adapter_tasks == RunConfig(personal_heads="all").personal_tasks
    assert RunConfig(personal_adapters="CP,CE").personal_adapter_tasks == ("CE", "CP")
    with pytest.raises(ValueError, match=r"`personal-heads` = 'PE,los'.*comma-separated list of CE"):
        RunConfig(personal_heads="PE,los")
    with pytest.raises(ValueError, match=r"`personal-adapters` = 'heads'.*comma-separated list of CE"):
        RunConfig(personal_adapters="heads")
    with pytest.raises(ValueError, match=r"`local-optimizer` = 'adam'.*one of reset, keep"):
        RunConfig(local_optimizer="adam")


def test_site_sampling_follows_the_seed_and_site_names_not_node_ids():
    # Flower draws node ids with the global `random` module, and node ids are new random
    # numbers every run; with fraction-train < 1 the sites of each round must still follow
    # the run's seed (two runs alike, a resume alike)
    import random

    names = ["alpha", "beta", "gamma", "delta"]

    def sampled(node_ids, seed=0, offset=0, rounds=range(1, 7)):
        strategy = build_strategy(RunConfig(min_train_nodes=1, fraction_train=0.5, seed=seed), None, 1,
                                  round_offset=offset)
        grid = QueryGrid(dict(zip(node_ids, names)))
        random.seed(node_ids[0])  # Flower's own draw differs between the two runs
        return [sorted(grid.sites[m.metadata.dst_node_id]
                       for m in strategy.configure_train(r, arrays(a=[0.0]), ConfigRecord(), grid)) for r in rounds]

    first = sampled([101, 202, 303, 404])
    assert all(len(r) == 2 for r in first)
    assert len({tuple(r) for r in first}) > 1      # the draw changes from round to round
    assert sampled([9, 5, 7, 3]) == first           # other node ids, other global random state: same sites
    assert sampled([9, 5, 7, 3], offset=2, rounds=range(1, 5)) == first[2:]  # a resume after round 2
    assert sampled([101, 202, 303, 404], seed=1) != first


def test_resume_restores_only_the_personal_heads_this_run_keeps():
    lora, ce, pe = "base_model.model.lora_A", "base_model.model.heads.CE.fc.weight", "base_model.model.heads.PE.fc.weight"
    saved = {f"personal/east/{ce}": np.ones(2, np.float32), f"personal/east/{pe}": np.full(2, 3.0, np.float32)}
    only_pe = build_strategy(RunConfig(min_train_nodes=2, personal_heads="PE"), None, 1)
    only_pe.set_state(saved)
    assert set(only_pe.personal["east"]) == {pe}
    # personal heads switched off on resume: nothing personal comes back, no site gets old heads
    off = build_strategy(RunConfig(min_train_nodes=2), None, 1)
    off.set_state(saved)
    assert off.personal == {} and off.site_state("east") == {}
    grid = QueryGrid({1: "east", 2: "west"})
    sent = list(off.configure_train(3, arrays(**{lora: [0.0, 0.0], ce: [0.0, 0.0], pe: [0.0, 0.0]}),
                                    ConfigRecord(), grid))
    assert grid.queried == []
    assert all(np.all(m.content.array_records["arrays"][pe].numpy() == 0) for m in sent)


def test_a_node_that_never_says_which_site_it_is_is_asked_once():
    class SilentGrid(FakeGrid):
        def __init__(self, node_ids):
            super().__init__(node_ids)
            self.queried = []

        def send_and_receive(self, messages, *, timeout=None):
            self.queried += [m.metadata.dst_node_id for m in messages]
            return []  # no node answers

    strategy = build_strategy(RunConfig(min_train_nodes=1, fraction_train=0.5), None, 1)
    grid = SilentGrid([4, 3, 2, 1])
    for r in (1, 2, 3):
        assert len(list(strategy.configure_train(r, arrays(a=[0.0]), ConfigRecord(), grid))) == 2
    assert sorted(grid.queried) == [1, 2, 3, 4]  # each once, not once per round (each query waits for the timeout)


def test_federated_evaluation_logs_each_sites_scores_and_averages_them_by_examples(tmp_path):
    log = RunLog(tmp_path)
    off = build_strategy(RunConfig(min_train_nodes=3), log, FULL_MODEL_BYTES)
    assert list(off.configure_evaluate(1, arrays(a=np.zeros(2)), ConfigRecord(), FakeGrid((11, 22, 33)))) == []
    strategy = build_strategy(RunConfig(min_train_nodes=3, fraction_evaluate=1.0), log, FULL_MODEL_BYTES)
    msgs = list(strategy.configure_evaluate(1, arrays(a=np.zeros(2)), ConfigRecord(), FakeGrid((11, 22, 33))))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 22, 33]
    assert all(m.metadata.message_type == "evaluate" for m in msgs)
    sent = {m.metadata.dst_node_id: m for m in msgs}

    def scores(to, site, n, ce, top1):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "CE-nmse_db": ce, "BF-top1": top1,
                                                            "CE-ratio": 0.5, "BF-ratio": 1.1, "avg-score": 0.8,
                                                            "eval-time-s": 2.0}),
                                   "site": ConfigRecord({"name": site})}), reply_to=to)

    replies = [scores(sent[11], "siteA", 10, -10.0, 0.2), scores(sent[22], "siteB", 30, -6.0, 0.6),
               Message(Error(1, "site=siteC: ValueError: no val split"), reply_to=sent[33])]
    agg = strategy.aggregate_evaluate(1, replies)
    # by hand: (10·x_A + 30·x_B) / 40
    assert agg["CE-nmse_db"] == pytest.approx((10 * -10.0 + 30 * -6.0) / 40)
    assert agg["BF-top1"] == pytest.approx((10 * 0.2 + 30 * 0.6) / 40)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["source"] == "site-val"]
    # one row per site and task: its metric and error ratio; the site's avg score and evaluation
    # time are columns, not tasks
    assert all(r["eval_time_s"] == 2.0 and r["avg_score"] == 0.8 for r in rows)
    assert sorted((r["task"], r["ratio"]) for r in rows) == [("BF", 1.1), ("BF", 1.1), ("CE", 0.5), ("CE", 0.5)]
    assert sorted((r["site"], r["task"], r.get("nmse_db", r.get("top1")), r["samples"]) for r in rows) == [
        ("siteA", "BF", 0.2, 10), ("siteA", "CE", -10.0, 10), ("siteB", "BF", 0.6, 30), ("siteB", "CE", -6.0, 30)]
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["site"] for e in events] == ["siteC"] and "site evaluation failed" in events[0]["message"]
    # the ledger counts the evaluation's traffic apart: the state (2 float32 = 8 B) went down again
    ledger = read_jsonl(tmp_path / "ledger.jsonl")
    assert sorted((r["kind"], r["site"], r["status"], r["bytes_down"], r["bytes_up"]) for r in ledger) == [
        ("evaluate", "siteA", "ok", 8, 0), ("evaluate", "siteB", "ok", 8, 0), ("evaluate", "siteC", "error", 8, 0)]
    # a site that does not answer before the timeout: an event and a ledger row, no score
    msgs = list(strategy.configure_evaluate(2, arrays(a=np.zeros(2)), ConfigRecord(), FakeGrid((11, 22, 33))))
    sent = {m.metadata.dst_node_id: m for m in msgs}
    assert strategy.aggregate_evaluate(2, [scores(sent[11], "siteA", 10, -9.0, 0.3)])["CE-nmse_db"] == -9.0
    # (node 33 has only ever replied with an error: it is named by its node id; events by name)
    assert [(e["round"], e["site"]) for e in read_jsonl(tmp_path / "events.jsonl")][1:] == [(2, "node-33"), (2, "siteB")]
    assert all("no reply to the evaluation" in e["message"] for e in read_jsonl(tmp_path / "events.jsonl")[1:])
    assert sorted(r["status"] for r in read_jsonl(tmp_path / "ledger.jsonl") if r["round"] == 2) == [
        "ok", "timeout", "timeout"]
    strategy.configure_evaluate(3, arrays(a=np.zeros(2)), ConfigRecord(), FakeGrid((11, 22, 33)))
    assert strategy.aggregate_evaluate(3, []) is None  # no usable reply: no average
