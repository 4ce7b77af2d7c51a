"""Central evaluation: every task on every site's test split, after every round and at round 0
(with ``eval-every=k``: round 0, every k-th round and the last).

Training sites and held-out sites alike are scored by the server with the global
adapter state (issue 4); with ``personal-heads`` a training site is scored with its own
copy of those heads over the global rest (what that site deploys), the held-out sites
with the global ones; with ``site-model=local`` a training site is scored with its own
model after its last local training (FedAvg + local fine-tuning), held-out sites again
with the global one. The classical baselines are fitted once per site on that
site's own train split, scored on the same test split, and cached in the run folder
(``baselines.json``), so a resumed run does not refit them. Each scored round also writes
every test sample's error (``samples/round-NNN.safetensors``, the baselines' in
``samples/baseline.safetensors``) for the paired bootstraps of the report and scripts/compare.py.

``get_evaluate_fn(...)`` returns the ``evaluate_fn(round, arrays) -> MetricRecord`` that
``strategy.start`` calls; the returned record holds run-level summaries, and the full
site × task table goes to ``metrics.jsonl``.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedfm.config import RunConfig, SiteEntry
from fedfm.evaluate import EXCLUDED, map_sites
from fedfm.federated import load_site_tasks, personal_keys, resolve_device, torch_state
from fedfm.runlog import RunLog, read_json, read_samples, samples_path, write_json, write_samples


def fit_site_baselines(cfg: RunConfig, entry: SiteEntry, test_tds: dict
                       ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """({task: metrics}, {task: per-sample errors}) of the classical baseline of each task,
    fitted on the site's train split and scored on ``test_tds``."""
    from fedfm.baselines import fit_baseline
    from fedfm.metrics import sample_errors, score

    # the baselines fit their own kNN tables: the heads' KnnPrior (labels=True) is not needed here
    train_tds = load_site_tasks(entry.spec, "train", cfg.cache_dir, cfg.train_max_samples, labels=False)
    out, errors = {}, {}
    for task, td in test_tds.items():
        baseline = fit_baseline(task, train_tds[task], entry.spec)
        pred = baseline.predict(td)
        out[task] = {"baseline": baseline.name, **score(task, pred, td)}
        errors[task] = sample_errors(task, pred, td)
    return out, errors


class CentralEvaluator:
    """Holds the sites' test task views, the baselines and one model between rounds."""

    def __init__(self, cfg: RunConfig, sites: list[SiteEntry], model, runlog: RunLog | None,
                 personal_for: Callable[[str], dict] | None = None):
        self.cfg, self.model, self.runlog = cfg, model, runlog
        self.personal_for = personal_for or (lambda site: {})
        self.device = resolve_device(cfg.device)
        self.sites = [e for e in sites if e.spec is not None]  # broken YAMLs are logged by the app
        self._tds: dict[str, dict] = {}
        self._side: dict[tuple[str, str], dict] = {}   # (site, task) → predict's side_cache: its pooled heads' side inputs
        self.baselines = self._load_or_fit_baselines()

    def test_tasks(self, entry: SiteEntry) -> dict:
        if entry.name not in self._tds:
            # a held-out site's labels are never the model's: its DE/PE heads read no kNN prior
            self._tds[entry.name] = load_site_tasks(entry.spec, "test", self.cfg.cache_dir, self.cfg.eval_max_samples,
                                                     stats_samples=self.cfg.train_max_samples,
                                                     labels=entry.role == "train")
        return self._tds[entry.name]

    def _load_or_fit_baselines(self) -> dict[str, dict[str, dict[str, float]]]:
        path = self.runlog.dir / "baselines.json" if self.runlog else None
        spath = samples_path(self.runlog.dir, "baseline") if self.runlog else None
        try:
            cached = read_json(path, {}) if path else {}
            if not isinstance(cached, dict):
                raise ValueError(f"{path}: not a JSON object")
            cached_errors = (read_samples(spath) if spath else None) or {}
        except ValueError as e:  # a cache: refit rather than stop the run
            print(f"fedfm: {e}; refitting the baselines", file=sys.stderr, flush=True)
            cached, cached_errors = {}, {}
        out, errors = {}, {}
        print(f"fedfm: central evaluation on {len(self.sites)} sites; fitting classical baselines", flush=True)

        def prepare(entry: SiteEntry):
            try:  # the test views are loaded now (a resume with cached baselines too): a site whose
                # data cannot be made or read is excluded here, once, not mid-run
                tds = self.test_tasks(entry)
            except (ValueError, OSError) as e:
                return e
            if cached.get(entry.name) and set(cached_errors.get(entry.name, {})) >= set(tds):
                return cached[entry.name], cached_errors[entry.name]
            return fit_site_baselines(self.cfg, entry, tds)  # no per-sample errors cached: refit (deterministic)

        results = map_sites(prepare, list(self.sites))  # one site per core, one BLAS thread each
        for entry, res in zip(list(self.sites), results):  # in the federation's order
            if isinstance(res, Exception):
                self.sites.remove(entry)
                self._tds.pop(entry.name, None)
                msg = f"{EXCLUDED}: {res}"  # scripts/evaluate.py leaves the site out again by it
                print(f"fedfm: site {entry.name}: {msg}", file=sys.stderr, flush=True)
                if self.runlog:
                    self.runlog.append_event(0, entry.name, "error", msg)
                continue
            out[entry.name], errors[entry.name] = res
        if path:
            write_json(path, out)
            write_samples(spath, errors)
        return out

    def __call__(self, round_: int, arrays: ArrayRecord) -> MetricRecord:
        from fedfm.evaluate import predict, site_copy
        from fedfm.metrics import average_score, sample_errors, score

        t0 = time.perf_counter()
        state = {k: a.numpy() for k, a in arrays.items()}
        self.model.eval()
        lock = threading.Lock()

        def score_site(entry: SiteEntry) -> tuple[list[dict], dict, dict]:
            own = self.personal_for(entry.name) if entry.role == "train" else {}
            local = bool(own) and self.cfg.site_model == "local"
            tds = self.test_tasks(entry)
            own_heads = set() if local else {t for t in tds if personal_keys(own, (t,), (t,))}
            net = site_copy(self.model, torch_state({**state, **own}), lock)  # LoRA merged once for its tasks
            rows, site_metrics, errors = [], {}, {}
            for task, td in tds.items():
                pred = predict(net, td, device=self.device, side_cache=self._side.setdefault((entry.name, task), {}))
                site_metrics[task] = score(task, pred, td)
                errors[task] = sample_errors(task, pred, td)
                rows.append({"round": round_, "site": entry.name, "role": entry.role, "task": task,
                             "source": "federated", **({"head": "own"} if task in own_heads else {}),
                             **({"model": "local"} if local else {}),
                             **site_metrics[task]})
            return rows, site_metrics, errors

        # between rounds the sites are idle: one site per core, up to every core (a host with more
        # cores than sites leaves the rest idle: one torch thread a site keeps the scores the same
        # on any core count)
        rows, summary, errors = [], {}, {}
        for entry, (site_rows, site_metrics, site_errors) in zip(self.sites, map_sites(score_site, self.sites)):
            rows += site_rows  # in the federation's order
            errors[entry.name] = site_errors
            summary[entry.name] = (entry.role, average_score(site_metrics, self.baselines[entry.name]))
        if self.runlog:
            write_samples(samples_path(self.runlog.dir, f"round-{round_:03d}"), errors)
            self.runlog.append_metrics(rows)
        record = MetricRecord({"eval-time-s": time.perf_counter() - t0})
        for role in ("train", "heldout"):
            scores = [s for r, s in summary.values() if r == role and np.isfinite(s)]
            if scores:
                record[f"avg-score-{role}"] = float(np.mean(scores))
        return record


def get_evaluate_fn(cfg: RunConfig, sites: list[SiteEntry], model, runlog: RunLog | None,
                    on_round_end: Callable[[int, ArrayRecord], None] | None = None,
                    personal_for: Callable[[str], dict] | None = None
                    ) -> Callable[[int, ArrayRecord], MetricRecord]:
    """``evaluate_fn`` for ``strategy.start``; ``on_round_end`` (checkpointing) runs after
    the round's metrics are written, so a checkpoint marks a fully logged round;
    ``personal_for(site)`` gives what a training site loads over the global state: its own
    heads and adapters (``personal-heads``, ``personal-adapters``) or its last local model
    (``site-model=local``)."""
    evaluator = CentralEvaluator(cfg, sites, model, runlog, personal_for)

    def evaluate_fn(round_: int, arrays: ArrayRecord) -> MetricRecord:
        record = evaluator(round_, arrays)
        if on_round_end:
            on_round_end(round_, arrays)
        return record

    evaluate_fn.evaluator = evaluator  # for tests and the app's summary
    return evaluate_fn
