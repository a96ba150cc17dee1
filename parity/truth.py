"""The reference and the float64 oracle: what every candidate is judged against, computed before any candidate
code has seen the weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from siglip_scratch.config import AnyVisionConfig
from siglip_scratch.errors import InputError

from .inputs import ModelInputs, select
from .judge import range_scan
from .oracle import SiteTruth, run_oracle
from .reference import build_reference, record_reference, reference_namer
from .sites import SiteProgress, named_sites, site_names
from .vlm import VlmSpec, build_features_reference
from .weights import nonfinite_keys

__all__ = ["Truth", "any_reference", "run_truth"]


def any_reference(
    config: AnyVisionConfig, state: Mapping[str, torch.Tensor], attn: str, features: VlmSpec | None
) -> torch.nn.Module:
    """The tower's reference, or with ``features`` the VLM's image-features reference (`vlm.py`)."""
    if features is None:
        return build_reference(config, state, attn_implementation=attn)
    return build_features_reference(features, config, state, attn_implementation=attn)  # type: ignore[arg-type]


@dataclass
class Truth:
    """The reference's recorded inputs and (measured) outputs per site, and the oracle's truth per mode."""

    names: list[str]
    skipped: list[str]
    ref_in: dict[str, torch.Tensor]
    ref_out: dict[str, torch.Tensor]  # as measured: NaFlex padding rows dropped (`inputs.select`)
    isolated: dict[str, SiteTruth] | None
    propagated: dict[str, SiteTruth] | None
    ranges: list[dict[str, Any]] = field(default_factory=list)
    range_notes: list[str] = field(default_factory=list)
    nonfinite_weights: list[str] = field(default_factory=list)


def run_truth(
    config: AnyVisionConfig,
    state: Mapping[str, torch.Tensor],
    inputs: ModelInputs,
    *,
    mode: str,
    depth: str,
    attn: str,
    skips: list,
    say: Callable[[str], None],
    features: VlmSpec | None = None,
) -> Truth:
    """Run the reference (hooks record each site's input and output) and the float64 oracle passes ``mode``
    needs; scan the reference's ranges; name non-finite weights when the outputs show some."""
    names = site_names(config, depth, features.path if features else None)  # type: ignore[arg-type]
    for pattern in skips:
        if not any(pattern.fullmatch(n) for n in names):
            raise InputError(
                f"--skip-site {pattern.pattern!r} matches no site",
                "--skip-site",
                "see the site names in docs/PARITY.md",
            )
    skipped = [n for n in names if any(p.fullmatch(n) for p in skips)]
    isolated, propagated = mode in ("isolated", "both"), mode in ("propagated", "both")
    passes = " + ".join(m for m, on in (("isolated", isolated), ("propagated", propagated)) if on)
    say(f"reference and float64 oracle ({passes}) at {len(names)} sites")
    reference = any_reference(config, state, attn, features)
    ref_in, ref_out = record_reference(reference, names, inputs)
    ref_sel = {k: select(inputs, v) for k, v in ref_out.items()}
    ranges, range_notes = range_scan(ref_sel)
    # NaN/Inf in any weight shows in the reference's output (an Inf times a non-zero is never finite again):
    # scan the weights only then, to name them.
    finite = all(bool(torch.isfinite(t).all()) for t in ref_sel.values())
    # The oracle uses sdpa: eager attention upcasts its softmax to float32 only.
    oracle_model = reference if attn == "sdpa" else any_reference(config, state, "sdpa", features)
    namer = reference_namer(oracle_model)
    oracle_sites = named_sites(oracle_model, namer, names)
    # A VLM's tower still runs the layers (and head) its features do not use: they run in float64 too, unjudged.
    extra = named_sites(oracle_model, namer, [n for n in site_names(config) if n not in names]) if features else {}

    def oracle(name: str, forced: dict[str, torch.Tensor] | None) -> dict[str, SiteTruth]:
        progress = SiteProgress(say, name, names)
        return run_oracle(oracle_model, oracle_sites, inputs, ref_sel, forced, progress, extra)

    return Truth(
        names=names,
        skipped=skipped,
        ref_in=ref_in,
        ref_out=ref_sel,
        isolated=oracle("oracle (isolated)", ref_in) if isolated else None,
        propagated=oracle("oracle (propagated)", None) if propagated else None,
        ranges=ranges,
        range_notes=range_notes,
        nonfinite_weights=[] if finite else nonfinite_keys(state),
    )
