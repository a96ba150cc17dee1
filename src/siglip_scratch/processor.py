"""`SiglipImageProcessor`: PIL images in, float32 ``[B, 3, H, W]`` out. No torchvision.

Two backends, one per transformers image processor (they differ by up to 0.016 on the same image):

- ``backend="pil"`` follows transformers' PIL processor (``SiglipImageProcessorPil`` in 5.x,
  ``SiglipImageProcessor`` in 4.57): any mode to RGB, PIL resize on uint8, rescale in float64 then
  float32, normalize in float32.
- ``backend="fast"`` follows the tensor ("fast") processor (``SiglipImageProcessor`` in 5.x when
  torchvision imports, ``SiglipImageProcessorFast`` in 4.57), with torch alone: the same RGB
  conversion, then ``torch.nn.functional.interpolate(antialias=True)`` on the uint8 image (the
  kernel torchvision's ``resize`` picks on CPU: native uint8, or through float32 with rounding
  where torchvision does that), then rescale and normalize fused as ``(x - 255·mean) / (255·std)``
  in float32.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import SiglipVisionConfig
from .errors import ConfigError, InputError, SourceError
from .files import read_json

__all__ = ["BACKENDS", "Siglip2ImageProcessor", "SiglipImageProcessor", "load_image", "naflex_size", "to_rgb"]

ImageLike = Image.Image | str | os.PathLike | np.ndarray

BICUBIC, BILINEAR = int(Image.Resampling.BICUBIC), int(Image.Resampling.BILINEAR)
_RESAMPLE_NAMES = {int(r): r.name.lower() for r in Image.Resampling}


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image file; corrupt, truncated and oversized files raise `InputError`."""
    where = str(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise SourceError("image not found", where, "check the path") from None
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"image has too many pixels to decode safely ({str(exc).split('. ')[0]})",
            where,
            "downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
        ) from None
    except UnidentifiedImageError:
        raise InputError("not a readable image", where, "pass a PNG, JPEG or other format Pillow reads") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image is corrupt or truncated ({exc})", where, "re-export or re-download it") from None


def to_rgb(image: Image.Image, transparency: str = "white") -> Image.Image:
    """Any PIL mode to RGB. Transparency (an alpha band or palette transparency) is composited onto
    white (``"white"``, transformers >= 5) or dropped (``"drop"``, transformers 4.57's convert)."""
    if transparency == "white" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class SiglipImageProcessor:
    """Preprocessing for SigLIP: resize to ``size``, rescale to [0, 1], normalize with mean/std.

    ``size`` is (height, width). ``resample`` is a PIL resampling code: 3 (bicubic) for SigLIP,
    2 (bilinear) for SigLIP 2 fixed-resolution checkpoints. ``transparency`` says what happens to
    transparent pixels: ``"white"`` composites onto white (transformers 5.x), ``"drop"`` discards
    alpha and keeps the colour underneath (transformers 4.57). Opaque images are unaffected.
    ``backend`` picks the arithmetic: ``"pil"`` (transformers' PIL processor) or ``"fast"`` (its
    tensor processor, the 5.x default where torchvision is installed); see the module docstring.
    """

    size: tuple[int, int] = (224, 224)
    resample: int = BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True
    transparency: str = "white"
    backend: str = "pil"

    def __post_init__(self) -> None:
        def number(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.transparency not in ("white", "drop"):
            raise ConfigError(f"unknown transparency {self.transparency!r}", "transparency", 'use "white" or "drop"')
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}", "backend", 'use "pil" or "fast"')
        if self.backend == "fast" and self.resample not in _TORCH_MODES:
            raise ConfigError(
                f"backend 'fast' resizes bilinear or bicubic only, got {_RESAMPLE_NAMES.get(self.resample, self.resample)}",
                "resample",
                'use backend="pil" for other PIL filters',
            )
        size = self.size
        if not (
            isinstance(size, tuple)
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ConfigError(f"size must be two positive integers, got {size!r}", "size", None)
        if (
            isinstance(self.resample, bool)
            or not isinstance(self.resample, int)
            or self.resample not in _RESAMPLE_NAMES
        ):
            raise ConfigError(f"unknown resample code {self.resample!r}", "resample", "use 2 (bilinear) or 3 (bicubic)")
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}", name, None)
        if not number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ConfigError(
                f"rescale_factor must be a positive number, got {self.rescale_factor!r}", "rescale_factor", None
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 3 and all(number(v) for v in value)):
                raise ConfigError(f"{name} must be three numbers, got {value!r}", name, None)
        if any(s == 0 for s in self.image_std):
            raise ConfigError("image_std must not contain 0", "image_std", None)

    @classmethod
    def for_config(cls, config: SiglipVisionConfig, **overrides: Any) -> SiglipImageProcessor:
        """The SigLIP defaults at the model's resolution."""
        return cls(size=(config.image_size, config.image_size), **overrides)

    @classmethod
    def for_preset(cls, hub_id: str, **overrides: Any) -> SiglipImageProcessor:
        """What the hub checkpoint ships: SigLIP's bicubic, or SigLIP 2's bilinear, at its resolution."""
        from .config import SIGLIP2_PRESETS, get_preset

        resample = BILINEAR if hub_id in SIGLIP2_PRESETS else BICUBIC
        return cls.for_config(get_preset(hub_id), **{"resample": resample, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "preprocessor_config") -> SiglipImageProcessor:
        """Read a ``preprocessor_config.json`` dict; keys that are not preprocessing steps are ignored."""
        if not isinstance(data, dict):
            raise ConfigError("preprocessor config must be a JSON object", source, None)
        values: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in names:
                continue
            if key == "size":
                value = _parse_size(value, source)
            elif key in ("image_mean", "image_std"):
                value = tuple(value) if isinstance(value, list) else (value,) * 3
            elif key == "resample" and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb") and not isinstance(value, bool):
                if value is None and key == "do_convert_rgb":
                    continue
                raise ConfigError(f"{key} must be true or false, got {value!r}", f"{source}: {key}", None)
            values[key] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(exc.what, f"{source}: {exc.where}", exc.fix) from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> SiglipImageProcessor:
        data, source = _read_preprocessor_config(path)
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "SiglipImageProcessor",
            "image_std": list(self.image_std),
            "processor_class": "SiglipProcessor",
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.size[0], "width": self.size[1]},
        }

    def preprocess_one(self, image: ImageLike) -> np.ndarray:
        """One image to a float32 ``[3, H, W]`` array."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
                raise InputError(
                    f"numpy images must be uint8 [H, W, C] with C in 1, 3, 4; got {image.dtype} {image.shape}",
                    "images",
                    "pass PIL images",
                )
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise InputError(f"image has zero size {image.shape[1::-1]}", "images", None)
            if self.backend == "fast":  # the tensor processor converts arrays as tensors, not through PIL
                return self._fast(_rgb_array(image, self.transparency) if self.do_convert_rgb else image)
            image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if not isinstance(image, Image.Image):
            raise InputError(f"cannot preprocess {type(image).__name__}", "images", "pass PIL images or file paths")
        if image.width == 0 or image.height == 0:
            raise InputError(f"image has zero size {image.size}", "images", None)
        if self.do_convert_rgb:
            image = to_rgb(image, self.transparency)
        if self.backend == "fast":
            return self._fast(np.array(image))
        if self.do_resize:
            h, w = self.size
            image = image.resize((w, h), resample=self.resample)
        arr = np.array(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = np.moveaxis(arr, -1, 0)  # [H, W, C] -> [C, H, W]
        if self.do_rescale:
            arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            arr = arr.astype(np.float32) if not np.issubdtype(arr.dtype, np.floating) else arr
            mean = np.array(self.image_mean, dtype=arr.dtype)[:, None, None]
            std = np.array(self.image_std, dtype=arr.dtype)[:, None, None]
            arr = (arr - mean) / std
        return arr.astype(np.float32, copy=False)

    def _fast(self, arr: np.ndarray) -> np.ndarray:
        """The tensor processor's arithmetic on one RGB (or, without ``do_convert_rgb``, any) uint8 image."""
        image = torch.from_numpy(arr if arr.ndim == 3 else arr[:, :, None]).permute(2, 0, 1)[None]
        if self.do_resize and tuple(image.shape[-2:]) != self.size:
            image = _interpolate_uint8(image, self.size, self.resample)
        if self.do_rescale and self.do_normalize:  # fused: (x - mean/factor) / (std/factor)
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            image = image.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])
        elif self.do_normalize:
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
            image = image.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])
        elif self.do_rescale:
            image = image * self.rescale_factor
        return image[0].to(torch.float32).numpy()

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images (PIL, paths, or uint8 HWC arrays) to float32 ``pixel_values`` [B, 3, H, W]."""
        if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise InputError("no images given", "images", "pass at least one image")
        arrays = [self.preprocess_one(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise InputError(f"images differ in size after preprocessing: {sorted(shapes)}", "images", "set do_resize")
        return torch.from_numpy(np.stack(arrays))


BACKENDS = ("pil", "fast")


def _rgb_array(arr: np.ndarray, transparency: str) -> np.ndarray:
    """A uint8 ``[H, W, 1|3|4]`` array to RGB the way the tensor processor converts tensors: grey is
    repeated; RGBA is composited onto white in float32 and scaled back as torchvision's ``to_dtype``
    does (``x·(256 − 1e-3)``, truncated), or its alpha dropped."""
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 3:
        return arr
    if transparency == "drop":
        return np.ascontiguousarray(arr[..., :3])
    x = torch.from_numpy(arr).to(torch.float32).mul_(1.0 / 255)
    rgb = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
    return rgb.mul(255 + 1.0 - 1e-3).to(torch.uint8).numpy()


_TORCH_MODES = {BICUBIC: "bicubic", BILINEAR: "bilinear"}


def _interpolate_uint8(image: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """torchvision ``resize(antialias=True)`` on a uint8 ``[1, C, H, W]`` image, with torch alone.

    Like torchvision 0.2x on CPU: bicubic runs torch's native uint8 antialiased kernel; bilinear does
    too where the CPU has AVX2/AVX512 (or is ARM), else it goes through float32 and is rounded back.
    """
    mode = _TORCH_MODES[resample]  # checked in SiglipImageProcessor.__post_init__
    native = image.device.type == "cpu" and (
        mode == "bicubic"
        or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64")
    )
    if native:
        return torch.nn.functional.interpolate(image, size=size, mode=mode, align_corners=False, antialias=True)
    out = torch.nn.functional.interpolate(
        image.to(torch.float32), size=size, mode=mode, align_corners=False, antialias=True
    )
    if mode == "bicubic":
        out = out.clamp_(0, 255)
    return out.round_().to(torch.uint8)


def _parse_size(value: Any, source: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (value["height"], value["width"])
    if isinstance(value, list) and len(value) == 2:
        return (value[0], value[1])
    if isinstance(value, dict) and "shortest_edge" in value:
        raise ConfigError(
            "size with shortest_edge is not a SigLIP preprocessing", f"{source}: size", "use height and width"
        )
    raise ConfigError(f"size must be {{height, width}}, got {value!r}", f"{source}: size", None)


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The (height, width) an image is resized to under NaFlex: both multiples of ``patch_size`` (at least
    one patch), the aspect ratio kept as closely as that allows, and at most ``max_num_patches`` patches.

    The scale is found by bisection on [1e-6, 100] until the interval is under 1e-5, keeping the largest
    scale that fits: the procedure transformers' SigLIP 2 processors use, so sizes agree to the pixel.
    """

    def scaled(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


@dataclass(frozen=True)
class Siglip2ImageProcessor:
    """Preprocessing for SigLIP 2 NaFlex: each image resized (aspect kept) to fit ``max_num_patches``
    patches of ``patch_size``, rescaled and normalised like SigLIP, cut into flattened patches
    (row-major over the patch grid, each patch's values in (row, column, channel) order) and padded.

    ``__call__`` returns ``pixel_values`` float32 [B, max_num_patches, C·p·p], ``pixel_attention_mask``
    int32 [B, max_num_patches] (1 = a real patch) and ``spatial_shapes`` int64 [B, 2] (patch rows, columns):
    the inputs of `Siglip2VisionModel`, as transformers' PIL ``Siglip2ImageProcessor`` makes them.
    """

    patch_size: int = 16
    max_num_patches: int = 256
    resample: int = BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True
    transparency: str = "white"

    def __post_init__(self) -> None:
        for name in ("patch_size", "max_num_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", name, None)
        self._per_image((self.patch_size, self.patch_size))  # the shared settings are checked there

    def _per_image(self, size: tuple[int, int]) -> SiglipImageProcessor:
        return SiglipImageProcessor(
            size=size,
            resample=self.resample,
            do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize,
            image_mean=self.image_mean,
            image_std=self.image_std,
            do_convert_rgb=self.do_convert_rgb,
            transparency=self.transparency,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "preprocessor_config") -> Siglip2ImageProcessor:
        """Read a ``Siglip2ImageProcessor`` preprocessor_config.json: the shared steps exactly as
        `SiglipImageProcessor.from_dict` reads (and checks) them, plus ``patch_size`` and ``max_num_patches``."""
        shared = SiglipImageProcessor.from_dict(
            {k: v for k, v in data.items() if k != "size"} if isinstance(data, dict) else data, source=source
        )
        values = {k: data[k] for k in ("patch_size", "max_num_patches") if data.get(k) is not None}
        try:
            return cls(
                **values,
                # only what the file states: an absent key keeps SigLIP 2's default (bilinear), not SigLIP's
                **{f.name: getattr(shared, f.name) for f in fields(cls) if f.name in data and f.name not in values},
            )
        except ConfigError as exc:
            raise ConfigError(exc.what, f"{source}: {exc.where}", exc.fix) from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Siglip2ImageProcessor:
        data, source = _read_preprocessor_config(path)
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_processor_type": "Siglip2ImageProcessor",
            "image_std": list(self.image_std),
            "max_num_patches": self.max_num_patches,
            "patch_size": self.patch_size,
            "processor_class": "Siglip2Processor",
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
        }

    def size_for(self, image: Image.Image) -> tuple[int, int]:
        return naflex_size(image.height, image.width, self.patch_size, self.max_num_patches)

    def preprocess_one(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """One image to (float32 patches [h·w, C·p·p], (h, w) in patches)."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape[:2]:
                raise InputError(
                    f"numpy images must be uint8 [H, W, C] with C in 1, 3, 4; got {image.dtype} {image.shape}",
                    "images",
                    "pass PIL images",
                )
            image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if not isinstance(image, Image.Image):
            raise InputError(f"cannot preprocess {type(image).__name__}", "images", "pass PIL images or file paths")
        if image.width == 0 or image.height == 0:
            raise InputError(f"image has zero size {image.size}", "images", None)
        height, width = self.size_for(image)
        arr = self._per_image((height, width)).preprocess_one(image)  # [C, H, W]
        p = self.patch_size
        c, h, w = arr.shape[0], height // p, width // p
        patches = arr.reshape(c, h, p, w, p).transpose(1, 3, 2, 4, 0).reshape(h * w, p * p * c)
        return patches, (h, w)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise InputError("no images given", "images", "pass at least one image")
        n = self.max_num_patches
        values, masks, shapes = [], [], []
        for image in images:
            patches, shape = self.preprocess_one(image)
            padded = np.zeros((n, patches.shape[1]), dtype=np.float32)
            padded[: len(patches)] = patches
            mask = np.zeros(n, dtype=np.int32)
            mask[: len(patches)] = 1
            values.append(padded)
            masks.append(mask)
            shapes.append(shape)
        return {
            "pixel_values": torch.from_numpy(np.stack(values)),
            "pixel_attention_mask": torch.from_numpy(np.stack(masks)),
            "spatial_shapes": torch.tensor(shapes, dtype=torch.int64),
        }


def _read_preprocessor_config(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """(the JSON of ``preprocessor_config.json`` in a folder, or of a file given directly; its path)."""
    path = Path(path)
    file = path / "preprocessor_config.json" if path.is_dir() else path
    return read_json(
        file, what="preprocessor_config.json", error=ConfigError, missing_fix="pass the model folder"
    ), str(file)
