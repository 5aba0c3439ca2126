"""Model recipes and model loading.

A recipe is one TOML file in the top-level ``models/`` package: the short name users type, the timm
architecture it stands for, the family (which adapter knows its blocks) and the default
quantization settings.  Keeping these declarative means adding a model is adding a file, and the
engine never string-matches model names.

Models are always built by timm (``timm.create_model``), never re-implemented.  What a saved run
needs to rebuild the architecture without weights is a :class:`ModelSpec` (timm name + kwargs);
where the weights came from is recorded in :attr:`LoadedModel.source`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..io import os_reason

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "ModelRecipe",
    "ModelSpec",
    "ModelSpecError",
    "RecipeError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "check_finite",
    "content_fingerprint",
    "list_recipes",
    "load_model",
    "read_checkpoint_file",
    "read_state_dict",
    "resolve_recipe",
    "source_changes",
    "state_fingerprint",
]

FAMILIES = ("vit", "swin")
DEMO_RECIPE = "demo"
# Checkpoint containers seen in the wild (timm train scripts, DeiT, Swin releases), in the order
# they are tried: the first key holding a mapping wins.
_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema")
_RECIPE_KEYS = {"name", "aliases", "timm_name", "family", "granularity", "samples", "bits", "model_kwargs"}


class RecipeError(ValueError):
    """A recipe file in ``models/`` is malformed."""


class UnknownModelError(ValueError):
    """The name is neither a recipe, an alias, nor a timm model name."""




class ModelSpecError(UnknownModelError):
    """timm cannot build the architecture a spec names (an unknown name, or kwargs it refuses)."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model's architecture."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but are not in any local cache (no network here)."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild an architecture without its weights.

    A saved run stores ``to_dict()``; ``create()`` gives the same module (random init), into which
    the run's own weights are then loaded.  ``kwargs`` go to ``timm.create_model`` unchanged, so
    they may include ``pretrained_cfg_overlay`` to carry the data config (mean, std, input size).
    """

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        try:
            kwargs = json.loads(json.dumps(self.kwargs))  # tuples -> lists: equal after a round trip
        except TypeError as e:
            raise ValueError(f"model kwargs of {self.timm_name} are not JSON-serialisable: {e}") from e
        return {"timm_name": self.timm_name, "kwargs": kwargs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict) or not isinstance(data.get("timm_name"), str):
            raise ValueError(f"not a model spec (need a 'timm_name' string): {data!r}")
        return cls(timm_name=data["timm_name"], kwargs=dict(data.get("kwargs") or {}))

    def create(self) -> nn.Module:
        """Build the architecture with random weights, in eval mode.

        A name or kwargs timm cannot build (a damaged run's spec, a typo in a recipe) is a
        :class:`ModelSpecError`: timm itself raises anything from KeyError to AssertionError.
        """
        try:
            return timm.create_model(self.timm_name, pretrained=False, **_as_timm_kwargs(self.kwargs)).eval()
        except MemoryError:
            raise
        except Exception as e:
            raise ModelSpecError(f"timm cannot build {self.timm_name} with {self.kwargs!r}: {_first_line(e)}") from e


@dataclass
class ModelRecipe:
    """One model as users name it, with its defaults for quantization."""

    name: str
    aliases: list[str]
    timm_name: str
    family: str | None  # "vit" | "swin"; None for a bare timm name the recipes don't know
    granularity: str = "auto"
    samples: int | None = None  # calibration views; None: CalibrationConfig's
    # the (w_bits, a_bits) pairs the recipe is meant for; the first is what `osq calibrate` uses
    # without --bits.  W4A8 and W8A8 are what int8 hardware and runtimes execute today.
    bit_pairs: list[tuple[int, int]] = field(default_factory=lambda: [(4, 4)])
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def w_bits(self) -> int:
        """The default pair's weight bit-width."""
        return self.bit_pairs[0][0]

    @property
    def a_bits(self) -> int:
        """The default pair's activation bit-width."""
        return self.bit_pairs[0][1]

    def spec(self, model_kwargs: dict[str, Any] | None = None) -> ModelSpec:
        """The recipe's architecture, with ``model_kwargs`` overriding the recipe's own kwargs."""
        return ModelSpec(self.timm_name, {**copy.deepcopy(self.model_kwargs), **(model_kwargs or {})})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "timm_name": self.timm_name,
            "family": self.family,
            "granularity": self.granularity,
            "samples": self.samples,
            "bits": [list(p) for p in self.bit_pairs],
            "model_kwargs": json.loads(json.dumps(self.model_kwargs)),
        }


@dataclass
class LoadedModel:
    """A model ready for calibration, with what is needed to describe and rebuild it."""

    model: nn.Module
    recipe: ModelRecipe
    spec: ModelSpec
    # JSON-able: {"checkpoint": path, "sha256": ..., "bytes": ...} | {"pretrained": "timm"}
    # | {"demo": path, "sha256": ..., ...} | {"random_init": True}; the digest is of the bytes loaded
    source: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "spec": self.spec.to_dict(), "source": dict(self.source)}


# --------------------------------------------------------------------------------------- recipes


def _parse_recipe(data: dict[str, Any], origin: str) -> ModelRecipe:
    unknown = sorted(set(data) - _RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"{origin}: unknown keys {unknown} (allowed: {sorted(_RECIPE_KEYS)})")
    for key in ("name", "timm_name", "family"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RecipeError(f"{origin}: '{key}' must be a non-empty string")
    if data["family"] not in FAMILIES:
        raise RecipeError(f"{origin}: family must be one of {FAMILIES}, got {data['family']!r}")
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise RecipeError(f"{origin}: 'aliases' must be a list of strings")
    bit_pairs = _bit_pairs(data.get("bits", [[4, 4]]), origin)
    granularity = data.get("granularity", "auto")
    if not isinstance(granularity, str) or not granularity:
        raise RecipeError(f"{origin}: 'granularity' must be a non-empty string")
    samples = data.get("samples")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise RecipeError(f"{origin}: 'samples' must be a positive integer, got {samples!r}")
    model_kwargs = data.get("model_kwargs", {})
    if not isinstance(model_kwargs, dict):
        raise RecipeError(f"{origin}: [model_kwargs] must be a table")
    return ModelRecipe(
        name=data["name"],
        aliases=list(aliases),
        timm_name=data["timm_name"],
        family=data["family"],
        granularity=granularity,
        samples=samples,
        bit_pairs=bit_pairs,
        model_kwargs=model_kwargs,
    )


def _bit_pairs(bits: Any, origin: str) -> list[tuple[int, int]]:
    """A recipe's ``bits``: a list of ``[w_bits, a_bits]`` pairs (the first the default), or one bare pair."""
    def is_pair(p: Any) -> bool:
        return isinstance(p, list) and len(p) == 2 and all(type(b) is int and 2 <= b <= 8 for b in p)

    if is_pair(bits):
        return [(bits[0], bits[1])]
    if not (isinstance(bits, list) and bits and all(is_pair(p) for p in bits)):
        raise RecipeError(f"{origin}: 'bits' must be a list of [w_bits, a_bits] pairs with integers in 2..8 "
                          f"(the first is the default), got {bits!r}")
    pairs = [(p[0], p[1]) for p in bits]
    if len(set(pairs)) != len(pairs):
        raise RecipeError(f"{origin}: 'bits' lists a pair twice: {bits!r}")
    return pairs


@lru_cache(maxsize=1)
def _recipes() -> tuple[ModelRecipe, ...]:
    recipes = []
    for entry in sorted(files("models").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            try:
                data = tomllib.loads(entry.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise RecipeError(f"models/{entry.name}: invalid TOML: {e}") from e
            recipes.append(_parse_recipe(data, f"models/{entry.name}"))
    seen: dict[str, str] = {}
    for r in recipes:
        for key in (r.name, *r.aliases):
            if key.lower() in seen:
                raise RecipeError(f"recipe name/alias {key!r} is used by both {seen[key.lower()]} and {r.name}")
            seen[key.lower()] = r.name
    return tuple(recipes)


def list_recipes() -> list[ModelRecipe]:
    """All recipes shipped in ``models/``, sorted by name (copies: callers may mutate them)."""
    return copy.deepcopy(list(_recipes()))


def resolve_recipe(name: str) -> ModelRecipe:
    """Find the recipe for a recipe name, an alias or a timm name (optionally with a ``.tag``).

    A valid timm name no recipe covers gets an ad-hoc recipe with ``family=None``: which adapter
    applies is then for the caller to decide from the built model, not guessed from the name.
    """
    key = name.strip()
    lowered = key.lower()
    arch, _, tag = lowered.partition(".")
    for r in list_recipes():
        # a recipe that reshapes its timm architecture (the demo) is not that timm model: names only
        timm_names = () if r.model_kwargs else (r.timm_name.lower(),)
        if lowered in (r.name.lower(), *timm_names, *(a.lower() for a in r.aliases)):
            return r
        if tag and arch in timm_names:
            return replace(r, timm_name=key)  # keep the pretrained tag for timm
    if key and timm.is_model(key):
        return ModelRecipe(name=key, aliases=[], timm_name=key, family=None)
    known = sorted({k for r in _recipes() for k in (r.name, *r.aliases)})
    close = difflib.get_close_matches(lowered, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: {hint}Recipes: {', '.join(r.name for r in _recipes())}; "
        "any timm model name (timm.list_models()) also works."
    )


# ----------------------------------------------------------------------------------- checkpoints


def content_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of a file's contents, read in chunks.

    What a resume compares to know the weights are the ones the interrupted run read: a path
    says nothing about a file overwritten in place.
    """
    path = Path(path)
    h, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {os_reason(e)}") from None
    return {"sha256": h.hexdigest(), "bytes": size}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.pt``/``.bin``/``.safetensors`` file, never unpickling code.

    Accepts a bare state dict or one wrapped under "model"/"state_dict"/"state_dict_ema", and strips
    the "module." prefix DataParallel/DDP checkpoints carry.  Tensors holding NaN or Inf are refused.
    """
    return read_checkpoint_file(path)[0]


def read_checkpoint_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`read_state_dict`, and the :func:`content_fingerprint` of the very bytes it parsed.

    The file is read once into memory and both hashed and parsed from there, so the digest is of
    what was loaded even if the file changes meanwhile.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {os_reason(e)}") from None
    if not data:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    digest = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    kind = _checkpoint_kind(data)
    if kind is None or (path.suffix == ".safetensors" and kind != "safetensors"):
        raise CheckpointError(
            f"{path} is not a checkpoint: its bytes are neither a PyTorch file (zip or pickle) nor safetensors"
        )
    try:
        if kind == "safetensors":
            from safetensors.torch import load as load_safetensors

            obj: Any = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"checkpoint {path} holds Python objects besides tensors; refusing to unpickle code "
                "(torch.load weights_only=True). Re-save it as a plain state dict."
            ) from e
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or truncated ({_first_line(e)})") from e
    except Exception as e:  # torch and safetensors raise many types for damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or truncated ({_first_line(e)})") from e
    state = _unwrap_state_dict(obj, path)
    check_finite(state, f"checkpoint {path}")
    return state, digest


def _checkpoint_kind(data: bytes) -> str | None:
    """"zip" (torch.save), "pickle" (legacy torch.save), "safetensors", or None, from the first bytes."""
    if data[:4] == b"PK\x03\x04":
        return "zip"
    if data[:1] == b"\x80":  # pickle protocol 2+ opens with PROTO
        return "pickle"
    if len(data) >= 9:
        header = int.from_bytes(data[:8], "little")
        if 2 <= header <= len(data) - 8 and data[8:9] == b"{":
            return "safetensors"
    return None


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values (weights that came from no one file)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or Inf, naming the tensor: a calibration of them can only fail, late."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{what} holds NaN or Inf values in {bad[0]}{more}; these weights cannot be quantized")


def source_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """How the weights of ``after`` (a :attr:`LoadedModel.source`) differ from those of ``before``.

    For the message refusing a resume: names the file and its old and new digests.
    """
    old_file = before.get("checkpoint") or before.get("demo")
    new_file = after.get("checkpoint") or after.get("demo")
    if old_file != new_file:
        return [f"weights {old_file or _origin(before)} → {new_file or _origin(after)}"]
    if before.get("sha256") != after.get("sha256"):
        old_sha, new_sha = str(before.get("sha256") or "?")[:12], str(after.get("sha256") or "?")[:12]
        what = f"weights file {new_file}" if new_file else f"weights ({_origin(after)})"
        return [f"{what} changed since (sha256 {old_sha}… → {new_sha}…)"]
    return []


def _origin(source: dict[str, Any]) -> str:
    return "timm pretrained" if source.get("pretrained") else "random init" if source.get("random_init") else "?"


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path} is not a state dict (expected parameter names mapped to tensors, "
            f"optionally under one of {list(_WRAPPER_KEYS)})"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, timm_name: str) -> None:
    """Load all-or-nothing, with an error that says *how* the architecture differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if keys:
                more = f", ... (+{len(keys) - 3})" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
        raise CheckpointError(
            f"checkpoint {path} does not fit model {timm_name}: {'; '.join(parts)}. Wrong model name?"
        )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Let timm look only in the local Hugging Face cache.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the env var alone is not enough once
    it is imported; without this, an offline machine spends ~45 s in retries before failing.
    """
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:
        hf_constants = None
    old_flag = getattr(hf_constants, "HF_HUB_OFFLINE", None)
    if hf_constants is not None:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _create_pretrained_offline(spec: ModelSpec, name: str) -> nn.Module:
    try:
        with _hub_offline():
            model = timm.create_model(spec.timm_name, pretrained=True, **_as_timm_kwargs(spec.kwargs))
    except Exception as e:
        raise WeightsUnavailableError(
            f"pretrained weights for {spec.timm_name} are not available offline (not in the local timm/"
            f"Hugging Face cache: {_first_line(e)}). Pass a local file instead, e.g. "
            f"`osq calibrate {name} --checkpoint FILE` (load_model(..., checkpoint=FILE))."
        ) from e
    return model.eval()


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build a model by recipe/alias/timm name and load its weights.

    Weights come from ``checkpoint`` if given, else from timm's local cache when ``pretrained``
    (there is no network), else the model stays randomly initialised.  ``"demo"`` without a
    checkpoint or kwargs is the embedded digits ViT, trained on first use.
    """
    recipe = resolve_recipe(name)
    if recipe.name == DEMO_RECIPE and checkpoint is None and pretrained and not model_kwargs:
        from osqdeploy.load.demo import ensure_demo_model  # demo builds on this module

        return ensure_demo_model()
    spec = recipe.spec(model_kwargs)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        state, digest = read_checkpoint_file(path)  # before building the model: a bad file fails fast
        model = spec.create()
        _load_strict(model, state, path, spec.timm_name)
        source: dict[str, Any] = {"checkpoint": str(path), **digest}
    elif pretrained:
        model = _create_pretrained_offline(spec, recipe.name)
        state = model.state_dict()
        check_finite(state, f"pretrained weights of {spec.timm_name}")
        source = {"pretrained": "timm", "sha256": state_fingerprint(state)}
    else:
        model = spec.create()
        source = {"random_init": True}
    return LoadedModel(model=model.eval(), recipe=recipe, spec=spec, source=source)


def _as_timm_kwargs(value: Any) -> Any:
    """JSON/TOML give lists where timm expects tuples (input_size, mean, depths, ...)."""
    if isinstance(value, dict):
        return {k: _as_timm_kwargs(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_as_timm_kwargs(v) for v in value)
    return value


def _first_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, shortened: errors here are one line for the terminal."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_pretrained_available(timm_name: str) -> None:
    """Raise WeightsUnavailableError, naming the caches looked in, unless timm's pretrained weights
    for ``timm_name`` are on this machine. Cheap (no model is built), so a command can check it
    together with its other inputs before any work."""
    import huggingface_hub
    import huggingface_hub.constants as hf_constants

    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # timm raises several types for unknown names
        cfg = None
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if cfg is not None:
        hf_id = getattr(cfg, "hf_hub_id", None)
        if hf_id:
            repo, _, _ = hf_id.partition("@")
            for filename in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
                if filename and isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str):
                    return
        url = getattr(cfg, "url", None)
        if url and (hub_dir / Path(url).name).is_file():
            return
    raise WeightsUnavailableError(
        f"pretrained weights for {timm_name} are not on this machine (looked in the Hugging Face cache "
        f"{hf_constants.HF_HUB_CACHE} and timm's {hub_dir}; osq does not download): pass --checkpoint FILE "
        "(a .pth/.safetensors state dict), or try the embedded model: `osq calibrate demo`"
    )
