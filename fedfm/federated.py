"""The steps of a federated round, without Flower: what a site does with the adapter
state it receives, and how the server builds, evaluates and sizes the model.

``clients/app.py`` and ``server/`` only turn Flower messages into these calls and back
(DESIGN.md: "server/ and clients/ hold no maths"); ``scripts/finetune_site.py`` and
``scripts/compare.py`` call the same functions, so local-only, federated and per-site
fine-tuning train with the exact same loop.

State dicts crossing this module are ``{name: np.ndarray float32}``: Flower's
ArrayRecord takes them as they are and safetensors writes them.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedfm.config import RunConfig, check_resume_settings
from fedfm.data import cache_root, first_samples, load_split
from fedfm.scenarios import SiteSpec, derive_seed, spec_hash

# Per-sample arrays of a split (first axis = sample); `codebook` is per site.


def resolve_device(name: str) -> str:
    """``auto`` → cuda where one is visible, else cpu; ValueError naming the value when it is no
    device, or a CUDA device this host does not have."""
    from fedfm.train import resolve_device as torch_device

    return str(torch_device(name))


def model_config(cfg: RunConfig, num_beams: int):
    """The run's ModelConfig: preset + LoRA rank/alpha + the federation's codebook size."""
    from fedfm.model import ModelConfig

    return ModelConfig.from_preset(cfg.preset, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   num_beams=num_beams, seed=cfg.seed)


def round_seed(cfg: RunConfig, site: str, round_: int) -> int:
    """Seed of one site's local training in one round (recorded in the ledger)."""
    return derive_seed(cfg.seed, site, "round", round_)


def numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in state.items()}


def torch_state(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in state.items()}


def personal_keys(keys, tasks: tuple[str, ...], adapters: tuple[str, ...] = ()) -> list[str]:
    """The adapter-state keys of the output heads of ``tasks`` (``...heads.PE.fc.weight``) and
    of the input adapters of ``adapters`` (``...adapters.CE.fc.weight``): with
    ``personal-heads`` / ``personal-adapters`` each training site keeps its own copy of these
    (FedPer, Arivazhagan et al. 2019, for heads; keeping the input side local too leaves only
    the LoRA shared): it trains them from its own last version, the server stores one per site
    and scores each training site with its own, and their FedAvg only starts sites not seen yet
    and scores the held-out sites. Everything not named stays shared."""
    marks = tuple(f".heads.{t}." for t in tasks) + tuple(f".adapters.{t}." for t in adapters)
    return [k for k in keys if any(m in f".{k}" for m in marks)]


def state_bytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in state.values()))


_STATS: dict = {}  # (spec hash, cache folder, samples) → ChannelStats: fitted once per process


def site_channel_stats(spec: SiteSpec, cache_dir: str = "", samples: int = 0, arrays: dict | None = None):
    """The site's ``ChannelStats`` (Kronecker slot/subcarrier/antenna covariances of its
    train channels, nominal SNR = the middle of its estimation SNR range in dB, and the PF
    predictor's AR order chosen on its PF train view as the PF-ARLMMSE baseline chooses it),
    from the first ``samples`` of its train split (0 = all): the samples it trains on, so a run
    with 250 labels a site fits them on those 250. ``arrays`` = that train split, already loaded."""
    from fedfm.baselines import pf_ar_lmmse_order
    from fedfm.estimators import ChannelStats
    from fedfm.scenarios import spec_hash
    from fedfm.tasks import build_tasks

    if samples < 0:
        raise ValueError(f"samples {samples} is not allowed; expected an integer >= 0 (0 = all)")
    key = (spec_hash(spec), str(cache_dir), int(samples))
    if key not in _STATS:
        train = arrays if arrays is not None else load_split(spec, "train", cache_dir or None)
        train = first_samples(train, samples) if samples else train
        snr_db = 0.5 * (spec.estimation.snr_db_min + spec.estimation.snr_db_max)
        stats = ChannelStats.fit(train["h_sub6"], snr_db)
        stats.pf_order = pf_ar_lmmse_order(build_tasks(train, spec, "train", ("PF",))["PF"], stats.covs)
        _STATS[key] = stats
    return _STATS[key]


LABEL_PRIOR_TASKS = ("BF", "DE", "PE", "LoS")
_LABEL_PRIORS: dict = {}  # (spec hash, cache folder, samples, task) → its prior: fitted once per process


def site_label_priors(spec: SiteSpec, tasks: tuple[str, ...] = LABEL_PRIOR_TASKS, cache_dir: str = "",
                      samples: int = 0, arrays: dict | None = None) -> dict:
    """``{task: prior}``: the site's label-fitted start of each pooled head in ``tasks``,
    ``KnnPrior`` for DE or PE (its DE-/PE-kNN baseline), ``BfPrior`` for BF (the spectrum BF-AoA
    chose), ``LosPrior`` for LoS (its LoS-logistic regression), fitted on the labels of the first
    ``samples`` of its train split (0 = all), as ``site_channel_stats`` is on their channels.
    ``arrays`` = that train split, already loaded; else it is loaded once for all the tasks
    not fitted yet in this process."""
    from fedfm.baselines import BfPrior, KnnPrior, LosPrior
    from fedfm.scenarios import spec_hash
    from fedfm.tasks import build_tasks

    fitters = {"DE": KnnPrior, "PE": KnnPrior, "BF": BfPrior, "LoS": LosPrior}
    unknown = [t for t in tasks if t not in fitters]
    if unknown:
        raise ValueError(f"site_label_priors: task {unknown[0]!r} is not allowed; expected one of {', '.join(fitters)}")
    if samples < 0:
        raise ValueError(f"samples {samples} is not allowed; expected an integer >= 0 (0 = all)")
    keys = {t: (spec_hash(spec), str(cache_dir), int(samples), t) for t in tasks}
    missing = tuple(t for t in tasks if keys[t] not in _LABEL_PRIORS)
    if missing:
        train = arrays if arrays is not None else load_split(spec, "train", cache_dir or None)
        train = first_samples(train, samples) if samples else train
        for t, td in build_tasks(train, spec, "train", missing).items():
            _LABEL_PRIORS[keys[t]] = fitters[t].fit(td)
    return {t: _LABEL_PRIORS[keys[t]] for t in tasks}


def load_site_tasks(spec: SiteSpec, split: str, cache_dir: str = "", max_samples: int = 0,
                    tasks: tuple[str, ...] | None = None, stats_samples: int | None = None,
                    labels: bool = True) -> dict:
    """``{task: TaskData}`` of one split of a site, generated or loaded from its own cache.

    ``max_samples`` > 0 keeps the first samples only (central evaluation budget); ``tasks``
    builds only those views (default: all seven). CE, CP and PF carry the site's
    ``ChannelStats`` in ``extras["stats"]`` (their heads' LMMSE prior), fitted on the first
    ``stats_samples`` train samples (0 = all; None = ``max_samples`` for the train split,
    all for the others). With ``labels`` (a site whose train labels the model may use: a
    training site, or the site ``finetune_site.py`` personalises), BF, DE, PE and LoS carry its
    label-fitted baseline there (``site_label_priors``), fitted on the same train samples;
    ``labels=False`` (a held-out site, never trained on) leaves those heads at their shared
    start: the Capon beam, the deployment prior, the K-factor rule."""
    from fedfm.tasks import TASKS, build_tasks

    if max_samples < 0:
        raise ValueError(f"max_samples {max_samples} is not allowed; expected an integer >= 0 (0 = all)")
    arrays = load_split(spec, split, cache_dir or None)
    if max_samples:
        arrays = first_samples(arrays, max_samples)
    tds = build_tasks(arrays, spec, split, TASKS if tasks is None else tuple(tasks))
    if stats_samples is None:
        stats_samples = max_samples if split == "train" else 0
    loaded = arrays if split == "train" and stats_samples == max_samples else None   # exactly those samples
    if any(t in tds for t in ("CE", "CP", "PF")):
        stats = site_channel_stats(spec, cache_dir, stats_samples, loaded)
        for t in ("CE", "CP", "PF"):
            if t in tds:
                tds[t].extras["stats"] = stats
    pooled = tuple(t for t in LABEL_PRIOR_TASKS if t in tds)
    if labels and pooled:
        for t, prior in site_label_priors(spec, pooled, cache_dir, stats_samples, loaded).items():
            tds[t].extras["stats"] = prior
    return tds


_HASHED: dict = {}  # (path, size, mtime) → sha256: a site hashes its backbone once, not every round


def check_backbone(path: str, expected_hash: str) -> str:
    """The backbone file's hash, after checking it is the one the server uses."""
    from fedfm.model import load_backbone

    if not path:
        raise ValueError("no backbone checkpoint configured (run config `backbone`)")
    p = Path(path)
    key = (str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
    digest = _HASHED.get(key)
    if digest is None:
        _, _, digest = load_backbone(path)  # ValueError naming the file if it does not match its sidecar
        _HASHED[key] = digest
    if expected_hash and digest != expected_hash:
        raise ValueError(f"{path}: backbone hash mismatch: this site has sha256 {digest}, the server uses "
                         f"{expected_hash}; every site must load the federation's backbone")
    return digest


def build_run_model(cfg: RunConfig, num_beams: int, backbone: str | None, device: str = "cpu"):
    """The one model factory, with the run's settings (server and sites alike)."""
    from fedfm.model import build_model

    return build_model(model_config(cfg, num_beams), backbone or None).to(device)


def full_model_bytes(model: torch.nn.Module) -> int:
    """float32 bytes of the deployed model (frozen backbone included): the 'send it all' cost."""
    from fedfm.model import parameter_summary

    return int(parameter_summary(model)["total"]) * 4


@dataclass
class LocalResult:
    state: dict[str, np.ndarray]     # adapter state after local training, float32
    num_examples: int                # training samples of the site (FedAvg weight)
    losses: dict[str, float]         # last per-task losses of local training
    local_time_s: float
    seed: int


# Ray reuses a ClientApp actor across rounds and sites, and with more sites than actors (the
# default: 4 training sites on 2 cores, one actor a core) a site is seldom drawn by the actor
# that trained it last: its tasks took 7–9 s to build again each round (RESULTS.md). So a
# process keeps the sites' tasks it built, least recently used out first, within
# :func:`site_cache_budget`, and one model: the model does not depend on the site (the sites'
# classical starts are in their tasks) and its trainable state is all it carries between
# sites, which set_adapter_state replaces.
_TASKS: OrderedDict = OrderedDict()  # (spec hash, cache dir, train-max-samples) → tasks
_MODEL: dict = {}                    # key, model, prior (its heads as built)


def site_cache_budget() -> int:
    """Bytes of site tasks one process keeps: a fifth of the machine's memory shared by its
    cores (a simulation runs a ClientApp actor a core); one site is always kept."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX sysconf
        total = 8 << 30
    try:  # a container's limit (cgroup v2), where lower than the host's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return int(0.2 * total / (os.cpu_count() or 1))


def _nbytes(obj) -> int:
    """Bytes of the arrays in a site's tasks (TaskData fields, their extras); a shared array
    counts each time, so the cache errs on the small side."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _site_model_and_tasks(cfg: RunConfig, spec: SiteSpec, num_beams: int, backbone: str, device: str,
                          need_tasks: bool = True):
    """(model, tasks or None, heads' prior) for one site's local training, built once per process."""
    from fedfm.train import head_prior

    model_key = (cfg.preset, cfg.lora_r, cfg.lora_alpha, cfg.seed, num_beams, backbone, device)
    if _MODEL.get("key") != model_key:
        model = build_run_model(cfg, num_beams, backbone, device)
        _MODEL.clear()
        _MODEL.update(key=model_key, model=model, prior=head_prior(model))
    if not need_tasks:  # the caller brings its own (compare.py, finetune_site.py)
        return _MODEL["model"], None, _MODEL["prior"]
    key = (spec_hash(spec), cfg.cache_dir, cfg.train_max_samples)
    if key in _TASKS:
        _TASKS.move_to_end(key)
    else:
        tasks = load_site_tasks(spec, "train", cfg.cache_dir, cfg.train_max_samples)
        _TASKS[key] = (tasks, _nbytes(tasks))
        budget = site_cache_budget()
        while len(_TASKS) > 1 and sum(n for _, n in _TASKS.values()) > budget:
            _TASKS.popitem(last=False)
    return _MODEL["model"], _TASKS[key][0], _MODEL["prior"]


def round_schedule(round_: int, local_steps: int, num_rounds: int) -> tuple[int, int]:
    """(offset, total) of round ``round_``'s local steps in one run-long learning-rate schedule
    (``fedfm.train.finetune(schedule=...)``): round r (from 1) runs steps (r−1)·L … r·L−1 of
    R·L, so every site warms up once and decays to lr/10 by the last round, as the centralized
    reference does over its steps, instead of restarting at the full rate every round. A
    resumed run or a later round (r > R) continues at the schedule's end."""
    total = local_steps * max(num_rounds, 1)
    return min(max(round_ - 1, 0) * local_steps, total - local_steps), total


OPTIMIZER_FILES_KEPT = 2  # a site's last two: a resume needs the one of its last complete round


def optimizer_folder(cfg: RunConfig, run_key: str, site: str) -> Path:
    """Where a site keeps its Adam moments between rounds (``local-optimizer=keep``): beside its
    data, on its own disk, under the run's key (the server's ``run-key``, kept across resumes)."""
    return cache_root(cfg.cache_dir) / "optimizer" / run_key / site


def load_site_optimizer(folder: Path, round_: int) -> tuple[dict[str, torch.Tensor], str]:
    """(state, note): the site's Adam state saved after its latest round before ``round_`` (a
    resumed run restarts from its last complete round, so a file of a round the server did not
    complete is passed over), or ({}, why not) when there is none or it cannot be read."""
    from safetensors.torch import load_file

    earlier = [r for r in _saved_rounds(folder) if r < round_]
    if not earlier:
        return {}, "no optimizer state from an earlier round: AdamW starts fresh"
    path = folder / f"round-{earlier[-1]:03d}.safetensors"
    try:
        return load_file(str(path)), ""
    except Exception as e:  # noqa: BLE001 — a torn or foreign file: start fresh, say which
        return {}, f"{path}: unreadable optimizer state ({type(e).__name__}: {e}); AdamW starts fresh"


def save_site_optimizer(folder: Path, round_: int, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{round_:03d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)  # a killed site leaves its previous file whole
    for r in _saved_rounds(folder)[:-OPTIMIZER_FILES_KEPT]:
        (folder / f"round-{r:03d}.safetensors").unlink(missing_ok=True)


def _saved_rounds(folder: Path) -> list[int]:
    """Rounds with a saved optimizer state in ``folder``, ascending (by number: round-1000 after round-999)."""
    if not folder.is_dir():
        return []
    stems = (f.stem.split("-", 1)[1] for f in folder.glob("round-*.safetensors"))
    return sorted(int(r) for r in stems if r.isdigit())


def local_train(cfg: RunConfig, spec: SiteSpec, state: dict[str, np.ndarray], round_: int, *,
                num_beams: int, backbone: str, proximal_mu: float = 0.0, steps: int | None = None,
                tasks: dict | None = None, run_key: str = "", model: torch.nn.Module | None = None
                ) -> LocalResult:
    """One site's local multi-task fine-tuning (DWA) from the received adapter state.

    ``model``: one :func:`build_run_model` built for this call alone (its heads as built are the
    head prior), trained in place, for callers that train several sites at once on threads
    (scripts/compare.py's local-only arm); else the process's one model (a Ray actor's).

    With ``local-optimizer=keep`` and the server's ``run_key`` a site continues its own AdamW
    moments and DWA loss windows from its last round instead of starting them afresh: measured on one site trained
    in 5 chunks of 40 steps, restarting Adam every chunk cost 1–4 % of CE and CP's NMSE against
    one 200-step run, and carrying the moments recovered all of it (RESULTS.md). The moments
    stay on the site's disk (:func:`optimizer_folder`), never travel. With ``head-refit-epochs``
    the site then refits its pooled heads alone on its labels (``fedfm.train.refit_heads``,
    seeded by the round's seed; ``head-refit-scope`` says which of their parameters move)."""
    from fedfm.model import get_adapter_state, set_adapter_state
    from fedfm.train import OptimizerStateMismatch, finetune, refit_heads

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if model is None:
        model, site_tasks, prior = _site_model_and_tasks(cfg, spec, num_beams, backbone, device,
                                                         need_tasks=tasks is None)
        tasks = tasks if tasks is not None else site_tasks
    else:
        from fedfm.train import head_prior

        if tasks is None:
            raise ValueError("local_train(model=...): pass the site's tasks too")
        model, prior = model.to(device), head_prior(model)
    set_adapter_state(model, torch_state(state))
    seed = round_seed(cfg, spec.name, round_)
    kwargs = dict(steps=steps if steps is not None else cfg.local_steps, batch_size=cfg.batch_size,
                  lr=cfg.lr, dwa_temperature=cfg.dwa_temperature, seed=seed, device=device,
                  head_lr_scale=cfg.head_lr_scale)
    if cfg.lr_schedule == "run" and steps is None:
        kwargs["schedule"] = round_schedule(round_, cfg.local_steps, cfg.num_server_rounds)
    if cfg.head_prior_mu > 0:  # anchored at the heads as built, not as received: every round pulls
        kwargs.update(prior_mu=cfg.head_prior_mu, prior=prior,  # towards the same classical start
                      prior_tasks=cfg.prior_tasks)
    keep = cfg.local_optimizer == "keep" and bool(run_key) and steps is None
    if keep:
        folder = optimizer_folder(cfg, run_key, spec.name)
        kwargs["optimizer_state"], note = load_site_optimizer(folder, round_)
        if note and round_ > 1:
            print(f"fedfm: site {spec.name}: round {round_}: {note}", flush=True)
    if proximal_mu > 0:
        if "proximal_mu" not in inspect.signature(finetune).parameters:
            raise ValueError("strategy fedprox needs fedfm.train.finetune(proximal_mu=...)")
        kwargs["proximal_mu"] = proximal_mu
    try:
        losses = finetune(model, tasks, **kwargs)
    except OptimizerStateMismatch as e:  # raised before the first step: the model is as received
        print(f"fedfm: site {spec.name}: round {round_}: {e}; AdamW starts fresh", flush=True)
        kwargs["optimizer_state"] = {}
        losses = finetune(model, tasks, **kwargs)
    if cfg.head_refit_epochs > 0:  # the pooled heads to convergence on the site's own labels
        refit_heads(model, tasks, epochs=cfg.head_refit_epochs, seed=seed, device=device,
                    scope=cfg.head_refit_scope)
    if keep:
        try:
            save_site_optimizer(folder, round_, kwargs["optimizer_state"])
        except OSError as e:  # the round's update still goes out; only the moments are lost
            print(f"fedfm: site {spec.name}: round {round_}: cannot keep the optimizer state in {folder} "
                  f"({e}); the next round starts AdamW afresh", flush=True)
    new_state = numpy_state(get_adapter_state(model))
    num_examples = int(next(iter(tasks.values())).targets.shape[0])
    return LocalResult(new_state, num_examples, {k: float(v) for k, v in losses.items()},
                       time.perf_counter() - t0, seed)


# ---- server side -----------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("fedfm", "torch", "flwr", "ray", "numpy", "peft", "sionna-no-rt", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def python_random_state(rng) -> list:
    """``random.Random.getstate()`` as JSON (for the checkpoint's RNG state)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_random_state(rng, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


@dataclass
class RunRecord:
    """What the scripts that read a finished run need from its config.json (:func:`read_run`)."""

    conf: dict          # the file's contents
    cfg: RunConfig      # its run config, validated
    num_beams: int
    backbone: str       # the backbone file the run used, and its sha256
    backbone_sha256: str
    where: str          # the config.json path, for messages


def read_run(run_dir) -> RunRecord:
    """A run folder's recorded settings (scripts/finetune_site.py, scripts/evaluate.py); ValueError
    naming its config.json when it is missing, not JSON, or lacks or mistypes what they need (a
    run of another fedfm version, or an edited file). Reads nothing else and writes nothing."""
    from fedfm.runlog import read_run_config

    conf = read_run_config(run_dir)
    where = str(Path(run_dir) / "config.json")
    try:
        cfg = RunConfig.from_flower(conf["run_config"])
        num_beams, backbone = conf["model"]["config"]["num_beams"], conf["backbone"]["path"]
        digest = conf["backbone"].get("sha256") or ""
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: lacks {e} (a run of another fedfm version, or an edited file)") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return RunRecord(conf, cfg, num_beams, backbone, digest, where)


@dataclass
class RunSetup:
    """Everything the server needs before round 1 (or before the resumed round)."""

    runlog: "RunLog"
    sites: list                      # [SiteEntry] train then held-out; broken ones carry .error
    num_beams: int
    backbone: str                    # absolute path of the checkpoint every site loads
    backbone_sha256: str
    model: torch.nn.Module           # server copy: initial state and central evaluation
    initial_state: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    round_offset: int                # rounds already complete (resume)
    random_state: list | None        # python `random` state to restore (Flower's own draws)
    full_model_bytes: int
    run_key: str = ""                # this run's id for site-side state (kept across resumes)
    resumed: bool = False            # from a checkpoint (round_offset may be 0: one of round 0)


def setup_run(cfg: RunConfig) -> RunSetup:
    """Open the run folder, load the federation site by site, get the backbone (given, or
    pretrained centrally when none is configured), build the model and either the fresh
    initial adapter state or the last complete round's checkpoint (``resume``)."""
    from fedfm.config import check_batch_fits, load_federation_sites
    from fedfm.model import get_adapter_state
    from fedfm.runlog import RunLog, check_fresh_run_dir, read_jsonl

    if not cfg.resume:
        check_fresh_run_dir(cfg.run_dir)
    sites = load_federation_sites(cfg.federation)
    check_batch_fits(cfg, sites)  # before the run folder is made
    runlog = RunLog(cfg.run_dir)
    resumed = cfg.resume and (runlog.dir / "config.json").exists()
    logged = {(r.get("site"), r.get("message")) for r in read_jsonl(runlog.dir / "events.jsonl", drop_torn_tail=True)}
    for e in sites:
        if e.error and (e.name, f"site excluded: {e.error}") not in logged:  # once per run, not per resume
            runlog.append_event(0, e.name, "error", f"site excluded: {e.error}")
    good = [e for e in sites if e.spec is not None]
    if not any(e.role == "train" for e in good):
        raise ValueError(f"{cfg.federation}: no usable training site (see {runlog.dir / 'events.jsonl'})")
    num_beams = good[0].spec.mmwave.codebook_beams
    backbone, source, recorded = cfg.backbone, "given", None
    if resumed:
        recorded_config = runlog.read_config()
        check_resume_settings(cfg, recorded_config, sites, runlog.dir)
        recorded = recorded_config["backbone"]
        if backbone and Path(backbone).resolve() != Path(recorded["path"]).resolve():
            raise ValueError(f"resume={runlog.dir}: backbone={backbone} differs from the run's "
                             f"{recorded['path']}; a run keeps its backbone (leave backbone unset to resume)")
        backbone, source = recorded["path"], recorded["source"]
    elif not backbone:
        from fedfm.backbone_cache import pretrain_backbone_centrally  # it builds models with this module's factory

        print(f"fedfm: no backbone given: pretraining one centrally ({cfg.pretrain_steps} steps)", flush=True)
        backbone, reused = pretrain_backbone_centrally(cfg, [e.spec for e in good if e.role == "train"],
                                                       num_beams, runlog.dir / "backbone")
        source = "central masked pretraining on the federation's training sites' synthetic train splits"
        if reused:  # the same inputs and code as an earlier run's: the same bits (pretrain_key)
            print(f"fedfm: the same pretraining was cached: {reused} (copied into the run)", flush=True)
            source += f" (reused from the cache entry {reused}, made with the same inputs and code)"
    digest = check_backbone(backbone, "")
    if recorded and digest != recorded["sha256"]:
        raise ValueError(f"resume={runlog.dir}: backbone {backbone} has sha256 {digest[:12]}…, the run was "
                         f"trained on {recorded['sha256'][:12]}… (the file was replaced); its adapters do not "
                         f"fit this backbone: restore that file or start a new run")
    model = build_run_model(cfg, num_beams, backbone, resolve_device(cfg.device))
    initial, strategy_state, offset, rstate = numpy_state(get_adapter_state(model)), {}, 0, None
    last = runlog.last_complete_round() if cfg.resume else None
    if last is not None:
        fresh = initial
        initial, strategy_state, state = runlog.load_checkpoint(last)
        check_state_fits(initial, fresh, runlog.checkpoint_dir(last))
        offset, rstate = last, state.get("python_random")
        runlog.truncate_after(last)
    # a new run gets a fresh key even in a folder a deleted run once used: a site must never
    # continue another run's optimizer state
    run_key = (runlog.read_config().get("run_key", "") if resumed else "") or uuid.uuid4().hex
    setup = RunSetup(runlog, sites, num_beams, backbone, digest, model, initial, strategy_state, offset, rstate,
                     full_model_bytes(model), run_key, resumed=last is not None)
    write_run_config(cfg, setup, source)
    return setup


def check_state_fits(state: dict[str, np.ndarray], model_state: dict[str, np.ndarray], where: Path) -> None:
    """ValueError naming ``where`` when a checkpoint's adapter state has other keys or shapes
    than this model's (written by another model config or fedfm version)."""
    missing, extra = sorted(set(model_state) - set(state)), sorted(set(state) - set(model_state))
    shapes = [k for k in sorted(set(state) & set(model_state)) if state[k].shape != model_state[k].shape]
    if missing or extra or shapes:
        first = (f"`{missing[0]}` missing" if missing else f"`{extra[0]}` unexpected" if extra else
                 f"`{shapes[0]}` has shape {tuple(state[shapes[0]].shape)}, "
                 f"expected {tuple(model_state[shapes[0]].shape)}")
        raise ValueError(f"{where}: adapter state does not fit this model ({len(missing)} keys missing, "
                         f"{len(extra)} unexpected, {len(shapes)} of another shape; {first}); it was written "
                         f"by another model config or fedfm version: start a new run instead of resuming")


def federation_record(cfg: RunConfig, sites: list) -> dict:
    """config.json's ``federation``: each site's name, role, YAML path, spec hash and split
    seeds (what :func:`check_resume_settings` compares a resume against)."""
    from fedfm.scenarios import SPLITS, split_seed

    return {"path": cfg.federation, "sites": [
        {"name": e.name, "role": e.role, "path": e.path, "error": e.error,
         "spec_hash": spec_hash(e.spec) if e.spec else None,
         "split_seeds": {sp: split_seed(e.spec, sp) for sp in SPLITS} if e.spec else None}
        for e in sites]}


def write_run_config(cfg: RunConfig, s: RunSetup, backbone_source: str) -> None:
    previous = s.runlog.read_config() if (s.runlog.dir / "config.json").exists() else {}
    adapter = state_bytes(s.initial_state)
    s.runlog.write_config({
        "run_config": cfg.to_flower(),
        "federation": federation_record(cfg, s.sites),
        "seeds": {"root": cfg.seed, "round_seed": "derive_seed(root, site, 'round', round)"},
        "backbone": {"path": s.backbone, "sha256": s.backbone_sha256, "source": backbone_source},
        "model": {"preset": cfg.preset, "config": model_config(cfg, s.num_beams).to_dict(),
                  "adapter_bytes": adapter, "full_model_bytes": s.full_model_bytes,
                  "adapter_fraction": adapter / s.full_model_bytes},
        "versions": package_versions(),
        "resumed_at_rounds": previous.get("resumed_at_rounds", []) + ([s.round_offset] if cfg.resume else []),
        "run_key": s.run_key,
    })


_SPLIT_BASELINES: dict = {}  # (site hash, split, cache dir, train cap) → {task: metrics}: fitted once per process


def split_baselines(cfg: RunConfig, spec: SiteSpec, split: str, tds: dict) -> dict[str, dict[str, float]]:
    """{task: metrics} of the site's classical baselines, fitted on its own train split (its
    first ``train-max-samples``) and scored on ``tds``, a view of ``split``; computed once per
    process (a Ray actor serving the site again reuses them)."""
    from fedfm.baselines import fit_baseline
    from fedfm.metrics import score

    key = (spec_hash(spec), split, cfg.cache_dir, cfg.train_max_samples)
    if key not in _SPLIT_BASELINES:
        train = load_site_tasks(spec, "train", cfg.cache_dir, cfg.train_max_samples, labels=False)
        _SPLIT_BASELINES[key] = {t: score(t, fit_baseline(t, train[t], spec).predict(td), td) for t, td in tds.items()}
    return _SPLIT_BASELINES[key]


def evaluate_site(cfg: RunConfig, spec: SiteSpec, state: dict[str, np.ndarray], *, num_beams: int,
                  backbone: str, split: str = "val") -> tuple[int, dict[str, float]]:
    """(samples, scores) of the adapters on one of the site's own splits: each task's headline
    metric ('CE-nmse_db', ...) and its error ratio to the site's classical baseline on the same
    samples ('CE-ratio', ...; :func:`split_baselines`), and their mean, 'avg-score' (the
    report's average score, on this split)."""
    from fedfm.evaluate import predict
    from fedfm.metrics import HEADLINE, average_score, error_for_score, error_ratio, score

    from fedfm.model import set_adapter_state
    from fedfm.model.lora import merged_copy

    model = build_run_model(cfg, num_beams, backbone, resolve_device(cfg.device))
    set_adapter_state(model, torch_state(state))
    model.eval()
    tds = load_site_tasks(spec, split, cfg.cache_dir, stats_samples=cfg.train_max_samples)
    base = split_baselines(cfg, spec, split, tds)
    net = merged_copy(model)   # LoRA merged once for all the site's tasks
    out, scored = {}, {}
    for task, td in tds.items():
        pred = predict(net, td, device=resolve_device(cfg.device))
        scored[task] = score(task, pred, td)
        out[f"{task}-{HEADLINE[task]}"] = float(scored[task][HEADLINE[task]])
        out[f"{task}-ratio"] = float(error_ratio(task, error_for_score(task, scored[task]),
                                                 error_for_score(task, base[task])))
    out["avg-score"] = float(average_score(scored, base))
    return int(next(iter(tds.values())).targets.shape[0]), out
