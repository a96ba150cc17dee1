"""Image processors as users write them when porting SigLIP: each is a function from a PIL image to
pixel values, the shape `siglip-parity --candidate-processor` takes. `faithful` ports the PIL backend and
`torchvision_arithmetic` the torchvision one, both honestly; each other one carries one of the public preprocessing bugs (none is built from our own renderer)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIZE = 224
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))


def _rgb(image: Image.Image) -> Image.Image:
    """Transparency as the installed transformers treats it: on white from 5.0, dropped before."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return image.convert("RGB")
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_tensor(arr: np.ndarray, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    x = arr.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def faithful(image: Image.Image) -> torch.Tensor:
    return _to_tensor(np.asarray(_rgb(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC)))


def imagenet_stats(image: Image.Image) -> torch.Tensor:
    return _to_tensor(np.asarray(_rgb(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC)), *IMAGENET)


def bilinear(image: Image.Image) -> torch.Tensor:
    return _to_tensor(np.asarray(_rgb(image).resize((SIZE, SIZE), Image.Resampling.BILINEAR)))


def centre_crop(image: Image.Image) -> torch.Tensor:
    """torchvision's Resize(224) + CenterCrop(224), written out."""
    image = _rgb(image)
    w, h = image.size
    scale = SIZE / min(w, h)
    image = image.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
    return _to_tensor(np.asarray(image.crop((left, top, left + SIZE, top + SIZE))))


def torch_interpolate(image: Image.Image) -> torch.Tensor:
    """A port that resizes with F.interpolate's defaults (no antialias), in float."""
    x = torch.from_numpy(np.asarray(_rgb(image), dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False)[0]
    return (x - 0.5) / 0.5


def bgr(image: Image.Image) -> torch.Tensor:
    return faithful(image).flip(0)


def brighter(image: Image.Image) -> torch.Tensor:
    """A bug no variant models: every pixel 3 levels brighter."""
    return faithful(image) + 3 / 255 / 0.5


def raises(image: Image.Image) -> torch.Tensor:
    raise RuntimeError("no such mode")


def torchvision_arithmetic(image: Image.Image) -> torch.Tensor:
    """transformers' torchvision processor's arithmetic (an honest port of that backend, not of PIL's)."""
    import transformers

    from siglip_scratch.processor import SiglipImageProcessor

    white = int(transformers.__version__.split(".")[0]) >= 5
    fast = SiglipImageProcessor(size=(SIZE, SIZE), backend="fast", transparency="white" if white else "drop")
    return torch.from_numpy(fast.preprocess_one(image))
