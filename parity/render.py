"""Renderers: a report as a table (terminal), JSON, Markdown (CI job summaries) and a plot; the processor
report's too. Each takes the data object and returns text (or writes a file); none decides a verdict.

    >>> print(processor_markdown_row("wide", (3, 224, 224), 0.01, 0.5, 0.02, 1.0, True))
    | wide | 3x224x224 | 0.010 | 0.50 | 0.020/1.00 | ok |
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

from siglip_scratch.errors import InputError, OutputError

from .judge import SiteResult, fmt_num, fmt_ratio

__all__ = [
    "columns",
    "combined_json",
    "combined_markdown",
    "extras",
    "figure",
    "head",
    "markdown",
    "plot",
    "processor_markdown",
    "processor_markdown_row",
    "processor_table",
    "table",
    "weights_label",
]


def columns(report) -> tuple[list[str], list[list[str]]]:
    oracle = "rule" in report.tolerance
    first = report.first_failure()
    prop = {s.name: s for s in report.propagated_sites} if report.propagated_sites is not None else None
    if oracle and prop is not None:
        header = ["", "site", "isolated err", "×ref", "propagated err", "×ref", "max|Δ|", "result"]
    elif oracle:
        header = ["", "site", "max|Δ|", "err cand", "err ref", "×ref", "bound", "result"]
    else:
        header = ["", "site", "max|Δ|", "mean|Δ|", "rel L2", "cosine", "ref max|x|", "result"]
    rows = []
    for s in report.sites:
        p = prop.get(s.name) if prop is not None else None
        bad = [r for r in (s, p) if r is not None and not r.passed]
        mark = ">>" if first is not None and first in (s, p) else (" x" if bad else "  ")
        if s.status in ("missing", "shape", "nonfinite") and not (
            p and p.status not in ("missing", "shape", "nonfinite")
        ):
            nums = ["-"] * (len(header) - 3)
        elif oracle and p is not None:
            nums = [
                fmt_num(s.err_cand),
                fmt_ratio(s.ratio),
                fmt_num(p.err_cand),
                fmt_ratio(p.ratio),
                fmt_num(max(s.max_abs or 0.0, p.max_abs or 0.0)),
            ]
        elif oracle:
            nums = [fmt_num(s.max_abs), fmt_num(s.err_cand), fmt_num(s.err_ref), fmt_ratio(s.ratio), fmt_num(s.limit)]
        else:
            nums = [
                fmt_num(s.max_abs),
                fmt_num(s.mean_abs),
                fmt_num(s.rel_l2),
                f"{s.cosine:.7f}",
                fmt_num(s.ref_max_abs),
            ]
        rows.append([mark, s.name, *nums, _result(s, p)])
    return header, rows


def _result(s: SiteResult, p: SiteResult | None) -> str:
    def one(r: SiteResult) -> str:
        text = {"exact": "exact", "ok": "ok", "fail": "FAIL"}.get(r.status, r.status.replace("_", " ").upper())
        if r.note and r.status not in ("exact", "ok", "fail"):
            text += f" ({r.note})"
        return text

    if p is None or (one(s) == one(p)):
        return one(s)
    return f"{one(s)} isolated, {one(p)} propagated"


def head(report) -> str:
    tol = report.tolerance
    if "rule" in tol:
        rule = (
            f"judged against a float64 oracle: err ≤ {tol['k']:g}×transformers' own + {tol['floor']:g}u, "
            f"max err ≤ {tol['k_max']:g}×own + {tol['floor_max']:g}u (u = {tol['unit_roundoff']:.3g})"
        )
    else:
        rule = f"ABSOLUTE rule (--atol/--rtol given): max|Δ| ≤ {tol['atol']:g} + {tol['rtol']:g}·max|x_ref|"
    framework = report.candidate.get("framework")
    cand = (
        f"candidate {report.candidate['impl']} ({framework}, {report.candidate.get('runtime', 'unknown')})"
        if framework
        else f"candidate {report.candidate['impl']}"
        + (f" ({report.candidate['attn']})" if report.candidate.get("attn", "n/a") != "n/a" else "")
    )
    return (
        f"reference {report.reference['impl']} {report.reference['version']} ({report.reference['attn']}) vs "
        f"{cand}; "
        f"weights: {report.weights['source']} ({weights_label(report.weights)}); "
        f"{report.dtype} on {report.device}, {report.mode}; {rule}"
    )


def weights_label(weights: dict[str, Any]) -> str:
    """How a report names its weights: ``synthetic, trained regime``, ``real`` (a hub checkpoint) or, for a user's
    folder or file, what the harness knows of it.

        >>> weights_label({"synthetic": False, "kind": "real", "origin": "folder"})
        'local weights, not a hub checkpoint'
    """
    if not weights["synthetic"]:
        return "local weights, not a hub checkpoint" if weights.get("origin") == "folder" else "real"
    regime = weights.get("regime")
    return f"synthetic, {regime} regime" if regime else "synthetic"


def extras(report) -> list[str]:
    extra = list(report.notes)
    if report.compiled_sites:
        judged = ", ".join(f"{c.name} {c.status} {fmt_ratio(c.ratio)}" for c in report.compiled_sites)
        extra.append(f"torch.compile: the compiled forward, end to end: {judged}")
    if report.batches is not None and not report.batches["passed"] and report.first_failure() is not None:
        extra.append(f"also {report.batches['cause']}: {report.batches['detail']}")
    line = report.amplification_line() if not report.passed else None
    if line:
        extra.append(line)
    if report.nonfinite_weights:
        extra.append(f"weights with NaN/Inf: {', '.join(report.nonfinite_weights)}")
    if report.mutated_weights:
        extra.append(f"checkpoint tensors the candidate changed in place: {', '.join(report.mutated_weights)}")
    if report.unloaded_parameters:
        extra.append(
            "candidate parameters never loaded from the checkpoint (still at their initial value): "
            + ", ".join(report.unloaded_parameters)
        )
    if report.missing_keys:
        extra.append(f"candidate parameters not filled by the checkpoint: {', '.join(report.missing_keys)}")
    if report.unexpected_keys:
        extra.append(f"checkpoint tensors the candidate did not take: {', '.join(report.unexpected_keys)}")
    return extra


def table(report) -> str:
    header, body = columns(report)
    rows = [header, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r[:-1])]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join([head(report), *lines, *extras(report), report.verdict])


def markdown(report) -> str:
    header, body = columns(report)
    header = [h.replace("|", "\\|") for h in header]
    out = [f"### siglip-parity: {'✅' if report.passed else '❌'} {report.verdict}", "", head(report) + "."]
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in body:
        r[0] = "**→**" if r[0] == ">>" else ("✗" if r[0].strip() == "x" else "")
        r[1] = f"`{r[1]}`"
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    out += ["", *(f"- {e}" for e in extras(report))] if extras(report) else []
    if report.amplification:
        out += [
            "",
            "Amplification (per layer: its own error, isolated, beside the error carried to it, propagated):",
            "",
        ]
        out += ["| layer | local ×ref | accumulated ×ref |", "|---|---|---|"]
        for r in report.amplification:
            local = f"{fmt_num(r['local_ratio'])}{'' if r['local_passed'] else ' ✗'}"
            acc = f"{fmt_num(r['accumulated_ratio'])}{'' if r['accumulated_passed'] else ' ✗'}"
            out.append(f"| {r['site'].rsplit('.', 1)[-1]} | {local} | {acc} |")
    return "\n".join(out) + "\n"


def plot(report, path: str | Path) -> None:
    """Per-site error (against the float64 oracle, or max |Δ|) and its bound, log scale (needs matplotlib)."""
    fig = figure(report)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise OutputError(f"cannot write plot ({exc})", str(path), None) from None
    finally:
        plt.close(fig)


def figure(report) -> Any:
    """The plot's matplotlib figure: the per-site panel and, in mode both, the per-layer amplification panel.
    Legends sit outside the axes (they never cover a point), layer ticks are whole layers, the log axes label
    their decades only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise InputError(
            "--plot needs matplotlib, which is not installed", "--plot", 'pip install "siglip-scratch[plot]"'
        ) from None
    names = [s.name.replace("vision_model.", "").replace("encoder.layers.", "L") for s in report.sites]
    oracle = "rule" in report.tolerance
    floor = 1e-18
    amp = [r for r in report.amplification if r["local_ratio"] is not None and r["accumulated_ratio"] is not None]
    if amp:  # a second panel: local vs accumulated error per layer (a jump at one layer vs drift)
        fig, (ax, ax_amp) = plt.subplots(
            2, 1, figsize=(max(6, 0.25 * len(names)), 6.5), gridspec_kw={"height_ratios": [3, 2]}
        )
        layers = [int(r["site"].rsplit(".", 1)[-1]) for r in amp]
        ax_amp.plot(layers, [_plot_value(r["local_ratio"], floor) for r in amp], "o-", ms=3, label="local (isolated)")
        ax_amp.plot(
            layers,
            [_plot_value(r["accumulated_ratio"], floor) for r in amp],
            "^-",
            ms=3,
            label="accumulated (propagated)",
        )
        ax_amp.axhline(2.0, linestyle="--", linewidth=0.8, color="gray", label="rule: ×2 (+ a roundoff floor)")
        ax_amp.set_yscale("log")
        ax_amp.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10))
        ax_amp.yaxis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation(base=10))
        ax_amp.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_amp.set_xticks(layers)
        ax_amp.set_xlabel("layer")
        ax_amp.set_ylabel("× transformers' own error")
        ax_amp.set_title("\n".join(textwrap.wrap(report.amplification_line() or "amplification", 95)), fontsize=7)
        ax_amp.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
    x = range(len(names))
    series = [("isolated" if report.propagated_sites is not None else report.mode, report.sites, "o")]
    if report.propagated_sites is not None:
        series.append(("propagated", report.propagated_sites, "^"))
    for label, sites, marker in series:
        vals = [_plot_value(s.err_cand if oracle else s.max_abs, floor) for s in sites]
        colors = ["tab:red" if not s.passed else "tab:blue" for s in sites]
        ax.scatter(x, vals, c=colors, s=14, marker=marker, zorder=3, label=f"candidate, {label}")
        if oracle:
            ax.plot(x, [_plot_value(s.err_ref, floor) for s in sites], linewidth=0.8, label=f"transformers, {label}")
        ax.plot(x, [_plot_value(s.limit, floor) for s in sites], linestyle="--", linewidth=0.8, label=f"bound, {label}")
    ax.set_yscale("log")
    ax.set_xticks(list(x), names, rotation=90, fontsize=6)
    ax.set_ylabel("RMS error vs float64 oracle / RMS" if oracle else "max |Δ|")
    ax.set_title("\n".join(textwrap.wrap(report.verdict, 95)), fontsize=7)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _plot_value(x: float | None, floor: float) -> float:
    if x is None or not math.isfinite(x):
        return float("nan")
    return max(x, floor)


def processor_markdown_row(
    image: str,
    shape: tuple[int, ...],
    rms: float | None,
    mx: float | None,
    spread_rms: float,
    spread_max: float,
    ok: bool,
) -> str:
    rms_s = "—" if rms is None else f"{rms:.3f}"
    mx_s = "—" if mx is None else f"{mx:.2f}"
    return (
        f"| {image} | {'x'.join(map(str, shape))} | {rms_s} | {mx_s} | {spread_rms:.3f}/{spread_max:.2f} "
        f"| {'ok' if ok else 'FAIL'} |"
    )


def processor_table(pre: Any) -> str:
    """The processor check (`preprocess.ProcessorReport`) as a terminal table."""
    lines = [
        f"preprocessing: candidate {pre.candidate} vs {pre.reference} ({pre.backend}, chosen by {pre.backend_chosen_by})",
        f"  {'probe image':<26}{'shape':>16}{'RMS lvl':>10}{'max lvl':>10}{'pil~tv rms/max':>17}  result",
    ]
    for p in pre.probes:
        shape = "x".join(map(str, p.shape))
        rms = "—" if p.rms_levels is None else f"{p.rms_levels:.3f}"
        mx = "—" if p.max_levels is None else f"{p.max_levels:.2f}"
        lines.append(
            f"  {p.image:<26}{shape:>16}{rms:>10}{mx:>10}{p.spread_rms_levels:>9.3f}/{p.spread_max_levels:<7.2f}"
            f"  {'ok' if p.passed else 'FAIL'}"
        )
    lines.append(pre.verdict)
    return "\n".join(lines)


def processor_markdown(pre: Any) -> str:
    """The processor check (`preprocess.ProcessorReport`) as a Markdown section."""
    rows = [
        "### Preprocessing",
        "",
        f"{pre.verdict}",
        "",
        f"Judged against the {pre.backend} backend exactly (chosen by {pre.backend_chosen_by}); the last "
        "column but one is transformers' two backends against each other, for scale.",
        "",
        "| probe image | shape | RMS (levels) | max (levels) | pil vs torchvision rms/max | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in pre.probes:
        rows.append(
            processor_markdown_row(
                p.image, p.shape, p.rms_levels, p.max_levels, p.spread_rms_levels, p.spread_max_levels, p.passed
            )
        )
    return "\n".join(rows) + "\n"


def combined_json(report: Any, pre: Any | None) -> str:
    """The report's JSON, with the processor check under ``preprocessing`` (and in ``passed``) when there is one."""
    if pre is None:
        return report.to_json()
    data = json.loads(report.to_json())
    data["preprocessing"] = pre.to_dict()
    data["passed"] = data["passed"] and pre.passed
    return json.dumps(data, indent=2)


def combined_markdown(report: Any, pre: Any | None) -> str:
    return report.to_markdown() + ("\n" + processor_markdown(pre) if pre is not None else "")
