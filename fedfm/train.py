"""Local training loops: masked-reconstruction pretraining and multi-task fine-tuning (DWA).

    pretrainer = pretrain(model, [(spec, arrays), ...], steps=2000)       # writes into model's backbone
    losses = finetune(model, {"CE": td_ce, ...}, steps=500, seed=3)       # LoRA + adapters + heads

Both take an explicit seed (torch.Generator; global RNG untouched), pick CUDA when it is
there (``device`` overrides) and use bf16 autocast on GPU only.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedfm.model.config import DENSE_TASKS, POOLED_OUTPUTS
from fedfm.config import REFIT_SCOPES
from fedfm.model.lora import base_model, lora_parameters, without_lora
from fedfm.model.network import pooled_output
from fedfm.model.pretrain import MASK_PRIORS, MASK_TYPES, Pretrainer, make_mask, masked_nmse
from fedfm.model.prior import classical_prior


POOLED_TASKS = ("BF", *POOLED_OUTPUTS)
# What refit_heads may move (REFIT_SCOPES). "head": every parameter of a pooled head. "features":
# only the paths that read the classical side inputs (the linear skip and the feature MLP from the
# profile/context features, PE's LoS gate, BF's spectrum weights and beam-axis CNN), not the MLP
# over the token-mean embedding, whose inputs move with a site's grid shape (heads.PooledHead).
_FEATURE_PATHS = frozenset({"skip", "gate", "feature_mlp", "spectrum_weight", "spectrum_conv"})


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not allowed; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is visible here (use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this host has {torch.cuda.device_count()} CUDA device(s); "
                         f"expected cuda:0 … cuda:{torch.cuda.device_count() - 1}, cuda or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not allowed; expected auto, cpu, cuda or cuda:N")
    return dev


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@contextlib.contextmanager
def all_cores():
    """Use every core this process may run on, then restore the thread count.

    For the server's work between rounds (central evaluation, server-side pretraining): the
    sites wait for the next round then, so the server has the machine to itself, while the
    simulated sites train with one thread each (OMP_NUM_THREADS=1, see run_federation.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on CPU (CPU bf16 is slower than fp32 on most hosts)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up (5% of steps, ≤ 50) then cosine decay to lr/10."""
    warm = min(50, max(1, steps // 20))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def as_real(a: np.ndarray) -> torch.Tensor:
    """complex64 [...] → float32 [..., 2] without copying."""
    return torch.view_as_real(torch.from_numpy(np.ascontiguousarray(a, dtype=np.complex64)))


# ---- task batches and losses -----------------------------------------------------------
BF_SOFT_POWER = 1.0  # BF target: q_b ∝ g_b^κ over the codebook's beam gains g (κ = 1: their power shares)


def bf_soft_targets(td, power: float = BF_SOFT_POWER) -> torch.Tensor:
    """BF training target: the mmWave beam-gain distribution q [S, B], q_b ∝ g_b^κ with g_b =
    Σ_k |w_bᴴ h_k|² (argmax = ``best_beam``). Against one-hot labels (a few samples per beam on
    a site's split) it tells the head how much worse each other beam is, so neighbours of the
    best beam are near-misses, not errors as wrong as a beam pointing away."""
    from fedfm.channels.codebook import beam_gains

    g = np.asarray(beam_gains(td.extras["h_mmwave"], td.extras["codebook"]), np.float64)   # [S, B]
    q = (g / g.max(axis=1, keepdims=True)) ** power
    return torch.as_tensor((q / q.sum(axis=1, keepdims=True)).astype(np.float32))


def task_targets(td) -> torch.Tensor:
    """A TaskData's training target: dense [S, G, K, N, 2]; BF beam-gain distribution [S, B]
    (``bf_soft_targets``) when the TaskData carries the mmWave CSI, else beam ids; LoS class
    ids; DE/PE normalised."""
    if td.task in DENSE_TASKS:
        return as_real(td.targets)
    if td.task == "BF" and "h_mmwave" in td.extras and "codebook" in td.extras:
        return bf_soft_targets(td)
    if td.task in ("DE", "PE"):
        from fedfm.tasks import normalise_target

        return torch.as_tensor(np.asarray(normalise_target(td.task, td.targets), dtype=np.float32))
    return torch.as_tensor(np.asarray(td.targets, dtype=np.int64))


def task_loss(task: str, out: torch.Tensor, y: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """NMSE on the region (CE/CP/PF), cross-entropy (BF against a class id or a distribution
    over beams, LoS), L1 on normalised targets (DE, PE)."""
    if task in DENSE_TASKS:
        return masked_nmse(out.float(), y, region)
    if task in ("DE", "PE"):
        return F.l1_loss(out.float(), y)
    if y.is_floating_point():  # soft targets: -Σ_b q_b log p_b
        return -(y * F.log_softmax(out.float(), dim=1)).sum(dim=1).mean()
    return F.cross_entropy(out.float(), y)


def _context(td, device: torch.device) -> torch.Tensor | None:
    """The site context vector of a TaskData (``fedfm.tasks.site_context``), None if it has none."""
    c = td.extras.get("context")
    return None if c is None else torch.as_tensor(np.asarray(c, dtype=np.float32)).to(device)


class TaskSampler:
    """Random batches of one task pooled over one or more sites (sites may differ in shape:
    a batch comes from one site, chosen with probability ∝ its samples)."""

    def __init__(self, tds, device: torch.device):
        self.tds = list(tds) if isinstance(tds, (list, tuple)) else [tds]
        self.task = self.tds[0].task
        self.x = [as_real(td.inputs) for td in self.tds]
        self.y = [task_targets(td) for td in self.tds]
        self.known = [torch.as_tensor(np.asarray(td.known, dtype=bool)).to(device) for td in self.tds]
        self.region = [torch.as_tensor(np.asarray(td.region, dtype=bool)).to(device)
                       if self.task in DENSE_TASKS else None for td in self.tds]
        self.context = [_context(td, device) for td in self.tds]
        self.stats = [td.extras.get("stats") for td in self.tds]   # ChannelStats of CE/CP/PF, the site's label prior of BF/DE/PE/LoS, or None
        self.sizes = torch.tensor([float(x.shape[0]) for x in self.x])
        self.device = device

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum())

    def batch(self, batch_size: int, gen: torch.Generator):
        i = int(torch.multinomial(self.sizes, 1, generator=gen)) if len(self.x) > 1 else 0
        idx = torch.randint(self.x[i].shape[0], (batch_size,), generator=gen)
        return (self.x[i][idx].to(self.device, non_blocking=True), self.known[i],
                self.y[i][idx].to(self.device, non_blocking=True), self.region[i], self.context[i], self.stats[i])


# ---- Dynamic Weight Averaging ------------------------------------------------------------
def dwa_weights(prev: dict[str, float] | None, prev2: dict[str, float] | None,
                temperature: float) -> dict[str, float]:
    """LLM4WM Eq. 27 (Liu et al. 2019): w_i = K·exp(r_i/T) / Σ_j exp(r_j/T), r_i = L_i(t−1)/L_i(t−2).

    Until two windows of losses exist every weight is 1.
    """
    if temperature <= 0:
        raise ValueError(f"dwa_temperature should be > 0, got {temperature}")
    if not prev or not prev2:
        return {t: 1.0 for t in (prev or prev2 or {})}
    tasks = list(prev)
    r = torch.tensor([prev[t] / max(prev2[t], 1e-12) for t in tasks], dtype=torch.float64)
    w = len(tasks) * torch.softmax(r / temperature, dim=0)
    return {t: float(v) for t, v in zip(tasks, w)}


# ---- fine-tuning -------------------------------------------------------------------------
def finetune(model: nn.Module, tasks: dict, steps: int, batch_size: int = 32, lr: float = 1e-3,
             dwa_temperature: float = 2.0, seed: int = 0, device=None, dwa_window: int = 10,
             stage1_steps: int = 0, train_lora: bool = True, proximal_mu: float = 0.0,
             weight_decay: float = 0.0, history: list | None = None,
             head_lr_scale: float = 10.0, schedule: tuple[int, int] | None = None,
             prior_mu: float = 0.0, prior: dict[str, torch.Tensor] | None = None,
             prior_tasks: tuple[str, ...] = POOLED_TASKS,
             optimizer_state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Multi-task fine-tuning of the trainable state (LoRA + adapters + heads) with DWA.

    tasks: {task: TaskData or [TaskData, ...] (pooled sites)}. Every step draws one batch per
    task and descends Σ_i w_i L_i; DWA re-weights once per window of ``dwa_window`` steps.
    ``stage1_steps``: LLM4WM §IV-E two-stage schedule (LoRA frozen for the first steps).
    ``train_lora=False``: the frozen-backbone ablation. ``proximal_mu``: FedProx term
    μ/2·‖θ − θ_start‖². ``history`` (if given) receives one dict per window.
    ``prior_mu``: L2-SP (Li et al. 2018) on the pooled heads (BF, DE, PE, LoS):
    μ/2·‖θ − θ_prior‖² over their parameters, θ_prior = ``prior`` ({name: tensor}, e.g.
    :func:`head_prior` of the model as the factory built it) or their values at the call's start;
    ``prior_tasks``: the pooled heads it holds (default all four; run-config ``head-prior-tasks``).
    Those heads start at the classical readings (Capon beam, deployment prior, K-factor rule),
    and with few labels their MLPs fit the training samples and end below where they started
    (measured in RESULTS.md); the penalty is a Gaussian prior centred on the classical reading.
    ``schedule`` = (offset, total): these steps are steps offset … offset+steps−1 of one
    ``total``-step warm-up + cosine schedule (a federated round's slice of the run's schedule,
    ``fedfm.federated.round_schedule``); default: the steps are the whole schedule.
    ``optimizer_state`` (in and out): AdamW's step count and moments by parameter name
    (:func:`adam_state`) and DWA's last two windows of task losses (:func:`dwa_state`); when
    it holds some they are loaded before the first step (so two calls continue one Adam run
    and one DWA weighting), and it receives the state after the last step.
    Returns each task's mean loss over the last window.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"finetune: `steps` and `batch_size` should be positive, got {steps}, {batch_size}")
    offset, total = schedule if schedule is not None else (0, steps)
    device = resolve_device(device)
    model.to(device).train()
    samplers = {t: TaskSampler(td, device) for t, td in tasks.items()}
    gen = torch.Generator().manual_seed(seed)
    lora = lora_parameters(model)
    lora_flags = [p.requires_grad for p in lora]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    pooled = [_pooled_head(n) for n, _ in named]
    groups = [{"params": [p for (_, p), f in zip(named, pooled) if not f], "scale": 1.0},
              {"params": [p for (_, p), f in zip(named, pooled) if f], "scale": head_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
    windows: list[dict[str, float]] = []
    if optimizer_state:
        load_adam_state(opt, named, {k: v for k, v in optimizer_state.items() if not k.startswith(_DWA_PREFIX)})
        windows = load_dwa_state(optimizer_state, tuple(samplers))
    anchor = []
    if prior_mu > 0:
        if not prior_tasks or not set(prior_tasks) <= set(POOLED_TASKS):
            raise ValueError(f"finetune: `prior_tasks` {prior_tasks!r} should be a non-empty subset of "
                             f"{', '.join(POOLED_TASKS)}")
        prior = prior if prior is not None else head_prior(model)
        held = [_pooled_head(n, prior_tasks) for n, _ in named]
        missing = [n for (n, _), f in zip(named, held) if f and n not in prior]
        if missing:
            raise ValueError(f"finetune: `prior` has no value for {missing[0]} ({len(missing)} pooled-head "
                             f"parameters missing); pass head_prior(model) of this model")
        anchor = [(p, prior[n].to(p.device, p.dtype)) for (n, p), f in zip(named, held) if f]
    acc = {t: 0.0 for t in samplers}
    n_acc = 0
    try:
        for step in range(steps):
            for p, flag in zip(lora, lora_flags):
                p.requires_grad_(flag and train_lora and step >= stage1_steps)
            weights = dwa_weights(windows[-1] if windows else None, windows[-2] if len(windows) > 1 else None,
                                  dwa_temperature) or {t: 1.0 for t in samplers}
            for group in opt.param_groups:
                group["lr"] = lr_at(offset + step, total, lr) * group["scale"]
            opt.zero_grad(set_to_none=True)
            for t, sampler in samplers.items():  # one backward per task: one graph in memory at a time
                x, known, y, region, context, stats = sampler.batch(batch_size, gen)
                with autocast(device):
                    loss = task_loss(t, model(t, x, known, context, stats), y, region)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(f"finetune: the {t} loss is {value} at step {offset + step + 1} (training "
                                     f"diverged at lr {lr:g}: lower the learning rate); no result is kept")
                (weights.get(t, 1.0) * loss / len(samplers)).backward()
                acc[t] += value
            if start is not None:
                prox = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start) if p.requires_grad)
                (0.5 * proximal_mu * prox).backward()
            if anchor:
                (0.5 * prior_mu * sum(((p - a) ** 2).sum() for p, a in anchor)).backward()
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
            opt.step()
            n_acc += 1
            if n_acc == dwa_window or step == steps - 1:
                windows.append({t: v / n_acc for t, v in acc.items()})
                if history is not None:
                    history.append({"step": step + 1, "losses": windows[-1], "weights": weights})
                acc, n_acc = {t: 0.0 for t in samplers}, 0
    finally:
        for p, flag in zip(lora, lora_flags):
            p.requires_grad_(flag)
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(adam_state(opt, named))
        optimizer_state.update(dwa_state(windows))
    return windows[-1]


_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
_DWA_PREFIX = "dwa/"  # no parameter name starts with it (they start with the peft wrapper's base_model.)


def dwa_state(windows: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """DWA's memory, the last two windows' mean task losses, as ``{"dwa/<task>": float64 [2]}``
    (older window first, NaN while there is only one): what Eq. 27 reads at the next window."""
    if not windows:
        return {}
    prev2, prev = (windows[-2] if len(windows) > 1 else None), windows[-1]
    return {f"{_DWA_PREFIX}{t}": torch.tensor([prev2[t] if prev2 else math.nan, v], dtype=torch.float64)
            for t, v in prev.items()}


def load_dwa_state(state: dict[str, torch.Tensor], tasks: tuple[str, ...]) -> list[dict[str, float]]:
    """The windows :func:`dwa_state` saved (none saved: DWA starts afresh); OptimizerStateMismatch
    when they are for other tasks or malformed."""
    saved = {k[len(_DWA_PREFIX):]: v for k, v in state.items() if k.startswith(_DWA_PREFIX)}
    if not saved:
        return []
    if set(saved) != set(tasks) or any(v.shape != (2,) for v in saved.values()):
        raise OptimizerStateMismatch(f"the optimizer state's DWA losses are for tasks {sorted(saved)}, "
                                     f"not {sorted(tasks)}, or not two windows each")
    older = {t: float(saved[t][0]) for t in tasks}
    newer = {t: float(saved[t][1]) for t in tasks}
    if not all(math.isfinite(v) for v in newer.values()):  # a finished window's loss is finite (finetune checks)
        raise OptimizerStateMismatch("the optimizer state's latest DWA losses are not finite")
    return ([older] if all(math.isfinite(v) for v in older.values()) else []) + [newer]


class OptimizerStateMismatch(ValueError):
    """An optimizer state saved for another model (:func:`load_adam_state`)."""


def adam_state(opt: torch.optim.Optimizer, named: list) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as ``{"<parameter name>/<step|exp_avg|exp_avg_sq>": tensor}``
    (CPU float32; the step as a 1-element tensor): keyed by name, not by the optimizer's
    parameter order, so a site's state survives a rebuilt model and reads as a safetensors file."""
    out = {}
    for name, p in named:
        st = opt.state.get(p)
        if st:
            out.update({f"{name}/{k}": torch.atleast_1d(st[k].detach()).float().cpu() for k in _ADAM_KEYS})
    return out


def load_adam_state(opt: torch.optim.Optimizer, named: list, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`adam_state` into ``opt`` (a parameter it has no entry for, one that had no
    gradient yet, starts fresh); OptimizerStateMismatch when it is another model's (a parameter name this
    model lacks, or another shape): a stale state must not steer this one's steps."""
    params = dict(named)
    theirs = sorted({k.rsplit("/", 1)[0] for k in state})
    extra = [n for n in theirs if n not in params]
    if extra:
        raise OptimizerStateMismatch(f"the optimizer state is for other parameters ({len(extra)} not in this "
                                     f"model, e.g. {extra[0]})")
    for name in theirs:
        p = params[name]
        if any(f"{name}/{k}" not in state for k in _ADAM_KEYS) or state[f"{name}/exp_avg"].shape != p.shape:
            raise OptimizerStateMismatch(f"the optimizer state's `{name}` is incomplete or not of the "
                                         f"parameter's shape {list(p.shape)}")
        opt.state[p] = {"step": state[f"{name}/step"].reshape(()).clone().float(),
                        "exp_avg": state[f"{name}/exp_avg"].to(p.device, p.dtype).clone(),
                        "exp_avg_sq": state[f"{name}/exp_avg_sq"].to(p.device, p.dtype).clone()}


def _pooled_head(name: str, tasks: tuple[str, ...] = POOLED_TASKS) -> bool:
    return any(f"heads.{t}." in name for t in tasks)


def head_prior(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the pooled heads' trainable parameters by name: ``finetune(prior=...)``'s
    anchor, taken from a model as the factory builds it (heads at their classical start)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and _pooled_head(n)}


@torch.no_grad()
def task_losses(model: nn.Module, tasks: dict, batch_size: int = 64, device=None) -> dict[str, float]:
    """Each task's training loss over all its samples (eval mode), e.g. before/after fine-tuning."""
    device = resolve_device(device)
    model.to(device).eval()
    out = {}
    for t, td in tasks.items():
        s = TaskSampler(td, device)
        total, count = 0.0, 0
        for x, y, known, region, context, stats in zip(s.x, s.y, s.known, s.region, s.context, s.stats):
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                with autocast(device):
                    total += float(task_loss(t, model(t, xb, known, context, stats), yb, region)) * xb.shape[0]
                count += xb.shape[0]
        out[t] = total / count
    model.train()
    return out


# ---- refitting the pooled heads on frozen features ------------------------------------------
@torch.no_grad()
def _head_inputs(model: nn.Module, task: str, tds: list, device: torch.device, batch_size: int):
    """(inputs, targets): what the pooled head of ``task`` reads for every sample of ``tds``
    (``FedFM.pooled_inputs``, on the host, float32) and its training targets, sites concatenated."""
    net = base_model(model)
    parts, targets = [], []
    for td in tds:
        x = as_real(td.inputs)
        known = torch.as_tensor(np.asarray(td.known, dtype=bool)).to(device)
        context = _context(td, device)
        for i in range(0, x.shape[0], batch_size):
            with autocast(device):
                parts.append(tuple(v.float().cpu() for v in net.pooled_inputs(task, x[i:i + batch_size].to(device),
                                                                              known, context, td.extras.get("stats"))))
        targets.append(task_targets(td))
    return tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))), torch.cat(targets)


def refit_heads(model: nn.Module, tasks: dict, epochs: int = 100, lr: float = 3e-3, batch_size: int = 64,
                val_fraction: float = 0.2, seed: int = 0, device=None, check_every: int = 5,
                scope: str = "head", prior_mu: float = 0.0) -> dict[str, dict]:
    """Refit the pooled heads (BF, DE, PE, LoS) to their training data with everything else
    frozen, keeping the epoch with the lowest loss on held-back training samples.

    Last-layer retraining (Kirichenko et al. 2023; the linear-probe half of Kumar et al.'s
    LP-FT, run after fine-tuning instead of before): multi-task fine-tuning gives a pooled
    head one batch per step, a few passes over a site's labels in a CPU budget, while what it
    reads — the token-mean embedding and the classical side inputs — costs one forward per
    sample to compute once. Training the head alone on those is then cheap, so it can run to
    convergence, with early stopping instead of a step budget as the guard against fitting
    noise. Heads are per task, so the epoch is chosen per task.

    tasks: {task: TaskData or [TaskData, ...]} (train splits; dense tasks are ignored).
    ``val_fraction`` of each task's samples (drawn with ``seed``) is held back to choose the
    epoch; epoch 0, the head as it was, is a candidate, so a refit never raises the held-back
    loss. The head ends trained on the other samples at the chosen epoch. ``scope`` (REFIT_SCOPES):
    "head" refits every parameter of a head, "features" only its paths from the classical side
    inputs, leaving the MLP over the embedding as fine-tuning left it. ``prior_mu`` > 0 adds
    μ/2·‖θ − θ_before‖² to every batch's loss (L2-SP towards the head as fine-tuning left it; the
    held-back loss that chooses the epoch is without it). The change to each layer that reads
    the side features alone (skip, gate, the feature MLP's first) is then confined to the span
    of the training samples' features (``confine_to_span``): the same outputs on every training
    sample, no change along a direction the training sites do not vary in (their antenna count).
    Returns {task: {"epoch", "val_loss_before", "val_loss_after", "samples"}}.
    """
    if scope not in REFIT_SCOPES:
        raise ValueError(f"refit_heads: `scope` {scope!r} is not allowed; expected one of {', '.join(REFIT_SCOPES)}")
    if not (math.isfinite(prior_mu) and prior_mu >= 0):
        raise ValueError(f"refit_heads: `prior_mu` {prior_mu} is not allowed; expected a finite number >= 0")
    if epochs <= 0 or batch_size <= 0 or check_every <= 0:
        raise ValueError(f"refit_heads: `epochs`, `batch_size` and `check_every` should be positive, "
                         f"got {epochs}, {batch_size}, {check_every}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"refit_heads: `val_fraction` {val_fraction} is not in (0, 1)")
    device = resolve_device(device)
    model.to(device).eval()
    heads = base_model(model).heads
    kept = {t: [p.detach().clone() for p in heads[t].parameters()] for t in tasks if t in POOLED_TASKS}
    try:
        return _refit(model, heads, tasks, epochs, lr, batch_size, val_fraction, seed, device, check_every, scope,
                      prior_mu)
    except ValueError:
        with torch.no_grad():  # a diverged refit leaves every head as it was, not some of them refitted
            for t, values in kept.items():
                for p, v in zip(heads[t].parameters(), values):
                    p.copy_(v)
        raise
    finally:
        model.train()


def _refit(model, heads, tasks, epochs, lr, batch_size, val_fraction, seed, device, check_every,
           scope, prior_mu) -> dict[str, dict]:
    out = {}
    for t, tds in tasks.items():
        if t not in POOLED_TASKS:
            continue
        tds = list(tds) if isinstance(tds, (list, tuple)) else [tds]
        inputs, y = _head_inputs(model, t, tds, device, batch_size)
        n = y.shape[0]
        n_val = int(round(n * val_fraction))
        if n_val < 1 or n - n_val < 1:
            raise ValueError(f"refit_heads: {t} has {n} samples, too few to hold back {val_fraction:g} of them")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=gen)
        val, fit = order[:n_val], order[n_val:]
        head = heads[t]
        params = [p for name, p in head.named_parameters()
                  if p.requires_grad and (scope == "head" or _FEATURE_PATHS & set(name.split(".")))]

        def loss_on(idx):
            return task_loss(t, pooled_output(t, head(*(v[idx].to(device) for v in inputs))), y[idx].to(device), None)

        with torch.no_grad():
            before = float(loss_on(val))
        best = (before, [p.detach().clone() for p in params], 0)
        anchor = best[1]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for epoch in range(1, epochs + 1):
            shuffled = fit[torch.randperm(fit.numel(), generator=gen)]
            for i in range(0, shuffled.numel(), batch_size):
                loss = loss_on(shuffled[i:i + batch_size])
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(f"refit_heads: the {t} loss is {value} in epoch {epoch} (diverged "
                                     f"at lr {lr:g}: lower it); every head is left as it was")
                opt.zero_grad(set_to_none=True)
                if prior_mu > 0:
                    loss = loss + 0.5 * prior_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                loss.backward()
                opt.step()
            if epoch % check_every == 0 or epoch == epochs:
                with torch.no_grad():
                    v = float(loss_on(val))
                if v < best[0]:
                    best = (v, [p.detach().clone() for p in params], epoch)
        with torch.no_grad():
            for p, b in zip(params, best[1]):
                p.copy_(b)
        start = {id(p): a for p, a in zip(params, anchor)}           # what the refit began from
        for layer in _feature_layers(head):
            if id(layer.weight) in start and id(layer.bias) in start:
                confine_to_span(layer, start[id(layer.weight)], start[id(layer.bias)], inputs[1])
        out[t] = {"epoch": best[2], "val_loss_before": before, "val_loss_after": best[0], "samples": n}
    return out


def _feature_layers(head: nn.Module) -> list[nn.Linear]:
    """A pooled head's linear layers that read its side features [B, F] and nothing else."""
    first = head.feature_mlp[0] if head.feature_mlp is not None else None
    return [m for m in (head.skip, head.gate, first) if m is not None]


@torch.no_grad()
def confine_to_span(layer: nn.Linear, weight_before: torch.Tensor, bias_before: torch.Tensor,
                    features: torch.Tensor, rtol: float = 1e-6) -> None:
    """Keep only the part of a refit's change to ``layer`` (which reads ``features``) that its
    training data can tell apart; move the rest into the bias.

    A refit trains on the training sites alone, and some directions of the feature space do
    not vary there: every training site of benchmark.yaml has 8 antennas, so log2(antennas) is
    the constant 3, and the four sites' contexts span 3 of its 12 dimensions. Along such a
    direction a change of weight is a change of bias in disguise, and gradient descent moves it
    as freely as the bias; on a site where that coordinate differs (16 antennas) it adds an
    offset no training sample ever checked. Here ΔW becomes ΔW·P, P the projection onto the span
    of the centred training features, and the bias takes (ΔW − ΔW·P)·μ, μ their mean: on every
    training sample the layer's output is unchanged (x − μ lies in the span), while on a new site
    the refit acts only on the part of its features the training sites span.
    Hand-written: the minimum-norm choice among the updates the training data cannot tell
    apart (the pseudo-inverse's), which no training library applies to one layer after the fact.
    """
    x = features.double().reshape(-1, features.shape[-1])
    mu = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mu, full_matrices=False)
    keep = s > rtol * float(s[0]) if s.numel() and float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
    v = vh[keep]                                                    # [r, F] the span's basis
    dw = layer.weight.double() - weight_before.double().to(layer.weight.device)
    kept = dw @ (v.T @ v).to(dw.device)
    layer.weight.copy_((weight_before.double().to(kept.device) + kept).to(layer.weight.dtype))
    layer.bias.add_(((dw - kept) @ mu.to(dw.device)).to(layer.bias.dtype))


# ---- pretraining --------------------------------------------------------------------------
def _site_grids(sites) -> list[tuple[torch.Tensor, float, float]]:
    """[(h_sub6 as float [S, T+P, K, N, 2], snr_db_min, snr_db_max)] from (spec, arrays) pairs."""
    out = []
    for spec, arrays in sites:
        est = spec.estimation
        out.append((as_real(arrays["h_sub6"]), float(est.snr_db_min), float(est.snr_db_max)))
    return out


def masked_batch(h: torch.Tensor, kind: str, snr_db: tuple[float, float], patch, gen: torch.Generator,
                 ratio: float | None = None):
    """Noisy, masked, normalised input and clean target for one batch of true CSI.

    h: float [B, G, K, N, 2]. Noise at a per-sample SNR ~ U[snr_db] (the site's estimation SNR),
    scale = RMS of the visible noisy elements (as fedfm.tasks normalises inputs).
    Returns x, visible (bool [B, G, K, N]), target, mask (hidden elements).
    """
    B, G, K, N, _ = h.shape
    mask = make_mask(kind, B, (G, K, N), patch, gen, ratio).to(h.device)
    snr = snr_db[0] + (snr_db[1] - snr_db[0]) * torch.rand(B, generator=gen)
    power = (h ** 2).sum(-1).flatten(1).mean(1)                                       # (B,)
    sigma = (power / 10 ** (snr.to(h.device) / 10) / 2).sqrt()                        # per real dimension
    noisy = h + sigma.view(B, 1, 1, 1, 1) * torch.randn(h.shape, generator=gen).to(h.device)
    visible = ~mask
    vis_power = ((noisy ** 2).sum(-1) * visible).flatten(1).sum(1) / visible.flatten(1).sum(1).clamp_min(1)
    scale = vis_power.clamp_min(1e-30).sqrt().view(B, 1, 1, 1, 1)
    return noisy * visible[..., None] / scale, visible, h / scale, mask


def pretrain(model: nn.Module, sites, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
             device=None, mask_types: tuple[str, ...] = MASK_TYPES, history: list | None = None,
             log_every: int = 50, schedule: tuple[int, int] | None = None) -> Pretrainer:
    """Masked reconstruction of the sites' true sub-6 CSI (all T+P slots), trained into the
    backbone of ``model`` (a FedFM, peft-wrapped or not, or a Pretrainer).

    sites: [(SiteSpec, split arrays)]. Steps cycle through ``mask_types``. Returns the
    Pretrainer (backbone + decoder) for ``reconstruction_nmse``; save with ``save_backbone``.
    ``schedule`` = (offset, total): as in ``finetune`` (a federated round's slice of one
    run-long warm-up + cosine schedule); default: the steps are the whole schedule. The
    history rows carry the learning rate of their last step (``lr``).
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"pretrain: `steps` and `batch_size` should be positive, got {steps}, {batch_size}")
    offset, total = schedule if schedule is not None else (0, steps)
    device = resolve_device(device)
    # a wrapped model's backbone without its LoRA layers (the same weights): they would only
    # add B = 0 products, a fifth of the step (fedfm.model.lora.without_lora)
    pre = model if isinstance(model, Pretrainer) else Pretrainer(base_model(model).cfg,
                                                                 without_lora(base_model(model).backbone))
    pre.to(device).train()
    grids = _site_grids(sites)
    sizes = torch.tensor([float(g[0].shape[0]) for g in grids])
    # Only the backbone's own weights and the decoder learn (LoRA, if wrapped, stays at B = 0).
    params = [p for n, p in pre.named_parameters() if "lora_" not in n]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    running = {k: [] for k in mask_types}
    try:
        for step in range(steps):
            kind = mask_types[step % len(mask_types)]
            i = int(torch.multinomial(sizes, 1, generator=gen))
            h, lo, hi = grids[i]
            idx = torch.randint(h.shape[0], (batch_size,), generator=gen)
            x, visible, target, mask = masked_batch(h[idx].to(device), kind, (lo, hi), pre.cfg.patch, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(offset + step, total, lr)
            with autocast(device):
                loss = masked_nmse(pre(x, visible), target, mask)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(f"pretrain: the {kind}-mask loss is {value} at step {offset + step + 1} (training "
                                 f"diverged at lr {lr:g}: lower the learning rate); no backbone is saved")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            running[kind].append(value)
            if history is not None and ((step + 1) % log_every == 0 or step == steps - 1):
                history.append({"step": step + 1, "lr": opt.param_groups[0]["lr"],
                                **{f"nmse_{k}": float(np.mean(v[-log_every:])) for k, v in running.items() if v}})
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return pre


@torch.no_grad()
def reconstruction_nmse(pre: Pretrainer | None, spec, arrays: dict, kind: str, seed: int = 0,
                        batch_size: int = 64, device=None, patch: tuple[int, int, int] | None = None) -> float:
    """Linear NMSE on the hidden elements of a split's true CSI under one mask type.

    ``pre=None`` scores the mask's classical filler instead (``MASK_PRIORS``: last slot held,
    AR across sub-bands, zeros for the random mask; give ``patch``) on the same noisy, masked
    samples: the reference a reconstruction has to beat to be worth anything.
    """
    device = resolve_device(device)
    if pre is not None:
        pre.to(device).eval()
        patch = pre.cfg.patch
    elif patch is None:
        raise ValueError("reconstruction_nmse: the classical reference (pre=None) needs `patch` for its masks")
    (h, lo, hi), = _site_grids([(spec, arrays)])
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, h.shape[0], batch_size):
        x, visible, target, mask = masked_batch(h[i:i + batch_size].to(device), kind, (lo, hi), patch, gen)
        if pre is None:  # time/frequency masks are one mask for the whole batch
            out = classical_prior(MASK_PRIORS[kind], x, visible if kind == "random" else visible[0])
        else:
            with autocast(device):
                out = pre(x, visible)
        total += float(masked_nmse(out, target, mask)) * x.shape[0]
    if pre is not None:
        pre.train()
    return total / h.shape[0]
