"""Runtimes: one calling convention for everything that can run the model.

A runtime is any object with a ``name`` and ``__call__(batch) -> logits`` (float32, CPU).  The
evaluator only sees that, so the FP32 PyTorch model, a fake-quantized PyTorch model and the
exported ONNX file are measured by the same loop and compared logit for logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from osqdeploy.load.models import _first_line
from osqdeploy.quant.layers import QuantConv2d, QuantLinear
from osqdeploy.reconstruct.engine import tf32

__all__ = ["OnnxRuntime", "Runtime", "RuntimeLoadError", "TorchRuntime", "UlpPerturbed"]

_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
_ORT_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class RuntimeLoadError(ValueError):
    """A model file or execution provider that cannot be used."""


@runtime_checkable
class Runtime(Protocol):
    name: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchRuntime:
    """A PyTorch module in eval mode (moved to ``device``) under ``torch.no_grad``, in full fp32.

    TF32 stays off for matmuls and convolutions alike, so the numbers are those of the model that
    ONNX Runtime (CPU, or CUDA with ``tf32=False``) is compared against.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", name: str = "torch-fp32") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.name = name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), tf32(False):
            logits = self.model(batch.to(self.device))
        return logits.float().cpu()  # .cpu() also waits for the GPU, so timing is honest


class OnnxRuntime:
    """An ONNX file run by ONNX Runtime.

    ``provider``: "auto" takes CUDA when this onnxruntime build has it, else CPU; "cuda" insists
    (an error, not a silent CPU run, when unavailable); "cpu" forces CPU.  ``provider`` on the
    instance is the execution provider actually used.  Inputs with a fixed batch dimension are fed
    in chunks of that size (the last one zero-padded), so any batch size works.  ``tf32``: the CUDA
    provider's TF32 matmuls and convolutions, on by default in onnxruntime-gpu but off here, since
    this class exists to measure the exported model against the PyTorch one in full fp32.
    """

    def __init__(
        self,
        path: str | Path,
        provider: str = "auto",
        graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        name: str | None = None,
        intra_op_num_threads: int | None = None,
        tf32: bool = False,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeLoadError(f"ONNX model not found: {self.path}")
        providers = _providers(provider, tf32)
        options = ort.SessionOptions()
        options.graph_optimization_level = graph_optimization_level
        if intra_op_num_threads:
            options.intra_op_num_threads = intra_op_num_threads
        try:
            self.sess = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as e:
            raise RuntimeLoadError(
                f"cannot load ONNX model {self.path} (corrupt, truncated or not ONNX?): {_first_line(e)}"
            ) from e
        self.provider = self.sess.get_providers()[0]
        if provider == "cuda" and self.provider != _CUDA_EP:
            raise RuntimeLoadError(f"onnxruntime could not start CUDA for {self.path} (fell back to {self.provider})")
        inputs = self.sess.get_inputs()
        if len(inputs) != 1 or inputs[0].type not in _ORT_INPUT_TYPES:
            found = [(i.name, i.type) for i in inputs]
            raise RuntimeLoadError(f"{self.path}: expected one float image input, found {found}")
        self.input_name = inputs[0].name
        self.input_dtype = _ORT_INPUT_TYPES[inputs[0].type]
        batch_dim = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch: int | None = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.output_name = self.sess.get_outputs()[0].name
        self.name = name or ("onnx-cuda" if self.provider == _CUDA_EP else "onnx-cpu")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return self._run(x)
        size = self.fixed_batch
        pieces = []
        for begin in range(0, len(x), size):
            chunk = x[begin : begin + size]
            n = len(chunk)
            if n < size:
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), dtype=chunk.dtype)])
            pieces.append(self._run(chunk)[:n])
        return torch.cat(pieces)

    def _run(self, x: np.ndarray) -> torch.Tensor:
        (out,) = self.sess.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})
        return torch.from_numpy(np.asarray(out)).float()


class UlpPerturbed:
    """A :class:`TorchRuntime` whose every Linear, convolution and LayerNorm output is moved by at
    most one float32 ulp, elementwise, by a seeded draw: another, equally exact, implementation.

    Why: a 4-bit network is chaotic. Two correct implementations that differ only in float
    summation order (PyTorch vs ONNX Runtime, one GEMM kernel vs another) send a few activations
    across a rounding threshold; each such flip moves a value by a whole step (a fifteenth of its
    range at 4 bits) and the difference spreads through the blocks after it. Their top-1 on a few
    hundred images then differs by points, not tenths. Top-1 under several seeds of this
    perturbation is the spread that arithmetic alone produces, against which a gap between
    PyTorch and ONNX Runtime can be judged. (Perturbing the input image instead would show
    nothing: the first quantizer absorbs it.)

    With ``inputs_of``, only the first input of those modules is nudged instead (forward
    pre-hooks): pointed at activation quantizers, it shows which of them the chaos starts from.
    """

    _kinds = (nn.Linear, nn.Conv2d, nn.LayerNorm, QuantLinear, QuantConv2d)

    def __init__(self, runtime: TorchRuntime, seed: int, inputs_of: Sequence[nn.Module] | None = None) -> None:
        if not isinstance(runtime, TorchRuntime):
            raise TypeError("UlpPerturbed perturbs a TorchRuntime's arithmetic; other runtimes cannot be reached")
        self.runtime = runtime
        self.name = f"{runtime.name}~ulp{seed}"
        self.seed = seed
        self.inputs_of = None if inputs_of is None else list(inputs_of)
        self._generators: dict[str, torch.Generator] = {}

    def _nudge_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t) or not t.is_floating_point():
            return t
        gen = self._generators.get(str(t.device))
        if gen is None:
            gen = self._generators[str(t.device)] = torch.Generator(t.device).manual_seed(self.seed)
        step = torch.randint(-1, 2, t.shape, generator=gen, device=t.device)
        away = torch.where(step > 0, torch.full_like(t, torch.inf), torch.full_like(t, -torch.inf))
        return torch.where(step == 0, t, torch.nextafter(t, away))

    def _nudge(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return self._nudge_tensor(out)

    def _nudge_input(self, module: nn.Module, inputs: tuple) -> tuple:
        return (self._nudge_tensor(inputs[0]), *inputs[1:]) if inputs else inputs

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        model = self.runtime.model
        if self.inputs_of is None:
            targets = [m for m in model.modules() if isinstance(m, self._kinds)]
            handles = [m.register_forward_hook(self._nudge) for m in targets]
        else:
            handles = [m.register_forward_pre_hook(self._nudge_input) for m in self.inputs_of]
        try:
            return self.runtime(batch)
        finally:
            for h in handles:
                h.remove()


def _providers(provider: str, tf32: bool = False) -> list:
    available = ort.get_available_providers()
    # each rank of a sharded evaluation runs on its own GPU (torch's current device)
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else 0
    cuda = (_CUDA_EP, {"use_tf32": str(int(tf32)), "device_id": str(device_id)})
    if provider == "auto":
        return [cuda, _CPU_EP] if _CUDA_EP in available else [_CPU_EP]
    if provider == "cuda":
        if _CUDA_EP not in available:
            raise RuntimeLoadError(
                f"provider 'cuda' requested but this onnxruntime has no {_CUDA_EP} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use provider='cpu'"
            )
        return [cuda, _CPU_EP]
    if provider == "cpu":
        return [_CPU_EP]
    raise ValueError(f"provider must be 'auto', 'cuda' or 'cpu', got {provider!r}")

