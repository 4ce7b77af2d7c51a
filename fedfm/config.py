"""RunConfig: one federated run's settings, from Flower's flat kebab-case run config.

Flower hands every app a flat mapping (``context.run_config``) whose defaults live in
``[tool.flwr.app.config]`` of pyproject.toml and whose overrides come from
``flwr run . --run-config "num-server-rounds=5 lora-r=16"``. :func:`RunConfig.from_flower`
validates that mapping once; everything downstream reads the frozen dataclass.

Paths: the ServerApp and ClientApp run from ``$FLWR_HOME/apps/...`` with a working
directory nobody chooses (FLOWER_NOTES.md), so relative input paths (federation,
backbone) resolve against ``base_dir`` — the app's own folder, which holds the
``scenarios/`` YAMLs because the FAB ships ``*.yaml`` — and relative output paths
(out-dir, cache-dir) against the current directory. ``scripts/run_federation.py``
always passes absolute paths.

Also: :func:`federation_site_paths`, a lenient reader of a federation file that keeps
one broken site YAML from taking the whole federation down (issue 4: "a site with a
broken YAML yields a clear error and the other sites' round completes").
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedfm.scenarios import SiteSpec, check_sites_fit, federation_entries, load_listed_site, load_site, spec_hash

LR_SCHEDULES = ("run", "round")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm")
STAGES = ("finetune", "pretrain")
SITE_MODELS = ("global", "local")
LOCAL_OPTIMIZERS = ("reset", "keep")
PRESETS = ("tiny", "small", "base", "large")
DEVICES = ("auto", "cpu", "cuda")
# What fedfm.train.refit_heads may move (defined here, torch-free, so run configs validate it):
# "head" every parameter of a pooled head, "features" only its paths from the classical side inputs.
REFIT_SCOPES = ("head", "features")


@dataclass(frozen=True)
class RunConfig:
    federation: str = "scenarios/federations/default.yaml"  # which sites train, which are held out
    backbone: str = ""              # pretrained backbone checkpoint; "" → server pretrains a small one first
    preset: str = "tiny"            # model size: tiny (~1M) | small | base | large
    stage: str = "finetune"         # finetune: LoRA+heads FL on a frozen backbone; pretrain: full-backbone FedAvg
    num_server_rounds: int = 3
    local_steps: int = 20           # optimiser steps per site per round (equal per-site compute)
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "run"        # run: each round is its slice of one warm-up + cosine schedule; round: restarts
    lora_r: int = 4                 # LoRA rank on the frozen backbone (model preset default)
    lora_alpha: int = 8
    dwa_temperature: float = 2.0    # Dynamic Weight Averaging of task losses (LLM4WM)
    head_prior_mu: float = 0.0      # L2-SP pull of the BF/DE/PE/LoS heads towards their classical start
    head_prior_tasks: str = "all"   # the heads head-prior-mu holds: all (BF, DE, PE, LoS) or a list of them, "BF"
    head_lr_scale: float = 10.0     # the BF/DE/PE/LoS heads' learning rate as a multiple of lr
    head_refit_epochs: int = 0      # after its local steps a site refits its BF/DE/PE/LoS heads alone (0 = off)
    head_refit_scope: str = "head"  # what that refit moves: head (all of it) | features (paths from the classical inputs)
    strategy: str = "fedavg"
    fedprox_mu: float = 0.01        # proximal weight, only used by fedprox
    fedadam_eta: float = 1e-2       # server learning rate, only used by fedadam
    server_lr: float = 1.0          # fedavgm: global += server_lr · (momentum of the averaged update)
    server_momentum: float = 0.0    # fedavgm: server momentum (Hsu et al. 2019); 0 and lr 1 = FedAvg
    personal_heads: str = ""        # tasks whose output heads each training site keeps (FedPer): "", "all", "PE,LoS"
    personal_adapters: str = ""     # tasks whose input adapters each training site keeps (FedRep-like): as above
    site_model: str = "global"      # what a training site is scored with: the aggregate, or its own last local model
    local_optimizer: str = "reset"  # reset: fresh AdamW every round; keep: a site continues its own Adam moments and DWA windows
    fraction_train: float = 1.0     # fraction of connected sites sampled per round
    fraction_evaluate: float = 0.0  # fraction of sites that score the new global state on their own val split each round
    min_train_nodes: int = 2        # Flower waits until this many sites are connected
    round_timeout: float = 1800.0   # seconds the server waits for a round's replies
    pretrain_steps: int = 200       # central pretraining steps when no backbone is given
    eval_max_samples: int = 0       # cap on test samples per site in central evaluation; 0 = all
    eval_every: int = 1             # central evaluation at round 0, every k-th round and the last round
    train_max_samples: int = 0      # a site trains on (and its baselines fit) its first N train samples; 0 = all
    out_dir: str = "runs/{run-id}"  # the run folder itself (config.json, ...); server/app.py fills in {run-id}
    cache_dir: str = ""             # site data cache; "" → $FEDFM_CACHE_DIR or ~/.cache/fedfm
    resume: str = ""                # a run folder to continue from its last complete round
    seed: int = 0                   # root seed: every (site, split) and (site, round) derives from it
    device: str = "auto"            # auto: cuda when present

    def __post_init__(self) -> None:
        _check("strategy", self.strategy, self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}")
        _check("lr-schedule", self.lr_schedule, self.lr_schedule in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}")
        _check("stage", self.stage, self.stage in STAGES, f"one of {', '.join(STAGES)}")
        _check("site-model", self.site_model, self.site_model in SITE_MODELS, f"one of {', '.join(SITE_MODELS)}")
        _check("local-optimizer", self.local_optimizer, self.local_optimizer in LOCAL_OPTIMIZERS,
               f"one of {', '.join(LOCAL_OPTIMIZERS)}")
        _check("head-refit-scope", self.head_refit_scope, self.head_refit_scope in REFIT_SCOPES,
               f"one of {', '.join(REFIT_SCOPES)}")
        _check("preset", self.preset, self.preset in PRESETS, f"one of {', '.join(PRESETS)}")
        _check("device", self.device, self.device in DEVICES, f"one of {', '.join(DEVICES)}")
        _check("federation", self.federation, bool(self.federation), "a path to a federation YAML")
        _check("out-dir", self.out_dir, bool(self.out_dir), "a folder path")
        for key in ("num_server_rounds", "local_steps", "batch_size", "lora_r", "lora_alpha", "min_train_nodes",
                    "eval_every"):
            value = getattr(self, key)
            _check(_kebab(key), value, value >= 1, "an integer >= 1")
        for key in ("pretrain_steps", "eval_max_samples", "train_max_samples", "seed", "head_refit_epochs"):
            value = getattr(self, key)
            _check(_kebab(key), value, value >= 0, "an integer >= 0")
        for key in ("lr", "dwa_temperature", "fedadam_eta", "server_lr", "round_timeout", "head_lr_scale"):
            value = getattr(self, key)
            _check(_kebab(key), value, math.isfinite(value) and value > 0, "a finite number > 0")
        for key in ("fedprox_mu", "head_prior_mu"):
            value = getattr(self, key)
            _check(_kebab(key), value, math.isfinite(value) and value >= 0, "a finite number >= 0")
        _check("server-momentum", self.server_momentum,
               math.isfinite(self.server_momentum) and 0 <= self.server_momentum < 1, "a number in [0, 1)")
        _check("fraction-train", self.fraction_train, 0 < self.fraction_train <= 1, "a number in (0, 1]")
        _check("fraction-evaluate", self.fraction_evaluate, 0 <= self.fraction_evaluate <= 1,
               "a number in [0, 1] (0 = no federated evaluation)")
        # A knob of one strategy set under another would be silently ignored (the run passed off
        # as, say, FedProx while it ran FedAvg): refuse it, naming the strategy that uses it.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, owner in (("fedprox_mu", "fedprox"), ("fedadam_eta", "fedadam"),
                           ("server_lr", "fedavgm"), ("server_momentum", "fedavgm")):
            value = getattr(self, key)
            if value != defaults[key] and self.strategy != owner:
                raise ValueError(f"run config: `{_kebab(key)}` = {value!r} is used only by strategy={owner}, and "
                                 f"`strategy` is {self.strategy!r}; set strategy={owner}, or leave `{_kebab(key)}` "
                                 f"at its default {defaults[key]!r}")
        if self.fraction_evaluate and self.stage == "pretrain":
            raise ValueError(f"run config: `fraction-evaluate` = {self.fraction_evaluate!r} is used only with "
                             f"stage=finetune (the sites score the fine-tuned tasks; stage=pretrain is scored "
                             f"by its reconstruction on the server); leave `fraction-evaluate` at 0.0")
        if self.head_refit_scope != defaults["head_refit_scope"] and self.head_refit_epochs == 0:
            raise ValueError(f"run config: `head-refit-scope` = {self.head_refit_scope!r} is used only with "
                             f"`head-refit-epochs` >= 1, and it is 0; set head-refit-epochs, or leave "
                             f"`head-refit-scope` at its default {defaults['head_refit_scope']!r}")
        parse_prior_tasks(self.head_prior_tasks)
        if self.head_prior_tasks != defaults["head_prior_tasks"] and self.head_prior_mu == 0:
            raise ValueError(f"run config: `head-prior-tasks` = {self.head_prior_tasks!r} is used only with "
                             f"`head-prior-mu` > 0, and it is 0; set head-prior-mu, or leave `head-prior-tasks` "
                             f"at its default {defaults['head_prior_tasks']!r}")
        from fedfm.tasks import TASKS

        for key in ("personal_heads", "personal_adapters"):
            _check(_kebab(key), getattr(self, key), set(_named_tasks(getattr(self, key))) <= set(TASKS),
                   f"'' (none), 'all' or a comma-separated list of {', '.join(TASKS)}")

    def train_samples(self, spec: SiteSpec) -> int:
        """The training samples a site has in this run: its train split, capped by ``train-max-samples``."""
        return site_train_samples(spec, self.train_max_samples)

    def evaluates_round(self, round_: int) -> bool:
        """Whether the central evaluator scores round ``round_`` (``eval-every``): round 0, every
        k-th round and the last, so a run's report always has its start and its end. Every
        round is checkpointed either way."""
        return round_ % self.eval_every == 0 or round_ == self.num_server_rounds

    @property
    def personal_tasks(self) -> tuple[str, ...]:
        """Tasks whose heads stay personal to each training site (``personal-heads``)."""
        from fedfm.tasks import TASKS

        named = _named_tasks(self.personal_heads)
        return tuple(t for t in TASKS if t in named)

    @property
    def prior_tasks(self) -> tuple[str, ...]:
        """The pooled heads ``head-prior-mu`` holds near their classical start (``head-prior-tasks``)."""
        return parse_prior_tasks(self.head_prior_tasks)

    @property
    def personal_adapter_tasks(self) -> tuple[str, ...]:
        """Tasks whose input adapters stay personal to each training site (``personal-adapters``)."""
        from fedfm.tasks import TASKS

        named = _named_tasks(self.personal_adapters)
        return tuple(t for t in TASKS if t in named)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], base_dir: str | Path | None = None) -> "RunConfig":
        """Validate Flower's flat run config (kebab-case keys) and resolve its paths.

        Unknown keys and wrong types raise ``ValueError`` naming the key, the value and
        what is allowed."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_").replace(".", "_")
            if name not in fields:
                allowed = ", ".join(_kebab(n) for n in fields)
                raise ValueError(f"run config: unknown key `{key}`; allowed keys: {allowed}")
            kwargs[name] = _coerce(key, value, fields[name].type)
        cfg = cls(**kwargs)
        return cfg.resolve(base_dir)

    def resolve(self, base_dir: str | Path | None = None) -> "RunConfig":
        """Absolute paths: inputs against ``base_dir`` (default: cwd), outputs against cwd."""
        base = Path(base_dir) if base_dir else Path.cwd()

        def inp(p: str) -> str:
            return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

        def out(p: str) -> str:
            return str(Path(p).expanduser().resolve()) if p else p

        return dataclasses.replace(self, federation=inp(self.federation), backbone=inp(self.backbone),
                                   out_dir=out(self.out_dir), cache_dir=out(self.cache_dir),
                                   resume=out(self.resume))

    @property
    def run_dir(self) -> Path:
        """Where this run writes: the resumed run's folder when resuming, else out-dir."""
        return Path(self.resume or self.out_dir)

    def to_flower(self) -> dict[str, Any]:
        """The kebab-case mapping :meth:`from_flower` accepts (round trip)."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}


# Run-config keys a resume may change: how long and where it runs, not what it trains. Any
# other key changed on resume would make the rest of the run another experiment than its
# first rounds (and than the uninterrupted run the resume is meant to equal), so it is refused.
# ``backbone`` is checked on its own (the run keeps the recorded one); ``federation`` by the
# sites it names (their spec hashes), not by its path.
RESUME_MAY_CHANGE = ("num-server-rounds", "round-timeout", "min-train-nodes", "eval-every", "fraction-evaluate",
                     "device", "cache-dir", "out-dir", "resume", "backbone", "federation", "pretrain-steps")


def _named_tasks(value: str, every: tuple[str, ...] | None = None) -> list[str]:
    """The tasks a ``personal-*`` / ``head-prior-tasks`` value names: '' → none, 'all' → every
    task (``every``, default all seven), else its list."""
    from fedfm.tasks import TASKS

    if value.strip() == "all":
        return list(every or TASKS)
    return [t.strip() for t in value.split(",") if t.strip()]


POOLED_HEADS = ("BF", "DE", "PE", "LoS")  # the heads head-prior-mu can hold (fedfm.train.POOLED_TASKS)


def parse_prior_tasks(value: str, key: str = "run config: `head-prior-tasks`") -> tuple[str, ...]:
    """``head-prior-tasks`` (run config; train_central.py's flag): 'all' or a comma-separated list
    of the pooled heads → those heads in their order; ValueError naming ``key`` and the value."""
    named = _named_tasks(value, POOLED_HEADS)
    if not named or not set(named) <= set(POOLED_HEADS):
        raise ValueError(f"{key} = {value!r} is not allowed; expected 'all' or a comma-separated list of "
                         f"{', '.join(POOLED_HEADS)} (the pooled heads)")
    return tuple(t for t in POOLED_HEADS if t in named)


def resume_mismatch(cfg: "RunConfig", recorded: Mapping[str, Any]) -> str | None:
    """Why ``cfg`` cannot continue the run whose recorded run config is ``recorded`` (a
    config.json's ``run_config``): the first key it changes, or None."""
    mine = cfg.to_flower()
    # a key the run's fedfm version did not record yet had its default then (head-prior-tasks
    # set on a resume of a run from before it existed would change what the run trains)
    defaults = RunConfig().to_flower()
    for key in mine:
        if key in RESUME_MAY_CHANGE:
            continue
        then = recorded.get(key, defaults[key])
        if mine[key] != then:
            return (f"`{key}` is {mine[key]!r} here but the run was started with {then!r}; a resume keeps "
                    f"the run's settings (only {', '.join(RESUME_MAY_CHANGE[:7])} may change): set "
                    f"{key}={then!r} or start a new run")
    return None


def check_resume_settings(cfg: RunConfig, recorded: dict, sites: list, run_dir: Path) -> None:
    """ValueError when ``cfg`` changes what the run in ``run_dir`` trains: a run-config key
    other than those :data:`fedfm.config.RESUME_MAY_CHANGE` lists, or the federation's sites
    (names, roles, site-YAML contents by spec hash)."""
    why = resume_mismatch(cfg, recorded.get("run_config", {}))
    if why is None:
        def sites_of(entries):
            return [(e.get("name"), e.get("role"), e.get("spec_hash")) for e in entries]

        then = sites_of(recorded.get("federation", {}).get("sites", []))
        now = sites_of({"name": e.name, "role": e.role, "spec_hash": spec_hash(e.spec) if e.spec else None}
                       for e in sites)
        if now != then:
            first = next((b for a, b in zip(now, then) if a != b), None) or (now[len(then):] or then[len(now):])[0]
            why = (f"federation {cfg.federation} differs from the run's sites (first difference: site "
                   f"{first[0]!r}: another role, YAML content or order); a resume keeps the run's federation")
    if why:
        raise ValueError(f"resume={run_dir}: {why}")


def with_recorded_settings(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Launcher helper: a resume's run config is the recorded run's, with ``overrides`` on top.

    ``run_federation.py --set resume=runs/X`` would otherwise fill every key it is not given
    from the defaults, and the server would refuse to resume a run started with, say,
    ``strategy=fedavgm``. Without ``resume`` (or without a config.json there) ``overrides``
    is returned as it is."""
    resume = overrides.get("resume")
    path = Path(str(resume)).expanduser() / "config.json" if resume else None
    if not path or not path.is_file():
        return dict(overrides)
    try:
        recorded = json.loads(path.read_text())["run_config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the run's recorded settings ({e})") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: `run_config` = {recorded!r} is not allowed; expected the run's settings "
                         f"(a mapping of run-config keys)")
    known = {_kebab(f.name) for f in dataclasses.fields(RunConfig)}
    keep = {k: v for k, v in recorded.items() if k in known and k not in ("out-dir", "resume", "backbone")}
    try:  # a damaged file is named as such, not blamed on the command line
        RunConfig.from_flower(keep)
    except ValueError as e:
        raise ValueError(f"{path}: the run's recorded settings: {e}") from None
    return {**keep, **overrides}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"run config: `{key}` = {value!r} is not allowed; expected {allowed}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    typ = {"int": int, "float": float, "str": str}.get(typ, typ)  # annotations are strings here
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or isinstance(value, bool):
        kind = {int: "an integer", float: "a number", str: "a string"}.get(typ, f"a {typ.__name__}")
        raise ValueError(f"run config: `{key}` = {value!r} is not allowed; expected {kind}")
    return value


# ---- federation files, leniently -------------------------------------------------------
@dataclass(frozen=True)
class SiteEntry:
    """One site line of a federation file: its spec, or why it cannot be used."""

    path: str
    role: str                       # 'train' | 'heldout'
    spec: SiteSpec | None = None
    error: str = ""

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else Path(self.path).stem


def federation_site_paths(path: str | Path) -> list[tuple[str, str]]:
    """``[(absolute site YAML path, 'train'|'heldout'), ...]`` in file order (train first).

    Reads only the federation file, so a broken *site* file does not fail here."""
    return federation_entries(path)[1]


def load_federation_sites(path: str | Path) -> list[SiteEntry]:
    """Every site of a federation, each loaded on its own: a bad file becomes an entry
    with ``error`` set (the message names file, key and value) instead of an exception."""
    entries = []
    for site_path, role in federation_site_paths(path):
        try:
            entries.append(SiteEntry(site_path, role, spec=load_listed_site(path, site_path, role)))
        except ValueError as e:
            entries.append(SiteEntry(site_path, role, error=str(e)))
    check_sites_fit(path, (e.spec for e in entries if e.spec is not None))  # of the usable sites
    return entries


def check_batch_fits(cfg: RunConfig, sites: list[SiteEntry]) -> None:
    """ValueError when ``batch-size`` exceeds a usable training site's training samples (its
    train split, or ``train-max-samples`` of it): batches are drawn with replacement, so a
    larger one only repeats samples, and a large enough one exhausts memory mid-run (Ray then
    kills the site's actor) instead of being refused before anything starts."""
    check_batch_size("run config: `batch-size` =", cfg.batch_size,
                     [e.spec for e in sites if e.role == "train" and e.spec is not None], cfg.train_max_samples)


def site_train_samples(spec: SiteSpec, max_samples: int = 0) -> int:
    """A site's training samples: its train split, capped by ``max_samples`` (0 = all)."""
    return min(spec.samples.train, max_samples) if max_samples else spec.samples.train


def check_batch_size(what: str, batch_size: int, train_specs, max_samples: int = 0) -> None:
    """ValueError "``what`` N is not allowed: …" (``what``: a script's flag, or a run-config key and "=") when ``batch_size``
    exceeds a training site's training samples: its train split, or ``max_samples`` of it (0 =
    all). Each batch is drawn from one site's samples with replacement (``fedfm.train``)."""
    for spec in train_specs:
        n = site_train_samples(spec, max_samples)
        if batch_size > n:
            raise ValueError(f"{what} {batch_size} is not allowed: training site {spec.name} "
                             f"({spec.path}) has {n} training samples and a batch is drawn from them with "
                             f"replacement; expected an integer in [1, {n}]")


def train_site_for_partition(federation: str | Path, partition_id: int, num_partitions: int) -> SiteEntry:
    """The training site a simulated SuperNode plays: partition ``i`` → i-th train site."""
    entries = [e for e in federation_site_paths(federation) if e[1] == "train"]
    if num_partitions != len(entries):
        raise ValueError(f"{federation}: {len(entries)} training sites but num-partitions={num_partitions}; "
                         f"run with --federation-config \"num-supernodes={len(entries)}\"")
    if not 0 <= partition_id < len(entries):
        raise ValueError(f"partition-id {partition_id} is not in [0, {len(entries)})")
    site_path, role = entries[partition_id]
    try:
        return SiteEntry(site_path, role, spec=load_site(site_path))
    except ValueError as e:
        return SiteEntry(site_path, role, error=str(e))

