"""`compare`: run the reference and a candidate on the same input and weights, site by site.

The weights are loaded (or generated) once, cast once, and *assigned* to both models, so the two
share storage. The reference runs first with hooks recording each site's input and output; the
candidate then runs with hooks that measure each site against the reference as soon as it is
produced (and, in isolated mode, feed it the reference's input first).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

import siglip_scratch
from siglip_scratch.config import SiglipVisionConfig, get_preset
from siglip_scratch.errors import InputError
from siglip_scratch.modeling import SiglipVisionModel, load_vision_state_dict, synthetic_state_dict
from siglip_scratch.processor import SiglipImageProcessor

from .candidate import LoadResult, build_candidate, load_candidate_factory, load_weights_into
from .reference import build_reference, canonical_name, reference_prefix, transformers_version
from .report import DEFAULT_TOLERANCES, Report, SiteResult, measure
from .sites import (
    Depth,
    RenameRules,
    apply_rename,
    first_tensor,
    hooks,
    named_sites,
    replace_first_tensor,
    site_names,
)

__all__ = ["DTYPES", "Weights", "assert_parity", "compare", "make_pixels", "resolve_weights"]

Mode = Literal["propagated", "isolated"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass
class Weights:
    """One copy of the vision tower's tensors, canonical keys, already in the run's dtype/device."""

    config: SiglipVisionConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    synthetic: bool


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


def resolve_weights(
    *,
    weights: str | os.PathLike[str] | None = None,
    model: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    revision: str | None = None,
) -> Weights:
    """Load real weights (``weights`` path or hub ``model``) or generate synthetic ones (``preset``)."""
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
        state = synthetic_state_dict(config, seed=seed, dtype=torch_dtype, device=device)
        return Weights(config, state, f"{preset} (seed {seed})", synthetic=True)
    path = weights if weights else model
    assert path is not None
    config, state, source = load_vision_state_dict(path, revision=revision)
    state = {k: (v.to(device=device, dtype=torch_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    return Weights(config, state, source if weights else f"{model} ({source})", synthetic=False)


def make_pixels(
    config: SiglipVisionConfig,
    *,
    images: Sequence[str | os.PathLike[str]] | None = None,
    batch: int = 2,
    seed: int = 0,
    processor: SiglipImageProcessor | None = None,
) -> torch.Tensor:
    """Images through the processor, else ``batch`` seeded uniform[-1, 1] images (float32)."""
    if images:
        processor = processor or SiglipImageProcessor.for_config(config)
        return processor(list(images))
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}", "--batch", None)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.num_channels, config.image_size, config.image_size, generator=g) * 2 - 1


def compare(
    *,
    weights: str | os.PathLike[str] | Weights | None = None,
    model: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    candidate: nn.Module | Callable[..., nn.Module] | str | None = None,
    rename: RenameRules | None = None,
    mode: Mode = "propagated",
    depth: Depth = "coarse",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn: str = "sdpa",
    images: Sequence[str | os.PathLike[str]] | None = None,
    batch: int = 2,
    pixel_values: torch.Tensor | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    revision: str | None = None,
) -> Report:
    """Compare a candidate with ``transformers.SiglipVisionModel`` site by site.

    Args:
        weights / model / preset: exactly one weights source (a path, a hub id, or a preset id for
            deterministic synthetic weights with ``seed``); or a `Weights` already loaded.
        candidate: None for our encoder; an ``nn.Module``; a factory (``f(config_dict)`` or ``f()``);
            or a ``"module.path:factory"`` string.
        rename: compiled rename rules (see `sites.compile_rename`) from candidate names to canonical.
        mode: ``propagated`` (both run end to end) or ``isolated`` (each candidate site gets the
            reference's input to that site).
        depth: ``coarse`` (embeddings, layers, post_layernorm, head) or ``fine`` (also each layer's
            layer_norm1, self_attn, layer_norm2, mlp).
        atol / rtol: override the dtype's defaults in `DEFAULT_TOLERANCES`.
    Returns:
        The `Report`; ``report.passed`` is the verdict.
    """
    if mode not in ("propagated", "isolated"):
        raise InputError(f"unknown mode {mode!r}", "--mode", "use propagated or isolated")
    if depth not in ("coarse", "fine"):
        raise InputError(f"unknown depth {depth!r}", "--depth", "use coarse or fine")
    if attn not in ("sdpa", "eager"):
        raise InputError(f"unknown attention {attn!r}", "--attn", "use sdpa or eager")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine", "--device", "use --device cpu")
    name = dtype_name(dtype)
    default_atol, default_rtol = DEFAULT_TOLERANCES[name]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if atol < 0 or rtol < 0:
        raise InputError("tolerances must be >= 0", "--atol/--rtol", None)

    w = (
        weights
        if isinstance(weights, Weights)
        else resolve_weights(
            weights=weights, model=model, preset=preset, seed=seed, dtype=name, device=device, revision=revision
        )
    )
    config = w.config
    mixed = sorted({str(t.dtype) for t in w.state_dict.values() if t.is_floating_point() and t.dtype != DTYPES[name]})
    if mixed:
        raise InputError(
            f"weights are {', '.join(mixed)} but the run is {name}",
            "weights",
            f"load them with resolve_weights(..., dtype={name!r}) or pass dtype to match",
        )
    if pixel_values is None:
        pixel_values = make_pixels(config, images=images, batch=batch, seed=seed)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise InputError("pixel_values must be a floating-point tensor", "pixel_values", None)
    if not torch.isfinite(pixel_values).all():
        n_bad = int((~torch.isfinite(pixel_values)).sum())
        raise InputError(
            f"pixel_values contain {n_bad} NaN/Inf value(s); comparing them would prove nothing",
            f"pixel_values shape {list(pixel_values.shape)}",
            "check the images or the preprocessing",
        )
    # Both sides get the pixels in the run's dtype (the reference casts them the same way).
    pixel_values = pixel_values.to(device=device, dtype=DTYPES[name])

    reference = build_reference(config, w.state_dict, attn_implementation=attn)
    cand, cand_info, load = _prepare_candidate(candidate, config, w.state_dict, rename or [], attn)
    cand.to(device=device, dtype=DTYPES[name])  # a no-op for the shared tensors, already in place
    cand.eval()

    names = site_names(config, depth)
    sites = _run(reference, cand, names, pixel_values, rename or [], mode, atol, rtol)
    return Report(
        sites=sites,
        reference={"impl": "transformers.SiglipVisionModel", "version": transformers_version(), "attn": attn},
        candidate={**cand_info, "loaded_via": load.via},
        weights={"source": w.source, "synthetic": w.synthetic, "kind": "synthetic" if w.synthetic else "real"},
        dtype=name,
        device=str(device),
        mode=mode,
        depth=depth,
        tolerance={"atol": atol, "rtol": rtol},
        inputs={
            "batch": int(pixel_values.shape[0]),
            "images": [str(p) for p in images] if images else [],
            "seed": seed,
            "height": int(pixel_values.shape[2]),
            "width": int(pixel_values.shape[3]),
        },
        missing_keys=load.missing_keys,
        unexpected_keys=load.unexpected_keys,
    )


def assert_parity(**kwargs: Any) -> Report:
    """`compare`, raising ``AssertionError`` whose message is the report table when it fails."""
    report = compare(**kwargs)
    if not report.passed:
        raise AssertionError("\n" + report.table())
    return report


def _prepare_candidate(
    candidate: nn.Module | Callable[..., nn.Module] | str | None,
    config: SiglipVisionConfig,
    state: Mapping[str, torch.Tensor],
    rules: RenameRules,
    attn: str,
) -> tuple[nn.Module, dict[str, Any], LoadResult]:
    if candidate is None:
        ours = SiglipVisionModel.from_state_dict(config, state, attn_implementation=attn)  # type: ignore[arg-type]
        info = {"impl": "siglip_scratch.SiglipVisionModel", "version": siglip_scratch.__version__, "attn": attn}
        return ours, info, LoadResult()
    spec = candidate if isinstance(candidate, str) else getattr(candidate, "__qualname__", type(candidate).__name__)
    if isinstance(candidate, str):
        candidate = load_candidate_factory(candidate)
    if isinstance(candidate, nn.Module):
        # A module the caller built keeps its own attention setting.
        module, cand_attn = candidate, getattr(candidate, "attn_implementation", "n/a")
    else:
        module, cand_attn = build_candidate(candidate, config, spec), "n/a"
        setter = getattr(module, "set_attn_implementation", None)
        if callable(setter):
            setter(attn)
            cand_attn = attn
    load = load_weights_into(module, state, rules, spec)
    return module, {"impl": spec, "version": "", "attn": str(cand_attn)}, load


def _run(
    reference: nn.Module,
    candidate: nn.Module,
    names: list[str],
    pixel_values: torch.Tensor,
    rules: RenameRules,
    mode: Mode,
    atol: float,
    rtol: float,
) -> list[SiteResult]:
    prefix = reference_prefix(reference)
    ref_sites = named_sites(reference, lambda n: canonical_name(n, prefix), names)
    ref_in: dict[str, torch.Tensor] = {}
    ref_out: dict[str, torch.Tensor] = {}

    def record_in(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = first_tensor(args) if args else None
        if t is None:
            t = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if t is not None:
            ref_in[site] = t

    def record_out(site: str, output: Any) -> None:
        t = first_tensor(output)
        if t is not None:
            ref_out[site] = t

    with torch.inference_mode(), hooks(ref_sites, on_input=record_in, on_output=record_out):
        reference(pixel_values)
    missing_ref = [n for n in names if n not in ref_out]
    if missing_ref:
        raise InputError(f"reference did not produce sites {missing_ref}", "reference", "report this")

    cand_sites = named_sites(candidate, lambda n: _rename(n, rules), names)
    results: dict[str, SiteResult] = {}

    def measure_out(site: str, output: Any) -> None:
        t = first_tensor(output)
        if t is None:
            results[site] = SiteResult(site, status="shape", note=f"module returned {type(output).__name__}")
        else:
            results[site] = measure(site, t, ref_out[site], atol, rtol)

    def teacher_force(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The embeddings site's input is the model input, which both sides already share; what
        # a candidate's embeddings module takes (pixels, or patches before the position add)
        # is its own business, so it is never replaced.
        if site == "vision_model.embeddings" or site not in ref_in:
            return None
        return replace_first_tensor(args, kwargs, ref_in[site])

    on_input = teacher_force if mode == "isolated" else None
    try:
        with torch.inference_mode(), hooks(cand_sites, on_input=on_input, on_output=measure_out):
            output = candidate(pixel_values)
    except InputError:
        raise
    except Exception as exc:  # the candidate is user code
        raise InputError(
            f"candidate forward raised {type(exc).__name__}: {exc}".splitlines()[0],
            f"pixel_values shape {list(pixel_values.shape)}",
            "run the candidate on this input by itself to debug it",
        ) from None

    # Candidates without module-level sites still expose their final outputs.
    fallbacks = {"vision_model.post_layernorm": first_tensor(output), "vision_model.head": _pooled(output)}
    for site, tensor in fallbacks.items():
        if site in names and site not in results and tensor is not None:
            results[site] = measure(site, tensor, ref_out[site], atol, rtol)
            results[site].note = "from the model's output"
    return [results.get(n, SiteResult(n, status="missing", note="candidate has no such module")) for n in names]


def _rename(name: str, rules: RenameRules) -> str:
    return apply_rename(name, rules) if rules else name


def _pooled(output: Any) -> torch.Tensor | None:
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]
    return None
