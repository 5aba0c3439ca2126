"""What a run's artifacts must agree on before anything is computed from them.

An exported ONNX file records the checksum of the run state it was made from
(``run_state_sha256`` in its metadata) and the image shape it takes. Evaluating it against a run
compares both first: an ONNX file from another run, or one whose input does not fit the images,
would otherwise give numbers labelled with the wrong run, or fail with a runtime's traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import os_reason
from .store import RunError

__all__ = ["OnnxInfo", "OnnxMismatchError", "check_onnx_for_run", "check_onnx_input", "onnx_info"]

STATE_KEY = "run_state_sha256"


class OnnxMismatchError(RunError):
    """An ONNX file that does not belong to the run, or does not take the images, it is used with."""


@dataclass(frozen=True)
class OnnxInfo:
    """What an ONNX file says about itself, read without building an ONNX Runtime instance."""

    path: Path
    metadata: dict[str, str]
    input_name: str
    input_shape: tuple[int | str | None, ...]  # ints, symbolic names ("batch") or None when unknown

    @property
    def run_state_sha256(self) -> str | None:
        return self.metadata.get(STATE_KEY) or None


def onnx_info(path: str | Path) -> OnnxInfo:
    """Metadata and the single input of an ONNX file; a file that is not ONNX is a one-line RunError."""
    import onnx

    path = Path(path)
    try:
        with open(path, "rb") as f:
            proto = onnx.load_model(f, load_external_data=False)
    except OSError as e:
        raise RunError(f"cannot read {path}: {os_reason(e)}") from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise RunError(f"{path} is not an ONNX model ({type(e).__name__})") from None
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise RunError(f"{path}: expected one image input, found {len(inputs)}")
    dims: list[int | str | None] = []
    for d in inputs[0].type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return OnnxInfo(path, {p.key: p.value for p in proto.metadata_props}, inputs[0].name, tuple(dims))


def check_onnx_for_run(path: str | Path, state_sha256: str) -> OnnxInfo:
    """Refuse an ONNX file that was not exported from the run whose state has ``state_sha256``.

    ``state_sha256`` is the run manifest's (verified against the state file when the run loads).
    A file without the record (not made by ``osq export``) is refused too: nothing ties it to the run.
    """
    info = onnx_info(path)
    recorded = info.run_state_sha256
    if recorded is None:
        raise OnnxMismatchError(
            f"{info.path} records no run checksum ({STATE_KEY}), so it cannot be tied to the run; "
            "export it again with `osq export`"
        )
    if recorded != state_sha256:
        raise OnnxMismatchError(
            f"{info.path} was exported from another run (its run state sha256 {recorded[:12]}…, this run's "
            f"{state_sha256[:12]}…); evaluate it against the run it came from or export this run again"
        )
    return info


def check_onnx_input(info: OnnxInfo, image_shape: Sequence[int]) -> None:
    """Refuse an ONNX input that cannot take images of ``image_shape`` ``(C, H, W)``."""
    dims = info.input_shape
    if len(dims) != len(image_shape) + 1:
        raise OnnxMismatchError(
            f"{info.path}: input {info.input_name!r} has {len(dims)} dimensions; images need "
            f"{len(image_shape) + 1} (batch, {', '.join(map(str, image_shape))})"
        )
    for have, want in zip(dims[1:], image_shape, strict=True):
        if isinstance(have, int) and have != want:
            shape = "x".join("?" if not isinstance(d, int) else str(d) for d in dims[1:])
            raise OnnxMismatchError(
                f"{info.path}: input {info.input_name!r} takes {shape} images, the data gives "
                f"{'x'.join(map(str, image_shape))}"
            )
