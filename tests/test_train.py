"""fedfm.train: DWA, what fine-tuning may change, and a tiny real pretrain + fine-tune."""
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from fedfm.model import ModelConfig, base_model, build_model, get_adapter_state
from fedfm.train import (OptimizerStateMismatch, dwa_weights, finetune, pretrain, reconstruction_nmse, refit_heads,
                         task_losses, task_loss, task_targets)

RANK = 2
STEPS = 6
BSZ = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread; on a loaded 2-core host two OpenMP threads spin
    against each other (measured: a [2560, 32] × [32, 96] linear took 15 ms vs 0.2 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass(frozen=True)
class FakeTaskData:
    """The contract's TaskData fields, filled with random arrays (unit tests of one function)."""

    task: str
    site: str
    inputs: np.ndarray
    known: np.ndarray
    region: np.ndarray
    targets: np.ndarray
    scale: np.ndarray
    extras: dict = field(default_factory=dict)


def fake_tasks(rng, shape=(4, 16, 8), samples=8, beams=16) -> dict:
    G, K, N = shape
    h = (rng.standard_normal((samples, G, K, N)) + 1j * rng.standard_normal((samples, G, K, N))).astype(np.complex64)
    comb = np.zeros(shape, dtype=bool)
    comb[:, ::4] = True
    full = np.ones(shape, dtype=bool)
    scale = np.ones(samples, dtype=np.float32)
    return {
        "CE": FakeTaskData("CE", "fake", h * comb, comb, full, h, scale),
        "BF": FakeTaskData("BF", "fake", h, full, full, rng.integers(0, beams, samples), scale),
        "LoS": FakeTaskData("LoS", "fake", h, full, full, rng.integers(0, 2, samples), scale),
    }


def tiny_cfg(**kw):
    return ModelConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "num_beams": 16, "adapter_hidden": 8,
                          "head_hidden": 16, "conv_channels": 4, "patch_k": 4, "lora_r": RANK,
                          "tasks": ("CE", "BF", "LoS"), **kw})


def test_dwa_weights_match_hand_computation():
    # Prepare: task a's loss halved, task b's doubled over the last window
    prev, prev2, temp = {"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 1.0}, 2.0
    # Execute
    w = dwa_weights(prev, prev2, temp)
    # Assert: r = (0.5, 2.0); w_i = 2·exp(r_i/2) / (exp(0.25) + exp(1.0))
    z = math.exp(0.25) + math.exp(1.0)
    assert w["a"] == pytest.approx(2 * math.exp(0.25) / z, rel=1e-12)
    assert w["b"] == pytest.approx(2 * math.exp(1.0) / z, rel=1e-12)
    assert sum(w.values()) == pytest.approx(2.0)
    # before two windows exist every weight is 1; a huge temperature tends to equal weights
    assert dwa_weights(prev, None, temp) == {"a": 1.0, "b": 1.0}
    assert dwa_weights(prev, prev2, 1e9)["a"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dwa_temperature"):
        dwa_weights(prev, prev2, 0.0)


def test_finetune_changes_only_trainable_parameters(rng):
    # Prepare
    model = build_model(tiny_cfg())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Execute
    history = []
    losses = finetune(model, fake_tasks(rng), steps=STEPS, batch_size=BSZ, lr=1e-2, seed=0, device="cpu",
                      dwa_window=2, history=history)
    # Assert: frozen backbone bit-identical; LoRA B (zero-initialised) and heads moved
    after = dict(model.named_parameters())
    for n, p in after.items():
        if n not in trainable:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(after[n], before[n]) for n in trainable if "lora_B" in n)
    assert set(losses) == {"CE", "BF", "LoS"}
    assert len(history) == STEPS // 2 and history[-1]["weights"] != {"CE": 1.0, "BF": 1.0, "LoS": 1.0}


def test_two_stage_and_frozen_ablation_keep_lora_fixed(rng):
    tasks = fake_tasks(rng)
    for kwargs in ({"stage1_steps": STEPS}, {"train_lora": False}):
        model = build_model(tiny_cfg())
        lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        heads0 = get_adapter_state(model)
        finetune(model, tasks, steps=STEPS, batch_size=BSZ, lr=1e-2, seed=0, device="cpu", **kwargs)
        assert all(torch.equal(p, lora0[n]) for n, p in model.named_parameters() if "lora_" in n)
        assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # flags restored
        heads1 = get_adapter_state(model)
        assert any(not torch.equal(heads0[k], heads1[k]) for k in heads0 if "heads" in k)


def test_finetune_is_deterministic_given_seed(rng):
    tasks = fake_tasks(rng)
    states = []
    for _ in range(2):
        model = build_model(tiny_cfg())
        finetune(model, tasks, steps=3, batch_size=BSZ, seed=11, device="cpu")
        states.append(get_adapter_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def tiny_real_site(cache_dir):
    from conftest import tiny_site
    from fedfm.data import load_split

    spec = tiny_site("model", sub6={"subcarriers": 32}, mmwave={"antennas": 16, "codebook_beams": 64},
                     samples={"train": 64, "val": 8, "test": 32})
    return spec, load_split(spec, "train", cache_dir), load_split(spec, "test", cache_dir)


def real_cfg():
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, num_beams=64, adapter_hidden=8, head_hidden=32,
                       conv_channels=4, patch_k=4)


def test_tiny_pretrain_lowers_reconstruction_nmse_of_every_mask(cache_dir):
    """Real Sionna channels of a tiny site; NMSE on the hidden elements of the test split."""
    spec, train, test = tiny_real_site(cache_dir)
    model = build_model(real_cfg())
    pre0 = pretrain(model, [(spec, train)], steps=1, lr=0.0, device="cpu")  # untrained backbone and decoder
    before = {k: reconstruction_nmse(pre0, spec, test, k) for k in ("random", "time", "frequency")}
    pre = pretrain(model, [(spec, train)], steps=60, batch_size=16, lr=3e-3, seed=1, device="cpu")
    after = {k: reconstruction_nmse(pre, spec, test, k) for k in before}
    assert all(after[k] < before[k] for k in before), (before, after)
    # pretraining wrote into the model's backbone: the same parameter objects, its LoRA left out
    shared = {id(p) for p in base_model(model).backbone.parameters()}
    assert all(id(p) in shared for p in pre.backbone.parameters())
    assert not any("lora_" in n for n, _ in pre.backbone.named_parameters())


def test_reconstruction_reference_is_the_classical_filler(cache_dir):
    """The reference of the time mask is the last visible slot held (by hand here), of the
    frequency mask AR extrapolation (better than zeros); a model that outputs zeros scores 1."""
    from fedfm.model.pretrain import Pretrainer
    from fedfm.train import _site_grids, masked_batch

    spec, _, test = tiny_real_site(cache_dir)
    cfg = real_cfg()
    ref = {k: reconstruction_nmse(None, spec, test, k, seed=3, patch=cfg.patch) for k in ("time", "frequency")}
    (h, lo, hi), = _site_grids([(spec, test)])
    assert h.shape[0] <= 64  # one batch, so the noise draws below are the ones reconstruction_nmse made
    x, visible, target, mask = masked_batch(h, "time", (lo, hi), cfg.patch, torch.Generator().manual_seed(3))
    x, target, mask = x.numpy(), target.numpy(), mask.numpy()
    last = int(np.flatnonzero(visible[0].any(axis=(1, 2)).numpy())[-1])
    held = np.repeat(x[:, last:last + 1], x.shape[1], axis=1)
    m = mask[..., None]
    by_hand = np.mean(((held - target) ** 2 * m).reshape(len(x), -1).sum(1) / (target ** 2 * m).reshape(len(x), -1).sum(1))
    assert ref["time"] == pytest.approx(by_hand, rel=1e-5)
    assert 0.0 < ref["frequency"] < 1.0  # AR across sub-bands beats zeros on real channels
    pre = Pretrainer(cfg)
    with torch.no_grad():
        pre.head.weight.zero_()
        pre.head.bias.zero_()
    for k in ("random", *ref):
        assert reconstruction_nmse(pre, spec, test, k, seed=3, device="cpu") == pytest.approx(1.0)
    assert reconstruction_nmse(None, spec, test, "random", seed=3, patch=cfg.patch) == pytest.approx(1.0)


def test_tiny_finetune_lowers_every_task_loss(cache_dir):
    tasks_mod = pytest.importorskip("fedfm.tasks")
    if not hasattr(tasks_mod, "build_tasks"):
        pytest.skip("fedfm.tasks not written yet")
    spec, train, _ = tiny_real_site(cache_dir)
    model = build_model(real_cfg())
    pretrain(model, [(spec, train)], steps=20, batch_size=16, lr=3e-3, seed=1, device="cpu")
    tds = tasks_mod.build_tasks(train, spec, "train")
    start = task_losses(model, tds, device="cpu")
    finetune(model, tds, steps=80, batch_size=16, lr=3e-3, seed=2, device="cpu")
    end = task_losses(model, tds, device="cpu")
    assert set(end) == set(tasks_mod.TASKS)
    assert all(end[t] < start[t] for t in start), {t: (start[t], end[t]) for t in start if end[t] >= start[t]}


def test_predict_returns_the_contract_format(rng):
    from fedfm.evaluate import predict

    tasks = fake_tasks(rng)
    model = build_model(tiny_cfg())
    ce, bf, los = (predict(model, tasks[t], batch_size=3) for t in ("CE", "BF", "LoS"))
    assert ce.dtype == np.complex64 and ce.shape == tasks["CE"].targets.shape
    # untrained CE head keeps the observed pilots (zero-initialised correction on the comb prior)
    known = tasks["CE"].known
    np.testing.assert_allclose(ce[:, known], tasks["CE"].inputs[:, known], atol=1e-5)
    assert bf.dtype == np.float32 and bf.shape == (8, 16)
    assert los.dtype == np.float32 and los.shape == (8,) and ((los >= 0) & (los <= 1)).all()


def test_pooled_heads_learn_at_head_lr_scale_times_the_rate(rng):
    # Adam's first step moves every parameter with a non-zero gradient by lr_at(0)·sign(g):
    # by hand, pooled-head parameters move head_lr_scale times as far as the dense head's.
    from fedfm.train import lr_at

    model = build_model(tiny_cfg())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finetune(model, fake_tasks(rng), steps=1, batch_size=BSZ, lr=1e-3, seed=0, head_lr_scale=7.0)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in before}
    step = lr_at(0, 1, 1e-3)
    ce = [v for n, v in moved.items() if "heads.CE." in n and "modules_to_save" in n and v > 0]
    los = [v for n, v in moved.items() if "heads.LoS." in n and "modules_to_save" in n and v > 0]
    assert ce and los
    assert max(ce) == pytest.approx(step, rel=1e-3)
    assert max(los) == pytest.approx(7.0 * step, rel=1e-3)


def test_bf_soft_targets_and_their_loss_by_hand():
    from fedfm.channels.codebook import dft_codebook
    from fedfm.train import bf_soft_targets, task_loss

    # one mmWave subcarrier, a 4-antenna array, 4 beams: h = beam 1's steering vector + 0.5 × beam 3's
    cb = dft_codebook(4, 4)                                           # unit-norm columns, orthogonal
    h = (cb[:, 1] + 0.5 * cb[:, 3])[None, None, :]                   # [S=1, K=1, N=4]
    td = FakeTaskData("BF", "fake", np.zeros((1, 1, 1, 1), np.complex64), None, None, np.array([1]),
                      np.ones(1, np.float32), {"h_mmwave": h, "codebook": cb})
    q = bf_soft_targets(td)
    np.testing.assert_allclose(q.numpy(), [[0.0, 0.8, 0.0, 0.2]], atol=1e-6)   # gains 1 and 0.25
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    logp = logits - math.log(3 + math.e)
    assert float(task_loss("BF", logits, q, None)) == pytest.approx(-(0.8 * logp[0, 1] + 0.2 * logp[0, 3]).item(), rel=1e-6)


def test_round_schedule_slices_one_run_long_schedule(rng):
    from fedfm.federated import round_schedule
    from fedfm.train import lr_at

    L, R = 7, 3
    whole = [lr_at(s, L * R, 1.0) for s in range(L * R)]
    sliced = [lr_at(off + s, tot, 1.0) for r in range(1, R + 1) for off, tot in [round_schedule(r, L, R)]
              for s in range(L)]
    assert sliced == whole and whole[-1] < 0.11 and max(whole) == 1.0
    assert round_schedule(R + 2, L, R) == ((R - 1) * L, R * L)  # past the last round: stays at the end
    # finetune follows the slice: Adam's first step moves a parameter by exactly the step's rate
    model = build_model(tiny_cfg())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finetune(model, fake_tasks(rng), steps=1, batch_size=BSZ, lr=1e-3, seed=0, schedule=(19, 20))
    moved = [float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
             if n in before and "heads.CE." in n and "modules_to_save" in n]
    assert max(moved) == pytest.approx(lr_at(19, 20, 1e-3), rel=1e-3) and lr_at(19, 20, 1e-3) < 2e-4


def test_a_diverging_training_stops_with_one_line_instead_of_nan(rng, cache_dir):
    from fedfm.train import resolve_device

    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match=r"^finetune: the \w+ loss is (nan|inf) at step \d+ \(training diverged"):
        finetune(model, fake_tasks(rng), steps=50, batch_size=4, lr=1e30)
    spec, train, _ = tiny_real_site(cache_dir)
    with pytest.raises(ValueError, match=r"^pretrain: the \w+-mask loss is (nan|inf) at step \d+"):
        pretrain(build_model(real_cfg()), [(spec, train)], steps=50, batch_size=4, lr=1e30)
    with pytest.raises(ValueError, match=r"^pretrain: `steps` and `batch_size` should be positive, got 2, 0"):
        pretrain(build_model(real_cfg()), [(spec, train)], steps=2, batch_size=0)
    with pytest.raises(ValueError, match=r"^device 'gpu0' is not allowed; expected auto, cpu, cuda"):
        resolve_device("gpu0")


def test_head_prior_pulls_pooled_heads_back_to_their_anchor(rng):
    # L2-SP on the pooled heads: with every pooled-head parameter 0.5 above its anchor and a
    # penalty weight that dwarfs the data gradient, Adam's first step (lr_at(0)·sign(g), by
    # hand) moves each of them by head_lr_scale·lr_at(0) *down*, towards the anchor.
    from fedfm.train import head_prior, lr_at

    model = build_model(tiny_cfg())
    prior = head_prior(model)
    assert prior and all(any(f"heads.{t}." in n for t in ("BF", "LoS")) for n in prior)
    assert not any("heads.CE." in n or "lora_" in n for n in prior)   # dense heads and LoRA are free
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in prior:
                p.add_(0.5)
    finetune(model, fake_tasks(rng), steps=1, batch_size=BSZ, lr=1e-3, seed=0, head_lr_scale=7.0,
             prior_mu=1e6, prior=prior)
    step = 7.0 * lr_at(0, 1, 1e-3)
    for n, p in model.named_parameters():
        if n in prior:
            np.testing.assert_allclose((p.detach() - prior[n]).numpy(), 0.5 - step, rtol=1e-3, err_msg=n)


def test_head_prior_holds_only_the_heads_it_is_given(rng):
    # prior_tasks=("BF",) (run config head-prior-tasks=BF), every pooled-head parameter 0.5 off
    # its anchor, μ = 1 (the penalty's gradient, 0.5 an element, outweighs the data's): the BF
    # head ends nearer its anchor than without the penalty; the LoS head takes the step it takes
    # without any penalty, 0.01 (head_lr_scale · lr_at(0)), to 1 % of it (Adam's first step is
    # g/(|g| + eps): the clipping's rescale of g reaches it only through eps, measured 0.14 %);
    # held at its anchor too it is pulled back instead; a task outside the pooled heads is refused
    from fedfm.train import head_prior

    tasks = fake_tasks(rng)
    held, free, both = (build_model(tiny_cfg()) for _ in range(3))
    prior = head_prior(held)
    assert any("heads.BF." in n for n in prior) and any("heads.LoS." in n for n in prior)
    for model in (held, free, both):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in prior:
                    p.add_(0.5)
    kw = dict(steps=1, batch_size=BSZ, lr=1e-3, seed=0)
    finetune(held, tasks, prior_mu=1.0, prior=prior, prior_tasks=("BF",), **kw)
    finetune(both, tasks, prior_mu=1.0, prior=prior, prior_tasks=("BF", "LoS"), **kw)
    finetune(free, tasks, **kw)
    p_held, p_free, p_both = (dict(m.named_parameters()) for m in (held, free, both))

    def off(params, head):
        return sum(float((params[n].detach() - prior[n]).abs().sum()) for n in prior if f"heads.{head}." in n)

    assert off(p_held, "BF") < off(p_free, "BF")
    for n in prior:
        if "heads.LoS." in n:
            np.testing.assert_allclose(p_held[n].detach().numpy(), p_free[n].detach().numpy(), rtol=0, atol=1e-4,
                                       err_msg=n)
    assert off(p_both, "LoS") < off(p_free, "LoS")
    for bad in ((), ("BF", "CE")):
        with pytest.raises(ValueError, match=r"^finetune: `prior_tasks` .* should be a non-empty subset of BF, DE, PE, LoS"):
            finetune(held, tasks, prior_mu=1.0, prior_tasks=bad, **kw)


def test_head_prior_defaults_to_the_call_start_and_checks_its_keys(rng):
    # anchored at the call's start, the penalty's gradient is exactly zero on step 1: the same
    # step as without it; a prior that lacks a pooled-head parameter is refused by name
    from fedfm.train import head_prior

    tasks = fake_tasks(rng)
    a, b = build_model(tiny_cfg()), build_model(tiny_cfg())
    finetune(a, tasks, steps=1, batch_size=BSZ, lr=1e-3, seed=0, prior_mu=1e6)
    finetune(b, tasks, steps=1, batch_size=BSZ, lr=1e-3, seed=0)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    prior = head_prior(a)
    dropped = sorted(prior)[0]
    del prior[dropped]
    with pytest.raises(ValueError, match=f"no value for {dropped}"):
        finetune(a, tasks, steps=1, batch_size=BSZ, lr=1e-3, seed=0, prior_mu=1.0, prior=prior)


def test_carried_optimizer_state_makes_two_calls_one_run(rng):
    # `optimizer_state` in and out: 6 + 6 steps with AdamW's moments and DWA's last two loss
    # windows carried (and the schedule sliced) are bit-identical to one 12-step call. One
    # sample a task, so every batch is the same whatever the seed; windows of 2 steps, so DWA
    # re-weights from step 5 on and the second call's first windows need the first call's.
    # Restarting instead (no state carried) ends elsewhere, and so does carrying Adam alone;
    # another model's state is refused.
    tasks = fake_tasks(rng, samples=1)
    whole, split, reset, adam_only = (build_model(tiny_cfg()) for _ in range(4))
    kw = dict(batch_size=BSZ, lr=1e-3, dwa_window=2)
    finetune(whole, tasks, steps=12, seed=0, **kw)
    carried: dict = {}
    for model, state in ((split, carried), (reset, None), (adam_only, {})):
        for off in (0, 6):
            if model is adam_only:
                state = {k: v for k, v in state.items() if not k.startswith("dwa/")}
            finetune(model, tasks, steps=6, seed=off, schedule=(off, 12), optimizer_state=state, **kw)
    steps = {k: float(v) for k, v in carried.items() if k.endswith("/step")}
    assert steps and set(steps.values()) == {12.0}
    assert {k.rsplit("/", 1)[0] for k in carried if not k.startswith("dwa/")} == \
        {n for n, p in split.named_parameters() if p.requires_grad}
    assert {k for k in carried if k.startswith("dwa/")} == {f"dwa/{t}" for t in tasks}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for k, v in carried.items() if k.startswith("dwa/"))
    assert any(not torch.equal(a, d) for (_, a), (_, d) in zip(whole.named_parameters(), adam_only.named_parameters()))
    for (n, a), (_, b), (_, c) in zip(whole.named_parameters(), split.named_parameters(), reset.named_parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, c) for (_, a), (_, c) in zip(whole.named_parameters(), reset.named_parameters()))
    other = {f"base_model.model.heads.XX.fc.weight/{k}": torch.zeros(1) for k in ("step", "exp_avg", "exp_avg_sq")}
    with pytest.raises(ValueError, match=r"the optimizer state is for other parameters .*heads\.XX"):
        finetune(split, tasks, steps=1, batch_size=BSZ, optimizer_state={**carried, **other})
    with pytest.raises(OptimizerStateMismatch, match=r"DWA losses are for tasks"):
        finetune(split, {"CE": tasks["CE"]}, steps=1, batch_size=BSZ, optimizer_state=dict(carried))
    with pytest.raises(OptimizerStateMismatch, match=r"latest DWA losses are not finite"):
        finetune(split, tasks, steps=1, batch_size=BSZ,
                 optimizer_state={**carried, "dwa/CE": torch.tensor([1.0, math.nan], dtype=torch.float64)})


def _held_back_loss(model, td, val) -> float:
    """The loss of ``model`` on samples ``val`` of a TaskData, through the model's own forward."""
    from fedfm.train import as_real

    model.eval()
    with torch.no_grad():
        out = model(td.task, as_real(td.inputs)[val], torch.as_tensor(td.known))
        return float(task_loss(td.task, out, task_targets(td)[val], None))


def test_refit_moves_only_the_pooled_heads_and_keeps_the_best_held_back_epoch(rng):
    model = build_model(tiny_cfg())
    tasks = fake_tasks(rng, samples=40)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    val = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:10]  # the split refit_heads draws
    start = {t: _held_back_loss(model, tasks[t], val) for t in ("BF", "LoS")}
    info = refit_heads(model, tasks, epochs=6, lr=1e-2, batch_size=8, val_fraction=0.25, seed=3, check_every=1)
    assert set(info) == {"BF", "LoS"}  # CE is dense: not refitted
    for n, p in model.named_parameters():
        if not any(f"heads.{t}.modules_to_save" in n for t in info):
            assert torch.equal(p, before[n]), n  # backbone, LoRA, adapters, the CE head: untouched
    for t, r in info.items():
        assert r["samples"] == 40 and r["val_loss_before"] == pytest.approx(start[t], rel=1e-5)
        # the model ends at the chosen epoch: its held-back loss, recomputed through forward(), is the reported one
        assert _held_back_loss(model, tasks[t], val) == pytest.approx(r["val_loss_after"], rel=1e-5)
        assert r["val_loss_after"] < r["val_loss_before"] and r["epoch"] > 0


def test_a_features_scope_refit_moves_only_the_paths_from_the_side_inputs(rng):
    model = build_model(tiny_cfg())
    tasks = fake_tasks(rng, samples=40)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = refit_heads(model, tasks, epochs=6, lr=1e-2, batch_size=8, val_fraction=0.25, seed=3, check_every=1,
                       scope="features")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert info["BF"]["epoch"] > 0 and info["LoS"]["epoch"] > 0  # both refits kept an epoch that moved something
    paths = {n.split(".modules_to_save.default.")[1].split(".")[0] for n in moved}
    assert all(".modules_to_save.default." in n for n in moved)
    assert paths <= {"skip", "feature_mlp", "spectrum_weight", "spectrum_conv"}
    # BF's beam reading, the linear path and LoS's MLP over the side inputs moved; the MLPs over the embedding did not
    assert {"skip", "spectrum_weight", "feature_mlp"} <= paths
    with pytest.raises(ValueError, match=r"^refit_heads: `scope` 'mlp' is not allowed; expected one of head, features"):
        refit_heads(model, tasks, scope="mlp")


def test_confine_to_span_keeps_a_refits_change_where_the_training_features_vary():
    # Prepare: features (a, b, 3): the third never varies, as log2(antennas) on 8-antenna sites
    from fedfm.train import confine_to_span

    x = torch.tensor([[0.0, 1.0, 3.0], [1.0, -1.0, 3.0], [2.0, 0.5, 3.0], [-1.0, 2.0, 3.0]])
    layer = torch.nn.Linear(3, 1)
    w0, b0 = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0.1])
    with torch.no_grad():  # what a refit left: ΔW = (0.5, 0, 1.0), Δb = 0.1
        layer.weight.copy_(torch.tensor([[1.5, 2.0, 1.5]]))
        layer.bias.copy_(torch.tensor([0.2]))
    refitted = layer(x).detach().clone()
    # Execute
    confine_to_span(layer, w0, b0, x)
    # Assert: by hand, P = diag(1, 1, 0): W = (1.5, 2, 0.5), b = 0.2 + 1.0·3 = 3.2
    assert torch.allclose(layer.weight, torch.tensor([[1.5, 2.0, 0.5]]), atol=1e-6)
    assert float(layer.bias.detach()) == pytest.approx(3.2, abs=1e-6)
    assert torch.allclose(layer(x), refitted, atol=1e-5)   # every training sample: the same output
    x16 = torch.tensor([[0.0, 1.0, 4.0]])                  # the never-seen value: the pre-refit slope 0.5 holds
    assert float((layer(x16) - layer(x[:1])).detach()) == pytest.approx(0.5, abs=1e-5)


def test_a_refit_leaves_a_layers_weights_on_features_the_sites_share_as_they_were(rng, monkeypatch):
    # A site context the same on every sample (one site): the refit may shift the heads' outputs
    # through the bias, but not their weights on that context, which no sample can tell apart.
    import fedfm.train as train

    base = fake_tasks(rng, samples=40)
    from fedfm.tasks import CONTEXT_SIZE

    context = np.linspace(-1.0, 2.0, CONTEXT_SIZE).astype(np.float32)
    tasks = {t: FakeTaskData(**{**td.__dict__, "extras": {"context": context}}) for t, td in base.items()}

    def refit(confine: bool):
        model = build_model(tiny_cfg())
        if not confine:
            monkeypatch.setattr(train, "confine_to_span", lambda *a, **k: None)
        info = refit_heads(model, tasks, epochs=6, lr=1e-2, batch_size=8, val_fraction=0.25, seed=3, check_every=1,
                           scope="features")
        monkeypatch.undo()
        return model, info

    start, (free, info_free), (kept, info) = build_model(tiny_cfg()), refit(False), refit(True)
    assert info == info_free and all(r["epoch"] > 0 for r in info.values())
    ctx = slice(-CONTEXT_SIZE, None)  # the side features are (profile [5], context)
    for t in ("BF", "LoS"):
        heads = [train.base_model(m).heads[t] for m in (start, free, kept)]
        w0, w_free, w_kept = (h.modules_to_save["default"].skip.weight[:, ctx] for h in heads)
        assert not torch.allclose(w_free, w0, atol=1e-4)   # unconfined, the refit moved them
        assert torch.allclose(w_kept, w0, atol=1e-6)       # confined, they are where they were
        # and on the training samples the two refits give the same outputs
        x = train.as_real(tasks[t].inputs)
        known, c = torch.as_tensor(tasks[t].known), torch.as_tensor(context)
        with torch.no_grad():
            assert torch.allclose(free(t, x, known, c), kept(t, x, known, c), atol=1e-4)


def test_a_refit_prior_holds_the_heads_near_where_fine_tuning_left_them(rng):
    tasks = fake_tasks(rng, samples=40)

    def moved(mu):  # how far a refit of the same model moves the BF and LoS heads
        model = build_model(tiny_cfg())
        before = get_adapter_state(model)
        info = refit_heads(model, tasks, epochs=6, lr=1e-2, batch_size=8, val_fraction=0.25, seed=3, check_every=1,
                           prior_mu=mu)
        after = get_adapter_state(model)
        return info, sum(float(((after[k] - before[k]) ** 2).sum()) for k in before) ** 0.5

    (free, d_free), (held, d_held) = moved(0.0), moved(1e3)
    assert all(r["epoch"] > 0 for r in free.values()) and d_free > 0
    assert d_held < 0.2 * d_free, (d_held, d_free)  # μ/2·‖θ − θ_before‖² pulls back every step
    with pytest.raises(ValueError, match=r"^refit_heads: `prior_mu` -1.0 is not allowed"):
        refit_heads(build_model(tiny_cfg()), tasks, prior_mu=-1.0)


def test_a_refit_that_only_hurts_leaves_the_heads_as_they_were(rng):
    # Steps of 50 per parameter make every epoch worse on the held-back samples: epoch 0 is kept.
    model = build_model(tiny_cfg())
    tasks = fake_tasks(rng, samples=40)
    before = get_adapter_state(model)
    info = refit_heads(model, tasks, epochs=3, lr=50.0, batch_size=8, seed=0, check_every=1)
    assert {t: r["epoch"] for t, r in info.items()} == {"BF": 0, "LoS": 0}
    assert all(r["val_loss_after"] == r["val_loss_before"] for r in info.values())
    after = get_adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="val_fraction"):
        refit_heads(model, tasks, val_fraction=1.0)
    # a refit whose loss is not finite (LoS, the second head, on NaN inputs) stops with one line
    # and leaves every head as it was, BF's already refitted one included
    import dataclasses

    broken = dataclasses.replace(tasks["LoS"], inputs=tasks["LoS"].inputs * np.nan)
    with pytest.raises(ValueError, match=r"^refit_heads: the LoS loss is nan in epoch 1 .* every head is left as it was"):
        refit_heads(model, {"BF": tasks["BF"], "LoS": broken}, epochs=6, lr=1e-2, batch_size=8, val_fraction=0.25,
                    seed=3, check_every=1)
    after = get_adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
