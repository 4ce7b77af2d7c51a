"""ModelConfig: one frozen dataclass for tokeniser, backbone, adapters, heads and LoRA.

    cfg = ModelConfig.from_preset("tiny", num_beams=256)

Presets follow WiFo / WirelessGPT's range of sizes (≈1M to ≈80M backbone parameters);
`scripts/bench_model.py` prints the exact counts. Every bad value raises ``ValueError``
naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The model's task ids and which of them reconstruct a grid; mirrors fedfm.tasks (checked by a test)
# so that the model can be built and tested without the data side.
TASKS = ("CE", "CP", "PF", "BF", "DE", "PE", "LoS")
DENSE_TASKS = ("CE", "CP", "PF")
POOLED_OUTPUTS = {"DE": 1, "PE": 1, "LoS": 2}  # BF: num_beams


@dataclass(frozen=True)
class ModelConfig:
    # backbone (nanoGPT-style pre-LN encoder, bidirectional)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    # tokeniser: space-time-frequency patch (slots, subcarriers, antennas), WiFo-style
    patch_t: int = 2
    patch_k: int = 8
    patch_n: int = 4
    pos_dim: int = 64              # sinusoid features per axis before the learned projection
    # per-task parts (trained and sent in FL): LLM4WM §IV-B adapters, §IV-D heads
    tasks: tuple[str, ...] = TASKS
    adapter_hidden: int = 32       # bottleneck width of the residual token adapter
    head_hidden: int = 64          # bottleneck of dense heads and hidden width of pooled MLP heads
    conv_channels: int = 8         # residual 3-D conv refiner on dense outputs (CNN head); 0 = none
    num_beams: int = 256           # BF classes = mmWave codebook size
    # pooled heads with a nonlinear path from the classical side inputs alone (PooledHead.feature_mlp)
    feature_mlp_tasks: tuple[str, ...] = ("DE", "PE", "LoS")
    # LoRA (peft) on the attention and MLP projections of every block
    lora_r: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    seed: int = 0                  # parameter initialisation (torch.Generator, never global RNG)

    def __post_init__(self):
        positive = ("d_model", "n_layers", "n_heads", "mlp_ratio", "patch_t", "patch_k", "patch_n",
                    "pos_dim", "adapter_hidden", "head_hidden", "num_beams", "lora_r", "lora_alpha")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig: `{key}` should be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig: `d_model` ({self.d_model}) should be divisible by "
                             f"`n_heads` ({self.n_heads})")
        if self.pos_dim % 2:
            raise ValueError(f"ModelConfig: `pos_dim` should be even, got {self.pos_dim}")
        if not isinstance(self.conv_channels, int) or self.conv_channels < 0:
            raise ValueError(f"ModelConfig: `conv_channels` should be an integer >= 0, got {self.conv_channels!r}")
        for key in ("dropout", "lora_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig: `{key}` should be in [0, 1), got {value!r}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ModelConfig: `tasks` {self.tasks!r} should be distinct ids from {', '.join(TASKS)}")
        pooled = tuple(t for t in TASKS if t not in DENSE_TASKS)
        fm = self.feature_mlp_tasks
        if any(t not in pooled for t in fm) or len(set(fm)) != len(fm):
            raise ValueError(f"ModelConfig: `feature_mlp_tasks` {self.feature_mlp_tasks!r} should be distinct ids "
                             f"from {', '.join(pooled)} (or empty)")
        allowed = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
        if not self.lora_targets or any(t not in allowed for t in self.lora_targets):
            raise ValueError(f"ModelConfig: `lora_targets` {self.lora_targets!r} should be a non-empty "
                             f"subset of {', '.join(allowed)}")

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_t, self.patch_k, self.patch_n)

    @property
    def patch_elems(self) -> int:
        return self.patch_t * self.patch_k * self.patch_n

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"ModelConfig: preset {name!r} is not one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict, where: str = "ModelConfig") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON lists → tuples
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def backbone_dict(self) -> dict:
        """The fields that shape the pretrained backbone (saved with it; must match on load)."""
        keys = ("d_model", "n_layers", "n_heads", "mlp_ratio", "patch_t", "patch_k", "patch_n", "pos_dim")
        return {k: getattr(self, k) for k in keys}


# ~12·d²·L backbone parameters. Bottlenecks grow slowly with d so that `base` trains ≤ 3% (issue #3).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4),                                   # ≈0.8M backbone
    "small": dict(d_model=256, n_layers=6, n_heads=8),                                  # ≈4.8M
    "base": dict(d_model=384, n_layers=12, n_heads=6, adapter_hidden=16),               # ≈21M
    "large": dict(d_model=768, n_layers=12, n_heads=12, adapter_hidden=32, lora_r=4),   # ≈85M
}
