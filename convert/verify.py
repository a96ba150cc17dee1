"""``--verify``: check the converted folder against the *source*, then run the parity harness on it.

Loading the output into both our encoder and transformers can only show that the folder agrees
with itself: a converter that swaps q and k in every layer writes a folder both load identically. So
the first check is against the source:

- big_vision ``.npz`` and timm / open_clip: the source tower is computed from its own tensors, by its
  own key names and layouts (`native.py`), in float64; each of our leaf modules (every projection,
  norm, MLP layer, the patch embedding and the MAP head's attention) loaded from the output folder is
  run on the native input and must reproduce the native output. A failure names our tensors and the
  source tensors they came from.
- HF layouts (whose conversion only strips a prefix and may cast): every output tensor must equal its
  source tensor, read back independently of the converter's reader (the ``safetensors`` library for
  safetensors files), cast to the output dtype, and the source key must end with the output key's
  hub-layout suffix.

Then, with transformers installed, the parity harness runs on the output (both modes, float64 oracle)
and transformers' own loader must report no missing or unexpected keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from siglip_scratch.config import Siglip2VisionConfig, load_config
from siglip_scratch.errors import ConfigError
from siglip_scratch.files import read_json
from siglip_scratch.modeling import Siglip2VisionModel, SiglipVisionModel
from siglip_scratch.processor import Siglip2ImageProcessor
from siglip_scratch.vlm import vlm_key

from .formats import by_family
from .sources import Plan

__all__ = ["SOURCE_RTOL", "check_against_source", "verify_output"]

# float64 on both sides, the same math in another order: ~1e-15 relative. A real mapping error is O(1).
SOURCE_RTOL = 1e-9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.pow(2).mean().sqrt().item()
    err = (a - b).pow(2).mean().sqrt().item()
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def check_against_source(folder: Path, plan: Plan, out_dtype: torch.dtype | None) -> tuple[bool, list[str]]:
    """(passed, lines). Compares the written folder with the plan's source, independently of the tables."""
    assert plan.store is not None, "verify needs the plan's open source store"
    store = plan.store

    def source(key: str) -> torch.Tensor:
        t = store.load(plan.root + key)
        if out_dtype is not None and t.is_floating_point():
            t = t.to(out_dtype)  # the output was cast; casting commutes with every relayout
        return t.to(torch.float64)

    if by_family(plan.family).native is not None:
        return _check_native(folder, plan, source)
    return _check_hf(folder, plan, out_dtype)


def _check_native(folder: Path, plan: Plan, source) -> tuple[bool, list[str]]:
    fmt = by_family(plan.family)
    model, cfg, pixels = fmt.probe(folder, torch.Generator().manual_seed(0))
    with torch.no_grad():
        leaves = fmt.native(source, cfg, pixels)
        failures = []
        for path, leaf in leaves.items():
            module = model.get_submodule(path)
            ours = module(*leaf.inputs)
            err = _rel(ours, leaf.output) if ours.shape == leaf.output.shape else float("inf")
            if not err <= SOURCE_RTOL:
                tensors = sorted(n for n, _ in module.named_parameters())
                failures.append(
                    f"{path}.{{{','.join(tensors)}}} do not reproduce the source's "
                    f"{', '.join(plan.root + s for s in leaf.sources)} (relative error {err:.3g})"
                )
    head = f"verify: source check ({plan.family} computed natively from {len(leaves)} leaf modules, float64)"
    if failures:
        more = f"; {len(failures) - 1} more leaf module(s) differ" if len(failures) > 1 else ""
        return False, [f"{head}: FAIL: {failures[0]}{more}", *(f"verify:   {f}" for f in failures[1:8])]
    return True, [f"{head}: PASS: every leaf reproduces the source (≤ {SOURCE_RTOL:g} relative)"]


def _same_tensor(out_key: str, src_key: str) -> bool:
    """Whether an output key and its source key name the same tensor in two layouts: the projector's by its
    canonical name, the tower's by what follows ``vision_model.`` (the output is canonical, or a VLM's hub layout
    with --with-projector; the projector and image_newline by their canonical names)."""
    if vlm_key(out_key) is not None or vlm_key(src_key) is not None:
        return vlm_key(out_key) == vlm_key(src_key)
    suffix = out_key.split("vision_model.", 1)[1]
    return src_key == suffix or src_key.endswith("." + suffix)


def _check_hf(folder: Path, plan: Plan, out_dtype: torch.dtype | None) -> tuple[bool, list[str]]:
    from safetensors import safe_open

    from siglip_scratch.checkpoint import index_checkpoint, load_tensors

    ours = load_tensors(index_checkpoint(folder, vision_only=plan.vlm_config is None))
    failures = []
    for p in plan.tensors:
        (src_key,) = p.sources
        if not _same_tensor(p.key, src_key):
            failures.append(f"{p.key} came from {src_key!r}, which is not the same tensor in another layout")
            continue
        file = str(p.raw.file) if p.raw is not None else ""
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                expected = f.get_tensor(src_key)
        else:
            expected = plan.store.load(src_key)  # type: ignore[union-attr]
        if out_dtype is not None and expected.is_floating_point():
            expected = expected.to(out_dtype)
        got = ours.get(p.key)
        if got is None or got.dtype != expected.dtype or not torch.equal(got, expected):
            failures.append(f"{p.key} differs from the source's {src_key} ({file or 'source'})")
    head = f"verify: source check ({len(plan.tensors)} tensors against the source file, read independently)"
    if failures:
        more = f"; {len(failures) - 1} more" if len(failures) > 1 else ""
        return False, [f"{head}: FAIL: {failures[0]}{more}"]
    return True, [f"{head}: PASS: every tensor equals its source"]


def verify_output(
    folder: Path,
    *,
    dtype: str = "float32",
    plan: Plan | None = None,
    out_dtype: torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[bool, str]:
    """(passed, text). The source check when ``plan`` is given; then, with transformers installed, the
    parity harness on a batch of 2 random images; without it, a strict load into our encoder and a
    finite forward pass, and a note saying so. ``progress`` gets a line as each step starts, and the harness's
    per-site-group lines (a person waiting sees where it is)."""
    say = progress or (lambda line: None)
    lines: list[str] = []
    passed = True
    if plan is not None:
        say("verify: the output against the source")
        passed, lines = check_against_source(folder, plan, out_dtype)
    if isinstance(
        load_config(read_json(folder / "config.json", what="config.json", error=ConfigError)), Siglip2VisionConfig
    ):
        ok, line = _verify_naflex(folder)
        return passed and ok, "\n".join([*lines, line])
    if plan is not None and plan.vlm_config is not None:
        ok, line = _verify_image_features(folder, plan.vlm_config, dtype, progress)
        return passed and ok, "\n".join([*lines, line])
    try:
        import transformers
    except ImportError:
        model = SiglipVisionModel.from_pretrained(folder)
        cfg = model.config
        x = torch.rand(1, cfg.num_channels, cfg.image_size, cfg.image_size) * 2 - 1
        with torch.inference_mode():
            out = model(x).last_hidden_state
        ok = bool(torch.isfinite(out).all())
        lines.append(
            f"verify: loaded strictly into siglip_scratch, forward {'finite' if ok else 'NOT finite'}; "
            'transformers is not installed, so no parity check (pip install "siglip-scratch[parity]")'
        )
        return passed and ok, "\n".join(lines)
    from siglip_scratch.parity import compare

    transformers.utils.logging.disable_progress_bar()
    # The folder is loaded by the harness exactly as a user would load it.
    say("verify: the parity harness on the output (reference, float64 oracle, our encoder)")
    report = compare(weights=folder, dtype=dtype, batch=2, progress=progress)
    theirs = transformers.SiglipVisionModel.from_pretrained(folder, output_loading_info=True)[1]
    bad = {k: v for k, v in theirs.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    lines.append(f"verify: parity of the output with transformers: {report.verdict}")
    if bad:
        lines.append(f"verify: transformers.SiglipVisionModel.from_pretrained reported {bad}")
    return passed and report.passed and not bad, "\n".join(lines)


def _verify_image_features(
    folder: Path, vlm_config: dict, dtype: str, progress: Callable[[str], None] | None
) -> tuple[bool, str]:
    """--with-projector: transformers' own VLM class loads the folder with nothing missing but its language model,
    and the harness judges our features against its get_image_features (--image-features)."""
    try:
        import transformers
    except ImportError:
        return (
            True,
            'verify: transformers is not installed, so the image features were not checked (pip install "siglip-scratch[parity]")',
        )
    from siglip_scratch.parity import compare

    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, (vlm_config.get("architectures") or ["AutoModelForImageTextToText"])[0])
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its load report lists the language model we left out
    try:
        info = cls.from_pretrained(folder, output_loading_info=True)[1]
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    language = ("language_model", "text_model", "lm_head")
    bad = {
        k: [x for x in v if not any(part in x for part in language)]
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    bad = {k: v for k, v in bad.items() if v}
    report = compare(weights=folder, dtype=dtype, batch=2, image_features=True, progress=progress)
    line = f"verify: image features of the output against transformers.{cls.__name__}: {report.verdict}"
    if bad:
        line += f"\nverify: transformers.{cls.__name__}.from_pretrained reported, besides the language model, {bad}"
    return report.passed and not bad, line


def naflex_probe_inputs(patch_size: int, max_num_patches: int) -> dict[str, torch.Tensor]:
    """Three seeded images of different aspect ratios (wide, tall, small) through the NaFlex processor: a
    padded batch where every image has its own grid."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((180, 320), (300, 120), (40, 56))
    ]
    return Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=max_num_patches)(images)


def _verify_naflex(folder: Path) -> tuple[bool, str]:
    """SigLIP 2 NaFlex output: a strict load into our `Siglip2VisionModel`, then (with transformers) its
    own ``Siglip2VisionModel.from_pretrained`` with no missing/unexpected keys and both towers' outputs
    equal bit for bit on a padded batch of three aspect ratios. (The site-by-site harness judges the
    fixed-resolution tower; this is the NaFlex check until it covers NaFlex too.)"""
    model = Siglip2VisionModel.from_pretrained(folder).eval()
    cfg = model.config
    inputs = naflex_probe_inputs(cfg.patch_size, max(cfg.num_patches, 64))
    try:
        import transformers
    except ImportError:
        with torch.inference_mode():
            ok = bool(torch.isfinite(model(**inputs).last_hidden_state).all())
        return ok, (
            f"verify: loaded strictly into siglip_scratch.Siglip2VisionModel, forward {'finite' if ok else 'NOT finite'}; "
            'transformers is not installed, so no comparison (pip install "siglip-scratch[parity]")'
        )
    from siglip_scratch.parity.reference import naflex_arithmetic

    transformers.utils.logging.disable_progress_bar()
    theirs, info = transformers.Siglip2VisionModel.from_pretrained(folder, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        return False, f"verify: transformers.Siglip2VisionModel.from_pretrained reported {bad}"
    model.set_arithmetic(naflex_arithmetic())
    theirs = theirs.to(next(model.parameters()).dtype).eval()
    x = {**inputs, "pixel_values": inputs["pixel_values"].to(next(model.parameters()).dtype)}
    with torch.inference_mode():
        a, b = model(**x), theirs(**x)
    diffs = [(a.last_hidden_state - b.last_hidden_state).abs().max().item()]
    if a.pooler_output is not None:
        diffs.append((a.pooler_output - b.pooler_output).abs().max().item())
    worst = max(diffs)
    shapes = "/".join(f"{h}x{w}" for h, w in inputs["spatial_shapes"].tolist())
    verdict = "PASS" if worst == 0 else "FAIL"
    return worst == 0, (
        f"verify: SigLIP 2 NaFlex, transformers {transformers.__version__} Siglip2VisionModel vs siglip_scratch on a "
        f"padded batch of patch grids {shapes}: {verdict} (max |Δ| {worst:.3g}; bit-identical required)"
    )
