"""LoRA through peft, and the one pair of functions that move a site's trainable state.

Trainable = LoRA A/B on the backbone's attention and MLP projections + every task adapter
and head (peft ``modules_to_save``). The tokeniser, blocks and final LayerNorm stay frozen.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedfm.model.config import ModelConfig


def lora_config(cfg: ModelConfig) -> LoraConfig:
    # A full-match regex: a bare "proj" would also hit the heads' and adapters' proj layers.
    targets = "|".join(t.replace(".", r"\.") for t in cfg.lora_targets)
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=rf"backbone\.blocks\.\d+\.({targets})",
        modules_to_save=[f"adapters.{t}" for t in cfg.tasks] + [f"heads.{t}" for t in cfg.tasks],
    )


def wrap_lora(model: nn.Module, cfg: ModelConfig) -> PeftModel:
    """peft-wrap ``model``; LoRA A is re-drawn from ``cfg.seed`` (peft uses the global RNG)."""
    peft_model = get_peft_model(model, lora_config(cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:  # peft's kaiming_uniform(a=√5) bound, 1/√fan_in
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return peft_model


def base_model(model: nn.Module) -> nn.Module:
    """The FedFM module inside a PeftModel (or the module itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def without_lora(module: nn.Module) -> nn.Module:
    """A view of ``module`` with each peft LoRA layer replaced by its base layer: the same
    parameter objects (training the view trains ``module``), none of LoRA's extra products.
    For masked pretraining of a wrapped model's backbone, whose LoRA stays at B = 0, so each
    layer's output and gradients are the base layer's to the bit (with ``lora_dropout`` 0,
    the default: a dropout would also draw from the global RNG); ``module`` is untouched."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        return module.get_base_layer()
    if not any(isinstance(m, LoraLayer) for m in module.modules()):
        return module  # nothing to leave out: the module itself
    view = copy.copy(module)  # shallow: shares the parameters and buffers, own child list
    view._modules = {name: None if child is None else without_lora(child) for name, child in module._modules.items()}
    return view


def merged_copy(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with LoRA merged into the projections it adapts (W +
    (α/r)·B·A, peft's ``merge_and_unload``; the trained adapters and heads of
    ``modules_to_save`` in place of the originals): one matrix product per projection instead
    of three: 14–16 % less time for predicting every task of default.yaml's six sites with
    a ``tiny`` model on this CPU (RESULTS.md, "Model throughput"). Outputs equal the unmerged
    model's to float rounding; ``model`` itself is untouched. A module without LoRA (one
    merged already) is returned as it is."""
    if not isinstance(model, PeftModel):
        return model
    return copy.deepcopy(model).merge_and_unload()


def get_adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Exactly the trainable state (LoRA + adapters + heads), float32 CPU copies, sorted keys."""
    state = get_peft_model_state_dict(model)
    return {k: state[k].detach().float().cpu().clone() for k in sorted(state)}


def set_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load a state from ``get_adapter_state``; keys and shapes must match exactly."""
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"set_adapter_state: keys do not match this model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"set_adapter_state: `{k}` has shape {tuple(state[k].shape)}, model expects {tuple(shape)}")
    with torch.no_grad():
        set_peft_model_state_dict(model, {k: torch.as_tensor(v) for k, v in state.items()})


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def parameter_summary(model: nn.Module) -> dict[str, int | float]:
    """Trainable vs total parameters (total counts each weight once: originals of modules_to_save
    copies are excluded, as are LoRA matrices, so it is the deployed model's size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters()
                if "lora_" not in n and ".original_module." not in n)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total}
