"""The report: what a comparison found (per-site results, load and weight checks) and its verdict.

The metrics and the pass rule are in `judge.py`; the table, JSON, Markdown and plot renderers in
`render.py` (``Report.table()`` and the others call them).

JSON schema (stable; fields are only ever added)::

    {"passed": bool, "verdict": str,
     "reference": {"impl", "version", "attn"},
     "candidate": {"impl", "version", "attn", "loaded_via", "inferred_rename"?, "inference"?},
     "weights": {"source", "synthetic", "kind", "origin": "synthetic" | "hub" | "folder", "regime" (synthetic only)}, "dtype", "device", "mode", "depth",
     "tolerance": {"atol", "rtol"} | {"rule": "oracle", "k", "k_max", "floor", "floor_max", "unit_roundoff"},
     "inputs": {"batch", "images", "seed", "height", "width"},
     "first_divergent_site": str | null, "missing_keys": [..], "unexpected_keys": [..], "missing_sites": [..],
     "unloaded_parameters": [..], "mutated_weights": [..], "nonfinite_weights": [..],
     "resolution": float | null, "notes": [str], "skipped_sites": [..], "not_exposed_sites": [..],
     "ranges": [{"site", "max_abs", "fp16_headroom", "flag", "underflow_fraction"}],
     "fp16_overflow_site": str | null,
     "diagnosis": {"site", "likely_cause": str | null, "limit", "variants": [{"variant", "err", "relative"}]} | null,
     "batches": {"checked": bool, "passed": bool, "cause": "state" | "batch mixing" | "batch" | null, "detail"} | null,
     "runtime_baseline": [{"kind", "sites", "rms", "max", "accepted": [site]}] | null   (parity/baseline.py),
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
``exact``, ``ok``, ``fail``, ``missing``, ``shape``, ``nonfinite``, ``not_exposed`` (a sub-layer site no module of
the candidate computes alone, e.g. attention written inline in the layer: not compared, never counted as passing,
its layer's output judged instead), ``skipped`` (``--skip-site``: not
compared; it neither passes nor fails, and the verdict says how many). Numbers that are not finite are
written as ``null``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import render
from .judge import FP16_MAX, SiteResult, fmt_num, fmt_ratio

__all__ = ["Report"]


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
    # A torch.compile'd candidate: its compiled forward's final outputs, judged end to end (runs.compiled_run).
    compiled_sites: list[SiteResult] | None = None
    unloaded_parameters: list[str] = field(default_factory=list)
    mutated_weights: list[str] = field(default_factory=list)
    nonfinite_weights: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The reference's range per site (see `range_scan`): how close each comes to float16's limits.
    ranges: list[dict[str, Any]] = field(default_factory=list)
    # Known-bug variants ranked at the first site that fails in isolated mode (parity/diagnose.py).
    diagnosis: dict[str, Any] | None = None
    # The state and batch check (parity/batches.py): {"checked", "passed", "cause", "detail"}.
    batches: dict[str, Any] | None = None
    # Kinds of site where the candidate's runtime is uniformly less accurate and that was accepted
    # (parity/baseline.py): [{"kind", "sites", "rms", "max", "accepted": [site, ...]}].
    runtime_baseline: list[dict[str, Any]] | None = None

    @property
    def fp16_overflow_site(self) -> str | None:
        """The first site whose reference values exceed float16's max (65504), whatever the run dtype."""
        return next((r["site"] for r in self.ranges if r["max_abs"] is not None and r["max_abs"] > FP16_MAX), None)

    @property
    def all_sites(self) -> list[SiteResult]:
        return self.sites + (self.propagated_sites or []) + (self.compiled_sites or [])

    @property
    def missing_sites(self) -> list[str]:
        return [s.name for s in self.sites if s.status == "missing"]

    @property
    def not_exposed_sites(self) -> list[str]:
        """Sub-layer sites no module of the candidate computes alone: not compared, judged through their layer."""
        return [s.name for s in self.sites if s.status == "not_exposed"]

    @property
    def skipped_sites(self) -> list[str]:
        """Sites declared not applicable (``--skip-site``): not compared, shown SKIPPED, never counted as passing."""
        return [s.name for s in self.sites if s.status == "skipped"]

    @property
    def first_divergent_site(self) -> str | None:
        first = self.first_failure()
        return first.name if first else None

    def first_failure(self) -> SiteResult | None:
        return next((s for s in self.all_sites if not s.passed), None)

    @property
    def passed(self) -> bool:
        return (
            all(s.passed for s in self.all_sites)
            and not self.unloaded_parameters
            and not self.mutated_weights
            and not self.nonfinite_weights
            and (self.batches is None or self.batches["passed"])
        )

    @property
    def resolution(self) -> float | None:
        """Under the oracle rule, the largest per-site bound on err(cand): a difference at a site smaller
        than this fraction of the site's RMS could not have been seen."""
        limits = [s.limit for s in self.all_sites if s.limit is not None and "rule" in self.tolerance]
        return max(limits) if limits else None

    def _run_label(self) -> str:
        skipped = len(self.skipped_sites)
        inner = [n for n in self.not_exposed_sites if ".layers." in n]
        outer = [n.rsplit(".", 1)[-1] for n in self.not_exposed_sites if ".layers." not in n]
        return (
            f"{self.dtype}, {self.mode}, "
            + ("local weights" if self.weights.get("origin") == "folder" else self.weights.get("kind", "weights"))
            + (f"; {skipped} site(s) SKIPPED by --skip-site, not compared" if skipped else "")
            + (
                f"; {len(inner)} sub-layer site(s) NOT EXPOSED by the candidate, judged only through their layer's output"
                if inner
                else ""
            )
            + (f"; {', '.join(outer)} NOT EXPOSED by the candidate, not judged" if outer else "")
        )

    @property
    def verdict(self) -> str:
        n = len(self.sites) - len(self.skipped_sites) - len(self.not_exposed_sites)
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
            if all(s.exact for s in self.all_sites if s.status not in ("skipped", "not_exposed")):
                return f"PASS: all {n} sites exact ({run})"
            if "rule" in self.tolerance:
                worst = max(self.all_sites, key=lambda s: s.ratio or 0.0)
                res = self.resolution
                runtime = (
                    "; the candidate's runtime baseline accepted at "
                    + ", ".join(f"{len(b['accepted'])} {b['kind']} (×{b['rms']:.2g})" for b in self.runtime_baseline)
                    + " sites: uniform, noise-like, end to end within the bound"
                    if self.runtime_baseline
                    else ""
                )
                own = [s for s in self.all_sites if s.status != "runtime"] or self.all_sites
                worst = max(own, key=lambda s: s.ratio or 0.0)
                return (
                    f"PASS: {n} sites within the float64-oracle bound, {n_exact} exact, worst "
                    f"{fmt_ratio(worst.ratio)} transformers' own error at {worst.name}{runtime}; a difference below "
                    f"{res:.2g} of a site's RMS could not have been seen ({run})"
                )
            worst_abs = max((s.max_abs or 0.0) for s in self.all_sites)
            return f"PASS: {n} sites within tolerance (absolute rule), {n_exact} exact, worst max|Δ| {worst_abs:.3g} ({run})"
        first = self.first_failure()
        if first is None and self.batches is not None and not self.batches["passed"]:
            return f"FAIL: {self.batches['cause']}: {self.batches['detail']} ({run})"
        if first is None:
            return (
                f"FAIL: {len(self.unloaded_parameters)} candidate parameter(s) never loaded from the checkpoint: "
                f"{', '.join(self.unloaded_parameters[:3])}{', …' if len(self.unloaded_parameters) > 3 else ''} ({run})"
            )
        where = " (propagated)" if self.propagated_sites and first in self.propagated_sites else ""
        if self.compiled_sites and any(first is c for c in self.compiled_sites):
            where = " (the compiled forward)"
        if first.status == "fail":
            if first.err_cand is not None and "rule" in self.tolerance:
                detail = (
                    f"error {fmt_ratio(first.ratio)} transformers' own: err {first.err_cand:.3g} vs {first.err_ref:.3g}, "
                    f"bound {first.limit:.3g}; max|Δ| {first.max_abs:.3g}, cosine {first.cosine:.6f}"
                )
                if first.pattern:
                    detail += f"; {first.pattern['summary']}"
            else:
                detail = f"max|Δ| {first.max_abs:.3g} > {first.limit:.3g}, rel L2 {fmt_num(first.rel_l2)}, cosine {first.cosine:.6f}"
        else:
            detail = first.note or first.status
        n_bad = sum(not s.passed for s in self.sites)
        tail = f"; {n_bad}/{n} sites fail"
        if self.propagated_sites is not None:
            tail += f" isolated, {sum(not s.passed for s in self.propagated_sites)}/{n} propagated"
        if self.unloaded_parameters:
            tail += f"; {len(self.unloaded_parameters)} parameter(s) never loaded"
        cause = (self.diagnosis or {}).get("likely_cause")
        if cause:
            tail += f"; likely cause: {cause} in {self.diagnosis['site']}"
        return f"FAIL: first divergent site {first.name}{where} ({detail}){tail} ({run})"

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
                "not_exposed_sites": self.not_exposed_sites,
                "unloaded_parameters": self.unloaded_parameters,
                "mutated_weights": self.mutated_weights,
                "nonfinite_weights": self.nonfinite_weights,
                "notes": self.notes,
                "resolution": self.resolution,
                "ranges": self.ranges,
                "diagnosis": self.diagnosis,
                "batches": self.batches,
                "runtime_baseline": self.runtime_baseline,
                "amplification": self.amplification,
                "fp16_overflow_site": self.fp16_overflow_site,
                "sites": [asdict(s) for s in self.sites],
                "compiled_sites": None if self.compiled_sites is None else [asdict(s) for s in self.compiled_sites],
                "propagated_sites": None
                if self.propagated_sites is None
                else [asdict(s) for s in self.propagated_sites],
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default) + "\n"

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
        emb = next((s for s in self.sites if s.name == "vision_model.embeddings"), None)
        if (
            emb is not None
            and emb.status in ("fail", "shape", "nonfinite")
            and (first_local is None or i_acc < i_local)
        ):
            also = f"; layers also fail alone from {first_local['site']} on" if first_local is not None else ""
            return (
                f"amplification: a local error at vision_model.embeddings, before every layer (isolated "
                f"{fmt_ratio(emb.ratio)}); the layers carry it (accumulated error over layers {span} grows {growth}){also}"
            )
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

    # -- renderings (render.py) --------------------------------------------------------------------
    def table(self) -> str:
        return render.table(self)

    def to_markdown(self) -> str:
        return render.markdown(self)

    def plot(self, path: str | Path) -> None:
        """Per-site error (against the float64 oracle, or max |Δ|) and its bound, log scale (needs matplotlib)."""
        render.plot(self, path)


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
