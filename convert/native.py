"""What the source-native forwards for ``--verify`` share (each family's forward is in `formats/`): the source
checkpoint computed in its *own* layout.

The converter maps source tensors to hub keys through a table (`tables.py`); a wrong row (q and k
swapped, a kernel permuted the wrong way) produces a folder that loads and runs, and agrees with
itself. So ``--verify`` does not compare the output with itself: it computes the tower from the
source tensors by their source names, the way the source framework does (big_vision's einsums over
``(D, heads, head_dim)`` kernels and HWIO convolutions; timm's fused ``qkv`` split by its reshape), and
records each leaf module's input and output under our module path. Each of our leaf modules is then
run on the native input and must reproduce the native output (float64 on both sides).

Nothing here imports the converter's tables: the semantics are written again, from the source
framework's point of view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Get", "Leaf", "attend", "gelu", "layer_norm"]

Get = Callable[[str], torch.Tensor]  # source key (relative to the tower root) -> float64 tensor


@dataclass
class Leaf:
    """One of our leaf modules as the source computes it: its inputs and output, and the source keys
    that hold its weights (for the error message)."""

    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    sources: tuple[str, ...]


def gelu(x: torch.Tensor, hidden_act: str = "gelu_pytorch_tanh") -> torch.Tensor:
    """flax ``nn.gelu`` (big_vision's default) is the tanh approximation; timm runs what the output
    config says (``--hidden-act``)."""
    if hidden_act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * scale + bias


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, heads, Lq, hd] x [B, heads, Lk, hd] -> [B, heads, Lq, hd], softmax(q·k / √hd) v."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v
