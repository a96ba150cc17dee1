"""Say *why*: known-bug variants of the reference module, run at the first divergent site.

In isolated mode the reference's input to the failing site is known. Each variant below recomputes
that site from that input with one known porting bug (exact GELU for tanh, LayerNorm eps 1e-5, q and
k swapped, …), using our encoder's module for the site (bit-identical to transformers', sharing the
checkpoint's tensors). A variant whose output reproduces the candidate's within the site's oracle
bound (the same bound the candidate failed against the reference) is reported as the likely cause;
the rest are ranked by how close they came, relative to the candidate's error against the reference.

Adding a variant: write ``def f(module, x, config, ctx) -> Tensor`` (``ctx``: a `Context`, the NaFlex
padding mask and patch grids, empty for fixed-resolution SigLIP) and add it to ``VARIANTS`` under the
kind of site it applies to (``norm``, ``attention``, ``mlp``, ``layer``, ``embeddings``, ``head``; the
``naflex-…`` kinds are added for SigLIP 2 NaFlex sites, whose fixed-resolution embeddings variants do not apply),
with a description that completes "likely cause: … in <site>". (Head counts depend on the config:
`_heads_variants` adds them at run time.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from siglip_scratch.config import SiglipVisionConfig

__all__ = ["VARIANTS", "Context", "Diagnosis", "diagnose", "naflex_context", "ranked_diagnosis", "site_kind"]

Variant = Callable[[nn.Module, torch.Tensor, SiglipVisionConfig, "Context"], torch.Tensor]


@dataclass
class Context:
    """What a site's module needs besides its input. Empty for fixed-resolution SigLIP; for SigLIP 2 NaFlex:
    which patches are real (``keep`` [B, N]) and each image's patch grid (``spatial_shapes`` [B, 2])."""

    keep: torch.Tensor | None = None
    spatial_shapes: torch.Tensor | None = None

    def additive(self, dtype: torch.dtype, heads: int | None = None) -> torch.Tensor | None:
        """The padding mask as an additive bias: [B, 1, 1, N] for self-attention, [B·heads, 1, N] for the head."""
        if self.keep is None:
            return None
        bias = torch.zeros(self.keep.shape, dtype=dtype, device=self.keep.device).masked_fill(
            ~self.keep, torch.finfo(dtype).min
        )
        if heads is None:
            return bias[:, None, None, :]
        return bias[:, None, None, :].repeat(1, heads, 1, 1).reshape(-1, 1, bias.shape[-1])

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The real rows of a [B, N, …] output (what the harness measures)."""
        if self.keep is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(self.keep.shape):
            return t[self.keep]
        return t


def naflex_context(inputs: Any, config: Any = None) -> Context:
    """The context of a NaFlex comparison's inputs (`inputs.NaflexInputs`)."""
    return Context(keep=inputs.pixel_attention_mask.bool(), spatial_shapes=inputs.spatial_shapes)


# -- the variants ---------------------------------------------------------------------------------------
def _norm(eps: float | None = None, affine: bool = True) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig, ctx: Context) -> torch.Tensor:
        w, b = (m.weight, m.bias) if affine else (None, None)
        return F.layer_norm(x, m.normalized_shape, w, b, m.eps if eps is None else eps)

    return f


def _other_gelu(cfg: SiglipVisionConfig) -> str:
    return "none" if cfg.hidden_act == "gelu_pytorch_tanh" else "tanh"


def _mlp_other_gelu(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig, ctx: Context | None = None) -> torch.Tensor:
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
    masked: bool = True,
) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig, ctx: Context) -> torch.Tensor:
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
        scores = (q @ k.transpose(-1, -2)).to(_soft(q)) * s
        bias = ctx.additive(scores.dtype) if masked else None
        w = torch.softmax(scores if bias is None else scores + bias, dim=softmax_dim).to(q.dtype)
        out = (w @ v).transpose(1, 2).reshape(B, N, D)
        return m.out_proj(out)

    return f


def _layer(*, attn_residual: bool = True, mlp_residual: bool = True, masked: bool = True) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig, ctx: Context) -> torch.Tensor:
        a = m.self_attn(m.layer_norm1(x), ctx.additive(x.dtype) if masked else None)
        h = x + a if attn_residual else a
        y = m.mlp(m.layer_norm2(h))
        return h + y if mlp_residual else y

    return f


def _embeddings(*, positions: bool = True, swap_hw: bool = False, column_major: bool = False) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig, ctx: Context) -> torch.Tensor:
        conv = m.patch_embedding
        w = conv.weight.transpose(-1, -2) if swap_hw else conv.weight
        grid = F.conv2d(x.to(w.dtype), w, conv.bias, stride=conv.stride)  # [B, D, h, w]
        if column_major:  # patches read down the columns (NHWC code flattening W before H)
            grid = grid.transpose(-1, -2)
        e = grid.flatten(2).transpose(1, 2)
        return e + m.position_embedding.weight.unsqueeze(0) if positions else e

    return f


def _naflex_embeddings(*, mode: str = "bilinear", antialias: bool = True, positions: bool = True) -> Variant:
    """NaFlex embeddings with the position grid resized another way (per image, through F.interpolate in
    float32, as transformers 4.57 did), or not added."""

    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig, ctx: Context) -> torch.Tensor:
        e = m.patch_embedding(x.to(m.patch_embedding.weight.dtype))
        if not positions:
            return e
        table = m.position_embedding.weight
        g, dim = m.grid, table.shape[-1]
        grid = table.reshape(g, g, dim).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
        pos = torch.empty_like(e)
        for i, (h, w) in enumerate(ctx.spatial_shapes.tolist()):
            kw = {} if mode == "nearest" else {"align_corners": False}
            r = F.interpolate(grid, size=(h, w), mode=mode, antialias=antialias, **kw)
            r = r.reshape(dim, h * w).transpose(0, 1).to(e.dtype)
            pos[i, : h * w] = r
            pos[i, h * w :] = r[0]
        return e + pos

    return f


def _head(*, order: str = "qkv", mlp_residual: bool = True, other_gelu: bool = False, masked: bool = True) -> Variant:
    def f(m: nn.Module, x: torch.Tensor, cfg: SiglipVisionConfig, ctx: Context) -> torch.Tensor:
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
        scores = (q @ k.transpose(-1, -2)).to(_soft(q)) * d**-0.5
        bias = ctx.additive(scores.dtype) if masked else None  # [B, 1, 1, N] over the patches
        a = torch.softmax(scores if bias is None else scores + bias, dim=-1).to(q.dtype) @ v
        a = att.out_proj(a.transpose(1, 2).reshape(x.shape[0], 1, D))
        n = m.layernorm(a)
        y = _mlp_other_gelu(m.mlp, n, cfg, ctx) if other_gelu else m.mlp(n)
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
    "naflex-attention": [
        ("padding not masked in the attention (pixel_attention_mask ignored)", _attention(masked=False))
    ],
    "naflex-layer": [("padding not masked in the attention (pixel_attention_mask ignored)", _layer(masked=False))],
    "naflex-embeddings": [
        ("position grid resized bicubic instead of bilinear", _naflex_embeddings(mode="bicubic")),
        ("position grid resized without antialias", _naflex_embeddings(antialias=False)),
        ("position grid resized bicubic without antialias", _naflex_embeddings(mode="bicubic", antialias=False)),
        ("position embeddings not added", _naflex_embeddings(positions=False)),
    ],
    "naflex-head": [("padding not masked in the MAP head (pixel_attention_mask ignored)", _head(masked=False))],
    "embeddings": [
        ("position embeddings not added", _embeddings(positions=False)),
        ("patch-embedding kernel with H and W swapped", _embeddings(swap_hw=True)),
        ("patches in column-major order (the token grid transposed before flattening)", _embeddings(column_major=True)),
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


def _beyond(err: float, noise: float) -> float:
    """``err`` with ``noise`` taken out in quadrature (independent errors add in quadrature)."""
    return math.sqrt(max(err * err - noise * noise, 0.0))


def diagnose(
    site: str,
    module: nn.Module,
    x: torch.Tensor,
    candidate_out: torch.Tensor,
    reference_out: torch.Tensor,
    config: SiglipVisionConfig,
    limit: float | None,
    context: Context | None = None,
    noise: float = 0.0,
) -> Diagnosis:
    """Rank the variants of ``site`` by how well they reproduce ``candidate_out`` from ``x``.

    A variant is the likely cause when it reproduces the candidate within ``limit`` and is at least twice as
    close to it as the reference is. ``noise``: the error the candidate's own runtime leaves at this site
    (`baseline.with_baseline`; relative to the reference's RMS), taken out of both distances in quadrature,
    so that a runtime's uniform arithmetic does not hide which bug a site has.

    ``reference_out`` is the reference's output as measured (NaFlex: real rows only); ``candidate_out`` and
    the variants' outputs are reduced the same way through ``context.select``."""
    ctx = context or Context()
    naflex = ctx.keep is not None
    kind = site_kind(site)
    library = [] if naflex and kind == "embeddings" else list(VARIANTS.get(kind or "", []))
    library += _heads_variants(config) if kind == "attention" else []
    library += VARIANTS.get(f"naflex-{kind}", []) if naflex else []
    thunks = [(desc, functools.partial(variant, module, x, config, ctx)) for desc, variant in library]
    return ranked_diagnosis(site, thunks, candidate_out, reference_out, limit, noise, ctx.select)


def ranked_diagnosis(
    site: str,
    library: Sequence[tuple[str, Callable[[], torch.Tensor]]],
    candidate_out: torch.Tensor,
    reference_out: torch.Tensor,
    limit: float | None,
    noise: float = 0.0,
    select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Diagnosis:
    """Rank the variants (``(description, thunk)``) by how close each comes to ``candidate_out``; see `diagnose`.

    A variant whose shape is not the candidate's is skipped. A candidate whose shape is not the reference's (a
    token more or less) is infinitely far from it, so a variant that reproduces it needs only to be within ``limit``."""
    cand = select(candidate_out.detach()).double()
    ref = reference_out.detach().double()
    scale = ref.pow(2).mean().sqrt().item() or 1.0
    base = (cand - ref).pow(2).mean().sqrt().item() / scale if cand.shape == ref.shape else math.inf
    ranked: list[tuple[str, float, float]] = []
    for desc, variant in library:
        try:
            with torch.inference_mode():
                out = select(variant())
        except (ValueError, RuntimeError):
            continue  # not applicable at this shape (a head count that does not divide the width)
        if tuple(out.shape) != tuple(cand.shape):
            continue
        err = (cand - out.double()).pow(2).mean().sqrt().item() / scale
        beyond = _beyond(base, noise)
        ranked.append((desc, err, _beyond(err, noise) / beyond if beyond > 0 else math.inf))
    ranked.sort(key=lambda r: r[1])
    bound = limit if limit is not None else 0.0
    likely = ranked[0][0] if ranked and ranked[0][1] <= max(bound, 0.0) and ranked[0][2] < 0.5 else None
    return Diagnosis(site, ranked, limit, likely)
