"""Option types of ``osq calibrate`` and the choices the commands share (declared apart from the commands,
which then read as what they do)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_BATCH = 32  # CalibrationConfig.batch_size, repeated so that help needs no torch import
DEFAULT_ITERS = 20_000
FAST_ITERS = 4_000


ModelArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="Recipe name or alias (see `osq list`), or any timm model name.")
]


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Autocast(str, Enum):
    auto = "auto"
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class Provider(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class RuntimeName(str, Enum):
    onnxruntime = "onnxruntime"
    torch_quant = "torch-quant"
    torch_fp32 = "torch-fp32"


BitsOpt = Annotated[
    tuple[int, int] | None,
    typer.Option(metavar="W A", help="Weight and activation bit-widths, 2..8: e.g. 4 8 or 8 8 for int8 runtimes. "
                 "\\[default: the recipe's first pair, see `osq list`]"),
]

DataOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Folder of calibration images: class sub-folders, ImageNet files named by WordNet id, or any flat "
        "folder of images. \\[default for demo: its train split]",
    ),
]

EvalDataOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Labelled folder `osq eval` should report accuracy on (recorded in the run). \\[default for demo: "
        "its held-out split]",
    ),
]

CheckpointOpt = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="Weights file (.pth/.pt/.bin/.safetensors state dict) for the model."),
]

GranularityOpt = Annotated[
    str | None,
    typer.Option(
        metavar="SPEC",
        help="auto | blocks:N | slices:A-B-C|AB-C|A-BC|ABC (see `osq list`). \\[default: the recipe's]",
    ),
]

CrossStageOpt = Annotated[
    bool, typer.Option("--cross-stage", help="Let blocks:N groups span Swin downsampling layers.")
]

ItersOpt = Annotated[
    int | None, typer.Option(help=f"Optimisation steps per group. \\[default: {DEFAULT_ITERS}; demo 100]")
]

FastOpt = Annotated[
    bool,
    typer.Option(
        "--fast",
        help=f"Quick preset: {FAST_ITERS} iterations per group with AdaRound's learning rate raised in "
        f"proportion, and output tuning cut by the same fraction. An explicit --iters wins.",
    ),
]

SamplesOpt = Annotated[int | None, typer.Option(help="Calibration images. \\[default: 1024; demo 256]")]

AugmentOpt = Annotated[
    bool,
    typer.Option(
        help="When the folder has fewer images than --samples, make up the number with seeded random crops and "
        "flips of them."
    ),
]

BatchSizeOpt = Annotated[int | None, typer.Option(help=f"Images per optimisation step. \\[default: {DEFAULT_BATCH}]")]

DeviceOpt = Annotated[Device, typer.Option(help="Where to calibrate.")]

AutocastOpt = Annotated[
    Autocast | None,
    typer.Option(
        help="Matmul precision of the reconstruction: off (fp32; TF32 on CUDA), bf16 or fp16; auto is fp16 on "
        "CUDA and off on CPU. Quantizers round in fp32 either way. \\[default: auto]"
    ),
]

SeedOpt = Annotated[int, typer.Option(help="Seed of the image draw and of reconstruction.")]

RunDirOpt = Annotated[
    Path | None,
    typer.Option(metavar="DIR", help="Run directory. \\[default: `.osq/runs/<recipe>-w<W>a<A>-<time>`]"),
]

ResumeOpt = Annotated[
    bool, typer.Option(help="Continue an interrupted run in --run-dir from its first unfinished group.")
]
GpusOpt = Annotated[
    int | None,
    typer.Option(
        "--gpus",
        min=1,
        help="Spread the work over N GPUs of this machine (one process each, NCCL); under torchrun the ranks come "
        "from torchrun. \\[default: 1]",
    ),
]
GlobalBatchScaleOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="K times the global batch with K times fewer iterations (AdaRound's rate K times higher): more images "
        "per step for several GPUs to share. 1 is the paper's schedule; on 2 GPUs 8 scaled best (1.9x) and kept "
        "the paper's accuracy on the real DeiT-Tiny; 16 scaled less (1.85x) and lost some.",
    ),
]


class ExportFormat(str, Enum):  # osqdeploy.onnx_export.ort_int8.ExportFormat's values
    qdq = "qdq"
    ort_int8 = "ort-int8"


class Method(str, Enum):  # osqdeploy.config.Method's presets
    paper = "paper"
    fisher = "fisher"
    prediction = "prediction"
    output_tuned = "output_tuned"


class AttnGrid(str, Enum):  # osqdeploy.config.ATTN_GRIDS
    log = "log"
    uniform = "uniform"


AttnGridOpt = Annotated[
    AttnGrid,
    typer.Option(
        help="Post-softmax grid. log: RepQ-ViT's log√2 grid, accurate at 4 bits; uniform: one per-tensor grid, "
        "which lets ONNX Runtime's CPU provider run every attention matmul as an integer kernel (for W4A8/W8A8 "
        "ort-int8 files).",
    ),
]
FormatOpt = Annotated[
    ExportFormat,
    typer.Option(
        "--format",
        help="qdq: ≤4-bit grids packed as int4, the smallest file; ort-int8: the same grids in uint8/int8 QDQ, "
        "which ONNX Runtime's CPU provider runs as integer kernels.",
    ),
]
PerLayerOpt = Annotated[
    bool,
    typer.Option(
        "--per-layer",
        help="Also compare every activation quantizer of the ONNX file with the fake-quant model: values on another "
        "grid step, and the first block where the two diverge.",
    ),
]
MethodOpt = Annotated[
    Method | None,
    typer.Option(
        help="output_tuned (the default): block reconstruction on the recipe's plan and views, then output-level "
        "tuning of steps, LayerNorms and biases (KL to fp32 at temperature 2 on cutmix blends of the calibration "
        "images, ending on the moving average of what it learns); paper: the "
        "paper's block reconstruction on its own plan and 1,024 views, nothing after; prediction adds the KL of "
        "predictions to the last group; fisher weights the block error by Fisher information.",
        show_default=False,
    ),
]
