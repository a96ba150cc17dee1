"""Per-site metrics, the pass rule, and the report in its four forms (table, JSON, Markdown, plot).

JSON schema (stable; fields are only ever added)::

    {"passed": bool, "verdict": str,
     "reference": {"impl", "version", "attn"}, "candidate": {"impl", "version", "attn", "loaded_via"},
     "weights": {"source", "synthetic"}, "dtype", "device", "mode", "depth",
     "tolerance": {"atol", "rtol"}, "inputs": {"batch", "images", "seed", "height", "width"},
     "first_divergent_site": str | null, "missing_keys": [..], "unexpected_keys": [..], "missing_sites": [..],
     "sites": [{"name", "max_abs", "mean_abs", "rel_l2", "cosine", "ref_max_abs", "passed",
                "exact", "status", "note"}]}

``status`` is one of ``exact``, ``ok``, ``fail``, ``missing``, ``shape``, ``nonfinite``. A site passes
when ``max_abs <= atol + rtol * ref_max_abs`` and both sides are finite.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.errors import InputError, OutputError

__all__ = ["DEFAULT_TOLERANCES", "Report", "SiteResult", "measure"]

# Calibrated from measurements recorded in docs/PARITY.md (noise floor of correct but differently
# ordered implementations, and the smallest planted bug they must still catch).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    # dtype: (atol, rtol)
    "float32": (1e-5, 5e-6),
    "bfloat16": (1e-2, 5e-2),
    "float16": (1e-3, 6e-3),
}


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


def measure(name: str, candidate: torch.Tensor, reference: torch.Tensor, atol: float, rtol: float) -> SiteResult:
    """Compare one site. Differences are computed in float64 on the reference's device."""
    if tuple(candidate.shape) != tuple(reference.shape):
        return SiteResult(
            name,
            status="shape",
            note=f"shape {list(candidate.shape)} vs reference {list(reference.shape)}",
        )
    a = candidate.detach().to(device=reference.device, dtype=torch.float64)
    b = reference.detach().to(torch.float64)
    ref_max = b.abs().max().item() if b.numel() else 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        bad = "candidate" if not torch.isfinite(a).all() else "reference"
        return SiteResult(name, ref_max_abs=ref_max, status="nonfinite", note=f"{bad} has NaN/Inf values")
    exact = torch.equal(candidate.detach().to(reference.device), reference.detach())
    d = (a - b).abs()
    max_abs = d.max().item() if d.numel() else 0.0
    mean_abs = d.mean().item() if d.numel() else 0.0
    norm_b = b.norm().item()
    rel_l2 = (a - b).norm().item() / norm_b if norm_b > 0 else (0.0 if max_abs == 0 else None)
    denom = a.norm().item() * norm_b
    cosine = (a.flatten() @ b.flatten()).item() / denom if denom > 0 else (1.0 if exact else 0.0)
    passed = exact or max_abs <= atol + rtol * ref_max
    status = "exact" if exact else ("ok" if passed else "fail")
    return SiteResult(name, max_abs, mean_abs, rel_l2, cosine, ref_max, passed, exact, status)


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
    tolerance: dict[str, float]
    inputs: dict[str, Any]
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def missing_sites(self) -> list[str]:
        return [s.name for s in self.sites if s.status == "missing"]

    @property
    def first_divergent_site(self) -> str | None:
        return next((s.name for s in self.sites if not s.passed), None)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.sites) and not self.missing_keys

    @property
    def verdict(self) -> str:
        n = len(self.sites)
        run = f"{self.dtype}, {self.mode}, {self.weights.get('kind', 'weights')}"
        if self.passed:
            n_exact = sum(s.exact for s in self.sites)
            worst = max((s.max_abs or 0.0) for s in self.sites) if self.sites else 0.0
            if n_exact == n:
                return f"PASS: all {n} sites exact ({run})"
            return f"PASS: {n} sites within tolerance, {n_exact} exact, worst max|Δ| {worst:.3g} ({run})"
        first = next(s for s in self.sites if not s.passed) if self.first_divergent_site else None
        if first is None:
            return f"FAIL: candidate has {len(self.missing_keys)} parameter(s) the checkpoint does not fill ({run})"
        if first.status == "fail":
            limit = self.tolerance["atol"] + self.tolerance["rtol"] * (first.ref_max_abs or 0.0)
            detail = f"max|Δ| {first.max_abs:.3g} > {limit:.3g}, rel L2 {_g(first.rel_l2)}, cosine {first.cosine:.6f}"
        else:
            detail = first.note or first.status
        n_bad = sum(not s.passed for s in self.sites)
        return f"FAIL: first divergent site {first.name} ({detail}); {n_bad}/{n} sites fail ({run})"

    # -- renderings ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
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
            "sites": [asdict(s) for s in self.sites],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default) + "\n"

    def _rows(self) -> list[list[str]]:
        first = self.first_divergent_site
        rows = []
        for s in self.sites:
            mark = ">>" if s.name == first else ("  " if s.passed else " x")
            if s.status in ("missing", "shape", "nonfinite"):
                nums = ["-"] * 5
            else:
                nums = [_g(s.max_abs), _g(s.mean_abs), _g(s.rel_l2), f"{s.cosine:.7f}", _g(s.ref_max_abs)]
            result = {"exact": "exact", "ok": "ok", "fail": "FAIL"}.get(s.status, s.status.upper())
            if s.note and s.status not in ("exact", "ok", "fail"):
                result += f" ({s.note})"
            rows.append([mark, s.name, *nums, result])
        return rows

    def table(self) -> str:
        header = ["", "site", "max|Δ|", "mean|Δ|", "rel L2", "cosine", "ref max|x|", "result"]
        rows = [header, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = []
        for r in rows:
            cells = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r[:-1])]
            lines.append("  ".join([*cells, r[-1]]).rstrip())
        lines.insert(1, "-" * max(len(line) for line in lines))
        head = (
            f"reference {self.reference['impl']} {self.reference['version']} ({self.reference['attn']}) vs "
            f"candidate {self.candidate['impl']} ({self.candidate.get('attn', 'n/a')}); "
            f"weights: {self.weights['source']} ({'synthetic' if self.weights['synthetic'] else 'real'}); "
            f"{self.dtype} on {self.device}, {self.mode}, tolerance atol {self.tolerance['atol']:g} "
            f"rtol {self.tolerance['rtol']:g}"
        )
        extra = []
        if self.missing_keys:
            extra.append(f"candidate parameters not filled by the checkpoint: {', '.join(self.missing_keys)}")
        if self.unexpected_keys:
            extra.append(f"checkpoint tensors the candidate did not take: {', '.join(self.unexpected_keys)}")
        return "\n".join([head, *lines, *extra, self.verdict])

    def to_markdown(self) -> str:
        header = ["", "site", "max\\|Δ\\|", "mean\\|Δ\\|", "rel L2", "cosine", "ref max\\|x\\|", "result"]
        out = [f"### siglip-parity: {'✅' if self.passed else '❌'} {self.verdict}", ""]
        out.append(
            f"Reference `{self.reference['impl']} {self.reference['version']}` ({self.reference['attn']}), "
            f"candidate `{self.candidate['impl']}`, weights `{self.weights['source']}` "
            f"({'synthetic' if self.weights['synthetic'] else 'real'}), `{self.dtype}` on `{self.device}`, "
            f"{self.mode}, atol {self.tolerance['atol']:g}, rtol {self.tolerance['rtol']:g}."
        )
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self._rows():
            r[0] = "**→**" if r[0] == ">>" else ("✗" if r[0].strip() == "x" else "")
            r[1] = f"`{r[1]}`"
            out.append("| " + " | ".join(r) + " |")
        if self.missing_keys:
            out += ["", "Candidate parameters not filled: " + ", ".join(f"`{k}`" for k in self.missing_keys)]
        if self.unexpected_keys:
            out += ["", "Checkpoint tensors not taken: " + ", ".join(f"`{k}`" for k in self.unexpected_keys)]
        return "\n".join(out) + "\n"

    def plot(self, path: str | Path) -> None:
        """Per-site max |Δ| and the tolerance on a log scale (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise InputError(
                "--plot needs matplotlib, which is not installed", "--plot", 'pip install "siglip-scratch[plot]"'
            ) from None
        names = [s.name.replace("vision_model.", "").replace("encoder.layers.", "L") for s in self.sites]
        floor = 1e-12
        values = [max(s.max_abs, floor) if s.max_abs is not None else float("nan") for s in self.sites]
        limits = [self.tolerance["atol"] + self.tolerance["rtol"] * (s.ref_max_abs or 0.0) for s in self.sites]
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
        colors = ["tab:red" if not s.passed else "tab:blue" for s in self.sites]
        ax.scatter(range(len(names)), values, c=colors, s=14, zorder=3, label="max |Δ| (exact plotted at 1e-12)")
        ax.plot(range(len(names)), limits, color="gray", linestyle="--", label="tolerance")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylabel("max |Δ|")
        ax.set_title("\n".join(textwrap.wrap(self.verdict, 110)), fontsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            fig.savefig(path, dpi=120)
        except OSError as exc:
            raise OutputError(f"cannot write plot ({exc})", str(path), None) from None
        finally:
            plt.close(fig)


def _g(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3e}"


def _json_default(obj: object) -> object:
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
