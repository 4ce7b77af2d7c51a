"""ClientApp: one simulated base station (site) of the federation.

``partition-id`` i → the i-th training site of the federation file. The site generates
or loads its own data from its own cache, builds the model from the shared backbone
(hash checked against the server's), loads the received adapter state, trains locally
on its seven tasks and replies with its adapter state (float32) and metrics. A site that
cannot train (broken YAML, unusable data or backbone, diverged training) replies with an
error that starts with ``site=NAME:``; it never sends garbage.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfm.config import RunConfig, train_site_for_partition
from fedfm.federated import check_backbone, evaluate_site, local_train, state_bytes
from fedfm.fedpretrain import local_pretrain

APP_DIR = Path(__file__).resolve().parents[1]
SITE_ERROR = 1  # Error.code of a site that refuses to train (Flower's own codes are 0-8 + …)

app = ClientApp()


def _site(context: Context, found: list):
    """(RunConfig, SiteEntry) of this node; raises ValueError if the site is unusable.
    ``found`` receives the entry as soon as it is known, so errors can name the site."""
    cfg = RunConfig.from_flower(context.run_config, base_dir=APP_DIR)
    node = context.node_config
    entry = train_site_for_partition(cfg.federation, int(node["partition-id"]), int(node["num-partitions"]))
    found.append(entry)
    if entry.error:
        raise ValueError(entry.error)
    return cfg, entry


def _error(msg: Message, context: Context, found: list, exc: Exception) -> Message:
    name = found[0].name if found else f"partition-{context.node_config.get('partition-id', '?')}"
    print(f"fedfm: site {name}: {exc}", flush=True)
    return Message(Error(code=SITE_ERROR, reason=f"site={name}: {type(exc).__name__}: {exc}"), reply_to=msg)


def _received(msg: Message, context: Context, found: list):
    """(cfg, entry, config record, backbone path, adapter state) of a train/evaluate message,
    after checking that the site's backbone is the server's."""
    cfg, entry = _site(context, found)
    conf = msg.content["config"]
    backbone = ""
    if conf.get("stage", "finetune") != "pretrain":  # stage=pretrain trains the backbone itself
        backbone = cfg.backbone or str(conf["backbone-path"])
        check_backbone(backbone, str(conf["backbone-sha256"]))
    state = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    return cfg, entry, conf, backbone, state


@app.train()
def train(msg: Message, context: Context) -> Message:
    found: list = []
    try:
        cfg, entry, conf, backbone, state = _received(msg, context, found)
        if conf.get("stage", "finetune") == "pretrain":
            res = local_pretrain(cfg, entry.spec, state, int(conf["server-round"]), num_beams=int(conf["num-beams"]))
        else:
            res = local_train(cfg, entry.spec, state, int(conf["server-round"]), num_beams=int(conf["num-beams"]),
                              backbone=backbone, proximal_mu=float(conf.get("proximal-mu", 0.0)),
                              run_key=str(conf.get("run-key", "")))
        bad = [k for k, v in res.state.items() if not np.all(np.isfinite(v))]
        if bad:
            raise FloatingPointError(f"local training diverged: NaN/inf in {bad[:3]}")
    except Exception as exc:  # noqa: BLE001 — any failure becomes a named error reply, never garbage
        return _error(msg, context, found, exc)
    metrics = MetricRecord({"num-examples": res.num_examples, "local-time-s": res.local_time_s,
                            "bytes-up": state_bytes(res.state),
                            **{f"loss-{task}": loss for task, loss in res.losses.items()}})
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in res.state.items()}),
                               "metrics": metrics,
                               "site": ConfigRecord({"name": entry.name, "seed": res.seed})}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which site this node is: a server keeping per-site state (``personal-heads``) asks the
    nodes it has not heard from yet, e.g. after a resume."""
    found: list = []
    try:
        _, entry = _site(context, found)
    except Exception as exc:  # noqa: BLE001
        return _error(msg, context, found, exc)
    return Message(RecordDict({"site": ConfigRecord({"name": entry.name})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapters on this site's own validation split (for deployments in
    which the server cannot see site data; simulations use the central evaluator)."""
    found: list = []
    t0 = time.perf_counter()
    try:
        cfg, entry, conf, backbone, state = _received(msg, context, found)
        num_examples, scores = evaluate_site(cfg, entry.spec, state, num_beams=int(conf["num-beams"]),
                                             backbone=backbone, split="val")
    except Exception as exc:  # noqa: BLE001
        return _error(msg, context, found, exc)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": num_examples, **scores,
                                                        "eval-time-s": time.perf_counter() - t0}),
                               "site": ConfigRecord({"name": entry.name})}), reply_to=msg)
