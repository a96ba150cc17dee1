"""`compare`: run the reference and a candidate on the same input and weights, site by site.

The weights are loaded (or generated) once, cast once, and *assigned* to both models, so the two
share storage. Order matters for trust:

1. the shared tensors are fingerprinted (crc32 of their bytes);
2. the reference runs, with hooks recording each site's input and output;
3. the float64 oracle runs (isolated and/or propagated truth, `oracle.py`) and each site is reduced
   to the reference's own error;
4. only then is candidate code run: it is built, loaded (`candidate.load_weights_into`) and run,
   each site measured against the reference and the oracle as soon as it is produced;
5. the fingerprint is checked: a candidate that changed a shared tensor in place fails loudly (its
   verdict is still against the untouched reference, which ran before it).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

import siglip_scratch
from siglip_scratch.checkpoint import DTYPE_NAMES
from siglip_scratch.config import AnyVisionConfig, Siglip2VisionConfig, SiglipVisionConfig, get_preset
from siglip_scratch.errors import InputError
from siglip_scratch.modeling import load_vision_state_dict, model_class_for, synthetic_state_dict
from siglip_scratch.processor import Siglip2ImageProcessor, SiglipImageProcessor

from .candidate import (
    LoadResult,
    RenameLike,
    as_rename_rules,
    build_candidate,
    forward_candidate,
    load_candidate_factory,
    load_weights_into,
)
from .diagnose import diagnose, naflex_context
from .infer import infer_parameter_rules, infer_site_rules
from .inputs import ModelInputs, NaflexInputs, call, naflex_images, naflex_inputs, select
from .oracle import SiteTruth, run_oracle
from .reference import build_reference, canonical_name, naflex_arithmetic, reference_prefix, transformers_version
from .report import Report, Rule, SiteResult, measure, range_scan
from .sites import (
    Depth,
    RenameRules,
    SiteProgress,
    apply_rename,
    first_tensor,
    hooks,
    input_tensor,
    named_sites,
    replace_first_tensor,
    site_names,
)

__all__ = ["DTYPES", "Weights", "assert_parity", "compare", "make_pixels", "resolve_weights"]

Mode = Literal["both", "propagated", "isolated"]
MODES = ("both", "propagated", "isolated")
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
    config, state, source = load_vision_state_dict(path, revision=revision, config_class=None)
    state = {k: (v.to(device=device, dtype=torch_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    return Weights(config, state, source if weights else f"{model} ({source})", synthetic=False)


def default_processor(config: AnyVisionConfig) -> SiglipImageProcessor | Siglip2ImageProcessor:
    """The processor for a config when the source names none: SigLIP's at its resolution, or NaFlex's with as
    many patches as the position grid (as the hub checkpoints ship it: a non-square image's grid is then
    smaller than the table on one side, so the resize shrinks it and antialias matters)."""
    if isinstance(config, Siglip2VisionConfig):
        return Siglip2ImageProcessor(patch_size=config.patch_size, max_num_patches=config.num_patches)
    return SiglipImageProcessor.for_config(config)


def make_pixels(
    config: AnyVisionConfig,
    *,
    images: Sequence[str | os.PathLike[str]] | None = None,
    batch: int = 2,
    seed: int = 0,
    processor: SiglipImageProcessor | Siglip2ImageProcessor | None = None,
) -> ModelInputs:
    """Images through the processor, else ``batch`` seeded uniform[-1, 1] images (float32). For SigLIP 2
    NaFlex: `NaflexInputs`, from the images or from ``batch`` seeded images of different aspect ratios
    (a padded batch in which every image has its own patch grid)."""
    if batch < 1 and not images:
        raise InputError(f"batch must be >= 1, got {batch}", "--batch", None)
    if isinstance(config, Siglip2VisionConfig):
        if not isinstance(processor, Siglip2ImageProcessor):
            processor = default_processor(config)
        return naflex_inputs(processor, list(images) if images else naflex_images(batch, seed))
    if images:
        return (processor or default_processor(config))(list(images))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.num_channels, config.image_size, config.image_size, generator=g) * 2 - 1


def compare(
    *,
    weights: str | os.PathLike[str] | Weights | None = None,
    model: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    candidate: nn.Module | Callable[..., nn.Module] | str | None = None,
    rename: RenameLike = None,
    mode: Mode = "both",
    depth: Depth = "fine",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn: str = "sdpa",
    images: Sequence[str | os.PathLike[str]] | None = None,
    batch: int = 2,
    pixel_values: torch.Tensor | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    revision: str | None = None,
    allow_unloaded: Sequence[str] = (),
    skip_sites: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    processor: SiglipImageProcessor | None = None,
) -> Report:
    """Compare a candidate with ``transformers.SiglipVisionModel`` site by site.

    Args:
        weights / model / preset: exactly one weights source (a path, a hub id, or a preset id for
            deterministic synthetic weights with ``seed``); or a `Weights` already loaded.
        candidate: None for our encoder; an ``nn.Module``; a factory (``f(config_dict)`` or ``f()``);
            or a ``"module.path:factory"`` string.
        rename: rules from candidate names (module paths and parameter keys) to canonical ones: a path
            to a JSON map, that JSON as a dict (``{"rename": [["regex", "replacement"], ...]}``), or a
            list of ``(regex, replacement)`` pairs. Rules chain: each applies to the previous one's result.
        mode: ``both`` (default: isolated for blame, propagated for the end-to-end effect; fails if
            either fails), ``propagated`` (both run end to end) or ``isolated`` (each candidate site
            gets the reference's input to that site).
        depth: ``fine`` (default: embeddings, each layer's layer_norm1, self_attn, layer_norm2, mlp and
            the layer itself, post_layernorm, head) or ``coarse`` (without the sub-layer sites; cheaper,
            but a sub-layer bug can hide in the layer's residual stream: eps 1e-5 in layer 11 of
            base-224 is ×6.6 transformers' error at its layer_norm1 and only ×1.6 at the layer).
        atol / rtol: switch from the float64-oracle rule to the absolute rule
            ``max|Δ| <= atol + rtol·max|x_ref|`` (the one not given takes its per-dtype default).
        allow_unloaded: regexes (full match) of candidate keys that may stay unloaded.
        skip_sites: regexes (full match) of canonical sites that do not apply to the candidate: they are
            reported ``skipped`` (not compared, never counted as passing; the verdict says how many).
        progress: called with a line as each phase starts (weights, reference and oracle, candidate).
        processor: turns ``images`` into pixels (default: the weights source's own preprocessing).
    Returns:
        The `Report`; ``report.passed`` is the verdict.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}", "--mode", f"use one of {', '.join(MODES)}")
    if depth not in ("coarse", "fine"):
        raise InputError(f"unknown depth {depth!r}", "--depth", "use coarse or fine")
    if attn not in ("sdpa", "eager"):
        raise InputError(f"unknown attention {attn!r}", "--attn", "use sdpa or eager")
    check_device(device)
    name = dtype_name(dtype)
    if (atol is not None and atol < 0) or (rtol is not None and rtol < 0):
        raise InputError("tolerances must be >= 0", "--atol/--rtol", None)
    rule = Rule(name, atol, rtol)
    allowed = _compile_patterns(allow_unloaded)
    rules = as_rename_rules(rename)  # a bad map fails here, before any weights are read
    skips = _compile_patterns(skip_sites, "--skip-site")
    say = progress or (lambda line: None)
    say("loading weights")

    w = (
        weights
        if isinstance(weights, Weights)
        else resolve_weights(
            weights=weights, model=model, preset=preset, seed=seed, dtype=name, device=device, revision=revision
        )
    )
    if w.tainted:
        raise InputError(
            f"these weights were changed in place by an earlier candidate ({', '.join(w.tainted[:3])})",
            w.source,
            "load them again; a candidate must copy a tensor before modifying it",
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
        if (
            images and processor is None and not isinstance(weights, Weights)
        ):  # the model's own preprocessing (SigLIP 2: bilinear)
            from .preprocess import processor_for_source

            processor = processor_for_source(weights, model, preset, revision, config=config)
        if images and processor is None:
            processor = default_processor(config)  # one processor: it makes the pixels and the report names it
        pixel_values = make_pixels(config, images=images, batch=batch, seed=seed, processor=processor)
    naflex = isinstance(config, Siglip2VisionConfig)
    if naflex and isinstance(pixel_values, dict):
        pixel_values = NaflexInputs.from_processor(pixel_values)
    if naflex != isinstance(pixel_values, NaflexInputs):
        raise InputError(
            "SigLIP 2 NaFlex takes pixel_values, pixel_attention_mask and spatial_shapes (Siglip2ImageProcessor's output)"
            if naflex
            else "fixed-resolution SigLIP takes a pixel tensor [B, C, H, W], not NaFlex inputs",
            "pixel_values",
            "leave pixel_values out to let the harness make them",
        )
    values = pixel_values.pixel_values if naflex else pixel_values
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise InputError("pixel_values must be a floating-point tensor", "pixel_values", None)
    if not torch.isfinite(values).all():
        n_bad = int((~torch.isfinite(values)).sum())
        raise InputError(
            f"pixel_values contain {n_bad} NaN/Inf value(s); comparing them would prove nothing",
            f"pixel_values shape {list(values.shape)}",
            "check the images or the preprocessing",
        )
    # Both sides get the pixels in the run's dtype (the reference casts them the same way).
    pixel_values = pixel_values.to(device=device, dtype=DTYPES[name])
    fingerprint = weight_fingerprint(w.state_dict)

    # 1. The reference and the oracle, before any candidate code has seen the weights.
    names = site_names(config, depth)
    oracle_passes = " + ".join(
        m for m, on in (("isolated", mode != "propagated"), ("propagated", mode != "isolated")) if on
    )
    say(f"reference and float64 oracle ({oracle_passes}) at {len(names)} sites")
    for pattern in skips:
        if not any(pattern.fullmatch(n) for n in names):
            raise InputError(
                f"--skip-site {pattern.pattern!r} matches no site",
                "--skip-site",
                "see the site names in docs/PARITY.md",
            )
    skipped = [n for n in names if any(p.fullmatch(n) for p in skips)]
    reference = build_reference(config, w.state_dict, attn_implementation=attn)
    ref_in, ref_out = _record_reference(reference, names, pixel_values)
    # What is measured: NaFlex padding rows are dropped from every [B, N, D] site (see inputs.py).
    ref_sel = {k: select(pixel_values, v) for k, v in ref_out.items()}
    ranges, range_notes = range_scan(ref_sel)
    # NaN/Inf in any weight shows in the reference's output (an Inf times a non-zero is never finite
    # again): scan the weights only then, to name them.
    finite = all(bool(torch.isfinite(t).all()) for t in ref_sel.values())
    bad_weights = [] if finite else nonfinite_keys(w.state_dict)
    # The oracle uses sdpa: eager attention upcasts its softmax to float32 only.
    oracle_model = reference if attn == "sdpa" else build_reference(config, w.state_dict, attn_implementation="sdpa")
    oracle_prefix = reference_prefix(oracle_model)
    oracle_sites = named_sites(oracle_model, lambda n: canonical_name(n, oracle_prefix), names)
    isolated = mode in ("isolated", "both")
    propagated = mode in ("propagated", "both")
    truth_iso = (
        run_oracle(
            oracle_model, oracle_sites, pixel_values, ref_sel, ref_in, SiteProgress(say, "oracle (isolated)", names)
        )
        if isolated
        else None
    )
    truth_prop = (
        run_oracle(
            oracle_model, oracle_sites, pixel_values, ref_sel, None, SiteProgress(say, "oracle (propagated)", names)
        )
        if propagated
        else None
    )
    del oracle_model, oracle_sites, reference

    # 2. The candidate. Given no rename map, one is inferred (see infer.py) and reported.
    say(
        "candidate: loading weights"
        + (" and inferring its rename map" if candidate is not None and rename is None else "")
    )
    onnx_file = isinstance(candidate, (str, os.PathLike)) and str(candidate).endswith(".onnx")
    external = getattr(candidate, "external_candidate", False) or onnx_file
    if onnx_file and name != "float32":
        raise InputError(f"an ONNX candidate runs in its graph's float32, not {name}", "--dtype", "use --dtype float32")
    infer = candidate is not None and rename is None and not external
    cand, cand_info, load, inferred = _prepare_candidate(
        candidate, config, w.state_dict, rules, attn, allowed, infer=infer
    )
    cand.to(device=device, dtype=DTYPES[name])  # a no-op for the shared tensors, already in place
    cand.eval()
    inferred_notes = []
    if infer:
        site_rules, closeness = infer_site_rules(cand, names, ref_sel, pixel_values)
        all_rules = inferred["parameters"] + site_rules
        rules = as_rename_rules(all_rules, "inferred rename map")
        cand_info["inferred_rename"] = [list(r) for r in all_rules]
        cand_info["inference"] = {"parameters": inferred["account"], "site_error": closeness}
        if all_rules:
            inferred_notes.append(
                f"no --rename given: {len(all_rules)} rule(s) inferred ({inferred['account']}; sites matched by "
                "value); `siglip-parity inspect` shows them and --write-rename saves them"
            )
    runs = dict(rules=rules, ref_in=ref_in, ref_out=ref_sel, rule=rule, skipped=skipped)
    set_run_mode = getattr(cand, "set_run_mode", None)  # an ActivationCandidate replays one mode at a time
    set_run_mode = set_run_mode if callable(set_run_mode) else (lambda mode: None)
    first_run = f"candidate: {'isolated' if isolated else 'propagated'} run"
    say(first_run)
    set_run_mode("isolated" if isolated else "propagated")
    sites = _run_candidate(
        cand,
        names,
        pixel_values,
        isolated=isolated,
        truths=truth_iso or truth_prop,
        **runs,
        progress=SiteProgress(say, first_run, names),
    )
    if mode == "both":
        say("candidate: propagated run")
        set_run_mode("propagated")
    prop_sites = (
        _run_candidate(
            cand,
            names,
            pixel_values,
            isolated=False,
            truths=truth_prop,
            **runs,
            progress=SiteProgress(say, "candidate: propagated run", names),
        )
        if mode == "both"
        else None
    )

    # 2b. Why: known-bug variants at the first site that fails in isolated mode (its input is known).
    diagnosis = None
    first_fail = next((r for r in sites if r.status == "fail"), None) if isolated else None
    if first_fail is not None and first_fail.name in ref_in:
        say(f"diagnosis: known-bug variants at {first_fail.name}")
        set_run_mode("isolated")
        diagnosis = _diagnose(cand, config, w.state_dict, attn, names, pixel_values, runs, first_fail)

    # 3. Did the candidate change what the reference ran on?
    after = weight_fingerprint(w.state_dict)
    mutated = sorted(k for k in fingerprint if after.get(k) != fingerprint[k])
    if mutated:
        w.tainted = mutated
    notes = [*([diagnosis.line()] if diagnosis is not None else []), *inferred_notes, *range_notes]
    if load.allowed_unloaded:
        notes.append(f"left unloaded on purpose (--allow-unloaded): {', '.join(load.allowed_unloaded)}")
    return Report(
        sites=sites,
        propagated_sites=prop_sites,
        reference={
            "impl": f"transformers.{'Siglip2VisionModel' if naflex else 'SiglipVisionModel'}",
            "version": transformers_version(),
            "attn": attn,
        },
        candidate={**cand_info, "loaded_via": load.via},
        ranges=ranges,
        diagnosis=diagnosis.to_dict() if diagnosis is not None else None,
        weights={"source": w.source, "synthetic": w.synthetic, "kind": "synthetic" if w.synthetic else "real"},
        dtype=name,
        device=str(device),
        mode=mode,
        depth=depth,
        tolerance=rule.describe(),
        inputs={
            "batch": int(pixel_values.shape[0]),
            **(
                {
                    "spatial_shapes": pixel_values.spatial_shapes.tolist(),
                    "max_num_patches": int(pixel_values.shape[1]),
                    "measured_rows": "real patches only (padding rows are not compared)",
                }
                if naflex
                else {}
            ),
            "images": [str(p) for p in images] if images else [],
            "processor": processor.to_dict() if images and processor is not None else None,
            "seed": seed,
            "height": None if naflex else int(pixel_values.shape[2]),
            "width": None if naflex else int(pixel_values.shape[3]),
        },
        missing_keys=load.missing_keys,
        unexpected_keys=load.unexpected_keys,
        unloaded_parameters=load.unloaded,
        mutated_weights=mutated,
        nonfinite_weights=bad_weights,
        notes=notes,
    )


def assert_parity(**kwargs: Any) -> Report:
    """`compare`, raising ``AssertionError`` whose message is the report table when it fails."""
    report = compare(**kwargs)
    if not report.passed:
        raise AssertionError("\n" + report.table())
    return report


def _compile_patterns(patterns: Sequence[str], flag: str = "--allow-unloaded") -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise InputError(f"pattern {p!r} does not compile ({exc})", flag, "fix the regex") from None
    return out


def _prepare_candidate(
    candidate: nn.Module | Callable[..., nn.Module] | str | None,
    config: SiglipVisionConfig,
    state: Mapping[str, torch.Tensor],
    rules: RenameRules,
    attn: str,
    allowed: Sequence[re.Pattern[str]],
    *,
    infer: bool = False,
) -> tuple[nn.Module, dict[str, Any], LoadResult, dict[str, Any]]:
    """Build (or take) the candidate and load the shared weights into it. With ``infer``, parameter
    rename rules are inferred first (unless the candidate loads through ``load_hf_state_dict``)."""
    inferred: dict[str, Any] = {"parameters": [], "account": ""}
    if isinstance(candidate, (str, os.PathLike)) and str(candidate).endswith(".onnx"):
        from .onnx_candidate import OnnxCandidate

        candidate = OnnxCandidate(candidate, site_names(config, "fine"), rules)
    if getattr(candidate, "external_candidate", False):  # stored activations or an ONNX graph: no weights to load
        via = (
            "the ONNX graph's own initializers"
            if hasattr(candidate, "ios")
            else "activations file (the port loaded its own weights)"
        )
        return candidate, dict(candidate.info), LoadResult(via=via), inferred
    if candidate is None:
        ours = _ours(config, state, attn)
        info = {"impl": f"siglip_scratch.{type(ours).__name__}", "version": siglip_scratch.__version__, "attn": attn}
        return ours, info, LoadResult(via="siglip_scratch.from_state_dict (strict)"), inferred
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
    if infer:
        if callable(getattr(module, "load_hf_state_dict", None)):
            inferred["account"] = "weights through its load_hf_state_dict"
        else:
            inferred["parameters"], inferred["account"] = infer_parameter_rules(module, state)
            rules = as_rename_rules(inferred["parameters"], "inferred rename map")
    load = load_weights_into(module, state, rules, spec, allow_unloaded=allowed)
    return module, {"impl": spec, "version": "", "attn": str(cand_attn)}, load, inferred


def _record_reference(
    reference: nn.Module, names: list[str], pixel_values: ModelInputs
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    prefix = reference_prefix(reference)
    ref_sites = named_sites(reference, lambda n: canonical_name(n, prefix), names)
    ref_in: dict[str, torch.Tensor] = {}
    ref_out: dict[str, torch.Tensor] = {}

    def record_in(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = input_tensor(args, kwargs)  # the same slot teacher forcing replaces
        if t is not None:
            ref_in[site] = t

    def record_out(site: str, output: Any) -> None:
        t = first_tensor(output)
        if t is not None:
            ref_out[site] = t

    with torch.inference_mode(), hooks(ref_sites, on_input=record_in, on_output=record_out):
        call(reference, pixel_values)
    missing_ref = [n for n in names if n not in ref_out]
    if missing_ref:
        raise InputError(f"reference did not produce sites {missing_ref}", "reference", "report this")
    return ref_in, ref_out


def _run_candidate(
    candidate: nn.Module,
    names: list[str],
    pixel_values: ModelInputs,
    *,
    isolated: bool,
    rules: RenameRules,
    ref_in: Mapping[str, torch.Tensor],
    ref_out: Mapping[str, torch.Tensor],
    truths: Mapping[str, SiteTruth] | None,
    rule: Rule,
    skipped: Sequence[str] = (),
    progress: SiteProgress | None = None,
) -> list[SiteResult]:
    cand_sites = named_sites(candidate, lambda n: _rename(n, rules), names)
    results: dict[str, SiteResult] = {
        n: SiteResult(n, status="skipped", passed=True, note="--skip-site: not compared") for n in skipped
    }

    def judge(site: str, tensor: torch.Tensor) -> SiteResult:
        return measure(
            site, select(pixel_values, tensor), ref_out[site], truths[site] if truths is not None else None, rule
        )

    def measure_out(site: str, output: Any) -> None:
        if progress is not None:
            progress.done(site)
        if site in skipped:
            return
        t = first_tensor(output)
        if t is None:
            results[site] = SiteResult(site, status="shape", note=f"module returned {type(output).__name__}")
        else:
            results[site] = judge(site, t)

    def teacher_force(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The embeddings site's input is the model input, which both sides already share; what
        # a candidate's embeddings module takes (pixels, or patches before the position add)
        # is its own business, so it is never replaced.
        if site == "vision_model.embeddings" or site not in ref_in:
            return None
        return replace_first_tensor(args, kwargs, ref_in[site])

    # A port without an embeddings module still has the embeddings: they are layer 0's input.
    emb, first = "vision_model.embeddings", "vision_model.encoder.layers.0"
    emb_from_first = emb in names and emb not in cand_sites and first in cand_sites

    def on_input(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if emb_from_first and site == first and emb not in results:
            t = input_tensor(args, kwargs)
            if t is not None:
                results[emb] = judge(emb, t)
                results[emb].note = "the input of layer 0 (the candidate has no embeddings module)"
        return teacher_force(site, args, kwargs) if isolated else None

    hooked = hooks(cand_sites, on_input=on_input if (isolated or emb_from_first) else None, on_output=measure_out)
    with torch.inference_mode(), hooked:
        output = forward_candidate(candidate, pixel_values)

    # Candidates without module-level sites still expose their final outputs.
    fallbacks = {"vision_model.post_layernorm": first_tensor(output), "vision_model.head": _pooled(output)}
    for site, tensor in fallbacks.items():
        if site in names and site not in results and tensor is not None:
            results[site] = judge(site, tensor)
            results[site].note = "from the model's output"
    missing = [n for n in names if n not in results]
    notes = _missing_notes(candidate, rules, missing) if missing else {}
    return [results.get(n, SiteResult(n, status="missing", note=notes.get(n, ""))) for n in names]


def _missing_notes(candidate: nn.Module, rules: RenameRules, missing: Sequence[str]) -> dict[str, str]:
    """For each site the candidate lacks: its closest module names (as the rename rules leave them),
    so the fix (a --rename rule) can be written from the report alone."""
    import difflib

    renamed = {_rename(n, rules): n for n, _ in candidate.named_modules() if n}
    out = {}
    for site in missing:
        close = difflib.get_close_matches(site, list(renamed), n=2, cutoff=0.0)
        shown = ", ".join(renamed[c] + (f" (renamed {c})" if c != renamed[c] else "") for c in close)
        out[site] = "candidate has no such module" + (
            f"; closest: {shown}; map one with a --rename rule" if shown else "; it has no submodules at all"
        )
    return out


def _diagnose(cand, config, state, attn, names, pixel_values, runs, failed: SiteResult):
    """Capture the candidate's output at the failing site (teacher-forced, as judged) and rank the
    known-bug variants of our module for that site against it."""
    site = failed.name
    captured: dict[str, torch.Tensor] = {}
    rules, ref_in = runs["rules"], runs["ref_in"]
    cand_sites = named_sites(cand, lambda n: _rename(n, rules), names)
    if site not in cand_sites:
        return None

    def on_input(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name == "vision_model.embeddings" or name not in ref_in:
            return None
        return replace_first_tensor(args, kwargs, ref_in[name])

    def on_output(name: str, output: Any) -> None:
        if name == site:
            t = first_tensor(output)
            if t is not None:
                captured[name] = t.detach()

    try:
        with torch.inference_mode(), hooks({site: cand_sites[site]}, on_input=on_input, on_output=on_output):
            call(cand, pixel_values)
    except Exception:  # the candidate already ran once under the same hooks; a second failure is not ours
        return None
    if site not in captured:
        return None
    ours = _ours(config, state, attn)
    context = naflex_context(pixel_values, config) if isinstance(pixel_values, NaflexInputs) else None
    return diagnose(
        site,
        ours.get_submodule(site),
        ref_in[site],
        captured[site],
        runs["ref_out"][site],
        config,
        failed.limit,
        context,
    )


def _ours(config: AnyVisionConfig, state: Mapping[str, torch.Tensor], attn: str) -> nn.Module:
    """Our encoder for ``config`` on the shared tensors (NaFlex with the installed transformers' arithmetic)."""
    model = model_class_for(config).from_state_dict(config, state, attn_implementation=attn)  # type: ignore[arg-type]
    if isinstance(config, Siglip2VisionConfig):
        model.set_arithmetic(naflex_arithmetic())
    return model


def _rename(name: str, rules: RenameRules) -> str:
    return apply_rename(name, rules) if rules else name


def _pooled(output: Any) -> torch.Tensor | None:
    pooled = output.get("pooler_output") if isinstance(output, Mapping) else getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]
    return None
