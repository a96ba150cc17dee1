"""Candidate runs: the candidate's forward under hooks that judge each site as its output arrives (and, in
isolated mode, teacher-force each site's input), and the capture the diagnosis needs."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from siglip_scratch.config import AnyVisionConfig

from .candidates import Candidate, build_ours
from .diagnose import Diagnosis, diagnose, naflex_context
from .feature_bugs import diagnose_features
from .inputs import ModelInputs, NaflexInputs, forward_candidate, select
from .judge import Rule, SiteResult, measure
from .oracle import SiteTruth
from .sites import (
    EMBEDDINGS,
    FEATURE_SITES,
    FIRST_LAYER,
    PROJECTOR,
    VISION_FEATURE,
    RenameRules,
    SiteProgress,
    apply_rename,
    first_tensor,
    hooks,
    image_features,
    input_tensor,
    named_sites,
    teacher_forced,
)
from .truth import Truth
from .vlm import VlmSpec

__all__ = ["compiled_run", "diagnose_failure", "judged_run"]


def _sites_of(cand: Candidate, names: Sequence[str]) -> dict[str, nn.Module]:
    assert cand.module is not None
    rules = cand.site_rules
    return named_sites(cand.module, lambda n: apply_rename(n, rules) if rules else n, names)


def judged_run(
    cand: Candidate,
    truth: Truth,
    inputs: ModelInputs,
    *,
    isolated: bool,
    truths: Mapping[str, SiteTruth] | None,
    rule: Rule,
    progress: SiteProgress | None = None,
) -> list[SiteResult]:
    """One candidate forward, every site measured against the reference (and ``truths``, the oracle) as its
    output arrives, so a later in-place op cannot change what was measured."""
    names, ref_out = truth.names, truth.ref_out
    cand_sites = _sites_of(cand, names)
    results: dict[str, SiteResult] = {
        n: SiteResult(n, status="skipped", passed=True, note="--skip-site: not compared") for n in truth.skipped
    }

    def judge(site: str, tensor: torch.Tensor) -> SiteResult:
        return measure(site, select(inputs, tensor), ref_out[site], truths[site] if truths is not None else None, rule)

    def on_output(site: str, output: Any) -> None:
        if progress is not None:
            progress.done(site)
        if site in truth.skipped or site == PROJECTOR:  # the image features are what the candidate returns
            return
        t = first_tensor(output)
        if t is None:
            results[site] = SiteResult(site, status="shape", note=f"module returned {type(output).__name__}")
        else:
            results[site] = judge(site, t)

    # A port without an embeddings module still has the embeddings: they are layer 0's input.
    emb_from_first = EMBEDDINGS in names and EMBEDDINGS not in cand_sites and FIRST_LAYER in cand_sites

    def on_input(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if emb_from_first and site == FIRST_LAYER and EMBEDDINGS not in results:
            t = input_tensor(args, kwargs)
            if t is not None:
                results[EMBEDDINGS] = judge(EMBEDDINGS, t)
                results[EMBEDDINGS].note = "the input of layer 0 (the candidate has no embeddings module)"
        return teacher_forced(site, args, kwargs, truth.ref_in, module=cand_sites[site]) if isolated else None

    hooked = hooks(cand_sites, on_input=on_input if (isolated or emb_from_first) else None, on_output=on_output)
    with torch.inference_mode(), hooked:
        output = cand.forward(inputs)

    if PROJECTOR in names and PROJECTOR not in cand_sites:
        # No module is fed the vision feature (a projector written with functional calls): nothing reads it, and
        # in isolated mode nothing can be fed the reference's, so the image features carry the tower's rounding
        # too. Judged end to end then, where the propagated run does it; alone, isolated judges them as they are.
        results[VISION_FEATURE] = SiteResult(
            VISION_FEATURE,
            status="not_exposed",
            passed=True,
            note="no module is fed it; judged through the image features",
        )
        if isolated and truth.propagated is not None:
            results[PROJECTOR] = SiteResult(
                PROJECTOR, status="not_exposed", passed=True, note="no projector module to feed; judged end to end"
            )
    # Candidates without module-level sites still expose their final outputs.
    fallbacks = final_outputs(output, names, ref_out.get(PROJECTOR))
    for site, tensor in fallbacks.items():
        if site in names and site not in results and tensor is not None:
            results[site] = judge(site, tensor)
            source = "the image features the candidate returns" if site == PROJECTOR else "from the model's output"
            results[site].note = f"{results[site].note}; {source}" if results[site].note else source
    if PROJECTOR in names and PROJECTOR not in results and PROJECTOR not in truth.skipped:
        results[PROJECTOR] = SiteResult(
            PROJECTOR, status="shape", note=f"the candidate returned {type(output).__name__}, not image features"
        )
    judged = {n for n, r in results.items() if r.status not in ("missing", "skipped")}
    for site in names:
        why = None if site in results else cand.not_exposed(site, judged)
        if why is not None:
            results[site] = SiteResult(site, status="not_exposed", passed=True, note=why)
    missing = [n for n in names if n not in results]
    notes = _missing_notes(cand, missing) if missing else {}
    return [results.get(n, SiteResult(n, status="missing", note=notes.get(n, ""))) for n in names]


def compiled_run(cand: Candidate, truth: Truth, inputs: ModelInputs, rule: Rule) -> list[SiteResult]:
    """A ``torch.compile``d candidate: its sites were judged on the eager module it wraps (hooks cannot reach into
    a compiled graph); here the compiled forward itself runs end to end and its final outputs are judged like
    propagated sites, against the propagated oracle."""
    assert cand.compiled is not None and truth.propagated is not None
    with torch.inference_mode():
        output = forward_candidate(cand.compiled, inputs)
    results = []
    for site, tensor in final_outputs(output, truth.names, truth.ref_out.get(PROJECTOR)).items():
        if site in truth.names and tensor is not None:
            result = measure(site, select(inputs, tensor), truth.ref_out[site], truth.propagated[site], rule)
            result.note = "the compiled forward, end to end"
            results.append(result)
    return results


def _missing_notes(cand: Candidate, missing: Sequence[str]) -> dict[str, str]:
    """For each site the candidate lacks: its closest module names (as the rename rules leave them), so the
    fix (a --rename rule) can be written from the report alone."""
    assert cand.module is not None
    rules: RenameRules = cand.site_rules
    renamed = {(apply_rename(n, rules) if rules else n): n for n, _ in cand.module.named_modules() if n}
    out = {}
    for site in missing:
        close = difflib.get_close_matches(site, list(renamed), n=2, cutoff=0.0)
        shown = ", ".join(renamed[c] + (f" (renamed {c})" if c != renamed[c] else "") for c in close)
        out[site] = "candidate has no such module" + (
            f"; closest: {shown}; map one with a --rename rule" if shown else "; it has no submodules at all"
        )
    return out


def diagnose_failure(
    cand: Candidate,
    config: AnyVisionConfig,
    state: Mapping[str, torch.Tensor],
    attn: str,
    truth: Truth,
    inputs: ModelInputs,
    failed: SiteResult,
    noise: float = 0.0,
    *,
    features: VlmSpec | None = None,
    forced: bool = True,
) -> Diagnosis | None:
    """Capture the candidate's output at the failing site (teacher-forced, as judged) and rank the known-bug
    variants of our module for that site against it (``noise``: see `diagnose.diagnose`)."""
    site = failed.name
    cand_sites = _sites_of(cand, truth.names)
    if features is not None and (site in FEATURE_SITES or site.startswith(PROJECTOR + ".")):
        return _diagnose_feature_site(
            cand, cand_sites, config, state, attn, truth, inputs, failed, noise, features, forced
        )
    # A port without an embeddings module: its embeddings are what its layer 0 receives (not teacher-forced).
    via_first = site == EMBEDDINGS and site not in cand_sites and FIRST_LAYER in cand_sites
    if site not in cand_sites and not via_first:
        return None
    captured: dict[str, torch.Tensor] = {}

    def on_output(name: str, output: Any) -> None:
        t = first_tensor(output)
        if name == site and t is not None:
            captured[name] = t.detach().clone()  # a copy: a later in-place op must not change it

    def on_input(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if via_first:
            t = input_tensor(args, kwargs)
            if t is not None and site not in captured:
                captured[site] = t.detach().clone()
            return None
        return teacher_forced(name, args, kwargs, truth.ref_in, module=cand_sites[name])

    hooked = {FIRST_LAYER: cand_sites[FIRST_LAYER]} if via_first else {site: cand_sites[site]}
    cand.set_mode("isolated")
    try:
        with torch.inference_mode(), hooks(hooked, on_input=on_input, on_output=None if via_first else on_output):
            cand.forward(inputs)
    except Exception:  # the candidate already ran once under the same hooks; a second failure is not ours
        return None
    if site not in captured:
        return None
    ours = build_ours(config, state, attn)
    context = naflex_context(inputs, config) if isinstance(inputs, NaflexInputs) else None
    return diagnose(
        site,
        ours.get_submodule(site),
        truth.ref_in[site],
        captured[site],
        truth.ref_out[site],
        config,
        failed.limit,
        context,
        noise=noise,
    )


def _diagnose_feature_site(
    cand: Candidate,
    cand_sites: Mapping[str, nn.Module],
    config: AnyVisionConfig,
    state: Mapping[str, torch.Tensor],
    attn: str,
    truth: Truth,
    inputs: ModelInputs,
    failed: SiteResult,
    noise: float,
    features: VlmSpec,
    forced: bool,
) -> Diagnosis | None:
    """A site past the tower: the candidate runs with every site teacher-forced (as judged; ``forced``) or end to
    end, and its value at the site is captured (the projector's: the image features it returns); the
    VLM-integration variants (`feature_bugs.py`) are ranked against it."""
    site = failed.name
    captured: dict[str, torch.Tensor] = {}

    def on_output(name: str, output: Any) -> None:
        t = first_tensor(output)
        if name == site and t is not None and name not in captured:
            captured[name] = t.detach().clone()

    def on_input(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return teacher_forced(name, args, kwargs, truth.ref_in, module=cand_sites[name])

    cand.set_mode("isolated" if forced else "propagated")
    try:
        with torch.inference_mode(), hooks(cand_sites, on_input=on_input if forced else None, on_output=on_output):
            output = cand.forward(inputs)
    except Exception:  # the candidate already ran once under the same hooks; a second failure is not ours
        return None
    returned = image_features(output, truth.ref_out[PROJECTOR].shape)
    if site == PROJECTOR and returned is not None:  # the image features are what the candidate returns
        captured[site] = returned.detach().clone()
    if site not in captured or not isinstance(inputs, torch.Tensor):
        return None
    ours = build_ours(config, state, attn, features)
    return diagnose_features(
        site, ours, inputs, truth.ref_in.get(site), captured[site], truth.ref_out[site], failed.limit, noise
    )


def final_outputs(
    output: Any, names: Sequence[str], features_like: torch.Tensor | None = None
) -> dict[str, torch.Tensor | None]:
    """The sites a model's own output stands in for: the image features (a VLM candidate, read in the reference's
    shape ``features_like`` where it is only laid out otherwise), else the last hidden state and the pooled output."""
    if PROJECTOR in names:
        return {PROJECTOR: image_features(output, None if features_like is None else features_like.shape)}
    return {"vision_model.post_layernorm": first_tensor(output), "vision_model.head": _pooled(output)}


def _pooled(output: Any) -> torch.Tensor | None:
    pooled = output.get("pooler_output") if isinstance(output, Mapping) else getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]
    return None
