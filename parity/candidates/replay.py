"""The replay tree, written once: a module tree with the canonical site names whose modules emit values a
candidate computed elsewhere (an ONNX graph's, an activation file's), so the harness hooks them exactly as it
hooks a PyTorch module, teacher forcing included.

A source implements ``emit(site, x)`` (the value of ``site`` given its input ``x``, or None when the source
ignores inputs) and ``replay(inputs)`` (the ``(site, input)`` pairs of one run, in order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..sites import input_tensor

__all__ = ["ReplaySite", "ReplaySource", "ReplayTree", "install"]


class ReplaySource(Protocol):
    def emit(self, site: str, x: torch.Tensor | None) -> torch.Tensor: ...

    def replay(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor | None]]: ...


class ReplaySite(nn.Module):
    """One site: returns what its source says for it, given the (possibly teacher-forced) input."""

    def __init__(self, source: ReplaySource, site: str):
        super().__init__()
        self._source = [source]  # a list, so the source is not registered as a submodule (no cycle)
        self.site = site

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._source[0].emit(self.site, input_tensor(args, kwargs))


class ReplayTree(nn.Module):
    """Canonical sites as modules; ``forward`` calls each site its source replays, with that site's input."""

    def __init__(self, source: ReplaySource, sites: Sequence[str]):
        super().__init__()
        self._source = [source]
        for site in sites:
            install(self, site, ReplaySite(source, site))

    def forward(self, *args: Any, **kwargs: Any) -> None:
        for site, x in self._source[0].replay(*args, **kwargs):
            module = self.get_submodule(site)
            module(x) if x is not None else module()
        return None


def install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, creating plain containers on the way; a site that is
    also a container (``…layers.3`` holds ``…layers.3.mlp``) keeps both roles."""
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    existing = parent._modules.get(parts[-1])
    if existing is not None:  # a container made earlier: adopt its children
        for name, sub in existing._modules.items():
            module.add_module(name, sub)
    parent.add_module(parts[-1], module)
