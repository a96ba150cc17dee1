"""Per-site metrics, the pass rule, and the report in its four forms (table, JSON, Markdown, plot).

The pass rule (default): every site is judged against a float64 oracle (`oracle.py`). With
``err(x) = RMS(x − truth) / RMS(truth)`` and ``err_max(x) = max|x − truth| / max|truth|``, a site passes
when the candidate is not much worse than transformers itself at that site::

    err(cand)     <= k     · err(ref)     + floor     · u
    err_max(cand) <= k_max · err_max(ref) + floor_max · u

with ``u`` the run dtype's unit roundoff and ``k``, ``floor`` per dtype in `ORACLE_RULES` (measured in
docs/PARITY.md). A candidate *more* accurate than the reference always passes; a bit-identical site is
``exact``. ``atol``/``rtol`` switch to the old absolute rule (``max|Δ| <= atol + rtol · max|x_ref|``),
and the report says so.

JSON schema (stable; fields are only ever added)::

    {"passed": bool, "verdict": str,
     "reference": {"impl", "version", "attn"},
     "candidate": {"impl", "version", "attn", "loaded_via", "inferred_rename"?, "inference"?},
     "weights": {"source", "synthetic", "kind"}, "dtype", "device", "mode", "depth",
     "tolerance": {"atol", "rtol"} | {"rule": "oracle", "k", "k_max", "floor", "floor_max", "unit_roundoff"},
     "inputs": {"batch", "images", "seed", "height", "width"},
     "first_divergent_site": str | null, "missing_keys": [..], "unexpected_keys": [..], "missing_sites": [..],
     "unloaded_parameters": [..], "mutated_weights": [..], "nonfinite_weights": [..],
     "resolution": float | null, "notes": [str], "skipped_sites": [..],
     "ranges": [{"site", "max_abs", "fp16_headroom", "flag", "underflow_fraction"}],
     "fp16_overflow_site": str | null,
     "diagnosis": {"site", "likely_cause": str | null, "limit", "variants": [{"variant", "err", "relative"}]} | null,
     "amplification": [{"site", "local", "local_ratio", "accumulated", "accumulated_ratio", "local_passed",
                        "accumulated_passed"}],
     "sites": [{"name", "max_abs", "mean_abs", "rel_l2", "cosine", "ref_max_abs", "passed", "exact", "status",
                "note", "err_ref", "err_cand", "err_ref_max", "err_cand_max", "limit", "limit_max",
                "nonfinite_side", "nonfinite_index",
                "pattern": {"kind", "summary", "mean", "std", "bias", "channel_offset_share", "worst_channel",
                            "channel_share", "token_offset_share", "worst_token", "token_share", "scale_share"}
                           | null}],
     "propagated_sites": [same as sites] | null}

``mode`` is ``both`` (the default: ``sites`` are the isolated comparison, which blames, and
``propagated_sites`` the end-to-end one), ``isolated`` or ``propagated``. ``status`` is one of
``exact``, ``ok``, ``fail``, ``missing``, ``shape``, ``nonfinite``, ``skipped`` (``--skip-site``: not
compared; it neither passes nor fails, and the verdict says how many). Numbers that are not finite are
written as ``null``.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.errors import InputError, OutputError

from .oracle import SiteTruth, rms

__all__ = ["DEFAULT_TOLERANCES", "ORACLE_RULES", "UNIT_ROUNDOFF", "Report", "Rule", "SiteResult", "measure"]

# The old absolute rule, used only when --atol/--rtol are given: (atol, rtol) per dtype.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-12, 1e-12),
    "float32": (1e-5, 5e-6),
    "bfloat16": (1e-2, 5e-2),
    "float16": (1e-3, 6e-3),
}

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}

# (k, k_max, floor, floor_max) per dtype; floors in units of the dtype's unit roundoff.
# Measured in docs/PARITY.md ("Choosing k and the floor").
ORACLE_RULES: dict[str, tuple[float, float, float, float]] = {
    "float64": (2.0, 4.0, 64.0, 512.0),
    "float32": (2.0, 4.0, 1.0, 8.0),
    "bfloat16": (2.0, 4.0, 0.25, 2.0),
    "float16": (2.0, 4.0, 0.25, 2.0),
}


@dataclass(frozen=True)
class Rule:
    """How a site is judged: against the float64 oracle (default), or by the absolute rule."""

    dtype: str
    atol: float | None = None
    rtol: float | None = None

    @property
    def absolute(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def describe(self) -> dict[str, Any]:
        if self.absolute:
            a, r = DEFAULT_TOLERANCES[self.dtype]
            return {"atol": a if self.atol is None else self.atol, "rtol": r if self.rtol is None else self.rtol}
        k, k_max, floor, floor_max = ORACLE_RULES[self.dtype]
        return {
            "rule": "oracle",
            "k": k,
            "k_max": k_max,
            "floor": floor,
            "floor_max": floor_max,
            "unit_roundoff": UNIT_ROUNDOFF[self.dtype],
        }

    def limits(self, truth: SiteTruth) -> tuple[float, float]:
        """The largest ``err`` and ``err_max`` a candidate may have at a site."""
        k, k_max, floor, floor_max = ORACLE_RULES[self.dtype]
        u = UNIT_ROUNDOFF[self.dtype]
        return k * truth.err_ref + floor * u, k_max * truth.err_ref_max + floor_max * u


@dataclass
class SiteResult:
    name: str
    max_abs: float | None = None
    mean_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    ref_max_abs: float | None = None
    passed: bool = False
    exact: bool = False
    status: str = "missing"
    note: str = ""
    err_ref: float | None = None  # RMS(ref − truth) / RMS(truth)
    err_cand: float | None = None  # RMS(cand − truth) / RMS(truth)
    err_ref_max: float | None = None  # max|ref − truth| / max|truth|
    err_cand_max: float | None = None
    limit: float | None = None  # the bound on err_cand (oracle rule) or on max_abs (absolute rule)
    limit_max: float | None = None  # the bound on err_cand_max (oracle rule)
    nonfinite_side: str | None = None  # "candidate", "reference" or "oracle"
    nonfinite_index: list[int] | None = None  # first non-finite element
    # For failing sites: is the difference a systematic bias or noise-like? (see `_pattern`)
    pattern: dict[str, Any] | None = None

    @property
    def ratio(self) -> float | None:
        """err_cand / err_ref: how much worse than transformers' own rounding."""
        if self.err_cand is None or self.err_ref is None:
            return None
        if self.err_ref == 0:
            return 1.0 if self.err_cand == 0 else math.inf
        return self.err_cand / self.err_ref


FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # float16's smallest subnormal: smaller magnitudes flush to zero
FP16_MARGIN = 8.0  # a site within this factor of float16's max is flagged as near overflow


def range_scan(outputs: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per site, the reference's max |x| against float16's limits, and notes for the sites that matter.

    Returns (one entry per site: ``site``, ``max_abs``, ``fp16_headroom`` (65504 / max|x|), ``flag``
    (``"overflow"``, ``"near"`` within ×8 of 65504, ``"underflow"`` when over 1 % of the non-zero values
    are below float16's smallest subnormal, else null), ``underflow_fraction``), notes)."""
    entries: list[dict[str, Any]] = []
    for site, t in outputs.items():
        x = t.detach().abs().double()
        finite = x[torch.isfinite(x)]
        m = finite.max().item() if finite.numel() else None
        if finite.numel() < x.numel() and bool(torch.isinf(x).any()):
            m = math.inf  # the reference itself overflowed (a float16 run): that is the overflow
        nonzero = finite[finite > 0]
        under = (nonzero < FP16_TINY).double().mean().item() if nonzero.numel() else 0.0
        flag = None
        if m is not None and m > FP16_MAX:
            flag = "overflow"
        elif m is not None and m * FP16_MARGIN > FP16_MAX:
            flag = "near"
        elif under > 0.01:
            flag = "underflow"
        entries.append(
            {
                "site": site,
                "max_abs": m,
                "fp16_headroom": (FP16_MAX / m) if m else None,
                "flag": flag,
                "underflow_fraction": under,
            }
        )
    notes = []
    over = [e for e in entries if e["flag"] == "overflow"]
    near = [e for e in entries if e["flag"] == "near"]
    under = [e for e in entries if e["flag"] == "underflow"]
    if over:
        e = over[0]
        size = "Inf in the reference itself" if math.isinf(e["max_abs"]) else f"max |x| {e['max_abs']:.3g} > 65504"
        notes.append(f"float16 would overflow at {e['site']}: {size} ({len(over)} site(s) over float16's max)")
    if near:
        e = min(near, key=lambda e: e["fp16_headroom"])
        notes.append(
            f"{len(near)} site(s) within ×{FP16_MARGIN:g} of float16's max; closest {e['site']}: max |x| "
            f"{e['max_abs']:.3g} (×{e['fp16_headroom']:.3g} headroom)"
        )
    if under:
        e = max(under, key=lambda e: e["underflow_fraction"])
        notes.append(
            f"{len(under)} site(s) with over 1 % of values below float16's smallest subnormal; worst {e['site']} "
            f"({100 * e['underflow_fraction']:.1f} %)"
        )
    return entries, notes


def _first_nonfinite(t: torch.Tensor) -> list[int]:
    bad = (~torch.isfinite(t)).nonzero()
    return [int(i) for i in bad[0]] if len(bad) else []


def measure(
    name: str, candidate: torch.Tensor, reference: torch.Tensor, truth: SiteTruth | None, rule: Rule
) -> SiteResult:
    """Compare one site. Differences are computed in float64 on the reference's device."""
    if tuple(candidate.shape) != tuple(reference.shape):
        return SiteResult(
            name, status="shape", note=f"shape {list(candidate.shape)} vs reference {list(reference.shape)}"
        )
    a = candidate.detach().to(device=reference.device, dtype=torch.float64)
    b = reference.detach().to(torch.float64)
    for side, t in (("reference", b), ("candidate", a)):
        if not torch.isfinite(t).all():
            index = _first_nonfinite(t)
            return SiteResult(
                name,
                status="nonfinite",
                note=f"{side} has NaN/Inf (first at index {index})",
                nonfinite_side=side,
                nonfinite_index=index,
            )
    if truth is not None and not truth.finite:
        return SiteResult(name, status="nonfinite", note="the float64 oracle has NaN/Inf", nonfinite_side="oracle")
    ref_max = b.abs().max().item() if b.numel() else 0.0
    exact = torch.equal(candidate.detach().to(reference.device), reference.detach())
    d = a - b
    max_abs = d.abs().max().item() if d.numel() else 0.0
    mean_abs = d.abs().mean().item() if d.numel() else 0.0
    norm_b = b.norm().item()
    rel_l2 = d.norm().item() / norm_b if norm_b > 0 else (0.0 if max_abs == 0 else None)
    denom = a.norm().item() * norm_b
    cosine = (a.flatten() @ b.flatten()).item() / denom if denom > 0 else (1.0 if exact else 0.0)
    result = SiteResult(name, max_abs, mean_abs, rel_l2, cosine, ref_max, exact=exact)
    if truth is not None:
        e = d + truth.d_ref.to(torch.float64)  # cand − truth = (cand − ref) + (ref − truth)
        result.err_ref, result.err_ref_max = truth.err_ref, truth.err_ref_max
        result.err_cand = rms(e) / truth.scale_rms if truth.scale_rms > 0 else (0.0 if max_abs == 0 else math.inf)
        e_max = e.abs().max().item() if e.numel() else 0.0
        result.err_cand_max = e_max / truth.scale_max if truth.scale_max > 0 else (0.0 if e_max == 0 else math.inf)
    if rule.absolute:
        tol = rule.describe()
        result.limit = tol["atol"] + tol["rtol"] * ref_max
        result.passed = exact or max_abs <= result.limit
    else:
        assert truth is not None, "the oracle rule needs the oracle's truth"
        result.limit, result.limit_max = rule.limits(truth)
        result.passed = exact or (result.err_cand <= result.limit and result.err_cand_max <= result.limit_max)
    result.status = "exact" if exact else ("ok" if result.passed else "fail")
    if result.status == "fail":
        result.pattern = _pattern(d, b)
    return result


SYSTEMATIC_BIAS = 0.5  # |mean signed Δ| over its spread
CONCENTRATION = 10.0  # a channel (token) carrying this many times its even share of |Δ|


def _pattern(d: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Systematic or noise-like. How much of Δ's energy a simple structure explains: one offset per
    channel (the last axis), one per token (the axis before it), or a multiple of the reference (a
    scale); the mean signed Δ against its spread; and how concentrated |Δ| is in one channel or token.
    A wrong constant (a missing bias, an eps, a scale) is explained by one of them; a different
    summation order by none."""
    energy = d.pow(2).sum().item()
    flat = d.flatten()
    mean, std = flat.mean().item(), flat.std().item() if flat.numel() > 1 else 0.0
    bias = abs(mean) / std if std > 0 else (math.inf if mean else 0.0)
    out: dict[str, Any] = {"mean": mean, "std": std, "bias": bias}
    reasons = []
    if energy > 0 and d.dim() >= 2:
        rows = d.reshape(-1, d.shape[-1])
        out["channel_offset_share"] = rows.shape[0] * rows.mean(0).pow(2).sum().item() / energy
        per_channel = rows.abs().sum(0)
        c = int(per_channel.argmax())
        out["worst_channel"], out["channel_share"] = c, per_channel[c].item() / (per_channel.sum().item() or 1.0)
        if out["channel_offset_share"] > 0.5:
            reasons.append(f"a per-channel offset explains {100 * out['channel_offset_share']:.0f} % of Δ")
        if out["channel_share"] > CONCENTRATION / d.shape[-1]:
            reasons.append(f"channel {c} carries {100 * out['channel_share']:.0f} % of |Δ|")
    if energy > 0 and d.dim() >= 3:
        tokens = d.reshape(-1, d.shape[-2], d.shape[-1])
        out["token_offset_share"] = d.shape[-1] * tokens.mean(-1).pow(2).sum().item() / energy
        per_token = tokens.abs().sum((0, 2))
        t = int(per_token.argmax())
        out["worst_token"], out["token_share"] = t, per_token[t].item() / (per_token.sum().item() or 1.0)
        if out["token_offset_share"] > 0.5:
            reasons.append(f"a per-token offset explains {100 * out['token_offset_share']:.0f} % of Δ")
        if out["token_share"] > CONCENTRATION / d.shape[-2]:
            reasons.append(f"token {t} carries {100 * out['token_share']:.0f} % of |Δ|")
    r2 = ref.pow(2).sum().item()
    if energy > 0 and r2 > 0:
        dot = (d.flatten() @ ref.flatten()).item()
        out["scale_share"] = dot * dot / (energy * r2)
        if out["scale_share"] > 0.5:
            reasons.append(
                f"Δ ≈ {dot / r2:+.2g}× the reference explains {100 * out['scale_share']:.0f} % of Δ (a scale)"
            )
    if bias > SYSTEMATIC_BIAS:
        reasons.append(f"mean signed Δ {bias:.2g}× its spread")
    out["kind"] = "systematic" if reasons else "noise-like"
    out["summary"] = (
        "systematic: " + "; ".join(reasons)
        if reasons
        else f"noise-like: no offset, scale or hot channel/token explains it (worst channel {out.get('worst_channel')}, "
        f"token {out.get('worst_token')})"
    )
    return out


@dataclass
class Report:
    sites: list[SiteResult]
    reference: dict[str, Any]
    candidate: dict[str, Any]
    weights: dict[str, Any]
    dtype: str
    device: str
    mode: str
    depth: str
    tolerance: dict[str, Any]
    inputs: dict[str, Any]
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    propagated_sites: list[SiteResult] | None = None  # mode "both": the end-to-end comparison
    unloaded_parameters: list[str] = field(default_factory=list)
    mutated_weights: list[str] = field(default_factory=list)
    nonfinite_weights: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The reference's range per site (see `range_scan`): how close each comes to float16's limits.
    ranges: list[dict[str, Any]] = field(default_factory=list)
    # Known-bug variants ranked at the first site that fails in isolated mode (parity/diagnose.py).
    diagnosis: dict[str, Any] | None = None

    @property
    def fp16_overflow_site(self) -> str | None:
        """The first site whose reference values exceed float16's max (65504), whatever the run dtype."""
        return next((r["site"] for r in self.ranges if r["max_abs"] is not None and r["max_abs"] > FP16_MAX), None)

    @property
    def all_sites(self) -> list[SiteResult]:
        return self.sites + (self.propagated_sites or [])

    @property
    def missing_sites(self) -> list[str]:
        return [s.name for s in self.sites if s.status == "missing"]

    @property
    def skipped_sites(self) -> list[str]:
        """Sites declared not applicable (``--skip-site``): not compared, shown SKIPPED, never counted as passing."""
        return [s.name for s in self.sites if s.status == "skipped"]

    @property
    def first_divergent_site(self) -> str | None:
        first = self._first_failure()
        return first.name if first else None

    def _first_failure(self) -> SiteResult | None:
        return next((s for s in self.all_sites if not s.passed), None)

    @property
    def passed(self) -> bool:
        return (
            all(s.passed for s in self.all_sites)
            and not self.unloaded_parameters
            and not self.mutated_weights
            and not self.nonfinite_weights
        )

    @property
    def resolution(self) -> float | None:
        """Under the oracle rule, the largest per-site bound on err(cand): a difference at a site smaller
        than this fraction of the site's RMS could not have been seen."""
        limits = [s.limit for s in self.all_sites if s.limit is not None and "rule" in self.tolerance]
        return max(limits) if limits else None

    def _run_label(self) -> str:
        skipped = len(self.skipped_sites)
        return f"{self.dtype}, {self.mode}, {self.weights.get('kind', 'weights')}" + (
            f"; {skipped} site(s) SKIPPED by --skip-site, not compared" if skipped else ""
        )

    @property
    def verdict(self) -> str:
        n = len(self.sites) - len(self.skipped_sites)
        run = self._run_label()
        if self.nonfinite_weights:
            return (
                f"FAIL: the weights contain NaN/Inf ({', '.join(self.nonfinite_weights[:3])}"
                f"{', …' if len(self.nonfinite_weights) > 3 else ''}); nothing can be proven ({run})"
            )
        if self.mutated_weights:
            return (
                f"FAIL: the candidate changed {len(self.mutated_weights)} shared checkpoint tensor(s) in place "
                f"({', '.join(self.mutated_weights[:3])}); copy a tensor before modifying it ({run})"
            )
        if self.passed:
            n_exact = sum(s.exact for s in self.sites)
            if all(s.exact for s in self.all_sites if s.status != "skipped"):
                return f"PASS: all {n} sites exact ({run})"
            if "rule" in self.tolerance:
                worst = max(self.all_sites, key=lambda s: s.ratio or 0.0)
                res = self.resolution
                return (
                    f"PASS: {n} sites within the float64-oracle bound, {n_exact} exact, worst "
                    f"{_x(worst.ratio)} transformers' own error at {worst.name}; a difference below "
                    f"{res:.2g} of a site's RMS could not have been seen ({run})"
                )
            worst_abs = max((s.max_abs or 0.0) for s in self.all_sites)
            return f"PASS: {n} sites within tolerance (absolute rule), {n_exact} exact, worst max|Δ| {worst_abs:.3g} ({run})"
        first = self._first_failure()
        if first is None:
            return (
                f"FAIL: {len(self.unloaded_parameters)} candidate parameter(s) never loaded from the checkpoint: "
                f"{', '.join(self.unloaded_parameters[:3])}{', …' if len(self.unloaded_parameters) > 3 else ''} ({run})"
            )
        where = " (propagated)" if self.propagated_sites and first in self.propagated_sites else ""
        if first.status == "fail":
            if first.err_cand is not None and "rule" in self.tolerance:
                detail = (
                    f"error {_x(first.ratio)} transformers' own: err {first.err_cand:.3g} vs {first.err_ref:.3g}, "
                    f"bound {first.limit:.3g}; max|Δ| {first.max_abs:.3g}, cosine {first.cosine:.6f}"
                )
                if first.pattern:
                    detail += f"; {first.pattern['summary']}"
            else:
                detail = f"max|Δ| {first.max_abs:.3g} > {first.limit:.3g}, rel L2 {_g(first.rel_l2)}, cosine {first.cosine:.6f}"
        else:
            detail = first.note or first.status
        n_bad = sum(not s.passed for s in self.sites)
        tail = f"; {n_bad}/{n} sites fail"
        if self.propagated_sites is not None:
            tail += f" isolated, {sum(not s.passed for s in self.propagated_sites)}/{n} propagated"
        if self.unloaded_parameters:
            tail += f"; {len(self.unloaded_parameters)} parameter(s) never loaded"
        return f"FAIL: first divergent site {first.name}{where} ({detail}){tail} ({run})"

    # -- renderings ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _finite(
            {
                "passed": self.passed,
                "verdict": self.verdict,
                "reference": self.reference,
                "candidate": self.candidate,
                "weights": self.weights,
                "dtype": self.dtype,
                "device": self.device,
                "mode": self.mode,
                "depth": self.depth,
                "tolerance": self.tolerance,
                "inputs": self.inputs,
                "first_divergent_site": self.first_divergent_site,
                "missing_keys": self.missing_keys,
                "unexpected_keys": self.unexpected_keys,
                "missing_sites": self.missing_sites,
                "skipped_sites": self.skipped_sites,
                "unloaded_parameters": self.unloaded_parameters,
                "mutated_weights": self.mutated_weights,
                "nonfinite_weights": self.nonfinite_weights,
                "notes": self.notes,
                "resolution": self.resolution,
                "ranges": self.ranges,
                "diagnosis": self.diagnosis,
                "amplification": self.amplification,
                "fp16_overflow_site": self.fp16_overflow_site,
                "sites": [asdict(s) for s in self.sites],
                "propagated_sites": None
                if self.propagated_sites is None
                else [asdict(s) for s in self.propagated_sites],
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default) + "\n"

    def _columns(self) -> tuple[list[str], list[list[str]]]:
        oracle = "rule" in self.tolerance
        first = self._first_failure()
        prop = {s.name: s for s in self.propagated_sites} if self.propagated_sites is not None else None
        if oracle and prop is not None:
            header = ["", "site", "isolated err", "×ref", "propagated err", "×ref", "max|Δ|", "result"]
        elif oracle:
            header = ["", "site", "max|Δ|", "err cand", "err ref", "×ref", "bound", "result"]
        else:
            header = ["", "site", "max|Δ|", "mean|Δ|", "rel L2", "cosine", "ref max|x|", "result"]
        rows = []
        for s in self.sites:
            p = prop.get(s.name) if prop is not None else None
            bad = [r for r in (s, p) if r is not None and not r.passed]
            mark = ">>" if first is not None and first in (s, p) else (" x" if bad else "  ")
            if s.status in ("missing", "shape", "nonfinite") and not (
                p and p.status not in ("missing", "shape", "nonfinite")
            ):
                nums = ["-"] * (len(header) - 3)
            elif oracle and p is not None:
                nums = [
                    _g(s.err_cand),
                    _x(s.ratio),
                    _g(p.err_cand),
                    _x(p.ratio),
                    _g(max(s.max_abs or 0.0, p.max_abs or 0.0)),
                ]
            elif oracle:
                nums = [_g(s.max_abs), _g(s.err_cand), _g(s.err_ref), _x(s.ratio), _g(s.limit)]
            else:
                nums = [_g(s.max_abs), _g(s.mean_abs), _g(s.rel_l2), f"{s.cosine:.7f}", _g(s.ref_max_abs)]
            rows.append([mark, s.name, *nums, self._result(s, p)])
        return header, rows

    @staticmethod
    def _result(s: SiteResult, p: SiteResult | None) -> str:
        def one(r: SiteResult) -> str:
            text = {"exact": "exact", "ok": "ok", "fail": "FAIL"}.get(r.status, r.status.upper())
            if r.note and r.status not in ("exact", "ok", "fail"):
                text += f" ({r.note})"
            return text

        if p is None or (one(s) == one(p)):
            return one(s)
        return f"{one(s)} isolated, {one(p)} propagated"

    def _head(self) -> str:
        tol = self.tolerance
        if "rule" in tol:
            rule = (
                f"judged against a float64 oracle: err ≤ {tol['k']:g}×transformers' own + {tol['floor']:g}u, "
                f"max err ≤ {tol['k_max']:g}×own + {tol['floor_max']:g}u (u = {tol['unit_roundoff']:.3g})"
            )
        else:
            rule = f"ABSOLUTE rule (--atol/--rtol given): max|Δ| ≤ {tol['atol']:g} + {tol['rtol']:g}·max|x_ref|"
        framework = self.candidate.get("framework")
        cand = (
            f"candidate {self.candidate['impl']} ({framework}, {self.candidate.get('runtime', 'unknown')})"
            if framework
            else f"candidate {self.candidate['impl']} ({self.candidate.get('attn', 'n/a')})"
        )
        return (
            f"reference {self.reference['impl']} {self.reference['version']} ({self.reference['attn']}) vs "
            f"{cand}; "
            f"weights: {self.weights['source']} ({'synthetic' if self.weights['synthetic'] else 'real'}); "
            f"{self.dtype} on {self.device}, {self.mode}; {rule}"
        )

    @property
    def amplification(self) -> list[dict[str, Any]]:
        """Mode ``both``: per layer output, the local error (isolated: this layer's own) next to the
        accumulated one (propagated: everything before it too), both against the float64 oracle."""
        if self.propagated_sites is None:
            return []
        prop = {s.name: s for s in self.propagated_sites}
        rows = []
        for s in self.sites:
            p = prop.get(s.name)
            if p is None or not re.fullmatch(r"vision_model\.encoder\.layers\.\d+", s.name):
                continue
            rows.append(
                {
                    "site": s.name,
                    "local": s.err_cand,
                    "local_ratio": s.ratio,
                    "accumulated": p.err_cand,
                    "accumulated_ratio": p.ratio,
                    "local_passed": s.passed,
                    "accumulated_passed": p.passed,
                }
            )
        return rows

    def amplification_line(self) -> str | None:
        """One line telling a local bug from drift that builds up over the layers."""
        rows = [r for r in self.amplification if r["local"] is not None and r["accumulated"] is not None]
        if len(rows) < 2:
            return None
        first_local = next((r for r in rows if not r["local_passed"]), None)
        first_acc = next((r for r in rows if not r["accumulated_passed"]), None)
        a0, a1 = rows[0]["accumulated"], rows[-1]["accumulated"]
        growth = f"×{a1 / a0:.3g}" if a0 else "from 0"
        span = f"{rows[0]['site'].rsplit('.', 1)[-1]}→{rows[-1]['site'].rsplit('.', 1)[-1]}"
        i_local = rows.index(first_local) if first_local is not None else len(rows)
        i_acc = rows.index(first_acc) if first_acc is not None else len(rows)
        if first_local is not None and i_local <= i_acc:
            return (
                f"amplification: a local error at {first_local['site']} (isolated ×{first_local['local_ratio']:.3g}); "
                f"accumulated error over layers {span} grows {growth}"
            )
        if first_acc is not None:
            if first_local is None:
                return (
                    f"amplification: every layer passes alone, but the accumulated error grows {growth} over layers "
                    f"{span} and exceeds its bound first at {first_acc['site']}: drift, not one local bug"
                )
            return (
                f"amplification: the accumulated error exceeds its bound first at {first_acc['site']} while every "
                f"layer up to there passes alone (it grows {growth} over layers {span}): drift; layers also exceed "
                f"the bound alone from {first_local['site']} on (×{first_local['local_ratio']:.3g})"
            )
        return f"amplification: accumulated error over layers {span} grows {growth}, within bounds throughout"

    def _extras(self) -> list[str]:
        extra = list(self.notes)
        line = self.amplification_line() if not self.passed else None
        if line:
            extra.append(line)
        if self.nonfinite_weights:
            extra.append(f"weights with NaN/Inf: {', '.join(self.nonfinite_weights)}")
        if self.mutated_weights:
            extra.append(f"checkpoint tensors the candidate changed in place: {', '.join(self.mutated_weights)}")
        if self.unloaded_parameters:
            extra.append(
                "candidate parameters never loaded from the checkpoint (still at their initial value): "
                + ", ".join(self.unloaded_parameters)
            )
        if self.missing_keys:
            extra.append(f"candidate parameters not filled by the checkpoint: {', '.join(self.missing_keys)}")
        if self.unexpected_keys:
            extra.append(f"checkpoint tensors the candidate did not take: {', '.join(self.unexpected_keys)}")
        return extra

    def table(self) -> str:
        header, body = self._columns()
        rows = [header, *body]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = []
        for r in rows:
            cells = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r[:-1])]
            lines.append("  ".join([*cells, r[-1]]).rstrip())
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join([self._head(), *lines, *self._extras(), self.verdict])

    def to_markdown(self) -> str:
        header, body = self._columns()
        header = [h.replace("|", "\\|") for h in header]
        out = [f"### siglip-parity: {'✅' if self.passed else '❌'} {self.verdict}", "", self._head() + "."]
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in body:
            r[0] = "**→**" if r[0] == ">>" else ("✗" if r[0].strip() == "x" else "")
            r[1] = f"`{r[1]}`"
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        out += ["", *(f"- {e}" for e in self._extras())] if self._extras() else []
        if self.amplification:
            out += [
                "",
                "Amplification (per layer: its own error, isolated, beside the error carried to it, propagated):",
                "",
            ]
            out += ["| layer | local ×ref | accumulated ×ref |", "|---|---|---|"]
            for r in self.amplification:
                local = f"{_g(r['local_ratio'])}{'' if r['local_passed'] else ' ✗'}"
                acc = f"{_g(r['accumulated_ratio'])}{'' if r['accumulated_passed'] else ' ✗'}"
                out.append(f"| {r['site'].rsplit('.', 1)[-1]} | {local} | {acc} |")
        return "\n".join(out) + "\n"

    def plot(self, path: str | Path) -> None:
        """Per-site error (against the float64 oracle, or max |Δ|) and its bound, log scale (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import matplotlib.ticker
        except ImportError:
            raise InputError(
                "--plot needs matplotlib, which is not installed", "--plot", 'pip install "siglip-scratch[plot]"'
            ) from None
        names = [s.name.replace("vision_model.", "").replace("encoder.layers.", "L") for s in self.sites]
        oracle = "rule" in self.tolerance
        floor = 1e-18
        amp = [r for r in self.amplification if r["local_ratio"] is not None and r["accumulated_ratio"] is not None]
        if amp:  # a second panel: local vs accumulated error per layer (a jump at one layer vs drift)
            fig, (ax, ax_amp) = plt.subplots(
                2, 1, figsize=(max(6, 0.25 * len(names)), 6.5), gridspec_kw={"height_ratios": [3, 2]}
            )
            layers = [int(r["site"].rsplit(".", 1)[-1]) for r in amp]
            ax_amp.plot(
                layers, [_plot_value(r["local_ratio"], floor) for r in amp], "o-", ms=3, label="local (isolated)"
            )
            ax_amp.plot(
                layers,
                [_plot_value(r["accumulated_ratio"], floor) for r in amp],
                "^-",
                ms=3,
                label="accumulated (propagated)",
            )
            ax_amp.axhline(2.0, linestyle="--", linewidth=0.8, color="gray", label="rule: ×2 (+ a roundoff floor)")
            ax_amp.set_yscale("log")
            ax_amp.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax_amp.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
            ax_amp.set_xlabel("layer")
            ax_amp.set_ylabel("× transformers' own error")
            ax_amp.set_title("\n".join(textwrap.wrap(self.amplification_line() or "amplification", 95)), fontsize=7)
            ax_amp.legend(fontsize=6)
        else:
            fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
        x = range(len(names))
        series = [("isolated" if self.propagated_sites is not None else self.mode, self.sites, "o")]
        if self.propagated_sites is not None:
            series.append(("propagated", self.propagated_sites, "^"))
        for label, sites, marker in series:
            vals = [_plot_value(s.err_cand if oracle else s.max_abs, floor) for s in sites]
            colors = ["tab:red" if not s.passed else "tab:blue" for s in sites]
            ax.scatter(x, vals, c=colors, s=14, marker=marker, zorder=3, label=f"candidate, {label}")
            if oracle:
                ax.plot(
                    x, [_plot_value(s.err_ref, floor) for s in sites], linewidth=0.8, label=f"transformers, {label}"
                )
            ax.plot(
                x, [_plot_value(s.limit, floor) for s in sites], linestyle="--", linewidth=0.8, label=f"bound, {label}"
            )
        ax.set_yscale("log")
        ax.set_xticks(list(x), names, rotation=90, fontsize=6)
        ax.set_ylabel("RMS error vs float64 oracle / RMS" if oracle else "max |Δ|")
        ax.set_title("\n".join(textwrap.wrap(self.verdict, 95)), fontsize=7)
        ax.legend(fontsize=6)
        fig.tight_layout()
        try:
            fig.savefig(path, dpi=120)
        except OSError as exc:
            raise OutputError(f"cannot write plot ({exc})", str(path), None) from None
        finally:
            plt.close(fig)


def _plot_value(x: float | None, floor: float) -> float:
    if x is None or not math.isfinite(x):
        return float("nan")
    return max(x, floor)


def _g(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3e}"


def _x(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if not math.isfinite(ratio):
        return "×inf"
    return f"×{ratio:.3g}"


def _finite(obj: Any) -> Any:
    """NaN/Inf floats -> None, so the JSON stays valid."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: object) -> object:
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
