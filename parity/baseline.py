"""A runtime's own arithmetic or a bug: the candidate's baseline per kind of site.

The oracle rule (`judge.py`) bounds a candidate's error at twice transformers' own. Other runtimes compute
some ops uniformly a little less accurately than PyTorch and are still right: MLX's LayerNorm is ×3.6–4.6
transformers' float32 error at every norm of a so400m tower in isolated mode (its MLP ×2.6 at every layer),
while its end-to-end outputs are within ×1.6. The ×2 rule failed it at the first norm, with no cause. A bug
looks different: it stands out from the candidate's own error at the other sites of its kind, or it is
systematic, or it moves the end-to-end result.

The rule, applied to the isolated run when a propagated run exists (mode ``both``):

1. the propagated run passes at every site it judges — the end-to-end truth that the runtime's error does
   not accumulate into anything the oracle rule can see — or it fails only from the first isolated site the
   baseline does not explain on (a bug there explains the end-to-end failure, and the blame goes to it, not
   to the runtime's uniform excess before it). If it first fails at a site whose kind fails uniformly, that
   kind's excess is a bug at every site of it, not arithmetic: that kind (and the layer outputs, which contain
   it) gets no baseline, the others keep theirs;
2. per kind of site (norm, attention, MLP, layer output: `diagnose.site_kind`) with at least three judged
   sites, so that one bad site cannot move the median, the candidate's baseline is the median over those
   sites of err(cand)/err(transformers), and likewise for the max-norm error;
3. a failing site of that kind passes as *runtime* when it is within the same rule with the baseline in
   transformers' place — ``err(cand) ≤ k · max(1, baseline) · err(ref) + floor · u`` and the max-norm
   counterpart — and its difference is noise-like (no offset, scale or hot channel/token: `judge._pattern`).

A planted bug at one site (an eps, a GELU, a scale, at layer 0 or deep) stands out from its kind's median or is
systematic, and still fails; a bug at every site of a kind moves the propagated run and fails there. Sites
passed this way have status ``runtime`` (never ``exact``); the report lists each kind's baseline, and the
resolution at those sites is coarser by the same factor (the verdict says so).

    >>> from .judge import SiteResult
    >>> kind_ratios([SiteResult("vision_model.encoder.layers.0.mlp", err_cand=3.0, err_ref=1.0)])
    {'mlp': [3.0]}
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .diagnose import site_kind
from .judge import Rule, SiteResult

__all__ = ["BASELINE_KINDS", "MIN_SITES", "KindBaseline", "apply_runtime_baseline", "kind_ratios", "with_baseline"]

BASELINE_KINDS = ("norm", "attention", "mlp", "layer")
MIN_SITES = 3  # a median of three or more is not moved by one bad site


@dataclass
class KindBaseline:
    kind: str
    sites: int  # judged sites of this kind in the isolated run
    rms: float  # median err(cand)/err(ref)
    max: float  # median err_max(cand)/err_max(ref)
    accepted: list[str] = field(default_factory=list)
    # The end-to-end truth held (rule 1): the baseline is the runtime's arithmetic, not a bug at every site of
    # the kind; only then does the diagnosis take it out of its distances.
    credible: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sites": self.sites, "rms": self.rms, "max": self.max, "accepted": self.accepted}


def _judged(r: SiteResult) -> bool:
    return r.err_cand is not None and r.err_ref is not None and r.err_ref > 0 and r.status in ("ok", "exact", "fail")


def kind_ratios(results: Sequence[SiteResult], of: str = "rms") -> dict[str, list[float]]:
    """err(cand)/err(ref) (or the max-norm ratio, ``of="max"``) per kind of site, over the judged sites."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in results:
        kind = site_kind(r.name)
        if kind in BASELINE_KINDS and _judged(r):
            if of == "rms":
                out[kind].append(r.err_cand / r.err_ref)  # type: ignore[operator]
            elif r.err_cand_max is not None and r.err_ref_max:
                out[kind].append(r.err_cand_max / r.err_ref_max)
    return dict(out)


def apply_runtime_baseline(
    isolated: list[SiteResult], propagated: list[SiteResult] | None, rule: Rule
) -> tuple[list[KindBaseline], list[str]]:
    """Pass, as ``runtime``, the isolated failures that are the candidate's uniform arithmetic (module doc);
    returns every kind's baseline (those with ``accepted`` sites are the report's), and notes for what the rule
    could not decide."""
    failing = [r for r in isolated if r.status == "fail"]
    if rule.absolute or not failing:
        return [], []
    k, k_max, floor, floor_max = (rule.describe()[n] for n in ("k", "k_max", "floor", "floor_max"))
    u = rule.describe()["unit_roundoff"]
    rms, mx = kind_ratios(isolated, "rms"), kind_ratios(isolated, "max")
    baselines = {
        kind: KindBaseline(kind, len(v), statistics.median(v), statistics.median(mx.get(kind) or [1.0]))
        for kind, v in rms.items()
        if len(v) >= MIN_SITES
    }
    if propagated is None:
        over = sorted(b.kind for b in baselines.values() if b.rms > k)
        note = f"{', '.join(over)} sites fail uniformly; whether that is the runtime's arithmetic needs the end-to-end "
        return list(baselines.values()), [note + "run (mode both)"] if over else []
    within: list[tuple[SiteResult, float, float, KindBaseline]] = []
    standout = None  # the first isolated failure the baseline does not explain: a bug
    for r in failing:
        b = baselines.get(site_kind(r.name) or "")
        fits = b is not None and r.pattern is not None and r.pattern.get("kind") == "noise-like"
        if fits:
            assert b is not None and r.err_ref is not None and r.err_ref_max is not None and r.err_cand is not None
            limit = k * max(1.0, b.rms) * r.err_ref + floor * u
            limit_max = k_max * max(1.0, b.max) * r.err_ref_max + floor_max * u
            fits = r.err_cand <= limit and r.err_cand_max is not None and r.err_cand_max <= limit_max
        if fits:
            within.append((r, limit, limit_max, b))  # type: ignore[arg-type]
        elif standout is None:
            standout = r
    # The end-to-end truth: the propagated run passes, or it fails only from the first standing-out site on
    # (that bug explains it; the uniform excess before it did not move the end-to-end result). Otherwise the
    # end-to-end run first fails at a site whose kind fails uniformly: that kind's "baseline" is a bug at every
    # site of it (and the layer outputs, which contain it, are suspect with it); the other kinds stay credible.
    order = {r.name: i for i, r in enumerate(isolated)}
    first_prop_fail = next((p.name for p in propagated if not p.passed), None)
    suspect: set[str] = set()
    if first_prop_fail is not None and (standout is None or order.get(first_prop_fail, -1) < order[standout.name]):
        kind = site_kind(first_prop_fail) or ""
        suspect = {kind, "layer"} if kind in BASELINE_KINDS else set(BASELINE_KINDS)
    for b in baselines.values():
        b.credible = b.kind not in suspect
    for r, limit, limit_max, b in within:
        if b.credible:
            r.status, r.passed, r.limit, r.limit_max = "runtime", True, limit, limit_max
            r.note = f"×{b.rms:.2g} baseline of {b.kind} sites, noise-like"
            b.accepted.append(r.name)
    return list(baselines.values()), []


def with_baseline(result: SiteResult, baselines: Sequence[KindBaseline], rule: Rule) -> tuple[SiteResult, float]:
    """For the diagnosis: ``result`` with its bound widened by its kind's credible baseline, and the error that is no bug's
    in the distance between the candidate and a variant: the candidate's own arithmetic there (its kind's baseline,
    at least transformers' error) and the variant's own float32 rounding (transformers' error), added in
    quadrature. A known-bug variant reproduces the candidate when it does so down to that error."""
    if result.err_ref is None or rule.absolute:
        return result, 0.0
    b = next((b for b in baselines if b.kind == site_kind(result.name) and b.credible), None)
    own = max(1.0, b.rms) if b is not None else 1.0
    noise = math.sqrt(own * own + 1.0) * result.err_ref
    if b is None:
        return result, noise
    d = rule.describe()
    limit = d["k"] * own * result.err_ref + d["floor"] * d["unit_roundoff"]
    return dataclasses.replace(result, limit=max(limit, result.limit or 0.0)), noise
