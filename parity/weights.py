"""The weights a comparison runs on: loaded (a folder, a hub id) or synthetic (a preset), in the run's dtype, and
the checks that keep them honest (a crc32 fingerprint of every tensor, non-finite values).

    >>> w = resolve_weights(preset="google/siglip-base-patch16-224", dtype="bf16")
    >>> w.synthetic, w.state_dict["vision_model.post_layernorm.weight"].dtype
    (True, torch.bfloat16)
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from siglip_scratch.checkpoint import DTYPE_NAMES
from siglip_scratch.config import SiglipVisionConfig, get_preset
from siglip_scratch.errors import InputError
from siglip_scratch.modeling import REGIMES, load_vision_state_dict, synthetic_state_dict

__all__ = [
    "DTYPES",
    "Weights",
    "check_device",
    "dtype_name",
    "fingerprint_digest",
    "nonfinite_keys",
    "resolve_weights",
    "weight_fingerprint",
]

DTYPES = DTYPE_NAMES
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64"}


@dataclass
class Weights:
    """One copy of the vision tower's tensors, canonical keys, already in the run's dtype/device."""

    config: SiglipVisionConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    synthetic: bool
    # Shared tensors a candidate changed in place: these Weights no longer hold the checkpoint.
    tainted: list[str] = field(default_factory=list)
    # Synthetic weights: "trained" (a trained tower's activation statistics, the default) or "iid"; None: real.
    regime: str | None = None
    # Where real weights came from: "hub" (a hub id, or a folder in the hub cache) or "folder" (a user's folder or
    # file: trained or random, the harness cannot tell); "synthetic" for generated ones.
    origin: str = "synthetic"
    # Real weights: the folder they were read from (a VLM's projector is read from it too).
    folder: str | None = None
    # --image-features: the VLM's feature path (`vlm.VlmSpec`); ``state_dict`` then holds its projector too.
    features: Any = None


def weight_fingerprint(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """crc32 of every tensor's bytes (about 3 GB/s): any in-place change, scaling or reordering shows."""
    out = {}
    for key, t in state.items():
        flat = t.detach().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        out[key] = zlib.crc32(memoryview(flat.contiguous().view(torch.uint8).numpy()))
    return out


def nonfinite_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == dtype:
                return name
        raise InputError(f"unsupported dtype {dtype}", "--dtype", f"use one of {', '.join(DTYPES)}")
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}", "--dtype", f"use one of {', '.join(DTYPES)}")
    return name


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` that exists here; anything else is a usage error, raised before any work."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}", "--device", "use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InputError(f"device type {parsed.type!r} cannot run a comparison", "--device", "use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("CUDA is not available on this machine", "--device", "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"no CUDA device {parsed.index} (found {torch.cuda.device_count()})", "--device", None)


def resolve_weights(
    *,
    weights: str | os.PathLike[str] | None = None,
    model: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    revision: str | None = None,
    synthetic: str = "trained",
) -> Weights:
    """Load real weights (``weights`` path or hub ``model``) or generate synthetic ones (``preset``), in a trained
    tower's regime by default (``synthetic="iid"`` for the plain draw; see `modeling.TRAINED_REGIME`)."""
    if synthetic not in REGIMES:
        raise InputError(f"unknown synthetic regime {synthetic!r}", "--synthetic", f"use one of {', '.join(REGIMES)}")
    given = [n for n, v in (("--weights", weights), ("--model", model), ("--preset", preset)) if v]
    if len(given) != 1:
        raise InputError(
            f"give exactly one weights source, got {len(given)} ({', '.join(given) or 'none'})",
            "--weights/--model/--preset",
            "e.g. --preset google/siglip-base-patch16-224",
        )
    torch_dtype = DTYPES[dtype_name(dtype)]
    if preset:
        config = get_preset(preset)
        state = synthetic_state_dict(config, seed=seed, dtype=torch_dtype, device=device, regime=synthetic)
        label = f"{preset} (seed {seed}{', i.i.d.' if synthetic == 'iid' else ''})"
        return Weights(config, state, label, synthetic=True, regime=synthetic)
    path = weights if weights else model
    assert path is not None
    config, state, source = load_vision_state_dict(path, revision=revision, config_class=None)
    state = {k: (v.to(device=device, dtype=torch_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    in_hub_cache = "models--" in str(source) and "snapshots" in str(source)
    origin = "hub" if model or in_hub_cache else "folder"
    label = source if weights else f"{model} ({source})"
    return Weights(config, state, label, synthetic=False, origin=origin, folder=str(source))


def fingerprint_digest(state: Mapping[str, torch.Tensor]) -> str:
    """One hex digest of every tensor's crc32 (the weights an activation export was made with)."""
    crcs = weight_fingerprint(state)
    return f"{zlib.crc32(json.dumps(sorted(crcs.items())).encode()):08x}"
