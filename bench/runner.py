"""``make bench`` / ``python -m siglip_scratch.bench``: ours against the competitors, side by side.

Only ratios measured in one run are meaningful on a shared machine (absolute times drift ±10 %),
so every comparison interleaves its competitors (A/B/A/B…) and reports the median of the timed
runs after warm-up. Sections:

- ``encoder``: images/s for ours, transformers sdpa and eager (and timm where it imports), base-224
  at batch 1/8/32 and so400m-224 at batch 1/8, float32 and bfloat16; achieved GFLOP/s (counted,
  see `flops_per_image`) over ``torch.mm`` GFLOP/s measured in the same run; construction from a
  checkpoint against ``transformers…from_pretrained``. On CUDA also bf16/fp16 at 1/32/256, with
  and without ``torch.compile``, and MFU against the measured bf16 matmul peak.
- ``parity``: wall time and peak RSS of ``siglip-parity`` against loading one transformers model
  and running its two forwards, each a whole process.
- ``convert``: wall time and peak RSS of ``siglip-convert`` on a synthetic full so400m-384
  SiglipModel (3.5 GB) against ``cp`` of the output bytes and the transformers route.

``--quick`` runs a tiny config in seconds (a CI smoke test; it asserts nothing about speed).
Results go to ``<out>/bench.json`` and ``<out>/bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.config import TINY_CONFIG, SiglipVisionConfig, get_preset
from siglip_scratch.modeling import SiglipVisionModel, synthetic_state_dict

__all__ = ["flops_per_image", "main"]

BASE, SO400M, SO400M_384 = (
    "google/siglip-base-patch16-224",
    "google/siglip-so400m-patch14-224",
    "google/siglip-so400m-patch14-384",
)
TINY = TINY_CONFIG


def flops_per_image(cfg: SiglipVisionConfig) -> float:
    """Multiply-adds x 2 of one forward: patch conv, per layer q/k/v/out + attention + MLP, MAP head."""
    n, d, i = cfg.num_patches, cfg.hidden_size, cfg.intermediate_size
    patch = 2 * n * d * cfg.num_channels * cfg.patch_size**2
    layer = 2 * 4 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * i
    head = 0
    if cfg.vision_use_head:  # one probe token: q and out on 1 token, k/v on n tokens, attention, MLP
        head = 2 * 2 * d * d + 2 * 2 * n * d * d + 2 * 2 * n * d + 2 * 2 * d * i
    return patch + cfg.num_hidden_layers * layer + head


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 1, sync=lambda: None) -> dict[str, float]:
    """Median seconds per call of each function, interleaved (A/B/C, B/C/A, …) after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(runs):
        # Rotate the order each round so no competitor always follows the same neighbour.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(_timed(fns[name], sync))
    return {k: statistics.median(v) for k, v in samples.items()}


def mm_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, runs: int = 7) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = interleaved({"mm": lambda: torch.mm(a, b)}, runs=runs, warmup=2, sync=sync)["mm"]
    return 2 * n**3 / t / 1e9


def _timm_available() -> str | None:
    try:
        import timm  # noqa: F401
    except Exception as exc:  # timm fails in many ways without torchvision; any failure means "absent"
        return f"timm does not import here ({type(exc).__name__}); run `make compat` where it does"
    return None


# -- encoder ---------------------------------------------------------------------------------------------------
def bench_encoder(quick: bool, runs: int) -> dict[str, Any]:
    from siglip_scratch.parity.reference import build_reference

    plan = (
        [("tiny", TINY, [1, 2])]
        if quick
        else [(BASE, get_preset(BASE), [1, 8, 32]), (SO400M, get_preset(SO400M), [1, 8])]
    )
    rows = []
    for name, cfg, batches in plan:
        for dtype in (torch.float32, torch.bfloat16):
            state = synthetic_state_dict(cfg, dtype=dtype)
            impls: dict[str, torch.nn.Module] = {
                "ours": SiglipVisionModel.from_state_dict(cfg, state),
                "transformers_sdpa": build_reference(cfg, state, attn_implementation="sdpa"),
                "transformers_eager": build_reference(cfg, state, attn_implementation="eager"),
            }
            a = torch.randn(2048, 2048).to(dtype)
            b = torch.randn(2048, 2048).to(dtype)
            for batch in batches:
                x = torch.rand(batch, 3, cfg.image_size, cfg.image_size).to(dtype)
                fns = {k: (lambda m=m, x=x: m(x)) for k, m in impls.items()}
                fns["mm"] = lambda a=a, b=b: torch.mm(a, b)  # the roofline, timed in the same rounds
                with torch.inference_mode():
                    t = interleaved(fns, runs=runs)
                peak = 2 * 2048**3 / t.pop("mm") / 1e9
                flops = flops_per_image(cfg) * batch
                row = {"model": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "mm_gflops": peak}
                for k, sec in t.items():
                    row[f"{k}_img_s"] = batch / sec
                    row[f"{k}_roofline"] = flops / sec / 1e9 / peak
                row["ours_vs_sdpa"] = t["transformers_sdpa"] / t["ours"]
                rows.append(row)
                print(_fmt_encoder_row(row), flush=True)
            del impls, state
    return {"rows": rows, "timm": _timm_available() or "imported", "construction": bench_construction(quick, runs)}


def _fmt_encoder_row(r: dict[str, Any]) -> str:
    return (
        f"  {r['model']:34s} {r['dtype']:8s} b{r['batch']:<3d} ours {r['ours_img_s']:7.2f} img/s "
        f"({r['ours_roofline']:.0%} of mm)  sdpa {r['transformers_sdpa_img_s']:7.2f}  "
        f"eager {r['transformers_eager_img_s']:7.2f}  ours/sdpa {r['ours_vs_sdpa']:.3f}"
    )


def bench_construction(quick: bool, runs: int) -> dict[str, Any]:
    """Seconds to build a model from a checkpoint folder: ours vs transformers.from_pretrained."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = TINY if quick else get_preset(BASE)
    with tempfile.TemporaryDirectory(prefix="siglip-bench-") as tmp:
        SiglipVisionModel.from_config(cfg).save_pretrained(tmp)
        t = interleaved(
            {
                "ours": lambda: SiglipVisionModel.from_pretrained(tmp),
                "transformers": lambda: transformers.SiglipVisionModel.from_pretrained(tmp),
            },
            runs=runs,
        )
    out = {"model": "tiny" if quick else BASE, "ours_s": t["ours"], "transformers_s": t["transformers"]}
    out["ratio"] = t["ours"] / t["transformers"]
    print(f"  construction from a checkpoint: ours {t['ours']:.3f}s, transformers {t['transformers']:.3f}s", flush=True)
    return out


def bench_cuda(runs: int) -> dict[str, Any]:
    """bf16/fp16 images/s at batch 1, 32, 256, eager and torch.compile; MFU vs the measured bf16 mm."""
    from siglip_scratch.parity.reference import build_reference

    cfg = get_preset(BASE)
    peak = mm_gflops(torch.bfloat16, "cuda", n=8192)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        state = synthetic_state_dict(cfg, dtype=dtype, device="cuda")
        ours = SiglipVisionModel.from_state_dict(cfg, state)
        ref = build_reference(cfg, state, attn_implementation="sdpa")
        compiled = torch.compile(SiglipVisionModel.from_state_dict(cfg, state))
        for batch in (1, 32, 256):
            x = torch.rand(batch, 3, 224, 224, device="cuda").to(dtype)
            with torch.inference_mode():
                t = interleaved(
                    {
                        "ours": lambda m=ours, x=x: m(x),
                        "ours_compiled": lambda m=compiled, x=x: m(x),
                        "transformers_sdpa": lambda m=ref, x=x: m(x),
                    },
                    runs=runs,
                    warmup=3,
                    sync=torch.cuda.synchronize,
                )
            row = {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "bf16_mm_gflops": peak}
            for k, sec in t.items():
                row[f"{k}_img_s"] = batch / sec
                row[f"{k}_mfu"] = flops_per_image(cfg) * batch / sec / 1e9 / peak
            rows.append(row)
            print(f"  cuda {row['dtype']} b{batch}: " + ", ".join(f"{k} {batch / v:.1f} img/s" for k, v in t.items()))
    return {"device": torch.cuda.get_device_name(), "rows": rows}


# -- whole-process measurements ----------------------------------------------------------------------------------
# ru_maxrss counts what a child inherited before exec, so a child forked from this (large) process
# would report our RSS. A small `python -S` wrapper forks and waits for the measured command instead.
_WAIT4 = """
import os, subprocess, sys, time, json
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(p.pid, 0)
err = p.stderr.read().decode(errors="replace")[-800:]
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "rc": os.waitstatus_to_exitcode(status), "err": err}))
"""


def run_process(cmd: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one child process (interpreter start included)."""
    out = subprocess.run([sys.executable, "-S", "-c", _WAIT4, *cmd], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    if r["rc"] not in (0, 1):
        raise RuntimeError(f"{cmd[:3]}… failed ({r['rc']}): {r['err']}")
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}


def _median_runs(cmds: dict[str, list[str]], runs: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in cmds}
    for _ in range(runs):
        for k, cmd in cmds.items():
            samples[k].append(run_process(cmd))
    return {k: {m: statistics.median(s[m] for s in v) for m in ("wall_s", "peak_rss_mb")} for k, v in samples.items()}


BARE_REFERENCE = """
import sys, torch, transformers
transformers.utils.logging.disable_progress_bar()
from siglip_scratch.parity.compare import make_pixels
from siglip_scratch import SiglipVisionConfig
cfg = SiglipVisionConfig.from_pretrained(sys.argv[1])
m = transformers.SiglipVisionModel.from_pretrained(sys.argv[1]).eval()
x = make_pixels(cfg, batch=int(sys.argv[2]), seed=0)
with torch.inference_mode():
    m(x); m(x)
"""


def bench_parity(quick: bool, runs: int) -> dict[str, Any]:
    exe = shutil.which("siglip-parity") or str(Path(sys.executable).parent / "siglip-parity")
    rows = []
    for name in ["tiny"] if quick else [BASE, SO400M_384]:
        cfg = TINY if quick else get_preset(name)
        with tempfile.TemporaryDirectory(prefix="siglip-bench-") as tmp:
            SiglipVisionModel.from_config(cfg).save_pretrained(tmp)
            r = _median_runs(
                {
                    "siglip_parity": [exe, "--weights", tmp, "--batch", "2", "--quiet"],
                    "bare_transformers": [sys.executable, "-c", BARE_REFERENCE, tmp, "2"],
                },
                runs,
            )
        row = {"model": name, **{f"{k}_{m}": v for k, d in r.items() for m, v in d.items()}}
        row["wall_ratio"] = row["siglip_parity_wall_s"] / row["bare_transformers_wall_s"]
        row["rss_ratio"] = row["siglip_parity_peak_rss_mb"] / row["bare_transformers_peak_rss_mb"]
        rows.append(row)
        print(
            f"  parity {name}: siglip-parity {row['siglip_parity_wall_s']:.1f}s {row['siglip_parity_peak_rss_mb']:.0f}MB"
            f" vs bare {row['bare_transformers_wall_s']:.1f}s {row['bare_transformers_peak_rss_mb']:.0f}MB"
            f" (wall x{row['wall_ratio']:.2f}, RSS x{row['rss_ratio']:.2f})",
            flush=True,
        )
    return {"rows": rows}


def write_full_siglip_checkpoint(folder: Path, vision: SiglipVisionConfig, *, text_layers: int | None = None) -> int:
    """A synthetic full SiglipModel (vision + text towers, transformers' key set) as model.safetensors."""
    import transformers
    from safetensors.torch import save_file

    text = transformers.SiglipTextConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=text_layers or vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        vocab_size=32000,
        max_position_embeddings=64,
    )
    fields = {k: v for k, v in vision.to_dict().items() if k not in ("architectures", "model_type")}
    config = transformers.SiglipConfig(text_config=text.to_dict(), vision_config=fields)
    with torch.device("meta"):
        model = transformers.SiglipModel(config)
    tensors = {k: torch.full(v.shape, 0.01, dtype=v.dtype) for k, v in model.state_dict().items()}
    # safetensors' own writer (8-byte aligned data), as the hub's files were written; not checkpoint.save_safetensors
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return (folder / "model.safetensors").stat().st_size


# "A bare interpreter with the converter's imports": what siglip-convert imports before reading data.
CONVERTER_IMPORTS = (
    "import siglip_scratch.convert.cli, siglip_scratch.convert, siglip_scratch.hub, huggingface_hub, tqdm"
)

TRANSFORMERS_ROUTE = """
import sys, transformers
transformers.utils.logging.disable_progress_bar()
m = transformers.SiglipModel.from_pretrained(sys.argv[1])
m.vision_model.save_pretrained(sys.argv[2])
"""


def bench_convert(quick: bool, runs: int) -> dict[str, Any]:
    exe = shutil.which("siglip-convert") or str(Path(sys.executable).parent / "siglip-convert")
    cfg = TINY if quick else get_preset(SO400M_384)
    with tempfile.TemporaryDirectory(prefix="siglip-bench-", dir=os.environ.get("SIGLIP_BENCH_TMP")) as tmp:
        src, work = Path(tmp) / "src", Path(tmp)
        src.mkdir()
        size = write_full_siglip_checkpoint(src, cfg, text_layers=2 if quick else None)
        print(f"  convert: synthetic full SiglipModel {size / 1e9:.2f} GB", flush=True)
        samples: dict[str, list[dict[str, float]]] = {
            k: [] for k in ("cp", "siglip_convert", "imports", "transformers")
        }
        for i in range(runs):
            out = work / f"out{i}"
            samples["siglip_convert"].append(run_process([exe, str(src), str(out), "--quiet"]))
            samples["cp"].append(run_process(["cp", str(out / "model.safetensors"), str(work / f"cp{i}")]))
            samples["imports"].append(run_process([sys.executable, "-c", CONVERTER_IMPORTS]))
            if i < (1 if not quick else runs):  # the transformers route takes minutes; once is enough
                samples["transformers"].append(
                    run_process([sys.executable, "-c", TRANSFORMERS_ROUTE, str(src), str(work / f"hf{i}")])
                )
            out_bytes = (out / "model.safetensors").stat().st_size
            for p in (out, work / f"cp{i}", work / f"hf{i}"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    med = {k: {m: statistics.median(s[m] for s in v) for m in ("wall_s", "peak_rss_mb")} for k, v in samples.items()}
    row = {
        "source_gb": size / 1e9,
        "output_gb": out_bytes / 1e9,
        **{f"{k}_{m}": v for k, d in med.items() for m, v in d.items()},
    }
    row["rss_over_imports_mb"] = row["siglip_convert_peak_rss_mb"] - row["imports_peak_rss_mb"]
    row["wall_vs_cp"] = row["siglip_convert_wall_s"] / row["cp_wall_s"]
    row["speedup_vs_transformers"] = row["transformers_wall_s"] / row["siglip_convert_wall_s"]
    row["rss_ratio_vs_transformers"] = row["transformers_peak_rss_mb"] / row["siglip_convert_peak_rss_mb"]
    print(
        f"  convert: siglip-convert {row['siglip_convert_wall_s']:.2f}s {row['siglip_convert_peak_rss_mb']:.0f}MB "
        f"(+{row['rss_over_imports_mb']:.0f}MB over imports), cp {row['cp_wall_s']:.2f}s, transformers "
        f"{row['transformers_wall_s']:.1f}s {row['transformers_peak_rss_mb']:.0f}MB",
        flush=True,
    )
    return row


# -- report ----------------------------------------------------------------------------------------------------
def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"Machine: {env['machine']}; {env['threads']} threads; torch {env['torch']}, transformers "
        f"{env['transformers']}; command `{env['command']}`; {env['date']}.",
        "",
    ]
    enc = results.get("encoder")
    if enc:
        lines += [
            "### Encoder throughput (images/s, median of interleaved runs)",
            "",
            "| model | dtype | batch | mm GFLOP/s | ours | transformers sdpa | transformers eager | ours / sdpa | ours % of mm |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in enc["rows"]:
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['mm_gflops']:.0f} | {r['ours_img_s']:.2f} | "
                f"{r['transformers_sdpa_img_s']:.2f} | {r['transformers_eager_img_s']:.2f} | "
                f"{r['ours_vs_sdpa']:.3f} | {r['ours_roofline']:.0%} |"
            )
        c = enc["construction"]
        lines += [
            "",
            f"timm: {enc['timm']}.",
            "",
            f"Construction from a checkpoint ({c['model']}): ours {c['ours_s']:.3f} s, transformers "
            f"`from_pretrained` {c['transformers_s']:.3f} s, ratio {c['ratio']:.2f} "
            f"(target ≤ 0.5: {_verdict(c['ratio'] <= 0.5)}).",
            "",
        ]
        worst = min(r["ours_vs_sdpa"] for r in enc["rows"])
        lines.append(
            f"Default path vs transformers sdpa: worst interleaved median ratio {worst:.3f} "
            f"(target ≥ 1.00 within noise (±3 %): {_verdict(worst >= 0.97)})."
        )
        lines.append("")
    if results.get("cuda"):
        lines += [
            "### CUDA",
            "",
            "| dtype | batch | ours | ours compiled | transformers sdpa | MFU ours | MFU compiled |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["cuda"]["rows"]:
            lines.append(
                f"| {r['dtype']} | {r['batch']} | {r['ours_img_s']:.1f} | {r['ours_compiled_img_s']:.1f} | "
                f"{r['transformers_sdpa_img_s']:.1f} | {r['ours_mfu']:.0%} | {r['ours_compiled_mfu']:.0%} |"
            )
        lines.append("")
    par = results.get("parity")
    if par:
        lines += [
            "### Parity harness cost (whole process, median)",
            "",
            "| model | siglip-parity wall | peak RSS | load + 2 forwards (transformers) wall | peak RSS | wall ratio | RSS ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in par["rows"]:
            lines.append(
                f"| {r['model']} | {r['siglip_parity_wall_s']:.1f} s | {r['siglip_parity_peak_rss_mb']:.0f} MB | "
                f"{r['bare_transformers_wall_s']:.1f} s | {r['bare_transformers_peak_rss_mb']:.0f} MB | "
                f"{r['wall_ratio']:.2f} ({_verdict(r['wall_ratio'] <= 1.15)}) | "
                f"{r['rss_ratio']:.2f} ({_verdict(r['rss_ratio'] <= 1.15)}) |"
            )
        lines.append("")
    conv = results.get("convert")
    if conv:
        c = conv
        lines += [
            f"### Converter: full SiglipModel {c['source_gb']:.2f} GB → vision folder {c['output_gb']:.2f} GB",
            "",
            "| route | wall | peak RSS |",
            "|---|---|---|",
            f"| siglip-convert | {c['siglip_convert_wall_s']:.2f} s | {c['siglip_convert_peak_rss_mb']:.0f} MB |",
            f"| interpreter + converter imports | {c['imports_wall_s']:.2f} s | {c['imports_peak_rss_mb']:.0f} MB |",
            f"| cp of the output bytes | {c['cp_wall_s']:.2f} s | {c['cp_peak_rss_mb']:.0f} MB |",
            f"| transformers from_pretrained + save_pretrained | {c['transformers_wall_s']:.1f} s | {c['transformers_peak_rss_mb']:.0f} MB |",
            "",
            f"- peak RSS over imports: {c['rss_over_imports_mb']:.0f} MB (target ≤ 400: {_verdict(c['rss_over_imports_mb'] <= 400)})",
            f"- wall vs cp: ×{c['wall_vs_cp']:.2f} (target ≤ 3: {_verdict(c['wall_vs_cp'] <= 3)})",
            f"- vs transformers: ×{c['speedup_vs_transformers']:.1f} faster (target ≥ 5: "
            f"{_verdict(c['speedup_vs_transformers'] >= 5)}), ×{c['rss_ratio_vs_transformers']:.1f} less peak memory "
            f"(target ≥ 10: {_verdict(c['rss_ratio_vs_transformers'] >= 10)})",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m siglip_scratch.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny configs, seconds: a smoke test")
    p.add_argument("--sections", default="encoder,parity,convert", help="comma-separated subset")
    p.add_argument("--runs", type=int, help="timed runs per competitor (default 5, quick 2)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md")
    args = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    runs = args.runs or (2 if args.quick else 5)
    sections = set(args.sections.split(","))
    results: dict[str, Any] = {
        "environment": {
            "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} CPUs, "
            f"{torch.backends.cpu.get_cpu_capability()})",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": "python -m siglip_scratch.bench" + (" --quick" if args.quick else ""),
            "date": time.strftime("%Y-%m-%d"),
            "quick": args.quick,
        }
    }
    if "encoder" in sections:
        print("encoder:", flush=True)
        results["encoder"] = bench_encoder(args.quick, runs)
        if torch.cuda.is_available():
            results["cuda"] = bench_cuda(runs)
    if "parity" in sections:
        print("parity harness:", flush=True)
        results["parity"] = bench_parity(args.quick, max(1, runs // 2) if not args.quick else 1)
    if "convert" in sections:
        print("converter:", flush=True)
        results["convert"] = bench_convert(args.quick, 3 if not args.quick else 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (out / "bench.md").write_text(md)
    print("\n" + md)
    return 0
