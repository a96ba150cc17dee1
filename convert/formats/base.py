"""What every checkpoint family provides (`Format`), what it returns (`Layout`), and the config finisher the
table families share.

    >>> from siglip_scratch.convert.formats import FORMATS
    >>> [f.family for f in FORMATS]
    ['big_vision_naflex', 'big_vision', 'timm', 'hf']
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from siglip_scratch.config import PRESETS, AnyVisionConfig, SiglipVisionConfig
from siglip_scratch.errors import ConfigError
from siglip_scratch.modeling import SiglipVisionModel

from ..native import Get, Leaf
from ..stores import Store
from ..tables import Planned

__all__ = ["Format", "Layout", "config_from_grid"]


@dataclass
class Layout:
    """A family's reading of one store: the output tensors it plans, the source keys they use, what it drops."""

    name: str  # for the detection line ("big_vision PaliGemma (img/…)")
    planned: list[Planned]
    used: set[str]
    drops: list[str]
    notes: list[str] = field(default_factory=list)
    root: str = ""  # the tower's prefix in the source's own key names
    inferred: AnyVisionConfig | None = None  # the config from tensor shapes, when the family can infer one


class Format(abc.ABC):
    """One checkpoint family: how to recognise it, its layout (a key table, or the prefix rules), the config it
    implies, and its native forward for ``--verify`` (None: compared tensor by tensor)."""

    family: ClassVar[str]
    native: ClassVar[Callable[[Get, Any, torch.Tensor], dict[str, Leaf]] | None] = None

    @abc.abstractmethod
    def detects(self, store: Store, keys: Sequence[str]) -> bool:
        """Whether this family reads ``store`` (families are asked in `FORMATS` order; the first that says yes)."""

    @abc.abstractmethod
    def layout(
        self,
        store: Store,
        keys: Sequence[str],
        *,
        folder: Path,
        where: str,
        use_head: bool,
        hidden_act: str | None,
        infer: bool,
    ) -> Layout:
        """Plan every output tensor; ``infer``: no --config was given, infer the config from the shapes."""

    def probe(self, folder: Path, generator: torch.Generator) -> tuple[torch.nn.Module, Any, torch.Tensor]:
        """(the converted model in float64, its config, inputs) for ``--verify``'s native comparison."""
        model = SiglipVisionModel.from_pretrained(folder, dtype=torch.float64).eval()
        cfg = model.config
        shape = (1, cfg.num_channels, cfg.image_size, cfg.image_size)
        return model, cfg, torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1


def config_from_grid(
    *,
    d: int,
    c: int,
    p: int,
    n: int,
    heads: int,
    inter: int,
    layers: int,
    head: bool,
    stated_size: int | None,
    notes: list[str],
) -> SiglipVisionConfig:
    """The config from tensor shapes. The grid fixes ``image_size`` only up to the patch (so400m/14's 27x27 grid is
    378 to 391 px): a size the source states wins, then the one hub preset of these exact shapes (384 for
    so400m/14), then grid x patch; ``notes`` says which."""
    grid = math.isqrt(n)
    if grid * grid != n or n == 0:
        raise ConfigError(f"position table of {n} entries is not a square grid", "pos_embedding", "pass --config")
    config = SiglipVisionConfig(
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=c,
        image_size=grid * p,
        patch_size=p,
        vision_use_head=head,
    )
    if stated_size is not None:
        if stated_size // p != grid:
            raise ConfigError(
                f"the timm config's image size {stated_size} does not fit the {grid}x{grid} position grid of patch {p}",
                "config.json: model_args.img_size",
                "pass --config with the right image_size",
            )
        notes.append(f"image_size {stated_size} from the timm config")
        return config.replace(image_size=stated_size)
    sizes = {
        (hub_id, preset.image_size)
        for hub_id, preset in PRESETS.items()
        if preset.replace(image_size=config.image_size, vision_use_head=head) == config
        and preset.image_size // p == grid
        and preset.image_size != config.image_size
    }
    if len({size for _, size in sizes}) == 1:
        hub_id, size = min(sizes)
        notes.append(
            f"image_size {size} as {hub_id} (a {grid}x{grid} grid of {p}-px patches fits {grid * p}–{grid * p + p - 1} px)"
        )
        return config.replace(image_size=size)
    return config
