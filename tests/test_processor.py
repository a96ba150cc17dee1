"""Our image processor against transformers' PIL image processor, within 1e-6."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_scratch import ConfigError, InputError, SiglipImageProcessor, SiglipVisionConfig
from siglip_scratch.processor import load_image

from .catalogue import covers


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    base = Image.fromarray(rgba, "RGBA")
    if mode == "I;16":
        # Mostly < 256 so the 16-bit -> 8-bit clip does not flatten the whole image.
        return Image.fromarray(rng.integers(0, 400, (h, w), dtype=np.uint16)).convert("I;16")
    if mode == "P-transparent":
        p = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        p.info["transparency"] = 3
        return p
    return base.convert(mode)


MODES = ["RGB", "L", "LA", "RGBA", "P", "P-transparent", "CMYK", "I;16", "1"]
SIZES = [(224, 224), (17, 31), (300, 200), (640, 96)]


def _reference_processor(hf, **kwargs):
    # 5.x: SiglipImageProcessorPil (do_convert_rgb defaults to True). 4.57: SiglipImageProcessor, whose
    # do_convert_rgb defaults to None and then fails on grayscale input; we convert, so ask it to.
    cls = getattr(hf, "SiglipImageProcessorPil", None) or hf.SiglipImageProcessor
    return cls(do_convert_rgb=True, **kwargs)


TRANSPARENT = {"LA", "RGBA", "P-transparent"}


@covers("I04", "I05", "I06")
@pytest.mark.parametrize("mode", MODES)
def test_matches_transformers_pil_processor(mode, hf):
    # transformers 5 composites transparency onto white, 4.57 drops alpha: one option each.
    v457 = hf.__version__.startswith("4.")
    ours = SiglipImageProcessor(transparency="drop" if v457 else "white")
    theirs = _reference_processor(hf)
    images = [_image(mode, size, i) for i, size in enumerate(SIZES)]
    a = ours(images)
    b = torch.as_tensor(np.asarray(theirs(images=images, return_tensors="np")["pixel_values"]))
    assert a.dtype == torch.float32 and a.shape == b.shape == (len(SIZES), 3, 224, 224)
    d = (a.double() - b.double()).abs().max().item()
    assert d <= 1e-6, f"{mode}: max |Δ| = {d:.3e}"


@pytest.mark.parametrize("resample", [2, 3])
def test_resample_and_size_from_preprocessor_config(tmp_path, resample, hf):
    cfg = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": resample,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    }
    (tmp_path / "preprocessor_config.json").write_text(__import__("json").dumps(cfg))
    ours = SiglipImageProcessor.from_pretrained(tmp_path)
    assert ours.size == (384, 384) and ours.resample == resample
    theirs = _reference_processor(hf, size={"height": 384, "width": 384}, resample=resample)
    images = [_image("RGB", (500, 333), 1)]
    d = (ours(images).double() - torch.as_tensor(theirs(images=images, return_tensors="np")["pixel_values"])).abs()
    assert d.max().item() <= 1e-6, f"max |Δ| = {d.max().item():.3e}"


def test_transparency_modes_differ_only_on_transparent_pixels():
    img = _image("RGBA", (50, 40), 3)
    white, drop = SiglipImageProcessor(transparency="white"), SiglipImageProcessor(transparency="drop")
    assert not torch.equal(white(img), drop(img))
    opaque = img.convert("RGB")
    assert torch.equal(white(opaque), drop(opaque))
    with pytest.raises(ConfigError, match="transparency"):
        SiglipImageProcessor(transparency="black")


def test_for_config_and_to_dict_round_trip():
    p = SiglipImageProcessor.for_config(SiglipVisionConfig(image_size=256))
    assert p.size == (256, 256)
    assert SiglipImageProcessor.from_dict(p.to_dict()) == p


def test_paths_and_arrays(tmp_path):
    img = _image("RGB", (40, 30), 0)
    img.save(tmp_path / "a.png")
    p = SiglipImageProcessor(size=(32, 32))
    from_path = p(tmp_path / "a.png")
    from_array = p(np.array(img))
    assert torch.equal(from_path, from_array) and from_path.shape == (1, 3, 32, 32)


@covers("I01", "I02")
def test_corrupt_and_truncated_images(tmp_path):
    buf = io.BytesIO()
    _image("RGB", (64, 64), 0).save(buf, format="PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for name in ("trunc.png", "junk.jpg"):
        with pytest.raises(InputError) as e:
            load_image(tmp_path / name)
        assert name in str(e.value)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="resample"):
        SiglipImageProcessor(resample=42)
    with pytest.raises(ConfigError, match="shortest_edge"):
        SiglipImageProcessor.from_dict({"size": {"shortest_edge": 224}})
    with pytest.raises(InputError, match="no images"):
        SiglipImageProcessor()([])


def test_fast_backend_is_its_own_arithmetic_and_checks_its_inputs():
    """The fast backend (tested against transformers' torchvision processor under `make compat`) is
    not the PIL one: on a photo-like image they differ by a few uint8 levels, as transformers' two do."""
    images = [_image("RGB", size, i) for i, size in enumerate(SIZES)]
    pil, fast = SiglipImageProcessor(), SiglipImageProcessor(backend="fast")
    assert pil.backend == "pil"
    a, b = pil(images), fast(images)
    assert a.shape == b.shape and b.dtype == torch.float32
    d = (a - b).abs().max().item()
    assert 1e-3 < d < 0.05, f"pil vs fast: max |Δ| = {d:.3e}"
    # Already at size: no resampling, and both backends agree to float32 rounding of the fused normalize.
    same = [_image("RGB", (224, 224), 9)]
    assert (pil(same) - fast(same)).abs().max().item() <= 1e-6
    with pytest.raises(ConfigError, match="backend"):
        SiglipImageProcessor(backend="torchvision")
    with pytest.raises(ConfigError, match="bilinear or bicubic only"):
        SiglipImageProcessor(backend="fast", resample=0)
    assert SiglipImageProcessor.from_dict({"backend": "fast"}).backend == "fast"
