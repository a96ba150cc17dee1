"""``make parity``: the whole parity suite on a fresh machine, offline, in a few minutes.

For base-patch16-224 and so400m-patch14-384: real weights when the local HF cache has them, else
deterministic synthetic weights at the real config (the table says which). Runs float32 sdpa and
eager, bfloat16, propagated and isolated, plus generated images through the image processor, then
checks the golden fingerprints. Exit 0 only when everything passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from siglip_scratch.errors import SiglipScratchError

from .compare import Weights, compare, resolve_weights
from .golden import run_golden

PRESETS = ("google/siglip-base-patch16-224", "google/siglip-so400m-patch14-384")
# (dtype, attn, mode, depth, use generated images)
RUNS = (
    ("float32", "sdpa", "propagated", "coarse", False),
    ("float32", "sdpa", "isolated", "fine", False),
    ("float32", "eager", "propagated", "coarse", False),
    ("float32", "sdpa", "propagated", "coarse", True),
    ("bfloat16", "sdpa", "propagated", "coarse", False),
    ("bfloat16", "sdpa", "isolated", "coarse", False),
)


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


def load_weights(preset: str, dtype: str, batch_seed: int) -> Weights:
    try:
        return resolve_weights(model=preset, dtype=dtype)
    except SiglipScratchError:
        return resolve_weights(preset=preset, seed=batch_seed, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m siglip_scratch.parity.suite", description=__doc__)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    failed = False
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="siglip-parity-") as tmp:
        images = [str(p) for p in generated_images(Path(tmp))]
        for preset in args.presets:
            for dtype in ("float32", "bfloat16"):
                weights = load_weights(preset, dtype, batch_seed=0)
                kind = "synthetic" if weights.synthetic else "real"
                if dtype == "float32":
                    print(f"{preset}: {kind} weights from {weights.source}", flush=True)
                for run_dtype, attn, mode, depth, use_images in RUNS:
                    if run_dtype != dtype:
                        continue
                    t0 = time.perf_counter()
                    report = compare(
                        weights=weights,
                        mode=mode,
                        depth=depth,
                        dtype=dtype,
                        attn=attn,
                        images=images if use_images else None,
                        batch=args.batch,
                    )
                    failed |= not report.passed
                    if not report.passed:
                        print(report.table(), flush=True)
                    worst = max((s.max_abs or 0.0) for s in report.sites)
                    n_exact = sum(s.exact for s in report.sites)
                    rows.append(
                        [
                            preset.split("/")[-1],
                            kind,
                            dtype,
                            attn,
                            f"{mode}/{depth}",
                            "images" if use_images else f"random x{args.batch}",
                            f"{n_exact}/{len(report.sites)}",
                            "0" if worst == 0 else f"{worst:.2e}",
                            "PASS" if report.passed else f"FAIL at {report.first_divergent_site}",
                            f"{time.perf_counter() - t0:.1f}s",
                        ]
                    )
                    print("  " + "  ".join(rows[-1]), flush=True)
                del weights
        print()
        golden_ok = run_golden([p for p in args.presets if p in PRESETS], update=False)
    header = ["preset", "weights", "dtype", "attn", "mode", "inputs", "exact", "worst max|Δ|", "verdict", "time"]
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print("\nsiglip-parity suite (reference: transformers.SiglipVisionModel; candidate: siglip_scratch)")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    ok = not failed and golden_ok
    total = time.perf_counter() - t_start
    print(
        f"\n{'PASS' if ok else 'FAIL'}: {len(rows)} comparisons, golden fingerprints "
        f"{'hold' if golden_ok else 'MOVED'} ({total:.0f}s)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
