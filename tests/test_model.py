"""fedfm.model: tokeniser, factory, LoRA state, checkpoints and masks (tiny sizes, CPU)."""
import json

import numpy as np
import pytest
import torch

from fedfm.estimators import angular_spectrum, ar_extrapolate
from fedfm.tasks import CONTEXT_SIZE, context_index
from fedfm.tasks.sensing import peak_power_ratio
from fedfm.model.prior import scaled_profile_features

from fedfm.model import (DENSE_TASKS, TASKS, ModelConfig, base_model, build_model, get_adapter_state,
                         load_backbone, parameter_summary, save_backbone, set_adapter_state)
from fedfm.model.pretrain import make_mask
from fedfm.model.tokeniser import Tokeniser, patchify, unpatchify

D_MODEL, LAYERS = 32, 2
SHAPES = [(16, 64, 8), (20, 32, 16)]  # (slots, subcarriers, antennas): LLM4WM's site and the N=16 held-out site


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread; on a loaded 2-core host two OpenMP threads spin
    against each other (measured: a [2560, 32] × [32, 96] linear took 15 ms vs 0.2 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(**kw):
    return ModelConfig(**{"d_model": D_MODEL, "n_layers": LAYERS, "n_heads": 2, "num_beams": 16,
                          "adapter_hidden": 8, "head_hidden": 16, "conv_channels": 4, **kw})


def grid(shape, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, 2, generator=g)


@pytest.mark.parametrize("shape", SHAPES + [(5, 30, 3)])
def test_patchify_round_trip_and_padding(shape):
    # Prepare: a grid whose sizes may not divide the (2, 8, 4) patch
    x = grid(shape)
    patch = (2, 8, 4)
    # Execute
    p = patchify(x, patch)
    back = unpatchify(p, shape, patch)
    # Assert: exact inverse; token count = product of rounded-up patch counts
    gt, gk, gn = (-(-s // q) for s, q in zip(shape, patch))
    assert p.shape == (2, gt * gk * gn, 2 * 8 * 4 * 2)
    assert torch.equal(back, x)


def test_patch_holds_one_contiguous_block():
    x = torch.arange(4 * 16 * 8, dtype=torch.float32).view(1, 4, 16, 8, 1)
    p = patchify(x, (2, 8, 4))
    first = p[0, 0].view(2, 8, 4)
    assert torch.equal(first, x[0, :2, :8, :4, 0])
    # second token moves along antennas (innermost patch axis), then frequency, then time
    assert torch.equal(p[0, 1].view(2, 8, 4), x[0, :2, :8, 4:8, 0])
    assert torch.equal(p[0, 2].view(2, 8, 4), x[0, :2, 8:16, :4, 0])


def test_tokeniser_positions_differ_per_axis_and_ignore_unknown_values():
    tok = Tokeniser((2, 8, 4), D_MODEL, 16)
    shape = (4, 16, 8)
    known = torch.zeros(shape, dtype=torch.bool)
    a, b = tok(grid(shape, seed=1), known), tok(grid(shape, seed=2), known)
    # nothing is known: the values must not leak in, and every token position is distinct
    assert torch.allclose(a, b)
    assert torch.unique(a[0].round(decimals=5), dim=0).shape[0] == a.shape[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_one_model_serves_both_site_shapes(shape):
    model = build_model(tiny_cfg())
    G, K, N = shape
    known = torch.ones(shape, dtype=torch.bool)
    for task in TASKS:
        out = model(task, grid(shape), known)
        expected = {"BF": (2, 16), "DE": (2,), "PE": (2,), "LoS": (2, 2)}.get(task, (2, G, K, N, 2))
        assert tuple(out.shape) == expected, task


def test_dense_heads_start_from_their_classical_prior():
    # Zero-initialised correction: before training CE returns the comb interpolation of its
    # pilots, CP the last observed slot held, PF each sample's AR extrapolation of its lower half.
    model = build_model(tiny_cfg())
    shape = SHAPES[0]
    G, K, N = shape
    x = grid(shape)
    comb = torch.zeros(shape, dtype=torch.bool)
    comb[:, ::4] = True
    ce = model("CE", x * comb[..., None], comb)
    torch.testing.assert_close(ce[:, :, ::4], x[:, :, ::4])                      # pilots kept
    torch.testing.assert_close(ce[:, :, 2], 0.5 * (x[:, :, 0] + x[:, :, 4]))      # midway: mean
    torch.testing.assert_close(ce[:, :, 1], 0.75 * x[:, :, 0] + 0.25 * x[:, :, 4])
    torch.testing.assert_close(ce[:, :, K - 1], x[:, :, K - 4])                   # beyond last pilot: held
    past = torch.zeros(shape, dtype=torch.bool)
    past[: G - 2] = True
    cp = model("CP", x * past[..., None], past)
    torch.testing.assert_close(cp[:, G - 1], x[:, G - 3])
    lower = torch.zeros(shape, dtype=torch.bool)
    lower[:, : K // 2] = True
    pf = model("PF", x * lower[..., None], lower)
    torch.testing.assert_close(pf[:, :, : K // 2], x[:, :, : K // 2])            # observed half kept
    xc = torch.view_as_complex((x * lower[..., None]).contiguous()).numpy()
    ar = ar_extrapolate(xc, K // 2, min(16, K // 4))
    torch.testing.assert_close(pf, torch.view_as_real(torch.from_numpy(ar)))


def test_bf_head_starts_at_the_capon_beam_and_pooled_heads_see_the_profile_features():
    model = build_model(tiny_cfg())
    shape = SHAPES[0]
    x = grid(shape)
    logits = model("BF", x, torch.ones(shape, dtype=torch.bool))
    xc = torch.view_as_complex(x.contiguous()).numpy()
    capon = angular_spectrum(xc, logits.shape[1], "capon")
    assert torch.equal(logits.argmax(1), torch.from_numpy(capon.argmax(1)))
    torch.testing.assert_close(logits, torch.from_numpy(np.log(np.maximum(capon, 1e-4))))
    # untrained DE outputs the deployment prior the site context carries; LoS and PE's gate
    # start at the K-factor rule σ(8·ln(peak share) + 16 + 0.6·prior log-odds), by hand
    known = torch.ones(shape, dtype=torch.bool)
    context = torch.linspace(-1.0, 1.0, CONTEXT_SIZE)
    torch.testing.assert_close(model("DE", x, known, context), context[context_index("DE")].expand(2))
    r = torch.from_numpy(np.log(peak_power_ratio(xc))).float()
    p = torch.sigmoid(8.0 * r + 16.0 + 0.6 * context[context_index("LoS")])
    assert p.min() < 0.9 and p.std() > 0  # the two samples read their own profiles, not one constant
    los, nlos = context[context_index("PE-LoS")], context[context_index("PE-NLoS")]
    torch.testing.assert_close(model("PE", x, known, context), nlos + p * (los - nlos))
    p_los = torch.softmax(model("LoS", x, known, context), 1)[:, 1]
    torch.testing.assert_close(p_los, p)
    torch.testing.assert_close(model("DE", x, known, None), model("DE", x, known, torch.zeros(CONTEXT_SIZE)))
    # once its MLP has moved off zero, DE reads the profile features and the environment
    with torch.no_grad():
        model.heads["DE"].proj.weight.normal_(generator=torch.Generator().manual_seed(0))
    head = model.heads["DE"]
    h = torch.randn(2, 5, model.cfg.d_model)
    f = torch.cat([torch.from_numpy(scaled_profile_features(xc)), torch.zeros(2, CONTEXT_SIZE + 1)], 1)  # + site residual
    assert not torch.allclose(head(h, f), head(h, f + torch.eye(f.shape[1])[0]))
    inh, uma = torch.zeros(CONTEXT_SIZE), torch.zeros(CONTEXT_SIZE)
    inh[3], uma[0] = 1.0, 1.0
    assert not torch.allclose(model("DE", x, known, inh), model("DE", x, known, uma))


def test_comb_weights_by_hand_and_against_numpy_interp():
    from fedfm.model.prior import comb_weights

    w = comb_weights(torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool))
    expected = np.array([[0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 2 / 3, 0, 0, 1 / 3, 0],
                         [0, 1 / 3, 0, 0, 2 / 3, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 0]], np.float32)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert torch.equal(comb_weights(torch.ones(4, dtype=torch.bool)), torch.eye(4))  # every sub-band known
    assert torch.equal(comb_weights(torch.zeros(4, dtype=torch.bool)) @ torch.zeros(4), torch.zeros(4))
    rng = np.random.default_rng(0)
    for _ in range(20):  # np.interp holds the end values beyond the first/last pilot, as the CE prior does
        comb = rng.random(16) < 0.3
        comb[rng.integers(16)] = True
        x = rng.standard_normal(16)
        want = np.interp(np.arange(16), np.flatnonzero(comb), x[comb])
        np.testing.assert_allclose(comb_weights(torch.from_numpy(comb)).double().numpy() @ x, want, atol=1e-6)


def test_lora_targets_only_backbone_projections():
    model = build_model(tiny_cfg())
    lora = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n}
    expected = {f"base_model.model.backbone.blocks.{i}.{m}" for i in range(LAYERS)
                for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert lora == expected


def test_adapter_state_is_exactly_the_trainable_state_and_round_trips():
    # Prepare
    a, b = build_model(tiny_cfg(seed=1)), build_model(tiny_cfg(seed=2))
    with torch.no_grad():  # make LoRA B non-zero so that the round trip is observable
        for n, p in a.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    # Execute
    state = get_adapter_state(a)
    set_adapter_state(b, state)
    # Assert: same number of tensors/values as trainable parameters, float32, exact round trip
    trainable = [p for p in a.parameters() if p.requires_grad]
    assert len(state) == len(trainable)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in trainable)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not any(".blocks." in k and "lora_" not in k for k in state)
    again = get_adapter_state(b)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    x, known = grid(SHAPES[0]), torch.ones(SHAPES[0], dtype=torch.bool)
    c = build_model(tiny_cfg(seed=1))
    set_adapter_state(c, state)
    assert all(torch.equal(c(t, x, known), a(t, x, known)) for t in ("CE", "BF"))


def test_merged_copy_predicts_as_the_unmerged_model_and_leaves_it_untouched():
    # fedfm.evaluate.predict runs a copy with LoRA merged into the projections: the same outputs
    # to float rounding, while the model it was given keeps its adapters unmerged and trainable
    from fedfm.model.lora import merged_copy

    model = build_model(tiny_cfg(seed=1))
    with torch.no_grad():  # every trainable tensor moved: LoRA B non-zero, heads reading the backbone
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    before = get_adapter_state(model)
    merged = merged_copy(model)
    model.eval()
    x, known = grid(SHAPES[0], batch=3), torch.ones(SHAPES[0], dtype=torch.bool)
    with torch.no_grad():
        for t in ("CE", "BF", "LoS"):
            want, got = model(t, x, known), merged(t, x, known)
            with model.disable_adapter():   # the frozen originals: what a lost merge would give
                assert (model(t, x, known) - want).abs().max() > 1e-3
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    after = get_adapter_state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)


def test_pretraining_view_without_lora_gives_the_wrapped_backbone_outputs_and_gradients_to_the_bit():
    # pretraining trains a wrapped model's backbone through fedfm.model.lora.without_lora: its
    # LoRA (B = 0) left out, the same parameter objects, the same outputs and gradients exactly
    from fedfm.model.lora import without_lora
    from fedfm.model.pretrain import Pretrainer

    model = build_model(tiny_cfg(seed=2))
    bb = base_model(model).backbone
    view = without_lora(bb)
    assert view is not bb and not any("lora_" in n for n, _ in view.named_parameters())
    assert any("lora_" in n for n, _ in bb.named_parameters())  # the model keeps its adapters
    assert without_lora(view) is view  # nothing left to leave out
    grads = {}
    frozen = [p for p in view.parameters() if not p.requires_grad]  # peft froze the backbone; pretraining thaws it
    for p in frozen:
        p.requires_grad_(True)
    for name, b in (("wrapped", bb), ("view", view)):
        pre = Pretrainer(base_model(model).cfg, b)
        x = grid(SHAPES[0], batch=2)
        known = torch.rand(SHAPES[0], generator=torch.Generator().manual_seed(1)) > 0.5
        out = pre(x, known)
        model.zero_grad(set_to_none=True)
        pre.zero_grad(set_to_none=True)
        out.square().sum().backward()
        grads[name] = (out.detach(), {n: p.grad.clone() for n, p in view.named_parameters() if p.grad is not None})
    for p in frozen:
        p.requires_grad_(False)
    (o1, g1), (o2, g2) = grads["wrapped"], grads["view"]
    assert torch.equal(o1, o2) and g1.keys() == g2.keys() and len(g1) > 10
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_predict_side_cache_gives_the_same_predictions_and_computes_the_side_inputs_once(monkeypatch):
    # The central evaluator passes predict a side_cache per (site, task): the pooled heads'
    # classical side inputs are computed in the first round and read back in the later ones.
    # The same predictions as without it, bit for bit; a second call computes nothing; other
    # inputs, another batch size or a changed model state are handled as they should be.
    from fedfm.baselines import BfPrior, LosPrior
    from fedfm.evaluate import predict
    from fedfm.model.network import FedFM
    from fedfm.tasks import TaskData

    model = build_model(tiny_cfg(seed=2))
    shape = SHAPES[0]
    xc = torch.view_as_complex(grid(shape, batch=10, seed=4).contiguous()).numpy()
    context = np.linspace(-1.0, 1.0, CONTEXT_SIZE).astype(np.float32)
    ones = np.ones(shape, bool)
    labels = (np.log(peak_power_ratio(xc)) > np.median(np.log(peak_power_ratio(xc)))).astype(np.int64)
    los = TaskData("LoS", "s", xc, ones, ones, labels, np.ones(10, np.float32), {"context": context})
    los.extras["stats"] = LosPrior.fit(los)
    tds = {"LoS": los,
           "BF": TaskData("BF", "s", xc, ones, ones, np.zeros(10, np.int64), np.ones(10, np.float32),
                          {"context": context, "stats": BfPrior("bartlett")}),
           "PE": TaskData("PE", "s", xc, ones, ones, np.zeros(10, np.float32), np.ones(10, np.float32),
                          {"context": context})}
    calls = []
    real = FedFM.classical_inputs
    monkeypatch.setattr(FedFM, "classical_inputs", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    for task, td in tds.items():
        want = predict(model, td, batch_size=4)          # no cache: computed inside every forward
        assert calls.count(task) == 3                    # 10 samples in batches of 4: three batches
        predict(model, td, batch_size=4)
        assert calls.count(task) == 6
        cache = {}
        first = predict(model, td, batch_size=4, side_cache=cache)
        assert calls.count(task) == 9
        again = predict(model, td, batch_size=4, side_cache=cache)
        assert calls.count(task) == 9                    # read back, not recomputed
        np.testing.assert_array_equal(first, want)
        np.testing.assert_array_equal(again, want)
        predict(model, td, batch_size=5, side_cache=cache)   # another batching: its own entries
        assert calls.count(task) == 11
    # the cache belongs to the inputs it was filled from: a TaskData sharing its extras dict but
    # not its samples (dataclasses.replace) gets its own side inputs, not the stale ones
    import dataclasses
    cache = {}
    predict(model, tds["LoS"], batch_size=4, side_cache=cache)
    flipped = dataclasses.replace(tds["LoS"], inputs=np.ascontiguousarray(xc[::-1]))
    np.testing.assert_array_equal(predict(model, flipped, batch_size=4, side_cache=cache),
                                  predict(model, flipped, batch_size=4))
    # ... and to the site's label prior and context: another LosPrior object gets its own
    refit = dataclasses.replace(tds["LoS"], extras={**tds["LoS"].extras, "stats": LosPrior.fit(flipped)})
    n = calls.count("LoS")
    np.testing.assert_array_equal(predict(model, refit, batch_size=4, side_cache=cache),
                                  predict(model, refit, batch_size=4))
    assert calls.count("LoS") == n + 6                   # refilled, not read from the cache
    # the side inputs do not depend on the weights: with a cache filled by the old state, a
    # moved model predicts as it does without one (and not as the old state did)
    cache = {}
    old = predict(model, tds["BF"], batch_size=4, side_cache=cache)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "heads.BF" in n:
                p.add_(0.1)
    moved = predict(model, tds["BF"], batch_size=4, side_cache=cache)
    np.testing.assert_array_equal(moved, predict(model, tds["BF"], batch_size=4))
    assert not np.array_equal(moved, old)
    with pytest.raises(ValueError, match="the CE head reads none"):
        base_model(model)("CE", torch.zeros(1, *shape, 2), torch.ones(shape, dtype=torch.bool), None, None,
                          (torch.zeros(1, 3),))


def test_set_adapter_state_names_bad_keys():
    model = build_model(tiny_cfg())
    state = get_adapter_state(model)
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="bogus.weight"):
        set_adapter_state(model, state)


def test_backbone_checkpoint_round_trip_and_wrong_hash(tmp_path):
    cfg = tiny_cfg(seed=5)
    path = tmp_path / "backbone.safetensors"
    digest = save_backbone(path, build_model(cfg))
    model = build_model(tiny_cfg(seed=9), backbone=path, expected_hash=digest)
    ref = base_model(build_model(cfg, lora=False)).backbone.state_dict()
    got = {k.replace(".base_layer.", "."): v for k, v in base_model(model).backbone.state_dict().items()
           if "lora_" not in k}
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert base_model(model).backbone_hash == digest
    # a federation expecting another backbone is refused, naming the file
    with pytest.raises(ValueError, match="backbone.safetensors.*hash mismatch"):
        build_model(cfg, backbone=path, expected_hash="0" * 64)
    # a modified file no longer matches its sidecar
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = "f" * 64
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=str(path.name) + ".*hash mismatch"):
        load_backbone(path)


def test_backbone_with_other_shape_is_refused(tmp_path):
    path = tmp_path / "b.safetensors"
    save_backbone(path, build_model(tiny_cfg()))
    with pytest.raises(ValueError, match="d_model"):
        build_model(tiny_cfg(d_model=64), backbone=path)


@pytest.mark.parametrize("shape", SHAPES)
def test_masks_hide_what_they_claim(shape):
    G, K, N = shape
    gen = torch.Generator().manual_seed(0)
    time = make_mask("time", 3, shape, (2, 8, 4), gen)
    assert time[:, G // 2:].all() and not time[:, :G // 2].any()
    freq = make_mask("frequency", 3, shape, (2, 8, 4), gen)
    assert freq[:, :, K // 2:].all() and not freq[:, :, :K // 2].any()
    rnd = make_mask("random", 3, shape, (2, 8, 4), gen)
    per_patch = patchify(rnd[..., None].float(), (2, 8, 4))  # (B, L, elements)
    # whole patches are hidden, 85% of them, differently per sample
    assert ((per_patch == 0) | (per_patch == 1)).all()
    assert torch.equal(per_patch.amin(-1), per_patch.amax(-1))
    frac = per_patch[..., 0].mean(1)
    L = per_patch.shape[1]
    assert torch.allclose(frac, torch.full_like(frac, round(0.85 * L) / L))
    assert not torch.equal(rnd[0], rnd[1])


def test_feature_mlp_reads_only_the_side_inputs_and_fits_what_a_line_cannot():
    from fedfm.model.heads import PooledHead

    model = build_model(tiny_cfg())
    assert {t for t, h in model.heads.items() if getattr(h, "feature_mlp", None) is not None} == {"DE", "PE", "LoS"}
    none = build_model(tiny_cfg(feature_mlp_tasks=()))
    assert all(getattr(h, "feature_mlp", None) is None for h in none.heads.values())
    assert not model.heads["PE"].feature_mlp[2].weight.any() and not model.heads["PE"].feature_mlp[2].bias.any()
    torch.manual_seed(0)
    head = PooledHead(16, 32, 1, num_features=6, feature_mlp=True)
    head.start_at_prior()  # the MLP's last layer zeroed: starts as no change
    with torch.no_grad():
        head.feature_mlp[2].weight.normal_(generator=torch.Generator().manual_seed(0))
    f = torch.randn(3, head.feature_mlp[0].in_features, generator=torch.Generator().manual_seed(1))
    h = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    mlp = head.feature_mlp
    with_mlp = [head(h, f), head(h.flip(0), f)]
    head.feature_mlp = None
    without = [head(h, f), head(h.flip(0), f)]
    head.feature_mlp = mlp
    for y, y0 in zip(with_mlp, without):  # the same added term whatever the embedding: a path from f alone
        torch.testing.assert_close(y - y0, mlp(f))
    assert mlp(f).abs().min() > 0

    # y = |f0| on features alone: the linear skip cannot fit a V, the MLP over the features can
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(512, 6, generator=gen)
    target = f[:, :1].abs()
    h = torch.zeros(512, 1, 16)
    losses = {}
    for mlp in (False, True):
        torch.manual_seed(0)
        head = PooledHead(16, 32, 1, num_features=6, feature_mlp=mlp)
        head.start_at_prior()
        params = [p for n, p in head.named_parameters() if n.split(".")[0] in ("skip", "feature_mlp")]
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(300):
            loss = (head(h, f) - target).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[mlp] = float(loss.detach())
    assert losses[False] > 0.3 and losses[True] < 0.1 * losses[False]  # best line: mean |f0 − 0.8| ≈ 0.35


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="`n_heads`"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="`lora_r`"):
        ModelConfig(lora_r=0)
    with pytest.raises(ValueError, match="preset 'huge'"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ValueError, match=r"`feature_mlp_tasks` \('CE',\) should be distinct ids from BF, DE, PE, LoS"):
        ModelConfig(feature_mlp_tasks=("CE",))


def test_base_preset_trains_at_most_three_percent():
    summary = parameter_summary(build_model(ModelConfig.from_preset("base")))
    assert 15e6 < summary["total"] < 30e6
    assert summary["trainable_pct"] <= 3.0


def test_task_ids_mirror_fedfm_tasks():
    tasks = pytest.importorskip("fedfm.tasks")
    if not hasattr(tasks, "TASKS"):
        pytest.skip("fedfm.tasks not written yet")
    assert tuple(tasks.TASKS) == TASKS and tuple(tasks.DENSE_TASKS) == DENSE_TASKS


def test_backbone_files_a_user_gets_wrong_are_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from fedfm.files import sha256_file

    path = tmp_path / "b.safetensors"
    save_backbone(path, build_model(tiny_cfg()))
    with pytest.raises(ValueError, match=rf"^{tmp_path}: backbone checkpoint not found \(a folder"):
        build_model(tiny_cfg(), backbone=tmp_path)
    # NaN weights with a matching hash (a diverged pretraining saved before the loss check)
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key][..., 0] = float("nan")
    save_file(state, str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = sha256_file(path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"^{path}: backbone tensor `{key}` holds NaN or inf values"):
        build_model(tiny_cfg(), backbone=path)
    # a sidecar edited to another size than its weights
    save_backbone(path, build_model(tiny_cfg()))
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["d_model"] = 64
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"has shape .* the weights and their .json sidecar do not belong together"):
        build_model(tiny_cfg(d_model=64), backbone=path)
    path.with_suffix(".json").write_bytes(b"\x96\xff")
    with pytest.raises(ValueError, match=rf"^{path.with_suffix('.json')}: unreadable backbone sidecar"):
        load_backbone(path)


def test_dense_heads_start_from_the_sites_kronecker_lmmse():
    # With the site's ChannelStats, an untrained CE/CP head returns the Kronecker LMMSE of what
    # it sees at the site's nominal SNR (numpy's kron_lmmse, checked against the full-matrix
    # formula in test_baselines); a mask that is no slots × subcarriers × antennas set falls
    # back to the classical prior (and its correction is not scaled).
    from fedfm.estimators import ChannelStats, kron_error_variance, kron_lmmse, kron_observed, lmmse_ar_extrapolate

    model = build_model(tiny_cfg())
    G, K, N = SHAPES[0]
    rng = np.random.default_rng(3)
    h = (rng.standard_normal((64, G, K, N)) + 1j * rng.standard_normal((64, G, K, N))).astype(np.complex64)
    h = h + np.roll(h, 1, axis=2) + np.roll(h, 1, axis=1)          # some time/frequency correlation
    stats = ChannelStats.fit(h, snr_db=7.0)
    x = grid(SHAPES[0])
    for task, known in (("CE", np.arange(K)[None, :, None] % 4 == 0), ("CP", np.arange(G)[:, None, None] < G - 2)):
        known = torch.from_numpy(np.broadcast_to(known, (G, K, N)).copy())
        obs = kron_observed(known.numpy())
        y = torch.view_as_complex((x * known[..., None]).contiguous()).numpy()[:, obs[0]][:, :, obs[1]][:, :, :, obs[2]]
        want = kron_lmmse(y, stats.covs, obs, 10 ** 0.7, G)
        out = model(task, x * known[..., None], known, None, stats)
        np.testing.assert_allclose(torch.view_as_complex(out.contiguous()).detach().numpy(), want, rtol=1e-4, atol=1e-4)
        # a correction of 0.5 on every entry arrives multiplied by the LMMSE's own error std there
        std = np.sqrt(np.maximum(kron_error_variance(stats.covs, obs, 10 ** 0.7, G), 1e-6))
        with torch.no_grad():
            model.heads[task].proj.bias.fill_(0.5)
            moved = model(task, x * known[..., None], known, None, stats) - out
            model.heads[task].proj.bias.zero_()
        np.testing.assert_allclose(moved.numpy(), np.broadcast_to(0.5 * std[None, ..., None], moved.shape), rtol=1e-4, atol=1e-5)
        assert std[known.numpy()].mean() < std[~known.numpy()].mean()      # surer where it saw the channel
    # the mask's pattern is remembered on the tensor: changed in place, it must be read again
    known = torch.from_numpy(np.broadcast_to(np.arange(K)[None, :, None] % 4 == 0, (G, K, N)).copy())
    model("CE", x * known[..., None], known, None, stats)
    known[:] = torch.from_numpy(np.broadcast_to(np.arange(K)[None, :, None] % 2 == 0, (G, K, N)).copy())
    obs = kron_observed(known.numpy())
    y = torch.view_as_complex((x * known[..., None]).contiguous()).numpy()[:, obs[0]][:, :, obs[1]][:, :, :, obs[2]]
    out = model("CE", x * known[..., None], known, None, stats)
    np.testing.assert_allclose(torch.view_as_complex(out.contiguous()).detach().numpy(),
                               kron_lmmse(y, stats.covs, obs, 10 ** 0.7, G), rtol=1e-4, atol=1e-4)
    # PF: the untrained head is numpy's AR on the LMMSE-denoised lower band (PF-ARLMMSE), not plain AR
    lower = torch.zeros(G, K, N, dtype=torch.bool)
    lower[:, : K // 2] = True
    xc = torch.view_as_complex((x * lower[..., None]).contiguous()).numpy()
    want = lmmse_ar_extrapolate(xc, K // 2, min(16, K // 4), stats.covs, 10 ** 0.7)
    pf = torch.view_as_complex(model("PF", x * lower[..., None], lower, None, stats).contiguous()).detach().numpy()
    np.testing.assert_allclose(pf[:, :, K // 2:], want[:, :, K // 2:], rtol=1e-3, atol=1e-3)
    assert not np.allclose(want[:, :, K // 2:], ar_extrapolate(xc, K // 2, min(16, K // 4))[:, :, K // 2:], atol=1e-2)
    # with the site's chosen AR order (ChannelStats.pf_order) the head runs that order
    stats.pf_order = 2
    want2 = lmmse_ar_extrapolate(xc, K // 2, 2, stats.covs, 10 ** 0.7)
    pf2 = torch.view_as_complex(model("PF", x * lower[..., None], lower, None, stats).contiguous()).detach().numpy()
    np.testing.assert_allclose(pf2[:, :, K // 2:], want2[:, :, K // 2:], rtol=1e-3, atol=1e-3)
    assert not np.allclose(want2[:, :, K // 2:], want[:, :, K // 2:], atol=1e-2)
    scattered = torch.zeros(G, K, N, dtype=torch.bool)
    scattered[0, ::4] = True
    scattered[1, 2] = True                                          # no Kronecker set: comb interpolation
    torch.testing.assert_close(model("CE", x * scattered[..., None], scattered, None, stats),
                               model("CE", x * scattered[..., None], scattered))
    with torch.no_grad():
        before = model("CE", x * scattered[..., None], scattered, None, stats)
        model.heads["CE"].proj.bias.fill_(0.5)
        moved = model("CE", x * scattered[..., None], scattered, None, stats) - before
    torch.testing.assert_close(moved, torch.full_like(moved, 0.5))


def test_de_pe_heads_start_at_the_sites_knn_and_train_on_its_leave_one_out_estimate():
    # With the site's KnnPrior an untrained DE/PE head outputs the DE-/PE-kNN baseline's
    # prediction (normalised); without one, its deployment-prior start (the residual column is 0).
    # A training sample's own row is left out of its neighbours.
    from fedfm.baselines import KnnPrior, _fit_knn, _knn, _neighbours
    from fedfm.model.network import SITE_RESIDUAL_FEATURE
    from fedfm.tasks import TaskData, normalise_target

    G, K, N = 4, 16, 4
    rng = np.random.default_rng(5)

    def view(task, S, seed):
        r = np.random.default_rng(seed)
        h = (r.standard_normal((S, G, K, N)) + 1j * r.standard_normal((S, G, K, N))).astype(np.complex64)
        h[:, :, : 1 + seed % 3] *= 4.0                      # some variety in the delay profile
        y = (r.uniform(20, 500, S) if task == "DE" else r.uniform(70, 140, S)).astype(np.float32)
        ctx = rng.standard_normal(CONTEXT_SIZE).astype(np.float32)
        return TaskData(task, "s", h, np.ones((G, K, N), bool), np.ones((G, K, N), bool), y,
                        np.ones(S, np.float32), {"context": ctx})

    model = build_model(tiny_cfg())
    model.eval()
    for task in ("DE", "PE"):
        train, test = view(task, 60, 1), view(task, 12, 2)
        test.extras["context"] = train.extras["context"]
        prior = KnnPrior.fit(train)
        fit = _fit_knn(train, None)
        want = normalise_target(task, _knn(test, **fit))
        x = torch.view_as_real(torch.from_numpy(test.inputs))
        known = torch.from_numpy(test.known)
        ctx = torch.from_numpy(test.extras["context"])
        with torch.no_grad():
            out = model(task, x, known, ctx, prior)
            plain = model(task, x, known, ctx)
            feats = model.pooled_inputs(task, x, known, ctx)[1]
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)
        assert feats.shape[1] == SITE_RESIDUAL_FEATURE + 1 and torch.all(feats[:, SITE_RESIDUAL_FEATURE] == 0)
        assert not np.allclose(plain.numpy(), want, atol=1e-2)
        # on its own train samples: the median of the k nearest *other* rows
        loo = np.median(prior.labels[_neighbours(prior.features, prior.features, prior.k, exclude_self=True)], 1)
        np.testing.assert_allclose(prior.estimate(train.inputs), loo, rtol=1e-5, atol=1e-5)
        assert not np.allclose(prior.estimate(train.inputs), normalise_target(task, _knn(train, **fit)), atol=1e-3)
    with pytest.raises(ValueError, match="the DE head was given the site's PE kNN prior"):
        model("DE", x, known, ctx, prior)
    # k at least the table's size (a site with few labels): a new sample's estimate is the
    # median of every row, as the baseline's; a train sample's the median of the others
    small = view("PE", 6, 4)
    few = KnnPrior.fit(small)
    few = KnnPrior(few.task, few.features, few.labels, few.mu, few.sd, 40)
    np.testing.assert_allclose(few.estimate(test.inputs), np.median(few.labels), rtol=1e-6)
    others = [np.median(np.delete(few.labels, i)) for i in range(6)]
    np.testing.assert_allclose(few.estimate(small.inputs), others, rtol=1e-6)


def test_bf_and_los_heads_start_at_the_sites_own_fitted_baseline():
    # With the site's BfPrior an untrained BF head reads its beam from the spectrum the site's
    # BF-AoA chose (here Bartlett), without one from Capon; with its LosPrior the LoS head's
    # log-odds are the LoS-logistic baseline's fitted on the site's labels, without one the
    # shared K-factor rule (the residual column is 0).
    from fedfm.baselines import BfPrior, LosPrior, _fit_los_lr, _los_lr
    from fedfm.model.network import SITE_RESIDUAL_FEATURE
    from fedfm.tasks import TaskData

    model = build_model(tiny_cfg())
    model.eval()
    shape = SHAPES[0]
    known = torch.ones(shape, dtype=torch.bool)
    x = grid(shape, batch=6, seed=3)
    xc = torch.view_as_complex(x.contiguous()).numpy()
    context = torch.linspace(-1.0, 1.0, CONTEXT_SIZE)
    with torch.no_grad():
        logits = {m: model("BF", x, known, context, BfPrior(m)) for m in ("bartlett", "capon")}
        plain = model("BF", x, known, context)
    for m in ("bartlett", "capon"):
        spec = angular_spectrum(xc, plain.shape[1], m)
        torch.testing.assert_close(logits[m], torch.from_numpy(np.log(np.maximum(spec, 1e-4))))
    torch.testing.assert_close(plain, logits["capon"])
    assert not torch.equal(logits["bartlett"], logits["capon"])
    with pytest.raises(ValueError, match="BF spectrum 'music' is not allowed"):
        model("BF", x, known, context, BfPrior("music"))

    r = np.log(peak_power_ratio(xc))
    labels = (r > np.median(r)).astype(np.int64)          # a threshold the shared rule does not use
    td = TaskData("LoS", "s", xc, np.ones(shape, bool), np.ones(shape, bool), labels,
                  np.ones(len(labels), np.float32), {"context": context.numpy()})
    prior = LosPrior.fit(td)
    fit = _fit_los_lr(td, None)
    assert prior == LosPrior(tuple(fit["mu"]), tuple(fit["sd"]), tuple(fit["w"]), fit["b"])
    with torch.no_grad():
        out = model("LoS", x, known, context, prior)
        rule = model("LoS", x, known, context)
        feats = model.pooled_inputs("LoS", x, known, context)[1]
    p = torch.softmax(out, 1)[:, 1].numpy()
    np.testing.assert_allclose(p, _los_lr(td, **fit), rtol=1e-5, atol=1e-6)
    assert ((p >= 0.5) == labels.astype(bool)).all()       # the fitted regression splits this split exactly
    assert torch.all(feats[:, SITE_RESIDUAL_FEATURE] == 0)
    # under bf16 autocast (the GPU path) the classical start still runs in float32: the residual
    # cancels the rule's reading exactly and the beam is the chosen spectrum's
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model("LoS", x, known, context, prior)
        bf16 = model("BF", x, known, context, BfPrior("bartlett"))
    torch.testing.assert_close((out16[:, 1] - out16[:, 0]).float(), (out[:, 1] - out[:, 0]), rtol=0, atol=1e-4)
    assert torch.equal(bf16.float().argmax(1), logits["bartlett"].argmax(1))
    p_rule = torch.sigmoid(8.0 * torch.from_numpy(r).float() + 16.0 + 0.6 * context[context_index("LoS")])
    torch.testing.assert_close(torch.softmax(rule, 1)[:, 1], p_rule)
