"""Shared pieces of the federated tests: a tiny federation on disk, a tiny backbone, and an
in-process Grid that delivers the server's messages to the real ClientApp handlers
(message in → message out, no Ray, no SuperLink)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

# Two busy-waiting OpenMP threads on a shared 2-core machine make a small linear ~50× slower
# (measured: 24 ms vs 0.5 ms); these tests run tiny models, one thread is the fast setting.
torch.set_num_threads(1)

TRAIN = {"train": 64, "val": 16, "test": 32}
_SITES = {  # name: (environment, seed)
    "alpha": ("uma", 11),
    "beta": ("umi", 12),
    "gamma": ("rma", 13),
}
# Small grids keep 2-core CPU tests fast: [T+P, K, N] = [6, 16, 4] → 4–6 tokens with the tiny
# preset's (2, 8, 4) patches; the BF head follows the 32-beam codebook.
_GRID = ("sub6: {antennas: 4, subcarriers: 16}\ntime: {history_slots: 4, horizon_slots: 2}\n"
         "mmwave: {antennas: 8, subcarriers: 16, codebook_beams: 32, oversampling: 4}\n")
NUM_BEAMS = 32


def write_federation(root: Path, broken_site: bool = False) -> Path:
    """root/fed.yaml: alpha, beta train (beta broken if asked), gamma held out."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (env, seed) in _SITES.items():
        text = (f"name: {name}\nenvironment: {env}\nseed: {seed}\n{_GRID}"
                f"samples: {{train: {TRAIN['train']}, val: {TRAIN['val']}, test: {TRAIN['test']}}}\n")
        if broken_site and name == "beta":
            text = text.replace("antennas: 4,", "antennas: -4,")  # invalid: the site must refuse, the round must go on
        (root / f"{name}.yaml").write_text(text)
    fed = root / "fed.yaml"
    fed.write_text("name: tiny\ntrain_sites: [alpha.yaml, beta.yaml]\nheldout_sites: [gamma.yaml]\n")
    return fed


def run_config(fed: Path, out: Path, cache: Path, backbone: str = "", **overrides) -> dict:
    cfg = {"federation": str(fed), "backbone": backbone, "out-dir": str(out), "cache-dir": str(cache),
           "num-server-rounds": 2, "local-steps": 2, "batch-size": 8, "pretrain-steps": 2,
           "min-train-nodes": 2, "seed": 5, "device": "cpu"}
    cfg.update(overrides)
    return cfg


def make_backbone(path: Path, num_beams: int = NUM_BEAMS, seed: int = 5) -> tuple[str, str]:
    """A randomly initialised tiny backbone checkpoint; (path, sha256)."""
    from fedfm.federated import build_run_model, model_config
    from fedfm.config import RunConfig
    from fedfm.model import base_model, save_backbone

    cfg = RunConfig(preset="tiny", seed=seed)
    model = build_run_model(cfg, num_beams, None)
    digest = save_backbone(path, base_model(model).backbone, model_config(cfg, num_beams))
    return str(path), digest


class InProcessGrid:
    """Duck-typed ``flwr.serverapp.Grid``: what ``Strategy.start`` calls, served by calling
    the ClientApp's handlers directly, one simulated node per partition."""

    def __init__(self, run_config: dict, num_nodes: int):
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i,
                                          node_config={"partition-id": i, "num-partitions": num_nodes},
                                          state=RecordDict(), run_config=dict(run_config))
                         for i in range(num_nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from clients.app import evaluate, query, train

        handler = {MessageType.TRAIN: train, MessageType.EVALUATE: evaluate, MessageType.QUERY: query}
        return [handler[m.metadata.message_type](m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def server_context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))


def train_message(arrays, config) -> Message:
    from flwr.app import RecordDict as RD

    return Message(RD({"arrays": arrays, "config": config}), dst_node_id=100, message_type=MessageType.TRAIN)


@pytest.fixture
def task_identity():
    """Message() stamps run/node ids from the running Flower task; outside Flower, set them."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
