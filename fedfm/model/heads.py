"""Per-task parts around the shared backbone (LLM4WM §IV-B input adapters, §IV-D output heads).

These are what a site trains besides LoRA and what travels in FL (peft ``modules_to_save``).
Each head's ``forward`` takes everything it needs as arguments: peft wraps it and forwards
calls only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedfm.model.prior import prior_and_scale
from fedfm.model.tokeniser import unpatchify


class TokenAdapter(nn.Module):
    """Task embedding + residual bottleneck MLP on tokens: y = x + e + W2 gelu(W1 LN(x + e)).

    x: [B, L, d] → [B, L, d]. The learned task vector e tells the shared backbone which task
    it serves (the grids of CE and PF can look alike); it lives here so that it travels with
    the adapter.
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.task_embedding = nn.Parameter(torch.zeros(d_model))
        self.ln = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.task_embedding
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class DenseHead(nn.Module):
    """Tokens → full grid [B, G, K, N, 2] (CE/CP/PF "fill the grid").

    Per-token bottleneck MLP to a patch, un-patchified and cropped, plus a classical first
    guess built from the observed input (``fedfm.model.prior``: comb interpolation for CE,
    last slot held for CP, observed half for PF; the site's Kronecker LMMSE for CE and CP where
    its ``ChannelStats`` are given), so the head learns a correction; then a small
    residual 3-D conv over (slot, subcarrier, antenna): LLM4WM's CNN head, which smooths
    across patch borders that a per-token linear map cannot see.

    On the Kronecker LMMSE both corrections are multiplied by the estimator's own error
    standard deviation per entry (``fedfm.model.prior.prior_and_scale``): the head predicts the
    LMMSE's error in units of its expected size. Unscaled, one correction shared by every site
    adds an error of about the same absolute size everywhere — noise against InH's −25 dB prior,
    where it cost 2.3 dB on CP (benchmark, 2026-11-25) while gaining 0.04 dB on UMi.
    """

    def __init__(self, d_model: int, hidden: int, patch: tuple[int, int, int], conv_channels: int,
                 prior: str = "observed"):
        super().__init__()
        self.patch = tuple(patch)
        self.prior = prior
        self.ln = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, patch[0] * patch[1] * patch[2] * 2)
        self.conv = None
        if conv_channels:
            self.conv = nn.Sequential(nn.Conv3d(2, conv_channels, 3, padding=1), nn.GELU(),
                                      nn.Conv3d(conv_channels, 2, 3, padding=1))

    def forward(self, h: torch.Tensor, x: torch.Tensor, known: torch.Tensor, stats=None) -> torch.Tensor:
        """h: [B, L, d]; x: [B, G, K, N, 2]; known: bool [G, K, N] or [B, G, K, N]; stats: the
        site's ``ChannelStats`` or None → [B, G, K, N, 2]."""
        B, G, K, N, _ = x.shape
        y = unpatchify(self.proj(F.gelu(self.fc(self.ln(h)))), (G, K, N), self.patch)  # (B, G, K, N, 2)
        prior, scale = prior_and_scale(self.prior, x.float(), known, stats)
        scale = 1.0 if scale is None else scale[..., None]                 # [G, K, N, 1] or 1
        y = prior + scale * y.float()
        if self.conv is not None:
            c = y.permute(0, 4, 1, 2, 3)                                    # (B, 2, G, K, N)
            y = y + scale * self.conv(c.to(self.conv[0].weight.dtype)).permute(0, 2, 3, 4, 1).float()
        return y


@dataclass(frozen=True)
class LinearStart:
    """Where one output of a linear layer starts: Σ weights[f]·features[f] + bias."""

    weights: tuple[tuple[int, float], ...]   # (feature index, weight)
    bias: float = 0.0

    def set(self, layer: nn.Linear, output: int) -> None:
        for f, w in self.weights:
            layer.weight[output, f] = w
        layer.bias[output] = self.bias


class PooledHead(nn.Module):
    """Mean over tokens → LN, joined by the classical features → MLP → [B, out] (BF logits,
    DE/PE value, LoS logits).

    With ``spectra`` > 0 (BF) the logits also add w·log-spectra (w starts at 1 on spectrum
    ``spectrum_start``, the others 0) and a small circular 1-D CNN over the beam axis of the
    log-spectra — circular because u = sin θ wraps at ±1 for a half-wavelength ULA.
    ``start_at_prior`` (called after the generic init) zeroes the MLP's and the CNN's last
    layers and sets w, so an untrained BF head is that spectrum's AoA beam (Capon in FedFM);
    ``prior_features`` {output: LinearStart} sets the linear path of those outputs, so an
    untrained DE head outputs the deployment prior the site context carries
    (``fedfm.channels.deployment``) and an untrained LoS head a K-factor rule.

    ``los_gate`` (PE) = (LinearStart of the gate g, LoS value index, NLoS value index): the
    output adds nlos + σ(g)·(los − nlos), g a linear map of the features. Path loss is bimodal
    in the LoS state, and the gap between the modes is the environment's (the deployment prior
    has it); whether *this* sample is LoS is one shared K-factor reading (the fitted LoS
    thresholds sit within ±0.2 of each other on every default site). With the gate, FedAvg
    learns one shared reading instead of each environment's mode split from the one site that
    has it (measured without it: federated PE 17 dB MAE on RMa against 9 dB trained alone).

    ``feature_mlp`` adds a small MLP over the side inputs alone (features → hidden → out, its last
    layer zeroed by ``start_at_prior``, so it starts as no change). The linear skip and gate can
    only shift and threshold the features; what a site's kNN fingerprint reads from them (PE, DE)
    is nonlinear, and the MLP over [embedding, features] mixes that with the embedding's noise.
    The side inputs are read on the same scale at every grid shape, so this path can be refitted
    to convergence (``fedfm.train.refit_heads`` scope "features") without the embedding's failure
    on a site of another shape.
    """

    def __init__(self, d_model: int, hidden: int, out: int, num_features: int = 0, spectra: int = 0,
                 spectrum_channels: int = 8, kernel: int = 9, prior_features: dict[int, "LinearStart"] | None = None,
                 los_gate: tuple["LinearStart", int, int] | None = None, spectrum_start: int = 0,
                 feature_mlp: bool = False):
        super().__init__()
        if spectra and not 0 <= spectrum_start < spectra:
            raise ValueError(f"PooledHead: `spectrum_start` {spectrum_start} is not in [0, {spectra})")
        self.spectrum_start = spectrum_start
        self.prior_features = dict(prior_features or {})
        self.los_gate = tuple(los_gate) if los_gate else None
        if (self.prior_features or self.los_gate or feature_mlp) and not num_features:
            raise ValueError("PooledHead: `prior_features`, `los_gate` and `feature_mlp` need `num_features` > 0")
        self.gate = nn.Linear(num_features, 1) if self.los_gate else None
        self.ln = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model + num_features, hidden)
        self.proj = nn.Linear(hidden, out)
        # a linear path from the classical features straight to the output ("wide and deep"):
        # a K-factor threshold or a per-environment offset is one weight away, not two layers
        self.skip = nn.Linear(num_features, out) if num_features else None
        self.feature_mlp = (nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, out))
                            if feature_mlp else None)
        self.spectrum_weight = self.spectrum_conv = None
        if spectra:
            self.spectrum_weight = nn.Parameter(F.one_hot(torch.tensor(spectrum_start), spectra).float())
            self.spectrum_conv = nn.Sequential(
                nn.Conv1d(spectra, spectrum_channels, kernel, padding=kernel // 2, padding_mode="circular"),
                nn.GELU(),
                nn.Conv1d(spectrum_channels, 1, kernel, padding=kernel // 2, padding_mode="circular"))

    def start_at_prior(self) -> None:
        with torch.no_grad():
            if self.spectrum_weight is not None:
                self.spectrum_weight.zero_()
                self.spectrum_weight[self.spectrum_start] = 1.0
            self.proj.weight.zero_()
            self.proj.bias.zero_()
            if self.skip is not None:
                self.skip.weight.zero_()
                self.skip.bias.zero_()
                for o, start in self.prior_features.items():
                    start.set(self.skip, o)
            if self.feature_mlp is not None:
                self.feature_mlp[2].weight.zero_()
                self.feature_mlp[2].bias.zero_()
            if self.gate is not None:
                self.gate.weight.zero_()
                self.gate.bias.zero_()
                self.los_gate[0].set(self.gate, 0)
            if self.spectrum_conv is not None:
                self.spectrum_conv[2].weight.zero_()
                self.spectrum_conv[2].bias.zero_()

    def forward(self, h: torch.Tensor, features: torch.Tensor | None = None,
                spectra: torch.Tensor | None = None) -> torch.Tensor:
        """h: [B, L, d]; features: [B, F]; spectra: [B, C, out] log-spectra → [B, out]."""
        z = self.ln(h.mean(dim=1))
        if features is not None:
            z = torch.cat([z, features.to(z.dtype)], dim=-1)
        y = self.proj(F.gelu(self.fc(z)))
        if features is not None and self.feature_mlp is not None:
            y = y + self.feature_mlp(features.to(y.dtype))
        # The classical start (linear path, PE's gate, the spectrum reading) in float32 even
        # under bf16 autocast: the site-residual column cancels the shared start's reading
        # (LoS log-odds up to ±20) and log-spectra of neighbouring beams differ by hundredths,
        # below bf16's resolution there, so bf16 would move decisions off the baseline's.
        with torch.autocast(device_type=y.device.type, enabled=False):
            y = y.float()
            if features is not None and self.skip is not None:
                y = y + self.skip(features.float())
            if features is not None and self.gate is not None:
                f = features.float()
                _, los, nlos = self.los_gate
                y = y + f[:, nlos:nlos + 1] + torch.sigmoid(self.gate(f)) * (f[:, los:los + 1] - f[:, nlos:nlos + 1])
            if spectra is not None and self.spectrum_weight is not None:
                s = spectra.float()
                y = y + torch.einsum("c,bcn->bn", self.spectrum_weight.float(), s) + self.spectrum_conv(s)[:, 0]
        return y
