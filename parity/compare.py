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

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from siglip_scratch.config import Siglip2VisionConfig
from siglip_scratch.errors import InputError
from siglip_scratch.processor import SiglipImageProcessor

from .baseline import apply_runtime_baseline, with_baseline
from .batches import check_batches
from .candidates import Candidate, LoadResult, RenameLike, as_rename_rules, open_candidate
from .infer import infer_site_rules
from .inputs import ModelInputs, NaflexInputs, default_processor, make_pixels
from .judge import small_range_note
from .options import MODES, Mode, RunOptions
from .preprocess import processor_for_source
from .reference import transformers_version
from .report import Report
from .runs import compiled_run, diagnose_failure, judged_run
from .sites import FEATURE_SITES, VISION_FEATURE, SiteProgress
from .truth import Truth, any_reference, run_truth
from .vlm import with_image_features
from .weights import DTYPES, Weights, fingerprint_digest, resolve_weights, weight_fingerprint

__all__ = [
    "DTYPES",
    "MODES",
    "Mode",
    "RunOptions",
    "Weights",
    "assert_parity",
    "compare",
    "make_pixels",
    "resolve_weights",
]


def compare(
    options: RunOptions | None = None,
    *,
    candidate: Any = None,
    rename: RenameLike = None,
    pixel_values: ModelInputs | None = None,
    processor: SiglipImageProcessor | None = None,
    progress: Callable[[str], None] | None = None,
    **fields: Any,
) -> Report:
    """Compare a candidate with ``transformers.SiglipVisionModel`` site by site.

    Args:
        weights / model / preset: exactly one weights source (a path, a hub id, or a preset id for
            deterministic synthetic weights with ``seed``); or a `Weights` already loaded.
        candidate: None for our encoder; an ``nn.Module``; a factory (``f(config_dict)`` or ``f()``);
            a ``"module.path:factory"`` string; a ``.onnx`` path; an activations file; or a `Candidate`
            (see `candidates.open_candidate`).
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
        options: a `RunOptions` instead of its fields as keywords (``weights`` … ``skip_sites``).
        pixel_values: the inputs to use instead of ``images``/``batch`` (a tensor, or NaFlex inputs).
    Returns:
        The `Report`; ``report.passed`` is the verdict.

    Example (our encoder against transformers on synthetic weights)::

        >>> compare(preset="google/siglip-base-patch16-224", batch=1, depth="coarse").passed
        True
    """
    unknown = set(fields) - RunOptions.fields()
    if unknown:
        raise TypeError(f"compare() got unexpected keyword argument(s) {sorted(unknown)}")
    if options is not None and fields:
        raise TypeError("compare() takes a RunOptions or its fields as keywords, not both")
    opts = options or RunOptions(**fields)
    rules = as_rename_rules(rename)  # a bad map fails here, before any weights are read
    cand = open_candidate(candidate)  # a typo in a file or factory name fails here too
    pinned = cand.pinned()
    if pinned is not None:  # computed elsewhere: the weights, dtype and inputs it ran on are fixed
        opts, pixel_values = dataclasses.replace(opts, dtype=pinned.dtype), pinned.inputs
    mode, depth, narrowed = cand.narrow(opts.mode, opts.depth, rules)
    opts = dataclasses.replace(opts, mode=mode, depth=depth).checked()
    cand.check_run(opts.dtype)
    say = progress or (lambda line: None)

    say("loading weights")
    w = _weights(opts, cand)
    inputs, processor = _inputs(opts, w, pixel_values, processor)
    fingerprint = weight_fingerprint(w.state_dict)
    truth = run_truth(w.config, w.state_dict, inputs, **opts.truth_fields(), say=say, features=w.features)

    infer = rename is None and not cand.canonical_names
    say("candidate: loading weights" + (" and inferring its rename map" if infer else ""))
    load = cand.load(w.config, w.state_dict, rules, **opts.load_fields(truth.names), infer=infer, **_features(w))
    cand.to(opts.device, DTYPES[opts.dtype])  # a no-op for the shared tensors, already in place
    notes = _infer_sites(cand, load, truth, inputs, list(w.state_dict)) if infer else []

    runs = [_judged(cand, truth, inputs, opts, run_mode, say) for run_mode in ("isolated", "propagated")]
    runs = [r for r in runs if r is not None]
    compiled = None
    if cand.compiled is not None and truth.propagated is not None:
        say("candidate: the compiled forward, end to end")
        compiled = compiled_run(cand, truth, inputs, opts.rule)
    elif cand.compiled is not None:
        notes.append("the compiled forward was not run: judging it end to end needs a propagated run (--mode both)")

    # A runtime's uniform arithmetic against a bug: the candidate's own baseline per kind of site (baseline.py).
    iso, prop = (runs[0], runs[1] if len(runs) > 1 else None) if truth.isolated is not None else (None, None)
    baselines, base_notes = apply_runtime_baseline(iso, prop, opts.rule) if iso is not None else ([], [])
    # Why: known-bug variants at the first site that fails in isolated mode (its input is known).
    diagnosis = _diagnosis(cand, w, opts, truth, inputs, runs, baselines, say)

    say("candidate: state and batch check (the same images in other batches)")
    reference = any_reference(w.config, w.state_dict, opts.attn, w.features)
    batches = check_batches(cand, reference, inputs, opts.rule, rerunnable=cand.rerunnable, progress=say)
    if not batches.checked:
        notes.append(batches.detail)

    # Did the candidate change what the reference ran on?
    after = weight_fingerprint(w.state_dict)
    mutated = sorted(k for k in fingerprint if after.get(k) != fingerprint[k])
    if mutated:
        w.tainted = mutated
    notes = [*([diagnosis.line()] if diagnosis is not None else []), *narrowed, *base_notes, *notes, *truth.range_notes]
    notes += small_range_note(truth.ranges)
    if load.allowed_unloaded:
        notes.append(f"left unloaded on purpose (--allow-unloaded): {', '.join(load.allowed_unloaded)}")
    report = _report(opts, w, inputs, processor, cand, load, truth, runs, diagnosis, batches, mutated, notes)
    report.compiled_sites = compiled
    report.runtime_baseline = [b.to_dict() for b in baselines if b.accepted] or None
    return report


def assert_parity(options: RunOptions | None = None, **kwargs: Any) -> Report:
    """`compare`, raising ``AssertionError`` whose message is the report table when it fails."""
    report = compare(options, **kwargs)
    if not report.passed:
        raise AssertionError("\n" + report.table())
    return report


def _diagnosis(
    cand: Candidate,
    w: Weights,
    opts: RunOptions,
    truth: Truth,
    inputs: ModelInputs,
    runs: list,
    baselines: list,
    say: Callable,
) -> Any:
    """Phase "diagnosis": the known-bug variants at the first site that fails in isolated mode, or None."""
    first_fail = next((r for r in runs[0] if _diagnosable(r)), None) if truth.isolated is not None else None
    truths, forced = truth.isolated, True
    if first_fail is None and w.features is not None and truth.propagated is not None:
        # A selection bug behind a teacher-forced post_layernorm shows only end to end (PaliGemma's feature layer
        # off by one): diagnosed at the first feature site that fails propagated, captured unforced.
        first_fail = next((r for r in runs[-1] if _diagnosable(r) and r.name in FEATURE_SITES), None)
        truths, forced = truth.propagated, False
    if first_fail is None or not (first_fail.name in truth.ref_in or first_fail.name in DIAGNOSED_WITHOUT_INPUT):
        return None
    if first_fail.status == "shape":  # a token count: a variant must reproduce it within the site's bound
        assert truths is not None
        first_fail = dataclasses.replace(first_fail, limit=opts.rule.limits(truths[first_fail.name])[0])
    if first_fail.name == VISION_FEATURE and truth.propagated is not None:
        # Its variants are selections of the reference's hidden states end to end, and a layer past the judged
        # sites runs unforced: the end-to-end bound is the one that holds an honest selection.
        bound = max(first_fail.limit or 0.0, opts.rule.limits(truth.propagated[VISION_FEATURE])[0])
        first_fail = dataclasses.replace(first_fail, limit=bound)
    say(f"diagnosis: known-bug variants at {first_fail.name}")
    first_fail, noise = with_baseline(first_fail, baselines, opts.rule) if forced else (first_fail, 0.0)
    return diagnose_failure(
        cand, w.config, w.state_dict, opts.attn, truth, inputs, first_fail, noise, features=w.features, forced=forced
    )


DIAGNOSED_WITHOUT_INPUT = ("vision_model.embeddings", VISION_FEATURE)


def _features(w: Weights) -> dict[str, Any]:
    return {"features": w.features} if w.features is not None else {}


def _diagnosable(r: Any) -> bool:
    """A failing site, or a VLM feature site with another token count (a dropped or added token is a known bug)."""
    return r.status == "fail" or (r.status == "shape" and r.name in FEATURE_SITES)


# -- the phases ------------------------------------------------------------------------------------------
def _judged(cand: Candidate, truth: Truth, inputs: ModelInputs, opts: RunOptions, mode: str, say: Callable) -> Any:
    """Phase "candidate runs": one judged run in ``mode`` (None when the run's mode does not include it)."""
    truths = truth.isolated if mode == "isolated" else truth.propagated
    if truths is None:
        return None
    phase = f"candidate: {mode} run"
    say(phase)
    cand.set_mode(mode)
    return judged_run(
        cand,
        truth,
        inputs,
        isolated=mode == "isolated",
        truths=truths,
        rule=opts.rule,
        progress=SiteProgress(say, phase, truth.names),
    )


def _weights(opts: RunOptions, cand: Candidate) -> Weights:
    """Phase "weights": the given `Weights`, or loaded/generated in the run's dtype (a pinned candidate's own
    source unless one is given), checked against a pinned candidate's fingerprint and for taint; with
    --image-features, the VLM's projector and feature path added."""
    if opts.image_features and not cand.image_features:
        raise InputError(
            f"--image-features judges PyTorch candidates (a module or factory), not a {cand.kind} candidate",
            "--image-features",
            "judge the tower alone, or wrap the port in an nn.Module",
        )
    pinned = cand.pinned()
    if isinstance(opts.weights, Weights):
        w = opts.weights
    else:
        source = {"weights": opts.weights, "model": opts.model, "preset": opts.preset, "revision": opts.revision}
        seed, regime = opts.seed, opts.synthetic
        if pinned is not None:
            if not (opts.weights or opts.model or opts.preset):
                source = {k: pinned.weights[k] for k in source}
                source["revision"] = opts.revision or pinned.weights["revision"]
            seed, regime = pinned.weights["seed"], pinned.weights["synthetic"]
        w = resolve_weights(**source, seed=seed, dtype=opts.dtype, device=opts.device, synthetic=regime)
    if opts.image_features and w.features is None:
        w = with_image_features(w, preset=opts.preset, seed=opts.seed, model=opts.model, revision=opts.revision)
    if pinned is not None and fingerprint_digest(w.state_dict) != pinned.fingerprint:
        raise InputError(
            f"these weights ({w.source}) are not the ones the inputs were exported with ({pinned.weights['source']})",
            "--weights/--model/--preset",
            "judge with the export's weights (leave the source out to use the manifest's)",
        )
    if w.tainted:
        raise InputError(
            f"these weights were changed in place by an earlier candidate ({', '.join(w.tainted[:3])})",
            w.source,
            "load them again; a candidate must copy a tensor before modifying it",
        )
    run_dtype = DTYPES[opts.dtype]
    mixed = sorted({str(t.dtype) for t in w.state_dict.values() if t.is_floating_point() and t.dtype != run_dtype})
    if mixed:
        raise InputError(
            f"weights are {', '.join(mixed)} but the run is {opts.dtype}",
            "weights",
            f"load them with resolve_weights(..., dtype={opts.dtype!r}) or pass dtype to match",
        )
    return w


def _inputs(
    opts: RunOptions, w: Weights, pixel_values: ModelInputs | dict | None, processor: Any
) -> tuple[ModelInputs, Any]:
    """Phase "inputs": the given pixels, or images through the source's own processor, or seeded random pixels;
    checked (kind, finite) and cast to the run's dtype and device. Returns (inputs, the processor used)."""
    config = w.config
    if pixel_values is None:
        if opts.images and processor is None and not isinstance(opts.weights, Weights):
            # the model's own preprocessing (SigLIP 2: bilinear)
            processor = processor_for_source(opts.weights, opts.model, opts.preset, opts.revision, config=config)
        if opts.images and processor is None:
            processor = default_processor(config)  # one processor: it makes the pixels and the report names it
        pixel_values = make_pixels(config, images=opts.images, batch=opts.batch, seed=opts.seed, processor=processor)
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
    values = pixel_values.pixel_values if isinstance(pixel_values, NaflexInputs) else pixel_values
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
    return pixel_values.to(device=opts.device, dtype=DTYPES[opts.dtype]), processor


def _infer_sites(
    cand: Candidate, load: LoadResult, truth: Truth, inputs: ModelInputs, state_keys: list[str]
) -> list[str]:
    """No rename map given: find each site's module by value (infer.py), adopt the rules and report them."""
    assert cand.module is not None
    site_rules, closeness = infer_site_rules(
        cand.module, truth.names, truth.ref_out, inputs, truth.ref_in, load.inferred_parameters, state_keys
    )
    all_rules = load.inferred_parameters + site_rules
    cand.site_rules = as_rename_rules(all_rules, "inferred rename map")
    cand.info["inferred_rename"] = [list(r) for r in all_rules]
    cand.info["inference"] = {"parameters": load.account, "site_error": closeness}
    if not all_rules:
        return []
    return [
        f"no --rename given: {len(all_rules)} rule(s) inferred ({load.account}; sites matched by value); "
        "`siglip-parity inspect` shows them and --write-rename saves them"
    ]


def _report(
    opts: RunOptions,
    w: Weights,
    inputs: ModelInputs,
    processor: Any,
    cand: Candidate,
    load: LoadResult,
    truth: Truth,
    runs: list,
    diagnosis: Any,
    batches: Any,
    mutated: list[str],
    notes: list[str],
) -> Report:
    """Phase "verdict": the report's data (its verdict is a property of the data)."""
    naflex = isinstance(inputs, NaflexInputs)
    pixels_meta: Mapping[str, Any] = (
        {
            "spatial_shapes": inputs.spatial_shapes.tolist(),
            "max_num_patches": int(inputs.shape[1]),
            "measured_rows": "real patches only (padding rows are not compared)",
        }
        if naflex
        else {}
    )
    return Report(
        sites=runs[0],
        propagated_sites=runs[1] if len(runs) > 1 else None,
        reference={
            "impl": f"transformers.{w.features.class_name}.get_image_features"
            if w.features is not None
            else f"transformers.{'Siglip2VisionModel' if naflex else 'SiglipVisionModel'}",
            **({"image_features": w.features.path.describe()} if w.features is not None else {}),
            "version": transformers_version(),
            "attn": opts.attn,
        },
        candidate={**cand.info, "loaded_via": load.via},
        ranges=truth.ranges,
        diagnosis=diagnosis.to_dict() if diagnosis is not None else None,
        weights={
            "source": w.source,
            "synthetic": w.synthetic,
            "kind": "synthetic" if w.synthetic else "real",
            "origin": w.origin,
            **({"regime": w.regime} if w.synthetic else {}),
        },
        dtype=opts.dtype,
        device=str(opts.device),
        mode=opts.mode,
        depth=opts.depth,
        tolerance=opts.rule.describe(),
        inputs={
            "batch": int(inputs.shape[0]),
            **pixels_meta,
            "images": [str(p) for p in opts.images] if opts.images else [],
            "processor": processor.to_dict() if opts.images and processor is not None else None,
            "seed": opts.seed,
            "height": None if naflex else int(inputs.shape[2]),
            "width": None if naflex else int(inputs.shape[3]),
        },
        missing_keys=load.missing_keys,
        unexpected_keys=load.unexpected_keys,
        unloaded_parameters=load.unloaded,
        mutated_weights=mutated,
        nonfinite_weights=truth.nonfinite_weights,
        notes=notes,
        batches=batches.to_dict(),
    )
