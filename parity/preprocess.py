"""Preprocessing is the first site: a candidate image processor against transformers' own.

Most public SigLIP parity bugs were in the pixels, not the math (a bilinear resize where the reference
is bicubic, ImageNet mean/std where SigLIP uses 0.5, a centre crop where it squashes). This module
judges a candidate processor — any callable from a PIL image to a pixel tensor — on a fixed set of
probe images against transformers' PIL `SiglipImageProcessor`, and names the likely cause.

transformers ships two processors for SigLIP (PIL, and a torchvision one whose arithmetic
`SiglipImageProcessor(backend="fast")` reproduces bit for bit) and they disagree by up to 20 uint8 levels
on one probe. A candidate is judged against one backend exactly — the one it claims
(``backend="pil"|"torchvision"``, `--processor-backend`), by default the one transformers'
`AutoImageProcessor` gives on this machine — and passes when, on every probe, its largest difference is at
most one uint8 level (a rounding at .5 decided the other way) and its RMS at most a quarter level. Judging
against "either backend's spread" would pass a port of one backend that is 20 levels off it where the other
backend happens to be. A port that fails against its backend and matches the other one exactly is named so.
The two backends' spread is reported beside each probe for scale.

Likely cause: the reference's recipe (a renderer that reproduces transformers' output on every probe,
checked) is replayed with one ingredient changed at a time — resample filter, antialias, geometry,
mean/std, channel order, value range, rounding, alpha handling — and the variant that reproduces the
candidate under the same rule is named. To add one, append to `VARIANTS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siglip_scratch.errors import InputError
from siglip_scratch.processor import Siglip2ImageProcessor, SiglipImageProcessor, to_rgb

from . import render as renderers
from .candidates.loading import load_candidate_factory

__all__ = [
    "BACKENDS",
    "VARIANTS",
    "ProcessorReport",
    "Recipe",
    "auto_backend",
    "compare_processor",
    "load_processor_callable",
    "probe_images",
    "render",
]

MEANS_STDS = {
    "0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "CLIP": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
BACKENDS = ("pil", "torchvision")
FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


# -- probe images ---------------------------------------------------------------------------------------
def probe_images() -> list[tuple[str, Image.Image]]:
    """Deterministic images that make preprocessing bugs visible: non-square both ways, smaller and
    larger than any model size, with alpha, grayscale and a palette. Content mixes smooth colour
    gradients (mean/std, channel order), hard edges and fine stripes (filters, antialias), and is
    asymmetric left/right and top/bottom (crops)."""

    def scene(w: int, h: int, seed: int) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        u, v = x / max(w - 1, 1), y / max(h - 1, 1)
        r = 255 * u
        g = 255 * v * (0.6 + 0.4 * np.sin(6 * u))
        b = 255 * (0.5 + 0.5 * np.cos(9 * u * v))
        img = np.stack([r, g, b], -1)
        stripes = (np.sin(x * 1.3 + y * 0.4) > 0) & (u > 0.55)  # fine detail on the right only
        img[stripes] = 255 - img[stripes]
        disc = (x - 0.3 * w) ** 2 + (y - 0.35 * h) ** 2 < (0.18 * min(w, h)) ** 2
        img[disc] = (230, 40, 20)  # a saturated red disc, top left: BGR shows, crops move it
        img += np.random.default_rng(seed).normal(0, 6, img.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    rgba = np.concatenate([scene(260, 200, 4), np.zeros((200, 260, 1), np.uint8)], -1)
    rgba[..., 3] = np.clip(np.linspace(0, 255 * 1.4, 260), 0, 255).astype(np.uint8)[None, :]  # half see-through
    return [
        ("wide 320x180 RGB", Image.fromarray(scene(320, 180, 1))),
        ("tall 150x410 RGB", Image.fromarray(scene(150, 410, 2))),
        ("small 61x45 RGB", Image.fromarray(scene(61, 45, 3))),
        ("large 1000x700 RGB", Image.fromarray(scene(1000, 700, 5))),
        ("RGBA 260x200 alpha ramp", Image.fromarray(rgba, "RGBA")),
        ("grayscale 230x170 L", Image.fromarray(scene(230, 170, 6)).convert("L")),
        ("palette 300x240 P", Image.fromarray(scene(300, 240, 7)).convert("P", palette=Image.Palette.ADAPTIVE)),
    ]


# -- the recipe and its variants ------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """What a SigLIP-style processor does, one ingredient per field."""

    size: tuple[int, int]  # (height, width)
    resample: str = "bicubic"  # bicubic | bilinear | nearest
    antialias: bool = True  # PIL always antialiases when downscaling; torch's interpolate does not by default
    geometry: str = "squash"  # squash | crop (shortest side to size, centre crop) | shortest (no crop)
    stats: str = "0.5"  # a key of MEANS_STDS
    channels: str = "RGB"  # RGB | BGR
    scale: str = "0-1"  # 0-1 | 0-255 (rescale skipped)
    round_uint8: bool = True  # the resized image is uint8 before rescaling (PIL's resize of an RGB image)
    alpha: str = "white"  # white (composited, transformers 5) | drop (transformers 4.57)


def render(image: Image.Image, recipe: Recipe) -> torch.Tensor:
    """One image through ``recipe`` to float32 ``[3, H, W]`` (W, H differ from ``size`` for 'shortest')."""
    rgb = to_rgb(image, recipe.alpha)
    h, w = recipe.size
    if recipe.geometry == "squash":
        target, crop = (h, w), None
    else:
        s = max(h / rgb.height, w / rgb.width) if recipe.geometry == "crop" else min(h, w) / min(rgb.size[::-1])
        target = (max(1, round(rgb.height * s)), max(1, round(rgb.width * s)))
        crop = (h, w) if recipe.geometry == "crop" else None
    if recipe.antialias:
        if recipe.round_uint8:
            arr = np.asarray(rgb.resize(target[::-1], resample=FILTERS[recipe.resample]), dtype=np.float64)
        else:  # resize each band in float ('F' mode): the same filter, no rounding
            bands = [b.convert("F").resize(target[::-1], resample=FILTERS[recipe.resample]) for b in rgb.split()]
            arr = np.stack([np.asarray(b, dtype=np.float64) for b in bands], -1)
        x = torch.from_numpy(arr).permute(2, 0, 1)
    else:
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float64)).permute(2, 0, 1)[None]
        kw = {} if recipe.resample == "nearest" else {"align_corners": False}
        x = torch.nn.functional.interpolate(x, size=target, mode=recipe.resample, antialias=False, **kw)[0]
        if recipe.round_uint8:
            x = x.round().clamp(0, 255)
    if crop is not None:
        top, left = (x.shape[1] - crop[0]) // 2, (x.shape[2] - crop[1]) // 2
        x = x[:, top : top + crop[0], left : left + crop[1]]
    if recipe.scale == "0-1":
        x = x / 255.0
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in MEANS_STDS[recipe.stats])
    x = (x - mean) / std if recipe.scale == "0-1" else x
    if recipe.channels == "BGR":
        x = x.flip(0)
    return x.to(torch.float32)


@dataclass(frozen=True)
class Variant:
    name: str  # the cause, as the report says it
    change: Callable[[Recipe], Recipe | None]  # None: does not apply to this reference


def _set(**kw: Any) -> Callable[[Recipe], Recipe | None]:
    def change(r: Recipe) -> Recipe | None:
        new = replace(r, **kw)
        return None if new == r else new

    return change


# The library of known preprocessing bugs. Each is the reference recipe with one ingredient changed.
VARIANTS: list[Variant] = [
    Variant("bilinear resize (the reference resizes bicubic)", _set(resample="bilinear")),
    Variant("bicubic resize (the reference resizes bilinear)", _set(resample="bicubic")),
    Variant("nearest-neighbour resize", _set(resample="nearest")),
    Variant(
        "resize without antialias (torch interpolate's default, in float)", _set(antialias=False, round_uint8=False)
    ),
    Variant("resize without antialias, rounded to uint8", _set(antialias=False)),
    Variant("centre crop (shortest side to size, then crop) instead of squashing", _set(geometry="crop")),
    Variant("shortest-side resize without crop (aspect kept)", _set(geometry="shortest")),
    Variant("ImageNet mean/std (the reference uses 0.5/0.5)", _set(stats="ImageNet")),
    Variant("CLIP mean/std (the reference uses 0.5/0.5)", _set(stats="CLIP")),
    Variant("BGR channel order", _set(channels="BGR")),
    Variant("values in 0–255 (rescale by 1/255 and normalisation skipped)", _set(scale="0-255")),
    Variant("no rounding to uint8 after the resize (the reference resizes uint8)", _set(round_uint8=False)),
    Variant("alpha dropped (the reference composites transparency on white)", _set(alpha="drop")),
    Variant("alpha composited on white (the reference drops it)", _set(alpha="white")),
    Variant(
        "bilinear resize without antialias (torch interpolate, in float)",
        _set(resample="bilinear", antialias=False, round_uint8=False),
    ),
    Variant(
        "ImageNet mean/std and a centre crop (torchvision's classic ImageNet transform)",
        _set(stats="ImageNet", geometry="crop"),
    ),
]


# -- the check ------------------------------------------------------------------------------------------
LEVEL = 1.0 / 255  # one uint8 step, before normalisation


@dataclass
class ProbeResult:
    image: str
    shape: list[int]
    expected_shape: list[int]
    rms_levels: float | None  # RMS |candidate - reference| in uint8 levels (normalisation undone)
    max_levels: float | None
    spread_rms_levels: float  # transformers' two processors against each other, the same units
    spread_max_levels: float
    passed: bool


@dataclass
class ProcessorReport:
    candidate: str
    reference: str
    recipe: dict[str, Any]
    probes: list[ProbeResult]
    cause: str | None = None  # the variant that reproduces the candidate, if one does
    ranking: list[dict[str, Any]] = field(default_factory=list)
    backend: str = "pil"  # the transformers backend judged against (BACKENDS)
    backend_chosen_by: str = "AutoImageProcessor"  # or "--processor-backend"

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.probes)

    @property
    def verdict(self) -> str:
        bad = [p for p in self.probes if not p.passed]
        if not bad:
            return (
                f"PASS: preprocessing matches {self.reference} on {len(self.probes)} probe images "
                f"(the {self.backend} backend, within one uint8 level)"
            )
        worst = bad[0]
        what = (
            f"shape {worst.shape} vs {worst.expected_shape}"
            if worst.shape != worst.expected_shape
            else f"max {worst.max_levels:.0f} levels, RMS {worst.rms_levels:.2f} against the {self.backend} backend"
        )
        cause = f"; likely cause: {self.cause}" if self.cause else "; no known preprocessing variant reproduces it"
        return f"FAIL: preprocessing differs on {len(bad)}/{len(self.probes)} probe images (first: {worst.image}, {what}){cause}"

    def table(self) -> str:
        return renderers.processor_table(self)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "candidate": self.candidate,
            "reference": self.reference,
            "recipe": self.recipe,
            "backend": self.backend,
            "backend_chosen_by": self.backend_chosen_by,
            "likely_cause": self.cause,
            "ranking": self.ranking,
            "probes": [{k: clean(v) for k, v in dataclasses.asdict(p).items()} for p in self.probes],
        }


def reference_processor(processor: SiglipImageProcessor) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """transformers' PIL image processor with ``processor``'s settings, and its name and version."""
    import transformers

    cls = getattr(transformers, "SiglipImageProcessorPil", None)
    if cls is None:  # 4.57: SiglipImageProcessor is the PIL one
        cls = transformers.SiglipImageProcessor
    ref = cls(**{k: v for k, v in _settings(processor).items() if k in _HF_KEYS})
    h, w = processor.size
    ref.size = {"height": h, "width": w}

    def run(image: Image.Image) -> torch.Tensor:
        return ref(images=[image], return_tensors="pt")["pixel_values"][0].to(torch.float32)

    return run, f"transformers {transformers.__version__} {cls.__name__}"


def torchvision_reference(
    processor: SiglipImageProcessor, transparency: str
) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """transformers' torchvision image processor with ``processor``'s settings where torchvision imports, else
    our bit-exact reproduction of its arithmetic (`make compat` checks the two agree to 0.0)."""
    import transformers

    fast = replace(processor, backend="fast", transparency=transparency)
    try:
        import torchvision  # noqa: F401

        cls = getattr(transformers, "SiglipImageProcessorFast", None) or transformers.SiglipImageProcessor
        theirs = cls(**{k: v for k, v in _settings(processor).items() if k in _HF_KEYS})
        if getattr(theirs, "backend", "torchvision") != "torchvision":
            raise ImportError("no torchvision backend")
        h, w = processor.size
        theirs.size = {"height": h, "width": w}
    except Exception:  # torchvision missing or broken beside this torch: the reproduction stands in
        return (
            lambda image: torch.from_numpy(fast.preprocess_one(image)),
            f"transformers {transformers.__version__} torchvision processor (siglip_scratch's bit-exact "
            "reproduction; torchvision does not import here)",
        )

    def run(image: Image.Image) -> torch.Tensor:
        return theirs(images=[image], return_tensors="pt")["pixel_values"][0].to(torch.float32)

    return run, f"transformers {transformers.__version__} {cls.__name__} (torchvision)"


def auto_backend(processor: SiglipImageProcessor) -> str:
    """The backend transformers' ``AutoImageProcessor`` gives for ``processor``'s settings on this machine
    (5.x: torchvision when it imports, else PIL; 4.57: the PIL one unless asked)."""
    import json
    import logging
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(processor.to_dict()))
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity(logging.ERROR)  # 4.57's use_fast notice
        try:
            auto = transformers.AutoImageProcessor.from_pretrained(folder)
        finally:
            transformers.logging.set_verbosity(level)
    backend = getattr(auto, "backend", None)
    if backend in BACKENDS:
        return backend
    return "torchvision" if type(auto).__name__.endswith("Fast") else "pil"


def _settings(processor: SiglipImageProcessor) -> dict[str, Any]:
    settings = processor.to_dict()
    settings.pop("image_processor_type", None)
    settings.pop("backend", None)
    return settings


_HF_KEYS = {
    "do_resize",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
}


def _levels(d: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """A normalised difference back in uint8 levels (x · std · 255)."""
    return d.double() * torch.tensor(std, dtype=torch.float64)[:, None, None] * 255.0


def _rule(rms: float, mx: float, spread_rms: float, spread_max: float) -> bool:
    return rms <= 2.0 * spread_rms + 0.25 and mx <= spread_max + 1.0


def _measure(a: torch.Tensor, b: torch.Tensor, std: Sequence[float]) -> tuple[float, float]:
    d = _levels(a - b, std)
    return float(d.pow(2).mean().sqrt()), float(d.abs().max())


def compare_processor(
    candidate: Callable[[Image.Image], Any],
    processor: SiglipImageProcessor,
    *,
    name: str = "candidate",
    images: Sequence[tuple[str, Image.Image]] | None = None,
    backend: str | None = None,
) -> ProcessorReport:
    """Judge ``candidate`` (a PIL image → pixel tensor ``[3, H, W]`` or ``[1, 3, H, W]``) against transformers'
    ``backend`` processor (``"pil"`` or ``"torchvision"``; default: what ``AutoImageProcessor`` gives here) for
    ``processor``'s settings on the probe images, and name the likely cause of a failure."""
    if backend is not None and backend not in BACKENDS:
        raise InputError(f"unknown processor backend {backend!r}", "--processor-backend", "use pil or torchvision")
    chosen_by = "--processor-backend" if backend is not None else "AutoImageProcessor"
    backend = backend or auto_backend(processor)
    images = list(images) if images is not None else probe_images()
    pil_fn, pil_name = reference_processor(processor)
    std = processor.image_std
    recipe = _recipe_for(processor, pil_fn, images)
    # transformers' other backend, as the installed version would run it (transparency differs by version)
    tv_fn, tv_name = torchvision_reference(processor, recipe.alpha)
    pil_refs = [pil_fn(im) for _, im in images]
    tv_refs = [tv_fn(im) for _, im in images]
    spreads = [_measure(t, p, std) for t, p in zip(tv_refs, pil_refs, strict=True)]
    refs, ref_name = (pil_refs, pil_name) if backend == "pil" else (tv_refs, tv_name)
    outs = [_call(candidate, im, name, label) for label, im in images]
    probes = []
    for (label, _), ref, out, (s_rms, s_max) in zip(images, refs, outs, spreads, strict=True):
        if tuple(out.shape) != tuple(ref.shape):
            probes.append(ProbeResult(label, list(out.shape), list(ref.shape), None, None, s_rms, s_max, False))
            continue
        rms, mx = _measure(out, ref, std)
        probes.append(ProbeResult(label, list(out.shape), list(ref.shape), rms, mx, s_rms, s_max, _exact(rms, mx)))
    report = ProcessorReport(
        name, ref_name, dataclasses.asdict(recipe), probes, backend=backend, backend_chosen_by=chosen_by
    )
    if not report.passed:
        other, other_refs = ("torchvision", tv_refs) if backend == "pil" else ("pil", pil_refs)
        if all(
            tuple(o.shape) == tuple(r.shape) and _exact(*_measure(o, r, std))
            for o, r in zip(outs, other_refs, strict=True)
        ):
            report.cause = (
                f"the {other} backend's arithmetic (it matches transformers' {other} processor within one level on "
                f"every probe): pass --processor-backend {other} if that is the backend it ports"
            )
        else:
            report.cause, report.ranking = _diagnose(recipe, images, outs, spreads, std)
    return report


def _exact(rms: float, mx: float) -> bool:
    """Against one backend: every value within one uint8 level (a rounding at .5 decided the other way), and
    no more than a quarter level RMS (such roundings are rare). The thousandth of a level is float32's error in
    normalising a uint8 value, not a tolerance."""
    return math.isfinite(rms) and rms <= 0.25 and mx <= 1.0 + 1e-3


def _recipe_for(processor: SiglipImageProcessor, ref_fn: Callable, images: Sequence[tuple[str, Image.Image]]) -> Recipe:
    """The recipe that reproduces transformers' output on every probe (alpha handling differs by version)."""
    names = {v: k for k, v in FILTERS.items()}
    stats = next(
        (
            k
            for k, (m, s) in MEANS_STDS.items()
            if np.allclose(m, processor.image_mean) and np.allclose(s, processor.image_std)
        ),
        None,
    )
    if (
        stats is None
        or processor.resample not in names
        or not (processor.do_resize and processor.do_rescale and processor.do_normalize)
    ):
        raise InputError(
            "the reference processor's settings are outside what --candidate-processor can model "
            f"(resample {processor.resample}, mean {processor.image_mean}, std {processor.image_std})",
            "preprocessor_config.json",
            "compare with a standard SigLIP preprocessor config",
        )
    for alpha in ("white", "drop"):
        recipe = Recipe(size=processor.size, resample=names[processor.resample], stats=stats, alpha=alpha)
        if all(float((render(im, recipe) - ref_fn(im)).abs().max()) <= 1e-5 for _, im in images):
            return recipe
    raise AssertionError("no recipe reproduces transformers' processor on the probes")  # our bug, not the user's


def _diagnose(
    recipe: Recipe, images: Sequence[tuple[str, Image.Image]], outs: Sequence[torch.Tensor], spreads, std
) -> tuple[str | None, list[dict[str, Any]]]:
    ranking, seen = [], set()
    for variant in VARIANTS:
        changed = variant.change(recipe)
        if changed is None or changed in seen:  # a combined variant can equal a single one for this reference
            continue
        seen.add(changed)
        worst, ok = 0.0, True
        for (_, im), out, (s_rms, s_max) in zip(images, outs, spreads, strict=True):
            v = render(im, changed)
            if tuple(v.shape) != tuple(out.shape):
                worst, ok = math.inf, False
                break
            rms, mx = _measure(out, v, std)
            ok &= _rule(rms, mx, s_rms, s_max)
            worst = max(worst, rms)
        ranking.append(
            {"variant": variant.name, "worst_rms_levels": worst if math.isfinite(worst) else None, "reproduces": ok}
        )
    ranking.sort(
        key=lambda r: (not r["reproduces"], math.inf if r["worst_rms_levels"] is None else r["worst_rms_levels"])
    )
    cause = ranking[0]["variant"] if ranking and ranking[0]["reproduces"] else None
    return cause, ranking[:5]


def _call(candidate: Callable[[Image.Image], Any], image: Image.Image, name: str, label: str) -> torch.Tensor:
    try:
        out = candidate(image.copy())
    except Exception as exc:  # user code
        raise InputError(
            f"candidate processor raised {type(exc).__name__}: {exc} (probe {label})", name, "fix the processor"
        ) from None
    if isinstance(out, dict) and "pixel_values" in out:
        out = out["pixel_values"]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise InputError(
            f"candidate processor returned {type(out).__name__}, not a floating-point tensor (probe {label})",
            name,
            "return pixel values [3, H, W] or [1, 3, H, W]",
        )
    if out.ndim == 4 and out.shape[0] == 1:
        out = out[0]
    if out.ndim != 3:
        raise InputError(
            f"candidate processor returned shape {list(out.shape)} (probe {label})",
            name,
            "return [3, H, W] or [1, 3, H, W]",
        )
    return out.detach().to("cpu", torch.float32)


def processor_for_source(
    weights: str | None = None,
    model: str | None = None,
    preset: str | None = None,
    revision: str | None = None,
    config: Any = None,
) -> SiglipImageProcessor | Siglip2ImageProcessor:
    """The preprocessing the model was published with: its ``preprocessor_config.json`` when the source has
    one (a folder, a hub repo), else the defaults of its generation at the config's resolution (a preset:
    SigLIP bicubic, SigLIP 2 bilinear, NaFlex as many patches as its position grid; default base-224).
    ``config``: the vision config if already known."""
    from siglip_scratch.config import NAFLEX_PRESETS, Siglip2VisionConfig, get_preset, load_config
    from siglip_scratch.errors import ConfigError
    from siglip_scratch.files import read_json

    found: Path | None = None
    if weights is not None:
        folder = Path(weights) if Path(weights).is_dir() else Path(weights).parent
        found = folder / "preprocessor_config.json" if (folder / "preprocessor_config.json").is_file() else None
        if config is None:
            config = load_config(read_json(folder / "config.json", what="config.json", error=ConfigError))
    elif model is not None:
        from siglip_scratch.hub import PREPROCESSOR_NAME, hub_file

        found = hub_file(model, PREPROCESSOR_NAME, revision=revision, optional=True)
        if config is None:
            file = hub_file(model, "config.json", revision=revision)
            config = load_config(read_json(file, what="config.json", error=ConfigError), source=str(file))
    else:
        preset = preset or "google/siglip-base-patch16-224"
        config = get_preset(preset)
    if isinstance(config, Siglip2VisionConfig):
        if found is not None:
            return Siglip2ImageProcessor.from_pretrained(found)
        return Siglip2ImageProcessor(patch_size=config.patch_size, max_num_patches=config.num_patches)
    if found is not None:
        return SiglipImageProcessor.from_pretrained(found)
    if preset is not None and preset not in NAFLEX_PRESETS:
        return SiglipImageProcessor.for_preset(preset)
    return SiglipImageProcessor.for_config(config)


def load_processor_callable(spec: str) -> Callable[[Image.Image], Any]:
    """``module.path:fn`` or ``file.py:fn``: a function from a PIL image to pixel values."""
    return load_candidate_factory(spec, "--candidate-processor", "function")
