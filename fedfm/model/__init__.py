"""The channel foundation model: one factory, one pair of adapter-state functions.

    cfg = ModelConfig.from_preset("tiny", num_beams=spec.mmwave.codebook_beams)
    model = build_model(cfg, backbone="runs/pre/backbone.safetensors")   # PeftModel
    y = model("CE", x, known)
    state = get_adapter_state(model); set_adapter_state(other, state)
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from fedfm.model.checkpoint import load_adapter, load_backbone, save_adapter, save_backbone
from fedfm.model.config import DENSE_TASKS, PRESETS, TASKS, ModelConfig
from fedfm.model.lora import (base_model, get_adapter_state, lora_parameters, parameter_summary,
                              set_adapter_state, wrap_lora)
from fedfm.model.network import FedFM

__all__ = ["ModelConfig", "PRESETS", "TASKS", "DENSE_TASKS", "FedFM", "build_model", "get_adapter_state",
           "set_adapter_state", "save_backbone", "load_backbone", "save_adapter", "load_adapter",
           "parameter_summary", "base_model", "lora_parameters", "backbone_hash"]


def build_model(cfg: ModelConfig, backbone: str | Path | None = None, expected_hash: str | None = None,
                lora: bool = True) -> nn.Module:
    """Backbone (+ checkpoint, hash verified) + task adapters/heads, LoRA-wrapped with peft.

    Deterministic: the same cfg (incl. seed) and checkpoint give the same parameters.
    ``lora=False`` returns the bare FedFM with everything trainable (used for pretraining-free
    unit tests and benchmarks of full fine-tuning, never for FL).
    """
    model = FedFM(cfg)
    if backbone is not None:
        state, saved_cfg, digest = load_backbone(backbone, expected_hash)
        if saved_cfg.backbone_dict() != cfg.backbone_dict():
            diff = {k: (v, cfg.backbone_dict()[k]) for k, v in saved_cfg.backbone_dict().items()
                    if cfg.backbone_dict()[k] != v}
            raise ValueError(f"{backbone}: backbone config differs from the model config "
                             f"(key: (checkpoint, model)) {diff}")
        own = model.backbone.state_dict()
        wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:  # a sidecar edited to another preset than the weights: load_state_dict's RuntimeError otherwise
            raise ValueError(f"{backbone}: checkpoint tensor `{wrong[0]}` has shape {tuple(state[wrong[0]].shape)}, "
                             f"its config expects {tuple(own[wrong[0]].shape)} ({len(wrong)} such tensors); "
                             f"the weights and their .json sidecar do not belong together")
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{backbone}: checkpoint keys do not match the backbone: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.backbone_hash = digest
    return wrap_lora(model, cfg) if lora else model


def backbone_hash(model: nn.Module) -> str | None:
    """sha256 of the checkpoint the model's backbone was loaded from (None: random init)."""
    return base_model(model).backbone_hash
