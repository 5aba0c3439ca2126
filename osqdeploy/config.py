"""Configuration dataclasses: the single source of every default.

The reconstruction defaults are the paper's Appendix F (which follows AdaRound, BRECQ and QDrop);
where the paper is silent the choice and its origin are written next to the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


class ConfigError(ValueError):
    """A configuration value outside what the method supports."""


def _check_bits(name: str, bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"{name} must be an integer bit-width in 2..8, got {bits!r}")


@dataclass
class QuantConfig:
    """What is quantized and how (Section 3.1 grid, RepQ-ViT quantizer choices)."""

    w_bits: int = 4
    a_bits: int = 4
    # Patch embedding and classifier head stay at 8 bits (weights and inputs), as in RepQ-ViT,
    # PTQ4ViT and the paper's baselines.
    edge_bits: int = 8
    # Post-softmax attention: RepQ-ViT's log√2 grid ("sqrt2") or FQ-ViT's log2 grid ("2").
    attn_log_base: str = "sqrt2"
    # RepQ-ViT scale reparameterisation of post-LayerNorm activations.
    reparam: bool = True

    def validate(self) -> None:
        _check_bits("weight bits", self.w_bits)
        _check_bits("activation bits", self.a_bits)
        _check_bits("edge bits", self.edge_bits)
        if self.attn_log_base not in ("sqrt2", "2"):
            raise ConfigError(f"attn_log_base must be 'sqrt2' or '2', got {self.attn_log_base!r}")


ROUND_WEIGHT_NORMS = ("sum", "per_block")


@dataclass
class CalibrationConfig:
    """Reconstruction schedule (Appendix F unless noted)."""

    samples: int = 1024  # 16 batches of 64 in the paper; issue default 1024 images
    batch_size: int = 32
    iters: int = 20_000  # per reconstruction group
    lr_round: float = 1e-3  # Adam on AdaRound's V
    lr_act: float = 4e-5  # Adam on activation steps
    round_weight: float = 0.1  # "rounding loss rate"
    # How the rounding regulariser of a group is scaled: "sum" adds it over every weight of the
    # group (AdaRound/BRECQ/QDrop, the paper); "per_block" divides that sum by the number of
    # blocks the group spans, so a 3-block group carries a 1-block group's total rounding loss
    # against its one output loss. Opt-in diagnostic: on the tiny test ViT it measured slightly
    # worse than "sum" (benchmarks/granularity_tiny.py), since Adam sees each weight's own
    # regulariser gradient, which the sum does not scale with group size.
    round_weight_norm: str = "sum"
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # AdaRound/BRECQ: no rounding loss for the first 20% of iterations
    drop_prob: float = 0.5  # QDrop
    granularity: str = "auto"
    cross_stage: bool = False  # may a group span a Swin downsampling layer?
    seed: int = 0
    device: str = "auto"
    # Loss reduction: squared error summed over channels, averaged over batch and tokens
    # (BRECQ/QDrop's lp_loss sums over the feature dimension), so round_weight keeps the
    # balance those methods tuned.
    loss: str = "mse"
    # Speed features (issue 5): TF32 matmuls on CUDA. They do not change what is computed
    # beyond float rounding.
    tf32: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples must be ≥ 1, got {self.samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be ≥ 1, got {self.batch_size}")
        if self.iters < 0:
            raise ConfigError(f"iterations must be ≥ 0, got {self.iters}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ConfigError(f"drop probability must be in [0, 1), got {self.drop_prob}")
        if self.round_weight_norm not in ROUND_WEIGHT_NORMS:
            raise ConfigError(
                f"round_weight_norm must be one of {', '.join(ROUND_WEIGHT_NORMS)}, got {self.round_weight_norm!r}"
            )
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
