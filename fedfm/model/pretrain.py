"""Masked channel reconstruction (WiFo; SimMIM-style input masking, MAE-style throwaway decoder).

Masked elements enter the tokeniser as zeros with known = 0 — exactly how CE/CP/PF present
unknown elements at fine-tuning ("fill the grid"), so what pretraining learns is what the
dense tasks ask. A one-block decoder reconstructs the grid and is dropped afterwards.

Mask types (WiFo §III): ``random`` hides ≈85% of the patches, independently per sample;
``time`` hides the last 50% of the slots (prediction); ``frequency`` the upper 50% of the
subcarriers (extrapolation across the band).

``MASK_PRIORS`` names each mask's classical filler (``fedfm.model.prior``): the last visible
slot held for the time mask, each sample's AR extrapolation across sub-bands for the
frequency mask, zeros for the random mask (nothing classical fills 85 % of the patches).
``fedfm.train.reconstruction_nmse`` scores it beside the model as the reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fedfm.model.backbone import Backbone, Block, init_weights
from fedfm.model.config import ModelConfig
from fedfm.model.tokeniser import grid_dims, unpatchify

MASK_TYPES = ("random", "time", "frequency")
MASK_RATIOS = {"random": 0.85, "time": 0.5, "frequency": 0.5}
MASK_PRIORS = {"random": "observed", "time": "hold", "frequency": "ar"}  # classical filler per mask type
CLASSICAL_MASKS = tuple(k for k, prior in MASK_PRIORS.items() if prior != "observed")  # those with a filler


def make_mask(kind: str, batch: int, shape: tuple[int, int, int], patch: tuple[int, int, int],
              generator: torch.Generator, ratio: float | None = None) -> torch.Tensor:
    """bool [batch, G, K, N], True = hidden from the model (and scored).

    random: round(ratio·L) whole patches per sample; time: slots t >= G − round(ratio·G);
    frequency: subcarriers k >= K − round(ratio·K).
    """
    if kind not in MASK_TYPES:
        raise ValueError(f"mask type {kind!r} is not one of {', '.join(MASK_TYPES)}")
    ratio = MASK_RATIOS[kind] if ratio is None else ratio
    G, K, N = shape
    mask = torch.zeros(batch, G, K, N, dtype=torch.bool)
    if kind == "time":
        mask[:, G - round(ratio * G):] = True
    elif kind == "frequency":
        mask[:, :, K - round(ratio * K):] = True
    else:
        gt, gk, gn = grid_dims(shape, patch)
        L = gt * gk * gn
        hidden = torch.rand(batch, L, generator=generator).argsort(dim=1) < round(ratio * L)  # (B, L)
        per_patch = hidden[:, :, None].expand(batch, L, patch[0] * patch[1] * patch[2])
        mask = unpatchify(per_patch.float(), shape, patch)[..., 0] > 0.5  # (B, G, K, N)
    return mask


def hash_name(name: str) -> int:
    """A small stable integer per part name (seed offsets; Python's hash() is salted per process)."""
    return sum(ord(c) * 31 ** i for i, c in enumerate(name)) % 100_003


def masked_nmse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ‖pred − target‖² / ‖target‖² on the mask. pred/target [B, G, K, N, 2]."""
    m = mask.to(pred.dtype).expand(pred.shape[:-1])[..., None]
    err = ((pred - target) ** 2 * m).flatten(1).sum(1)
    ref = (target ** 2 * m).flatten(1).sum(1).clamp_min(1e-12)
    return (err / ref).mean()


class Pretrainer(nn.Module):
    """Backbone + one-block decoder that reconstructs the whole grid. [B, G, K, N, 2] → same.

    ``backbone`` may be an existing model's backbone (shared, not copied): pretraining then
    writes straight into it.
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        fresh = backbone is None
        self.backbone = Backbone(cfg) if fresh else backbone
        self.decoder = Block(cfg)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.patch_elems * 2)
        for name, part in [("backbone", self.backbone)] * fresh + [("decoder", self.decoder), ("ln", self.ln),
                                                                   ("head", self.head)]:
            init_weights(part, cfg.seed + hash_name(name), cfg.n_layers)

    def forward(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        B, G, K, N, _ = x.shape
        h = self.decoder(self.backbone(x, known))                                    # (B, L, d)
        return unpatchify(self.head(self.ln(h)), (G, K, N), self.cfg.patch).float()  # (B, G, K, N, 2)
