"""``make parity``: the whole parity suite on a fresh machine, offline, in a few minutes.

For base-patch16-224 and so400m-patch14-384: real weights when the local HF cache has them, else
deterministic synthetic weights at the real config (every row says which). A checkpoint that *is* in
the cache but fails to load is an error (exit 2), never a quiet synthetic PASS. Every comparison is
judged against the float64 oracle in both modes (isolated and propagated); the runs cover float32 sdpa
and eager, bfloat16, fine depth, and generated images through the image processor; then the golden
fingerprints are checked. Exit 0 only when everything passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siglip_scratch.cli_common import run
from siglip_scratch.config import NAFLEX_PRESETS
from siglip_scratch.errors import OutputError, SourceError

from .compare import compare
from .golden import GOLDEN_CASES, run_golden
from .preprocess import processor_for_source
from .reference import transformers_version
from .vlm import with_image_features
from .weights import Weights, resolve_weights

PRESETS = (
    "google/siglip-base-patch16-224",
    "google/siglip-so400m-patch14-384",
    "google/siglip2-base-patch16-224",
    "google/siglip2-base-patch16-naflex",
    # Image features (--image-features): transformers' VLM get_image_features as the reference, up to the projector.
    "google/paligemma-3b-pt-224",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
)
VLM_SUITE = ("google/paligemma-3b-pt-224", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
NAFLEX_BATCH = 3  # NaFlex runs take at least 3 images of different aspect ratios: a padded batch of 3 grids
# preset -> runs of (dtype, attn, mode, depth, use generated images); "both" = isolated and
# propagated in one run. so400m-384 costs ~50 s a run on 2 cores (two float64 oracle passes), so it
# gets the one float32 run and base-224 covers the other dtypes, depths and inputs.
RUNS = {
    "google/siglip-base-patch16-224": (
        ("float32", "sdpa", "both", "fine", False),
        ("float32", "eager", "both", "coarse", False),
        ("float32", "sdpa", "both", "coarse", True),
        ("bfloat16", "sdpa", "both", "fine", False),
        ("float16", "sdpa", "both", "fine", False),
    ),
    "google/siglip-so400m-patch14-384": (("float32", "sdpa", "both", "fine", False),),
    # SigLIP 2 fixed resolution: the same architecture; the run feeds images through its bilinear processor.
    "google/siglip2-base-patch16-224": (("float32", "sdpa", "both", "coarse", True),),
    # SigLIP 2 NaFlex: transformers.Siglip2VisionModel as the reference, padding rows not measured.
    "google/siglip2-base-patch16-naflex": (("float32", "sdpa", "both", "fine", False),),
    # so400m towers (27 and 26 layers): one coarse float32 run each (~40 s and ~80 s on 2 cores).
    "google/paligemma-3b-pt-224": (("float32", "sdpa", "both", "coarse", False),),
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": (("float32", "sdpa", "both", "coarse", False),),
}
DEFAULT_RUNS = RUNS["google/siglip-base-patch16-224"]


def generated_images(folder: Path) -> list[Path]:
    """Three images in different sizes and modes, written as PNG/JPEG (no downloads)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:400]
    gradient = np.stack([x * 255 // 399, y * 255 // 299, (x + y) * 255 // 698], -1).astype(np.uint8)
    paths = [folder / "gradient.png", folder / "noise.jpg", folder / "palette.png"]
    Image.fromarray(gradient).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (180, 120, 3), dtype=np.uint8)).save(paths[1], quality=90)
    Image.fromarray(gradient).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(paths[2])
    return paths


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local HF cache holds this repo's config (then its weights must load)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_weights(preset: str, dtype: str, seed: int) -> Weights:
    """Real weights when the cache has the repo, else synthetic ones at its config. A cached repo that
    fails to load raises: a broken cache entry must never turn into a synthetic PASS."""
    if not in_hub_cache(preset):
        return resolve_weights(preset=preset, seed=seed, dtype=dtype)
    try:
        return resolve_weights(model=preset, dtype=dtype)
    except SourceError as exc:
        raise SourceError(
            f"{preset} is in the HF cache but does not load ({exc})",
            "make parity",
            "repair or delete the cache entry (huggingface-cli delete-cache), then rerun",
        ) from None
    except Exception as exc:
        raise SourceError(
            f"{preset} is in the HF cache but does not load ({type(exc).__name__}: {exc})".splitlines()[0],
            "make parity",
            "repair or delete the cache entry (huggingface-cli delete-cache), then rerun",
        ) from None


COLUMNS = (
    ("preset", 27),
    ("weights", 9),
    ("dtype", 8),
    ("attn", 5),
    ("mode", 11),
    ("inputs", 9),
    ("bit-exact", 9),
    ("worst ×ref", 10),
    ("time", 6),
    ("verdict", 0),
)


def _row(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m siglip_scratch.parity.suite", description=__doc__)
    p.add_argument(
        "--presets", nargs="+", default=list(PRESETS), help=f"hub ids to run (default: {', '.join(PRESETS)})"
    )
    p.add_argument("--batch", type=int, default=1, help="random images per comparison (default 1)")
    p.add_argument(
        "--out",
        default="parity-report",
        metavar="DIR",
        help="where the reports go: suite.json (every comparison's full report) and suite.md (default parity-report)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a first look: one float32 comparison of base-224 (seconds), then its golden fingerprint",
    )
    p.add_argument("--progress", action="store_true", help="progress lines (the default; kept for scripts)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines (default: on stderr, a line as each comparison starts with an ETA, and one per site "
        "group as it finishes, at least every 10 s, on a terminal and in a pipe alike)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return run(_main, p.parse_args(argv))


def _cost(preset: str, depth: str) -> float:
    """A comparison's relative cost: layers x patches x width^2 (the GEMMs), a fifth more at fine depth."""
    from siglip_scratch.config import get_preset

    c = get_preset(preset)
    images = NAFLEX_BATCH if preset in NAFLEX_PRESETS else 1
    return images * c.num_hidden_layers * c.num_patches * c.hidden_size**2 * (1.2 if depth == "fine" else 1.0)


def _main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder", str(out_dir), "give --out a folder path")
    failed = False
    reports: list[tuple[str, Any]] = []
    labels: list[str] = []  # one per report: dtype, attention, mode/depth, inputs (unique headings)
    golden_results: list[dict[str, Any]] = []
    kinds: dict[str, str] = {}
    n_rows = 0
    t_start = time.perf_counter()
    print(
        "siglip-parity suite: reference transformers.SiglipVisionModel (Siglip2VisionModel for NaFlex; the VLM's own "
        "get_image_features for image features), candidate siglip_scratch, "
        "each site judged against a float64 oracle, isolated and propagated",
        flush=True,
    )
    print(_row([name for name, _ in COLUMNS]), flush=True)
    print("-" * 113, flush=True)
    show = not args.quiet
    say = _Progress(t_start) if show else None
    presets = ["google/siglip-base-patch16-224"] if args.quick else args.presets
    runs_for = (lambda p: RUNS[p][:1]) if args.quick else (lambda p: RUNS.get(p, DEFAULT_RUNS))
    plan = [(p, r) for p in presets for r in runs_for(p)]
    total_cost = sum(_cost(p, r[3]) for p, r in plan)
    done_cost, t_runs = 0.0, None

    def announce(preset: str, run: tuple) -> None:
        """``[  40s] 3/6 base-224 float32 eager both/coarse (ETA 70s)``: the ETA scales the time spent
        so far by the cost left (see `_cost`), so it is calibrated on this machine by the runs done."""
        nonlocal t_runs
        if t_runs is None:
            t_runs = time.perf_counter()
        if not show:
            return
        spent = time.perf_counter() - t_runs
        eta = f" (ETA {spent * (total_cost - done_cost) / done_cost:.0f}s)" if done_cost else ""
        k = n_rows + 1
        assert say is not None
        say(
            f"{k}/{len(plan)} {preset.split('/')[-1]} {run[0]} {run[1]} "
            f"{run[2]}/{run[3]}{' images' if run[4] else ''}{eta}",
            indent="",
        )

    try:
        with tempfile.TemporaryDirectory(prefix="siglip-parity-") as tmp:
            images = [str(p) for p in generated_images(Path(tmp))]
            for preset in presets:
                runs = runs_for(preset)
                for dtype in dict.fromkeys(r[0] for r in runs):
                    if say is not None:
                        say(f"weights for {preset.split('/')[-1]} in {dtype}")
                    weights = load_weights(preset, dtype, seed=0)
                    if preset in VLM_SUITE:  # its projector too: read from the cached VLM, or drawn at its shapes
                        weights = with_image_features(weights, preset=preset, seed=0)
                    kind = "synthetic" if weights.synthetic else "real"
                    kinds[preset] = f"{kind} ({weights.source})"
                    for run_dtype, attn, mode, depth, use_images in runs:
                        if run_dtype != dtype:
                            continue
                        announce(preset, (run_dtype, attn, mode, depth, use_images))
                        t0 = time.perf_counter()
                        report = compare(
                            weights=weights,
                            progress=say,
                            mode=mode,
                            depth=depth,
                            dtype=dtype,
                            attn=attn,
                            images=images if use_images else None,
                            batch=max(args.batch, NAFLEX_BATCH) if preset in NAFLEX_PRESETS else args.batch,
                            processor=(
                                processor_for_source(**({"preset": preset} if weights.synthetic else {"model": preset}))
                                if use_images
                                else None
                            ),
                        )
                        failed |= not report.passed
                        reports.append((preset, report))
                        label = (
                            ("image features, " if preset in VLM_SUITE else "")
                            + f"{dtype}, {attn}, {mode}/{depth}, "
                            + ("generated images" if use_images else f"random×{report.inputs['batch']}")
                        )
                        ratios = [s.ratio for s in report.all_sites if s.ratio is not None]
                        worst = max(ratios) if ratios else float("nan")
                        n_exact = sum(s.exact for s in report.sites)
                        labels.append(label)
                        cells = [
                            preset.split("/")[-1],
                            kind,
                            dtype,
                            attn,
                            f"{mode}/{depth}",
                            "images" if use_images else f"random×{report.inputs['batch']}",
                            f"{n_exact}/{len(report.sites)}",
                            f"×{worst:.3g}",
                            f"{time.perf_counter() - t0:.0f}s",
                            "PASS" if report.passed else f"FAIL at {report.first_divergent_site}",
                        ]
                        print(_row(cells), flush=True)
                        n_rows += 1
                        done_cost += _cost(preset, depth)
                        if not report.passed:
                            print(report.table(), flush=True)
                    del weights
            golden = [p for p in presets if p in GOLDEN_CASES]
            if golden and say is not None:
                say(f"golden fingerprints of {', '.join(golden)}")
            golden_ok = run_golden(golden, update=False, results=golden_results) if golden else True
    finally:
        if say is not None:
            say.close()
    ok = not failed and golden_ok
    total = time.perf_counter() - t_start
    _write_reports(out_dir, reports, labels, golden_results, ok)

    print(
        f"\n{'PASS' if ok else 'FAIL'}: {n_rows} comparisons ({'all pass' if not failed else 'some FAIL'}), "
        + (f"golden fingerprints {'hold' if golden_ok else 'MOVED'}, " if golden else "")
        + f"{total:.0f}s"
    )
    for preset, kind in kinds.items():
        print(f"  {preset}: {kind} weights")
    print(
        f"  reference transformers {transformers_version()}, torch {torch.__version__}; "
        f"dtypes {', '.join(dict.fromkeys(r.dtype for _, r in reports))}; "
        f"modes {' + '.join(dict.fromkeys(m for _, r in reports for m in _modes(r.mode)))}; "
        "'worst ×ref' = the candidate's error against the float64 oracle over transformers' own, worst site"
    )
    print(f"  reports: {out_dir / 'suite.json'} (every comparison in full), {out_dir / 'suite.md'}")
    return 0 if ok else 1


def _modes(mode: str) -> tuple[str, ...]:
    return ("isolated", "propagated") if mode == "both" else (mode,)


class _Progress:
    """Timestamped lines on stderr, and a heartbeat: when nothing was said for `QUIET` seconds (a so400m weight
    draw, a golden fingerprint), a line says what it is still doing, so a CI log is never silent for 10 s."""

    QUIET = 8.0

    def __init__(self, t_start: float):
        self.t_start, self.last, self.doing = t_start, time.perf_counter(), "starting"
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()

    def __call__(self, line: str, indent: str = "  ") -> None:
        with self.lock:
            print(f"[{time.perf_counter() - self.t_start:5.0f}s] {indent}{line}", file=sys.stderr, flush=True)
            self.last, self.doing = time.perf_counter(), line

    def _beat(self) -> None:
        while not self.stopped.wait(1.0):
            with self.lock:
                now = time.perf_counter()
                if now - self.last >= self.QUIET:
                    print(f"[{now - self.t_start:5.0f}s]   … still at: {self.doing}", file=sys.stderr, flush=True)
                    self.last = now


def _write_reports(
    out_dir: Path, reports: list[tuple[str, Any]], labels: list[str], golden: list[dict[str, Any]], ok: bool
) -> None:
    import json

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        runs = [
            {"preset": preset, "run": label, "report": json.loads(r.to_json())}
            for (preset, r), label in zip(reports, labels, strict=True)
        ]
        doc = {"passed": ok, "runs": runs, "golden": golden}
        (out_dir / "suite.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        md = [f"# make parity: {'PASS' if ok else 'FAIL'}", ""]
        md += [f"## {preset}: {label}\n\n{r.to_markdown()}" for (preset, r), label in zip(reports, labels, strict=True)]
        if golden:
            md += ["## Golden fingerprints", ""] + [f"- {g['summary']}" for g in golden] + [""]
        (out_dir / "suite.md").write_text("\n".join(md), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write the reports ({exc.strerror})", str(out_dir), "check the path") from None


if __name__ == "__main__":
    sys.exit(main())
