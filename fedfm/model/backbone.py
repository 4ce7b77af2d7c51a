"""The shared channel transformer: a nanoGPT-style pre-LN encoder (bidirectional attention).

Module names are stable LoRA targets: ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``. The backbone owns the tokeniser, so a
pretrained checkpoint carries the patch embedding and the axis position projections.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedfm.model.config import ModelConfig
from fedfm.model.tokeniser import Tokeniser


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Backbone(nn.Module):
    """Tokeniser + encoder blocks + final LayerNorm. ``encode`` runs the blocks on given tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokeniser = Tokeniser(cfg.patch, cfg.d_model, cfg.pos_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, L, d] → [B, L, d]."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.ln_f(tokens)

    def forward(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return self.encode(self.tokeniser(x, known))


def init_weights(module: nn.Module, seed: int, n_layers: int) -> None:
    """nanoGPT init (N(0, 0.02), residual projections scaled by 1/√(2L)) from an explicit generator.

    Parameters are visited in ``named_parameters`` order, so the same config and seed give the
    same bits whatever else happened in the process.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1 and name.endswith("weight"):  # LayerNorm gains
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
