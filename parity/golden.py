"""Golden fingerprints: has the *reference* moved?

For each preset in `GOLDEN_CASES`, ``parity/golden/<preset>.json`` holds statistics of
transformers' float32 CPU output at every coarse site, for synthetic weights and pixels at pinned
seeds: the shape, the sum, max |x| and 32 values at fixed positions (stored as float hex, exact); all
of them are compared.
``siglip-parity --check-golden`` recomputes them; a drift above ``GOLDEN_RTOL`` of the site's scale
means a torch or transformers upgrade changed the numbers, which is what a CI gate must catch.
``--update-golden`` rewrites the files deliberately.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.config import get_preset
from siglip_scratch.errors import InputError
from siglip_scratch.modeling import synthetic_state_dict

from .inputs import make_pixels
from .reference import build_reference, canonical_name, reference_prefix, transformers_version
from .sites import hooks, named_sites, site_names

__all__ = ["GOLDEN_CASES", "GOLDEN_DIR", "GOLDEN_RTOL", "fingerprint", "run_golden"]

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_CASES: dict[str, dict[str, int]] = {
    "google/siglip-base-patch16-224": {"weights_seed": 0, "pixel_seed": 0, "batch": 2},
    "google/siglip-so400m-patch14-384": {"weights_seed": 0, "pixel_seed": 0, "batch": 1},
}
# float32 noise between CPU kernels (AVX2 vs AVX-512) is ~1e-7 of scale; a real change is larger.
GOLDEN_RTOL = 1e-5
N_SAMPLES = 32


def golden_path(preset: str) -> Path:
    return GOLDEN_DIR / (preset.replace("/", "--") + ".json")


def fingerprint(preset: str) -> dict[str, Any]:
    """Run the reference (float32, sdpa, CPU) at the preset's pinned seeds and summarise each site."""
    case = GOLDEN_CASES[preset]
    config = get_preset(preset)
    state = synthetic_state_dict(config, seed=case["weights_seed"])
    reference = build_reference(config, state, attn_implementation="sdpa")
    names = site_names(config, "coarse")
    prefix = reference_prefix(reference)
    sites = named_sites(reference, lambda n: canonical_name(n, prefix), names)
    out: dict[str, dict[str, Any]] = {}

    def record(site: str, output: Any) -> None:
        t = output[0] if isinstance(output, tuple) else output
        flat = t.detach().double().flatten()
        idx = torch.linspace(0, flat.numel() - 1, N_SAMPLES).round().long()
        out[site] = {
            "shape": list(t.shape),
            "sum": flat.sum().item(),
            "max_abs": flat.abs().max().item(),
            "samples": [float(v).hex() for v in t.detach().float().flatten()[idx].tolist()],
        }

    pixels = make_pixels(config, batch=case["batch"], seed=case["pixel_seed"])
    with torch.inference_mode(), hooks(sites, on_output=record):
        reference(pixels)
    return {
        "preset": preset,
        "case": case,
        "recorded_with": {
            "torch": torch.__version__,
            "transformers": transformers_version(),
            "machine": platform.machine(),
        },
        "rtol": GOLDEN_RTOL,
        "sites": out,
    }


def compare_fingerprints(golden: dict[str, Any], current: dict[str, Any]) -> tuple[bool, list[str]]:
    lines = []
    ok = True
    for site, g in golden["sites"].items():
        c = current["sites"].get(site)
        if c is None:
            lines.append(f"  {site}: missing from the current reference")
            ok = False
            continue
        if c["shape"] != g["shape"]:
            lines.append(f"  {site}: shape {c['shape']} vs golden {g['shape']}")
            ok = False
            continue
        gs = [float.fromhex(v) for v in g["samples"]]
        cs = [float.fromhex(v) for v in c["samples"]]
        drift = max(abs(a - b) for a, b in zip(gs, cs, strict=True))
        limit = GOLDEN_RTOL * g["max_abs"]
        # Every recorded statistic is compared, each with the bound the per-element limit implies:
        # max|x| moves by at most `limit` (it is 1-Lipschitz), the sum by at most numel · limit.
        numel = math.prod(g["shape"])
        stats = {
            "max|x|": (abs(c["max_abs"] - g["max_abs"]), limit),
            "sum": (abs(c["sum"] - g["sum"]), limit * numel),
        }
        moved = [f"{k} drift {d:.3e} > {lim:.3e}" for k, (d, lim) in stats.items() if not d <= lim]
        same = gs == cs and c["max_abs"] == g["max_abs"] and c["sum"] == g["sum"]
        status = "exact" if same else ("ok" if drift <= limit and not moved else "MOVED")
        ok &= status != "MOVED"
        extra = f"; {', '.join(moved)}" if moved else ""
        lines.append(f"  {site:40s} max drift {drift:.3e} (limit {limit:.3e}){extra}  {status}")
    return ok, lines


def run_golden(presets: list[str] | None, *, update: bool, results: list[dict[str, Any]] | None = None) -> bool:
    """Check (or rewrite) the golden fingerprints; prints one block per preset. True when all hold. ``results``,
    when given, receives one dict per preset (for the suite's JSON and Markdown reports)."""
    presets = presets or list(GOLDEN_CASES)
    unknown = [p for p in presets if p not in GOLDEN_CASES]
    if unknown:
        raise InputError(f"no golden case for {unknown}", "--preset", f"golden presets: {', '.join(GOLDEN_CASES)}")
    all_ok = True
    for preset in presets:
        current = fingerprint(preset)
        path = golden_path(preset)
        if update:
            GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")
            print(f"golden {preset}: rewritten ({path})")
            continue
        if not path.is_file():
            raise InputError(f"no golden file for {preset}", str(path), "run siglip-parity --update-golden")
        golden = json.loads(path.read_text(encoding="utf-8"))
        ok, lines = compare_fingerprints(golden, current)
        rec, now = golden["recorded_with"], current["recorded_with"]
        n_exact = sum(line.endswith("exact") for line in lines)
        # "bit-identical" is a bonus: across torch/transformers versions the reference may round differently
        # and still hold (every site within its drift limit).
        summary = (
            f"golden {preset}: {'holds' if ok else 'MOVED'} ({len(lines)} sites within their drift limit, "
            f"{n_exact} of them bit-identical)"
            if ok
            else f"golden {preset}: MOVED ({sum(line.endswith('MOVED') for line in lines)} of {len(lines)} sites "
            "beyond their drift limit)"
        )
        summary += (
            f"; recorded with torch {rec['torch']}, transformers {rec['transformers']}; now torch {now['torch']}, "
            f"transformers {now['transformers']}"
        )
        print(summary)
        shown = [line for line in lines if not line.endswith("exact")]
        if shown:
            print("\n".join(shown))
        if results is not None:
            results.append(
                {
                    "preset": preset,
                    "holds": ok,
                    "summary": summary,
                    "sites": len(lines),
                    "bit_identical": n_exact,
                    "recorded_with": rec,
                    "now": now,
                    "lines": [line.strip() for line in lines],
                }
            )
        all_ok &= ok
    return all_ok
