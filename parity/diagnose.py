"""Say *why*: known-bug variants of the reference module, run at the first divergent site.

In isolated mode the reference's input to the failing site is known. Each variant below recomputes
that site from that input with one known porting bug (exact GELU for tanh, LayerNorm eps 1e-5, q and
k swapped, …), using our encoder's module for the site (bit-identical to transformers', sharing the
checkpoint's tensors). A variant whose output reproduces the candidate's within the site's oracle
bound (the same bound the candidate failed against the reference) is reported as the likely cause;
the rest are ranked by how close they came, relative to the candidate's error against the reference.

Adding a variant: write ``def f(module, x, config) -> Tensor`` and add it to ``VARIANTS`` under the
kind of site it applies to (``norm``, ``attention``, ``mlp``, ``layer``, ``embeddings``, ``head``),
with a description that completes "likely cause: … in <site>". (Head counts depend on the config:
`_heads_variants` adds them at run time.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from siglip_scratch.config import SiglipVisionConfig

__all__ = ["VARIANTS", "Diagnosis", "diagnose", "site_kind"]

Variant = Callable[[nn.Module, torch.Tensor, SiglipVisionConfig], torch.Tensor]


# -- the variants ---------------------------------------------------------------------------------------
def _norm(eps: float | None = None, affine: bool = True) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig) -> torch.Tensor:
        w, b = (m.weight, m.bias) if affine else (None, None)
        return F.layer_norm(x, m.normalized_shape, w, b, m.eps if eps is None else eps)

    return f


def _other_gelu(cfg: SiglipVisionConfig) -> str:
    return "none" if cfg.hidden_act == "gelu_pytorch_tanh" else "tanh"


def _mlp_other_gelu(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig) -> torch.Tensor:
    return m.fc2(F.gelu(m.fc1(x), approximate=_other_gelu(cfg)))


def _soft(t: torch.Tensor) -> torch.dtype:
    """The softmax dtype: float32 for half types (as sdpa accumulates), else the tensor's own."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attention(
    *,
    swap: str | None = None,
    scale: str = "sqrt",
    heads: int | None = None,
    softmax_dim: int = -1,
    transpose: str | None = None,
) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig) -> torch.Tensor:
        B, N, D = x.shape

        def proj(name: str) -> torch.Tensor:
            lin = getattr(m, f"{name}_proj")
            w = lin.weight.t() if transpose == name else lin.weight
            return F.linear(x, w, lin.bias)

        q, k, v = proj("q"), proj("k"), proj("v")
        if swap == "qk":
            q, k = k, q
        elif swap == "kv":
            k, v = v, k
        h = heads or m.num_heads
        if D % h:
            raise ValueError("head count does not divide the width")
        d = D // h
        q, k, v = (t.view(B, N, h, d).transpose(1, 2) for t in (q, k, v))
        s = {"sqrt": d**-0.5, "d": 1.0 / d, "none": 1.0}[scale]
        w = torch.softmax((q @ k.transpose(-1, -2)).to(_soft(q)) * s, dim=softmax_dim).to(q.dtype)
        out = (w @ v).transpose(1, 2).reshape(B, N, D)
        return m.out_proj(out)

    return f


def _layer(*, attn_residual: bool = True, mlp_residual: bool = True) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig) -> torch.Tensor:
        a = m.self_attn(m.layer_norm1(x))
        h = x + a if attn_residual else a
        y = m.mlp(m.layer_norm2(h))
        return h + y if mlp_residual else y

    return f


def _embeddings(*, positions: bool = True, swap_hw: bool = False) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig) -> torch.Tensor:
        conv = m.patch_embedding
        w = conv.weight.transpose(-1, -2) if swap_hw else conv.weight
        e = F.conv2d(x.to(w.dtype), w, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
        return e + m.position_embedding.weight.unsqueeze(0) if positions else e

    return f


def _head(*, order: str = "qkv", mlp_residual: bool = True, other_gelu: bool = False) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig) -> torch.Tensor:
        att = m.attention
        D = x.shape[-1]
        w = dict(zip("qkv", att.in_proj_weight.split(D), strict=True))
        b = dict(zip("qkv", att.in_proj_bias.split(D), strict=True))
        names = dict(zip("qkv", order, strict=True))  # the slice each role reads
        probe = m.probe.expand(x.shape[0], -1, -1)
        q = F.linear(probe, w[names["q"]], b[names["q"]])
        k = F.linear(x, w[names["k"]], b[names["k"]])
        v = F.linear(x, w[names["v"]], b[names["v"]])
        h = cfg.num_attention_heads
        d = D // h
        q, k, v = (t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax((q @ k.transpose(-1, -2)).to(_soft(q)) * d**-0.5, dim=-1).to(q.dtype) @ v
        a = att.out_proj(a.transpose(1, 2).reshape(x.shape[0], 1, D))
        n = m.layernorm(a)
        y = _mlp_other_gelu(m.mlp, n, cfg) if other_gelu else m.mlp(n)
        return (a + y if mlp_residual else y)[:, 0]

    return f


def _heads_variants(cfg: SiglipVisionConfig) -> list[tuple[str, Variant]]:
    """Wrong head counts in the reshape: common ones (8, 16) and halves/doubles/two-thirds of the config's."""
    h, d = cfg.num_attention_heads, cfg.hidden_size
    counts = sorted({8, 16, h // 2, 2 * h, 2 * h // 3} - {h, 0})
    return [(f"{n} heads instead of {h} in the attention reshape", _attention(heads=n)) for n in counts if d % n == 0]


VARIANTS: dict[str, list[tuple[str, Variant]]] = {
    "norm": [
        ("LayerNorm eps 1e-5 (PyTorch's default) instead of 1e-6", _norm(eps=1e-5)),
        ("LayerNorm eps 1e-12", _norm(eps=1e-12)),
        ("LayerNorm without its weight and bias", _norm(affine=False)),
    ],
    "mlp": [("the other GELU (exact erf ↔ tanh approximation)", _mlp_other_gelu)],
    "attention": [
        ("q and k swapped", _attention(swap="qk")),
        ("k and v swapped", _attention(swap="kv")),
        ("attention scaled by 1/head_dim instead of 1/√head_dim", _attention(scale="d")),
        ("attention not scaled", _attention(scale="none")),
        ("softmax over the query axis instead of the key axis", _attention(softmax_dim=-2)),
        ("q_proj weight transposed", _attention(transpose="q")),
        ("k_proj weight transposed", _attention(transpose="k")),
        ("v_proj weight transposed", _attention(transpose="v")),
    ],
    "layer": [
        ("no residual around the attention", _layer(attn_residual=False)),
        ("no residual around the MLP", _layer(mlp_residual=False)),
    ],
    "embeddings": [
        ("position embeddings not added", _embeddings(positions=False)),
        ("patch-embedding kernel with H and W swapped", _embeddings(swap_hw=True)),
    ],
    "head": [
        ("the MAP head's in_proj read as k, q, v", _head(order="kqv")),
        ("the MAP head's in_proj read as q, v, k", _head(order="qvk")),
        ("the MAP head's in_proj read as v, k, q", _head(order="vkq")),
        ("no residual around the MAP head's MLP", _head(mlp_residual=False)),
        ("the other GELU (exact erf ↔ tanh approximation) in the MAP head's MLP", _head(other_gelu=True)),
    ],
}


def site_kind(site: str) -> str | None:
    last = site.rsplit(".", 1)[-1]
    if last in ("layer_norm1", "layer_norm2", "post_layernorm"):
        return "norm"
    if last == "self_attn":
        return "attention"
    if last == "mlp":
        return "mlp"
    if last.isdigit():
        return "layer"
    if last in ("embeddings", "head"):
        return last
    return None


@dataclass
class Diagnosis:
    site: str
    ranked: list[tuple[str, float, float]]  # (description, err(cand − variant) / RMS, that over err(cand − ref))
    limit: float | None  # the site's oracle bound on the error
    likely: str | None

    def line(self) -> str:
        if self.likely is not None:
            _, err, _ = self.ranked[0]
            return f"likely cause: {self.likely} in {self.site} — reproduces the candidate to {err:.1e} of its RMS"
        if not self.ranked:
            return f"no known-bug variant applies to {self.site}"
        desc, _, ratio = self.ranked[0]
        return (
            f"no known bug reproduces the candidate at {self.site} (closest: {desc}, ×{ratio:.2g} of its error "
            "against the reference)"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "site": self.site,
            "likely_cause": self.likely,
            "limit": self.limit,
            "variants": [{"variant": d, "err": e, "relative": r} for d, e, r in self.ranked],
        }


def diagnose(
    site: str,
    module: nn.Module,
    x: torch.Tensor,
    candidate_out: torch.Tensor,
    reference_out: torch.Tensor,
    config: SiglipVisionConfig,
    limit: float | None,
) -> Diagnosis:
    """Rank the variants of ``site`` by how well they reproduce ``candidate_out`` from ``x``."""
    kind = site_kind(site)
    cand = candidate_out.detach().double()
    scale = reference_out.detach().double().pow(2).mean().sqrt().item() or 1.0
    base = (cand - reference_out.detach().double()).pow(2).mean().sqrt().item() / scale
    ranked: list[tuple[str, float, float]] = []
    library = VARIANTS.get(kind or "", []) + (_heads_variants(config) if kind == "attention" else [])
    for desc, variant in library:
        try:
            with torch.inference_mode():
                out = variant(module, x, config)
        except (ValueError, RuntimeError):
            continue  # not applicable at this shape (a head count that does not divide the width)
        if tuple(out.shape) != tuple(cand.shape):
            continue
        err = (cand - out.double()).pow(2).mean().sqrt().item() / scale
        ranked.append((desc, err, err / base if base > 0 else math.inf))
    ranked.sort(key=lambda r: r[1])
    bound = limit if limit is not None else 0.0
    likely = ranked[0][0] if ranked and ranked[0][1] <= max(bound, 0.0) and ranked[0][2] < 0.5 else None
    return Diagnosis(site, ranked, limit, likely)
