"""Backbone checkpoints: safetensors weights + JSON sidecar (config, sha256 of the weights file).

    save_backbone("runs/x/backbone.safetensors", model.backbone, cfg)  → writes .safetensors + .json
    state, cfg, digest = load_backbone("runs/x/backbone.safetensors")

Every participant of a federation loads the same frozen backbone; the hash is how they
prove it (DESIGN.md: a client whose backbone hash differs refuses to train).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fedfm.files import sha256_file
from fedfm.model.config import ModelConfig


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own weights with plain keys (``blocks.0.attn.qkv.weight``), whether
    ``model`` is a Backbone, a FedFM, a Pretrainer or a peft-wrapped FedFM (LoRA dropped:
    it is not part of the shared backbone)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    m = getattr(m, "backbone", m)
    return {k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if "lora_" not in k}


def save_backbone(path: str | Path, model: nn.Module, cfg: ModelConfig | None = None,
                  meta: dict | None = None) -> str:
    """Write the backbone's float32 state to ``path`` and the JSON sidecar; return the sha256.

    ``model``: anything ``backbone_state`` accepts; ``cfg`` defaults to ``model.cfg``."""
    path = Path(path)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = cfg if cfg is not None else getattr(base, "cfg", None)
    if cfg is None:
        raise ValueError(f"{path}: save_backbone needs `cfg` for a module without a .cfg attribute")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in backbone_state(model).items()}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp))
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    sidecar = {"config": cfg.to_dict(), "sha256": digest, "meta": meta or {}}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=1))
    return digest


def load_backbone(path: str | Path, expected_hash: str | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig, str]:
    """(state, cfg, sha256) of a saved backbone. The file's hash must match its sidecar and,
    when given, ``expected_hash``; otherwise ValueError naming the file."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise ValueError(f"{path}: backbone checkpoint not found" + (" (a folder, not a .safetensors file)"
                                                                      if path.is_dir() else ""))
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: backbone sidecar (config + sha256) not found")
    try:
        meta = json.loads(meta_path.read_text())
        recorded = meta["sha256"]
        cfg = ModelConfig.from_dict(meta["config"], where=str(meta_path))
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = str(e) if str(e).startswith(str(meta_path)) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{meta_path}: unreadable backbone sidecar ({why})") from None
    digest = sha256_file(path)
    if digest != recorded:
        raise ValueError(f"{path}: backbone hash mismatch: file has sha256 {digest}, "
                         f"{meta_path.name} records {recorded} (modified or truncated checkpoint)")
    if expected_hash is not None and digest != expected_hash:
        raise ValueError(f"{path}: backbone hash mismatch: file has sha256 {digest}, expected {expected_hash} "
                         f"(a different backbone than the federation's)")
    state = load_file(str(path))
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # a diverged pretraining saved before this check: it would score NaN everywhere
        raise ValueError(f"{path}: backbone tensor `{bad}` holds NaN or inf values (a diverged training); "
                         f"pretrain again with a lower learning rate")
    return state, cfg, digest


def save_adapter(path: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig,
                 backbone_sha256: str | None, meta: dict | None = None) -> None:
    """Write a fine-tuned model's trainable state (``get_adapter_state``) to ``path``, with the
    model config and the backbone's sha256 in the safetensors header, so that ``load_adapter``
    can refuse a state made for another model. Written to a temporary file and renamed: a
    crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"config": json.dumps(cfg.to_dict()), "backbone_sha256": backbone_sha256 or "none",
              "meta": json.dumps(meta or {})}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=header)
    os.replace(tmp, path)


def load_adapter(path: str | Path, cfg: ModelConfig,
                 backbone_sha256: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state, meta) as ``save_adapter`` wrote them, after checking that it was made for a model
    built from ``cfg`` (the initialisation seed aside) on the backbone with ``backbone_sha256`` (None = a
    random-init backbone); otherwise ValueError naming the file and what differs."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: adapter state not found")
    try:
        with safe_open(str(path), framework="pt") as f:  # header and tensors in one read
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        saved_cfg = json.loads(header["config"])
        saved_bb = header["backbone_sha256"]
        meta = json.loads(header.get("meta", "{}"))
    except Exception as e:  # SafetensorError on a corrupt header, KeyError/JSONDecodeError on a foreign file
        raise ValueError(f"{path}: not an adapter state written by fedfm ({type(e).__name__}: {e})") from None
    want = json.loads(json.dumps(cfg.to_dict()))  # tuples as the header's JSON holds them: lists
    differ = sorted(k for k in set(want) | set(saved_cfg) if k != "seed" and want.get(k) != saved_cfg.get(k))
    if differ:
        k = differ[0]
        raise ValueError(f"{path}: made for another model: config `{k}` is {saved_cfg.get(k)!r} there, "
                         f"{want.get(k)!r} here" + (f" (and {len(differ) - 1} more keys)" if len(differ) > 1 else ""))
    if saved_bb != (backbone_sha256 or "none"):
        raise ValueError(f"{path}: made on another backbone (sha256 {saved_bb}, this one is "
                         f"{backbone_sha256 or 'none: a random-init backbone'})")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"{path}: `{bad}` holds NaN or inf values")
    return state, meta
