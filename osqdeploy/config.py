"""Configuration dataclasses: the single source of every default.

The reconstruction defaults are the paper's Appendix F (which follows AdaRound, BRECQ and QDrop);
where the paper is silent the choice and its origin are written next to the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum

WEIGHT_INITS = ("minmax", "mse")
AUTOCASTS = ("auto", "off", "bf16", "fp16")
POST_GELU_RANGES = ("mse", "mse_max")
EDGE_RANGES = ("mse", "minmax")
ATTN_GRIDS = ("log", "uniform")
POST_GELU_GRIDS = ("tensor", "channel", "hadamard")
OUTPUT_TUNING_PARAMS = ("steps", "steps+affine", "steps+affine+wscale")
OUTPUT_TUNING_MIXES = ("none", "mixup", "cutmix")
VIEW_MIXES = OUTPUT_TUNING_MIXES


MAX_SEED = 2**47 - 1  # seed * 100003 + group index stays within torch's 64-bit seeds


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
    # "log": the post-softmax grid above, which keeps 4-bit attention accurate but which ONNX
    # Runtime has no kernel for (39 % of the ort-int8 file's CPU time at batch 32, real DeiT-Tiny).
    # "uniform": an ordinary per-tensor uniform grid, one QuantizeLinear in the exported graph, for
    # the int8 targets (W4A8, W8A8) deployed on CPUs (docs/results.md).
    attn_grid: str = "log"
    # RepQ-ViT scale reparameterisation of post-LayerNorm activations.
    reparam: bool = True
    # Per-output-channel weight grid: "minmax" spans each channel's min..max (the paper's and
    # AdaRound's choice); "mse" shrinks each channel's range to the clipping that minimises
    # ||W − Q(W)||² (BRECQ/QDrop's scale_method='mse'), which at 4 bits trades a few clipped
    # extreme weights for a finer step on all the others.
    weight_init: str = "minmax"
    # Input of the MLP's second Linear (post-GELU). "mse": the MSE observer shrinks min and max
    # together, like every other activation; "mse_max": it keeps the observed min and searches
    # the max only. At 4 bits the joint search often clips GELU's negative lobe (down to -0.17,
    # where most values lie) to 0, a systematic shift that fc2 sums over 4·dim inputs; keeping
    # the min took real DeiT-Tiny W4A4 round-to-nearest from 41.6% to 61.2% top-1, and a short
    # (50 iterations/group) reconstruction from 49.2% to 67.2% (250 held-out images, 128
    # calibration images; docs/method.md). The paper is silent on its observers;
    # this one won on measured accuracy, so it is the default.
    post_gelu_range: str = "mse_max"
    # Grid of the post-GELU activations, which `osq inspect --sensitivity` ranks the costliest of a
    # W4A4 DeiT-Tiny. "tensor": one per-tensor grid, like every activation (the paper's).
    # "channel": a grid per channel, RepQ-ViT's reparameterisation carried over from post-LayerNorm
    # activations: there is no affine before the quantizer to fold it into, so the quantizer keeps a
    # per-channel multiply-add (one Mul and one Add in the exported graph) and fc2 absorbs the inverse;
    # it did worse at every schedule tried (docs/method.md). "hadamard": each block of 64 channels
    # rotated by an orthonormal Hadamard matrix and centred before one per-tensor grid, fc2 holding
    # the inverse (one MatMul and one Add per block in the exported graph); on the real DeiT-Tiny it
    # lowered held-out KL by 22 % at W4A4 and 27 % at W6A6 after the default's tuning, so the
    # default method uses it (``METHOD_QUANT``). The dataclass default stays the paper's grid.
    post_gelu_grid: str = "tensor"
    # Inputs of the 8-bit edge layers (patch embedding, head). "mse": the MSE observer, as
    # everywhere else; "minmax": the extremes of all calibration data, unclipped. The head sees
    # one pooled token per image, so its per-channel MSE ranges rest on few values and clip the
    # class token's tails: `osq inspect --sensitivity` showed the head input costing more
    # cross-entropy than any other single quantizer of a W6A6 DeiT-Tiny. With "minmax",
    # round-to-nearest real DeiT-Tiny (250 calibration / 250 held-out images, CPU) went from
    # cross-entropy 1.159 to 1.110 at W6A6 and 1.960 to 1.893 at W4A4 (top-1 75.6 → 75.6,
    # 62.0 → 62.4); but on the tiny test ViT it raised the final-output MSE after a 400-iteration
    # reconstruction from 0.197 to 0.210. Opt-in until a full-schedule real-model run decides.
    edge_range: str = "mse"

    def with_method(self, method: Method | str) -> QuantConfig:
        """These settings with the quantizer choices of ``method`` (``METHOD_QUANT``; bits kept)."""
        method = Method(method)
        return self if method is Method.CUSTOM else replace(self, **METHOD_QUANT[method])

    def validate(self) -> None:
        _check_bits("weight bits", self.w_bits)
        _check_bits("activation bits", self.a_bits)
        _check_bits("edge bits", self.edge_bits)
        if self.attn_grid not in ATTN_GRIDS:
            raise ConfigError(f"attn_grid must be one of {', '.join(ATTN_GRIDS)}, got {self.attn_grid!r}")
        if self.attn_log_base not in ("sqrt2", "2"):
            raise ConfigError(f"attn_log_base must be 'sqrt2' or '2', got {self.attn_log_base!r}")
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError(f"weight_init must be one of {', '.join(WEIGHT_INITS)}, got {self.weight_init!r}")
        if self.edge_range not in EDGE_RANGES:
            raise ConfigError(f"edge_range must be one of {', '.join(EDGE_RANGES)}, got {self.edge_range!r}")
        if self.post_gelu_grid not in POST_GELU_GRIDS:
            raise ConfigError(
                f"post_gelu_grid must be one of {', '.join(POST_GELU_GRIDS)}, got {self.post_gelu_grid!r}"
            )
        if self.post_gelu_range not in POST_GELU_RANGES:
            raise ConfigError(
                f"post_gelu_range must be one of {', '.join(POST_GELU_RANGES)}, got {self.post_gelu_range!r}"
            )


class Method(str, Enum):
    """Named accuracy methods: which objective a calibration minimises and what runs after the groups.

    ``PAPER`` is the paper's Appendix F reconstruction (block-output MSE per group, nothing after)
    on its plan (``granularity="auto"``, Algorithm 1) and its 1,024 calibration views, kept by name
    so its results stay reproducible. ``FISHER`` and ``PREDICTION`` change its objective only.
    ``OUTPUT_TUNED``, the default (``DEFAULT_METHOD``), adds output-level tuning on cutmix blends
    at distillation temperature 2, ending on the moving average of what it learns, and takes the
    plan and views of the model's recipe (DeiT-Tiny's: 4 blocks per group, 4,096 views).
    A setting changed by hand makes the configuration ``CUSTOM``; the length of a stage (``iters``,
    ``output_tuning_iters``) and the decay of the tuning's average are schedule, not method.
    """

    PAPER = "paper"
    FISHER = "fisher"  # BRECQ's Fisher-weighted block-output error
    PREDICTION = "prediction"  # + KL of the predictions in the last group's objective (PD-Quant)
    OUTPUT_TUNED = "output_tuned"  # + output-level tuning of steps, LayerNorms and biases
    CUSTOM = "custom"


# The paper's plan and views, pinned by the methods measured as the paper plus one change.
_PAPER_PLAN = dict(granularity="auto", samples=1024)
# Every method's accuracy settings, all of them, so that choosing one resets the others.
METHODS: dict[Method, dict] = {
    Method.PAPER: dict(loss="mse", kl_groups=0, output_tuning_iters=0, view_mix="none", **_PAPER_PLAN),
    Method.FISHER: dict(loss="fisher", kl_groups=0, output_tuning_iters=0, view_mix="none", **_PAPER_PLAN),
    Method.PREDICTION: dict(loss="mse", kl_groups=1, kl_weight=1.0, output_tuning_iters=0, view_mix="none",
                            **_PAPER_PLAN),
    Method.OUTPUT_TUNED: dict(loss="mse", kl_groups=0, output_tuning_iters=1000, output_tuning="steps+affine",
                              output_tuning_lr=1e-3, output_tuning_mix="cutmix", output_tuning_drop=0.0,
                              output_tuning_ema=0.995, output_tuning_batch=0, output_tuning_crop=0.0,
                              output_tuning_temperature=2.0, view_mix="none"),
}
# Every method's quantizer choices (QuantConfig fields), reset with the method like its settings
# above: the paper's methods keep its per-tensor post-GELU grid, the default rotates it.
_PAPER_QUANT = dict(post_gelu_grid="tensor")
METHOD_QUANT: dict[Method, dict] = {
    Method.PAPER: _PAPER_QUANT,
    Method.FISHER: _PAPER_QUANT,
    Method.PREDICTION: _PAPER_QUANT,
    Method.OUTPUT_TUNED: dict(post_gelu_grid="hadamard"),
}


def method_of(quant: QuantConfig, calibration: CalibrationConfig) -> Method:
    """The named method a run's two configurations are: ``calibration.method`` when ``quant`` has
    that method's quantizer choices, else ``Method.CUSTOM``."""
    method = calibration.method
    if method is Method.CUSTOM or quant.with_method(method) != quant:
        return Method.CUSTOM
    return method


# What ``osq calibrate`` and ``api.calibration_config`` use when no method is named. On the real
# DeiT-Tiny with the recipe's 4-block, 4,096-view plan it won on held-out KL and logit MSE at W4A4
# (6 seeds) and W6A6 (3 seeds), and, before its tuning ended on an average, at W4A8 and W8A8 too,
# at 1.17x the paper's calibration time; the rotated post-GELU grid then lowered its KL by a fifth
# or more at W4A4 and W6A6 at the same time, and tuning at temperature 2 its logit MSE by 8-10 %
# (docs/results.md).
DEFAULT_METHOD = Method.OUTPUT_TUNED


def _method_settings(cfg: CalibrationConfig) -> dict:
    """The accuracy settings that change what ``cfg`` computes (a weight of a disabled term does not)."""
    settings: dict = {"loss": cfg.loss, "kl_groups": cfg.kl_groups, "tuned": cfg.output_tuning_iters > 0,
                      "granularity": cfg.granularity, "samples": cfg.samples, "view_mix": cfg.view_mix}
    if cfg.kl_groups:
        settings["kl_weight"] = cfg.kl_weight
    if cfg.output_tuning_iters:
        # whether the tuning ends on an average is method; its decay follows the stage's length
        settings.update(output_tuning=cfg.output_tuning, output_tuning_lr=cfg.output_tuning_lr,
                        output_tuning_mix=cfg.output_tuning_mix, output_tuning_drop=cfg.output_tuning_drop,
                        output_tuning_batch=cfg.output_tuning_batch, output_tuning_crop=cfg.output_tuning_crop,
                        output_tuning_class_bias=cfg.output_tuning_class_bias,
                        output_tuning_temperature=cfg.output_tuning_temperature, averaged=cfg.output_tuning_ema > 0)
    return settings


# ``osq calibrate --fast``: iterations per group of the quick preset, a fifth of the paper's
# schedule (see ``fast_preset``).
FAST_ITERS = 4000


@dataclass
class CalibrationConfig:
    """Reconstruction schedule (Appendix F unless noted)."""

    samples: int = 1024  # calibration views: the paper uses 16 batches of 64
    # Half of the calibration views, drawn by the seed, blended once with another view before
    # anything is observed or reconstructed ("mixup" or "cutmix"; reconstruct/mixing.py): inputs
    # that are not crops of the same few hundred pictures, for a reconstruction that otherwise fits
    # its calibration images about twice as closely as held-out ones. Off ("none") in every preset:
    # on the real DeiT-Tiny it lowered W4A4 held-out KL by 3-4 % after tuning, but at W6A6 nothing
    # once the tuning ends on an average (+0.8 %, 3 seeds).
    view_mix: str = "none"
    batch_size: int = 32
    iters: int = 20_000  # per reconstruction group
    lr_round: float = 1e-3  # Adam on AdaRound's V
    lr_act: float = 4e-5  # Adam on activation steps
    round_weight: float = 0.1  # "rounding loss rate"
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
    # Prediction-aware objective (PD-Quant): the last ``kl_groups`` groups add to their block-output
    # error the KL divergence of the model's predictions from the float model's, the rest of the
    # network run on the group's output (the quantized head, and any later group at its current
    # grids). ``kl_weight`` is relative: 1 makes the KL term as large as the block-output error on
    # the group's round-to-nearest start, so the balance does not hang on the model's logit scale.
    # Off in the paper's method (Method.PAPER); "mse" loss only.
    kl_groups: int = 0
    kl_weight: float = 1.0
    # Output-level tuning after block reconstruction (reconstruct/output_tuning.py): Adam on the
    # whole quantized model, minimising the KL divergence of its predictions from the float
    # model's on the calibration images, for ``output_tuning_iters`` batches. "steps" learns the
    # activation steps; "steps+affine" also the LayerNorm gains and biases and the layers' biases,
    # which stay float in the deployed graph; "steps+affine+wscale" also each weight row's scale
    # (the DequantizeLinear scale of the export, a per-output-channel gain; on the real DeiT-Tiny
    # it overfit the calibration images, so no preset uses it). The integer weights never change.
    # ``output_tuning_lr`` is relative: each tensor's Adam rate is it times the tensor's mean
    # magnitude. Off in the paper's method.
    output_tuning_iters: int = 0
    output_tuning: str = "steps"
    output_tuning_lr: float = 1e-3
    # What each tuning step fits: "none" the calibration views as they are (their float predictions
    # computed once); "mixup" or "cutmix" every image blended with, or patched from, another one by
    # a fresh seeded amount each step, and the float model's predictions on that very mix, so the
    # stage matches the float function around the images instead of memorising 1,024 predictions.
    # OUTPUT_TUNED takes "cutmix": on the real DeiT-Tiny (3 seeds, paired) it lowered held-out KL
    # against fixed views by 21 % and 8 % at W6A6 and 2 % at W4A4 on 1,024 views (+2 % on 4,096);
    # mixup did no better at W6A6 and worse at W4A4 (docs/results.md).
    output_tuning_mix: str = "none"
    # QDrop during output tuning: each activation quantizer keeps the float value of an element with
    # this probability per step, as the group steps do with ``drop_prob``, so the tuned steps,
    # LayerNorms and biases are fitted around partly quantized activations rather than to one exact
    # pattern of rounding. 0 (off) in every preset.
    output_tuning_drop: float = 0.0
    # Keep an exponential moving average of the tuned parameters with this decay per step and end
    # on the average instead of the last step (0: off): the last step of a thousand noisy blend
    # batches lies wherever the last batches pushed it; the average smooths that out. OUTPUT_TUNED
    # takes 0.995: on the real DeiT-Tiny, paired with the same tuning ending on its last step, it
    # lowered held-out KL by 2.5 % at W4A4 (6 seeds) and 10.5 % at W6A6 (every seed of 3). Like the
    # stage's length it is schedule: ``with_tuning_steps`` changes both together.
    output_tuning_ema: float = 0.0
    # Images per tuning step; 0 takes the reconstruction's ``batch_size``. 0 in every preset: a
    # step's time grows in proportion to its batch, and on the real DeiT-Tiny 250 steps of 128 were
    # worse than the default's 1,000 of 32 at W4A4 and W6A6 (held-out KL +7 % and +6 %, 3 seeds).
    output_tuning_batch: int = 0
    # Each tuning step also re-crops every image it fits (after any blend): a random box covering
    # between this fraction and all of its area, aspect ratio 3/4 to 4/3, flipped with probability
    # 1/2, resampled to full size on the device, the float model's prediction taken on that very
    # crop. 0 (off) in every preset: at 0.35 it lowered W4A4 held-out KL by 2.7 % in PyTorch, not
    # at all in ONNX Runtime, and nothing at W6A6 (real DeiT-Tiny, 3 seeds, paired); with the
    # classifier's bias held too, by 1 % averaged over six float draws of each run (docs/results.md).
    output_tuning_crop: float = 0.0
    # Whether "steps+affine" tuning also moves the classifier's bias, a prior over classes that
    # calibration images of a few classes could pull toward their own. True in every preset: held,
    # it changed held-out KL by -3 % at W4A4 and -0.5 % at W6A6 on the real DeiT-Tiny, one seed
    # of three lower and two higher at each; -2 % at W4A4 averaged over float draws (docs/results.md).
    output_tuning_class_bias: bool = True
    # Temperature of the tuning's KL (Hinton's distillation loss, scaled by T²): above 1 it softens
    # both predictions, so each image also teaches the float model's ranking of its other classes;
    # below 1 it weighs the top classes more. OUTPUT_TUNED takes 2: on the real DeiT-Tiny, paired
    # with T = 1 on the same reconstructions (9 seeds at W4A4, 6 at W6A6), held-out logit MSE fell
    # by 10 % and 8 % on every seed, KL by 5 % and 7 %; at 0.5 the W4A4 tuning never lowered the
    # calibration KL (docs/results.md). Whatever it is, the stage keeps its result only if the
    # plain KL (T = 1) on the calibration images fell.
    output_tuning_temperature: float = 1.0
    # Speed features, used on CUDA devices only. TF32 matmuls change float rounding;
    # replaying each group's training step as a CUDA graph changes nothing that is computed
    # (reconstruct/step.py); compiled quantizer kernels fuse the same arithmetic (quant/kernels.py).
    tf32: bool = True
    cuda_graph: bool = True
    compile: bool = True
    # Autocast of the group's forward/backward during reconstruction: "auto" (fp16 on CUDA, bf16
    # there with the prediction-aware objective, off elsewhere), "off", "bf16" or "fp16". Matmuls
    # run in the half type; every quantizer still
    # rounds in fp32 (its input upcast inside the kernel), so a rounding decision moves only by
    # the half rounding of its input, never by half-precision arithmetic on the grid. fp16 rounds
    # matmul operands to TF32's 10-bit mantissa (bf16: 7 bits); its gradients are kept out of the
    # subnormal range by a constant ``loss_scale``, to which Adam is invariant (its eps is scaled
    # with it). fp16 is the CUDA default because it was measured both ways: on an H200 it is
    # 1.21-1.42x faster than TF32 (ViT-S, DeiT-B, Swin-B), group-0 losses within 0.16 %, and the
    # real DeiT-Tiny's W4A4 held-out KL was 0.316 / 0.321 against TF32's 0.326 / 0.325 (two
    # seeds, 20,000 iterations; docs/results.md). Off on CPUs, whose half matmuls are no faster.
    # bf16 stays opt-in: when the grid arithmetic itself ran in bf16 it raised that KL by 6 %.
    # The MSE reported before/after each group is always computed in fp32.
    autocast: str = "auto"
    loss_scale: float = 1024.0  # fp16 autocast only
    # torch.compile the group's whole forward (and so its backward): inductor fuses LayerNorm,
    # GELU, softmax and every quantizer with their neighbours, where ``compile`` fuses each
    # quantizer alone. Any device; QDrop's masks stay eager draws (each a graph break), so it
    # computes what the eager step computes up to float reassociation. Blocks of one shape share
    # one compiled graph (parameters are graph inputs). Off: no faster on ViT-S (H100 and H200,
    # with and without fused_rng: 4.10 against 3.88 s / 1k before the fused training kernels,
    # which take most of its fusions), and Swin-B under fp16 overflowed at its first step.
    compile_group: bool = False
    # One fused Adam kernel per parameter group instead of a chain of foreach kernels (CUDA). The
    # same update formula; its float operations are ordered differently, so weights' rounding can
    # differ where a V sits at a tie.
    fused_adam: bool = True
    # QDrop's random masks generated inside the compiled kernels (``compile``/``compile_group``)
    # rather than by eager ``bernoulli_``: Bernoulli(drop_prob) masks all the same, drawn from
    # inductor's Philox stream, so not the same draws as the uncompiled step for a seed. Off: it
    # measured only 1-2 % faster (H200, ViT-S and Swin-B), not worth losing the eager draws.
    fused_rng: bool = False
    # Several ranks, V whole on every rank (``shard_rounding`` off, or a layer whose rows do not
    # split over the ranks): start each rounding gradient's all-reduce as soon as backward has
    # produced it, overlapping the rest of the backward pass (distributed.GradientSync), rather than
    # one flat all-reduce after it. The same sums, so the same run; on 2× H200 (DeiT-B) it took a
    # step from 3.85 to 3.67 ms at batch 32 and 6.00 to 5.82 ms at batch 64.
    overlap_allreduce: bool = True
    # Several ranks: each trains only its rows of every layer's rounding variables (soft weight,
    # regulariser and Adam over 1/world of V), every layer's soft weight all-gathered under the
    # forward and its gradient reduce-scattered under the backward (distributed.RowShard). The same
    # arithmetic up to float summation order. On: on 2× H200 (DeiT-B) a step took 3.31 against
    # 3.64 ms at batch 32, 10.02 against 10.35 at 128, 18.6 against 19.1 at 256.
    shard_rounding: bool = True
    # The fused attention's keys and values padded to a multiple of 8 tokens, the padded keys
    # masked out of the softmax (their probabilities exactly 0): every operand of the two batched
    # products then has a leading dimension that tensor-core GEMMs accept. Unpadded, ViT's 197
    # tokens send those products and their gradients to unaligned kernels, 17 % of a DeiT-B step on
    # an H200 (docs/results.md, "Several GPUs"). The same function and QDrop draws, up to float
    # summation order. Off until it is timed on a GPU.
    pad_attention: bool = False
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
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.autocast not in AUTOCASTS:
            raise ConfigError(f"autocast must be one of {', '.join(AUTOCASTS)}, got {self.autocast!r}")
        if not self.loss_scale > 0:
            raise ConfigError(f"loss scale must be > 0, got {self.loss_scale}")
        from .reconstruct.objective import OBJECTIVES  # the registry owns the names (imported late: no cycle)

        if self.loss not in OBJECTIVES:
            raise ConfigError(f"loss must be one of {', '.join(OBJECTIVES)}, got {self.loss!r}")
        if self.kl_groups < 0:
            raise ConfigError(f"kl_groups must be ≥ 0, got {self.kl_groups}")
        if self.kl_groups and self.loss != "mse":
            raise ConfigError(f"the prediction-aware objective (kl_groups) extends the 'mse' loss, not {self.loss!r}")
        if not self.kl_weight > 0:
            raise ConfigError(f"kl_weight must be > 0, got {self.kl_weight}")
        if self.output_tuning_iters < 0:
            raise ConfigError(f"output tuning iterations must be ≥ 0, got {self.output_tuning_iters}")
        if self.output_tuning not in OUTPUT_TUNING_PARAMS:
            raise ConfigError(
                f"output_tuning must be one of {', '.join(OUTPUT_TUNING_PARAMS)}, got {self.output_tuning!r}"
            )
        if self.view_mix not in VIEW_MIXES:
            raise ConfigError(f"view_mix must be one of {', '.join(VIEW_MIXES)}, got {self.view_mix!r}")
        if self.output_tuning_mix not in OUTPUT_TUNING_MIXES:
            raise ConfigError(
                f"output_tuning_mix must be one of {', '.join(OUTPUT_TUNING_MIXES)}, got {self.output_tuning_mix!r}"
            )
        if not 0.0 <= self.output_tuning_drop < 1.0:
            raise ConfigError(f"output tuning drop probability must be in [0, 1), got {self.output_tuning_drop}")
        if not 0.0 <= self.output_tuning_ema < 1.0:
            raise ConfigError(f"output tuning average decay must be in [0, 1), got {self.output_tuning_ema}")
        if not self.output_tuning_lr > 0:
            raise ConfigError(f"output tuning learning rate must be > 0, got {self.output_tuning_lr}")
        if self.output_tuning_batch < 0:
            raise ConfigError(f"output tuning batch must be ≥ 0 (0: batch_size), got {self.output_tuning_batch}")
        if not (self.output_tuning_crop == 0.0 or 0.0 < self.output_tuning_crop <= 1.0):
            raise ConfigError(
                f"output tuning crop must be 0 (off) or a fraction in (0, 1], got {self.output_tuning_crop}"
            )
        if not self.output_tuning_temperature > 0:
            raise ConfigError(f"output tuning temperature must be > 0, got {self.output_tuning_temperature}")
        # torch seeds are 64-bit and reconstruction seeds group i with seed * 100003 + i: a larger
        # seed would fail only once reconstruction starts
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer in 0..{MAX_SEED} (47 bits), got {self.seed!r}")

    @property
    def method(self) -> Method:
        """The named method these settings are (``Method.CUSTOM`` when they match none)."""
        mine = _method_settings(self)
        for method, preset in METHODS.items():
            if _method_settings(replace(self, **preset)) == mine:
                return method
        return Method.CUSTOM

    def with_method(self, method: Method | str) -> CalibrationConfig:
        """These settings with the accuracy options of ``method`` (schedule, device and speed kept)."""
        method = Method(method)
        if method is Method.CUSTOM:
            return self
        return replace(self, **METHODS[method])

    def with_tuning_steps(self, steps: int) -> CalibrationConfig:
        """Output tuning ``steps`` long, its moving average spanning the same share of the stage.

        The decay is raised to the power old/new length, so the starting values keep the weight
        they had (0.995 over 1,000 steps leaves them 0.7 %): at 0.995 a 100-step stage would end on
        an average still 61 % its untuned start.
        """
        ema = self.output_tuning_ema
        if ema and self.output_tuning_iters and steps:
            ema = ema ** (self.output_tuning_iters / steps)
        return replace(self, output_tuning_iters=steps, output_tuning_ema=ema)

    def autocast_on(self, device_type: str) -> str:
        """The autocast mode a reconstruction on ``device_type`` runs: "auto" resolved."""
        if self.autocast != "auto":
            return self.autocast
        if device_type != "cuda":
            return "off"
        # The prediction-aware objective's KL term overflowed fp16 (NaN in the last group of the real
        # DeiT-Tiny W4A4, 3 seeds of 3); under bf16 the same runs finished (docs/results.md).
        return "bf16" if self.kl_groups else "fp16"

    def to_dict(self) -> dict:
        return {**asdict(self), "method": self.method.value}

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationConfig:
        known = {f.name for f in fields(cls)}
        d = dict(d)  # "method" is derived from the other settings, which are the record
        return cls(**{k: v for k, v in d.items() if k in known})


def fast_preset(cfg: CalibrationConfig) -> CalibrationConfig:
    """``osq calibrate --fast``: ``FAST_ITERS`` iterations per group, AdaRound's learning rate raised to match.

    Cutting the iterations alone leaves the rounding variables too little room to move (Adam moves
    each by about ``lr`` per step): at a tenth of the schedule the final-output MSE of the tiny
    test ViT was 1.34x the full schedule's. Scaling ``lr_round`` by the cut keeps ``lr·iters``,
    and at a fifth of the schedule brought both test models within 10 % of it (1.07x ViT, 1.03x
    Swin, mean of 9 seeds; benchmarks/fast_preset.py, README Results). Output tuning is cut by the
    same fraction (1,000 steps to 200: on the real DeiT-Tiny's paper runs 200 steps kept 80 % of
    the W4A4 KL gain and did better at W6A6, docs/results.md), its average over the same share of
    it. A schedule already shorter than the preset (the demo's) is returned unchanged.
    """
    if cfg.iters <= FAST_ITERS:
        return cfg
    return replace(cfg, iters=FAST_ITERS, lr_round=cfg.lr_round * cfg.iters / FAST_ITERS).with_tuning_steps(
        cfg.output_tuning_iters * FAST_ITERS // cfg.iters)
