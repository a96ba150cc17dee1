"""The judge: per-site metrics, the pass rule and the reference's range scan.

The pass rule (default): every site is judged against a float64 oracle (`oracle.py`). With
``err(x) = RMS(x − truth) / RMS(truth)`` and ``err_max(x) = max|x − truth| / max|truth|``, a site passes
when the candidate is not much worse than transformers itself at that site::

    err(cand)     <= k     · err(ref)     + floor     · u
    err_max(cand) <= k_max · err_max(ref) + floor_max · u

with ``u`` the run dtype's unit roundoff and ``k``, ``floor`` per dtype in `ORACLE_RULES` (measured in
docs/PARITY.md). A candidate *more* accurate than the reference always passes; a bit-identical site is
``exact``. ``atol``/``rtol`` switch to the old absolute rule (``max|Δ| <= atol + rtol · max|x_ref|``).

    >>> rule = Rule("float32")
    >>> rule.describe()["k"], rule.absolute
    (2.0, False)
    >>> fmt_ratio(1.5), fmt_ratio(None)
    ('×1.5', '-')

The report (`report.py`) holds what this module measured; `render.py` shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .oracle import SiteTruth, rms

__all__ = [
    "DEFAULT_TOLERANCES",
    "FP16_MAX",
    "LARGE_VALUE",
    "ORACLE_RULES",
    "UNIT_ROUNDOFF",
    "Rule",
    "SiteResult",
    "fmt_num",
    "fmt_ratio",
    "measure",
    "range_scan",
    "small_range_note",
]

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


# sqrt(65504): a value whose square overflows float16 (a hand-written LayerNorm's x², a softmax's exp(x) sooner).
LARGE_VALUE = 256.0


def small_range_note(ranges: list[dict[str, Any]]) -> list[str]:
    """A note when no site's reference values reach `LARGE_VALUE`: bugs that need large values could not show."""
    top = max((r["max_abs"] for r in ranges if r["max_abs"] is not None), default=None)
    if top is None or top >= LARGE_VALUE:
        return []
    return [
        f"activations never exceed {top:.3g} in magnitude (trained SigLIP towers reach hundreds): bugs that need "
        f"large values (a clamp, float16 overflow in a hand-written norm or softmax) could not have been seen; "
        "use real weights or --synthetic trained"
    ]


def _first_nonfinite(t: torch.Tensor) -> list[int]:
    bad = (~torch.isfinite(t)).nonzero()
    return [int(i) for i in bad[0]] if len(bad) else []


def measure(
    name: str, candidate: torch.Tensor, reference: torch.Tensor, truth: SiteTruth | None, rule: Rule
) -> SiteResult:
    """Compare one site. Differences are computed in float64 on the reference's device."""
    if tuple(candidate.shape) != tuple(reference.shape):
        note = f"shape {list(candidate.shape)} vs reference {list(reference.shape)}"
        if candidate.dim() == reference.dim() == 3 and (candidate.shape[0], candidate.shape[2]) == (
            reference.shape[0],
            reference.shape[2],
        ):
            note = f"{candidate.shape[1]} tokens per image where transformers gives {reference.shape[1]} ({note})"
        return SiteResult(name, status="shape", note=note)
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


def _share(per: torch.Tensor, i: int) -> float:
    """Index ``i``'s share of ``per``'s total, or its even share if larger: rounding error is relative, so a
    channel (token) holding a large share of the reference's magnitude — a massive-activation channel of a trained
    tower — carries as large a share of honest rounding noise."""
    total = per.sum().item()
    return max(per[i].item() / total if total > 0 else 0.0, 1.0 / per.numel())


def _pattern(d: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Systematic or noise-like. How much of Δ's energy a simple structure explains: one offset per
    channel (the last axis), one per token (the axis before it), or a multiple of the reference (a
    scale); the mean signed Δ against its spread; and how concentrated |Δ| is in one channel or token, beyond
    that channel's (token's) share of the reference's magnitude.
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
        if out["channel_share"] > CONCENTRATION * _share(ref.reshape(-1, d.shape[-1]).abs().sum(0), c):
            reasons.append(f"channel {c} carries {100 * out['channel_share']:.0f} % of |Δ|")
    if energy > 0 and d.dim() >= 3:
        tokens = d.reshape(-1, d.shape[-2], d.shape[-1])
        out["token_offset_share"] = d.shape[-1] * tokens.mean(-1).pow(2).sum().item() / energy
        per_token = tokens.abs().sum((0, 2))
        t = int(per_token.argmax())
        out["worst_token"], out["token_share"] = t, per_token[t].item() / (per_token.sum().item() or 1.0)
        if out["token_offset_share"] > 0.5:
            reasons.append(f"a per-token offset explains {100 * out['token_offset_share']:.0f} % of Δ")
        if out["token_share"] > CONCENTRATION * _share(ref.reshape(-1, d.shape[-2], d.shape[-1]).abs().sum((0, 2)), t):
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


def fmt_num(x: float | None) -> str:
    """A metric as the reports print it (``-`` when there is none)."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3e}"


def fmt_ratio(ratio: float | None) -> str:
    """``err_cand / err_ref`` as the reports print it: ``×1.5``."""
    if ratio is None:
        return "-"
    if not math.isfinite(ratio):
        return "×inf"
    return f"×{ratio:.3g}"
