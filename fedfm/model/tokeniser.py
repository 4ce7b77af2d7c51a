"""Space-time-frequency patch tokeniser for complex CSI grids (WiFo-style).

A grid x: float32 [B, G, K, N, 2] (slots, subcarriers, antennas, real/imag) with a mask
known: bool [G, K, N] or [B, G, K, N] becomes per element features (re, im, known), is
zero-padded to a multiple of the patch (pt, pk, pn) and cut into L = gt·gk·gn patches of
pt·pk·pn·3 values. Positions are factorised: a sinusoid of the patch index along each
axis, each projected by its own learned matrix and summed, so a site with other K, N or T
gets meaningful positions without retraining (issue #3, "inputs of different sizes").

Why patches and not LLM4WM's per-slot tokens: a per-slot token has K·N·2 inputs, so its
embedding layer is tied to one site's K and N; a patch has a fixed size at every site.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def grid_dims(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Patches per axis (gt, gk, gn) for a grid (G, K, N), rounding up (padding)."""
    return tuple(-(-s // p) for s, p in zip(shape, patch))


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """x: [B, G, K, N, C] → [B, L, pt·pk·pn·C], zero-padding G, K, N to multiples of the patch."""
    B, G, K, N, C = x.shape
    pt, pk, pn = patch
    gt, gk, gn = grid_dims((G, K, N), patch)
    x = F.pad(x, (0, 0, 0, gn * pn - N, 0, gk * pk - K, 0, gt * pt - G))
    x = x.view(B, gt, pt, gk, pk, gn, pn, C).permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, gt, gk, gn, pt, pk, pn, C)
    return x.reshape(B, gt * gk * gn, pt * pk * pn * C)


def unpatchify(p: torch.Tensor, shape: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """p: [B, L, pt·pk·pn·C] → [B, G, K, N, C], cropping the padding back off. Inverse of patchify."""
    B, L, D = p.shape
    G, K, N = shape
    pt, pk, pn = patch
    gt, gk, gn = grid_dims(shape, patch)
    C = D // (pt * pk * pn)
    x = p.view(B, gt, gk, gn, pt, pk, pn, C).permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, gt, pt, gk, pk, gn, pn, C)
    x = x.reshape(B, gt * pt, gk * pk, gn * pn, C)
    return x[:, :G, :K, :N]


def sinusoid(n: int, dim: int, device=None) -> torch.Tensor:
    """Transformer sinusoids of positions 0..n-1: [n, dim]."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)
    return out


class AxisPositions(nn.Module):
    """Factorised position code: W_t s(t) + W_k s(k) + W_n s(n) for every patch (t, k, n)."""

    def __init__(self, pos_dim: int, d_model: int):
        super().__init__()
        self.pos_dim = pos_dim
        self.time = nn.Linear(pos_dim, d_model, bias=False)
        self.freq = nn.Linear(pos_dim, d_model, bias=False)
        self.space = nn.Linear(pos_dim, d_model, bias=False)

    def forward(self, dims: tuple[int, int, int], device=None) -> torch.Tensor:
        gt, gk, gn = dims
        t = self.time(sinusoid(gt, self.pos_dim, device))    # (gt, d)
        k = self.freq(sinusoid(gk, self.pos_dim, device))    # (gk, d)
        n = self.space(sinusoid(gn, self.pos_dim, device))   # (gn, d)
        return (t[:, None, None] + k[None, :, None] + n[None, None, :]).reshape(gt * gk * gn, -1)  # (L, d)


class Tokeniser(nn.Module):
    """Grid + mask → token embeddings [B, L, d_model] (patch projection + axis positions)."""

    def __init__(self, patch: tuple[int, int, int], d_model: int, pos_dim: int):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Linear(patch[0] * patch[1] * patch[2] * 3, d_model)
        self.pos = AxisPositions(pos_dim, d_model)

    def forward(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """x: float [B, G, K, N, 2]; known: bool [G, K, N] or [B, G, K, N] → [B, L, d_model]."""
        if x.dim() != 5 or x.shape[-1] != 2:
            raise ValueError(f"Tokeniser: x should be [B, G, K, N, 2] (real/imag), got {tuple(x.shape)}")
        B, G, K, N, _ = x.shape
        m = known.to(x.dtype).expand(B, G, K, N)[..., None]            # (B, G, K, N, 1)
        feats = torch.cat([x * m, m], dim=-1)                          # unknown elements carry zeros
        tokens = self.proj(patchify(feats, self.patch))                # (B, L, d)
        return tokens + self.pos(grid_dims((G, K, N), self.patch), x.device)
