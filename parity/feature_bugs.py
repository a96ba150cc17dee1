"""Known VLM-integration bugs: the variants the diagnosis tries at ``vision_feature`` and ``multi_modal_projector``.

Most public bugs in SigLIP-based VLM ports sit between the tower and the language model (see the issue list in
docs/PARITY.md): which hidden state is taken, whether ``post_layernorm`` or the MAP head runs, how many tokens
there are, the projector's layout and scale. Each variant here is one of them, computed with *our* model (bit-exact
to transformers) on the reference's own inputs:

- at ``vision_feature`` from all the tower's hidden states (propagated: what the reference's sites recorded), so a
  candidate captured with its tower sites teacher-forced is compared at one layer's rounding;
- at ``multi_modal_projector`` (and Gemma 3's ``mm_soft_emb_norm``) from the reference's input to that site, the
  projector changed one way at a time.

A variant may produce another token count than the reference: that is how a dropped or added token, or the MAP head
run where hidden states are used, is recognised (the candidate's count, then its values).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from siglip_scratch.vlm import FeaturePath, Gemma3Projector, SiglipImageFeatures, pixel_shuffle

from .diagnose import Diagnosis, ranked_diagnosis
from .sites import PROJECTOR, VISION_FEATURE

__all__ = ["diagnose_features", "feature_variants", "projector_variants"]

Variant = Callable[[], torch.Tensor]


@torch.inference_mode()
def feature_variants(ours: SiglipImageFeatures, pixel_values: torch.Tensor) -> list[tuple[str, Variant]]:
    """The selections a port gets wrong, from our tower's hidden states on ``pixel_values``."""
    tower, path = ours.vision_model, ours.path
    hidden = tower.embeddings(pixel_values)
    states = [hidden]
    for layer in tower.encoder.layers:
        hidden = layer(hidden)
        states.append(hidden)
    n = len(states) - 1

    def pick(layers: tuple[int, ...], *, norm: bool = False, strategy: str = path.strategy) -> Variant:
        def f() -> torch.Tensor:
            chosen = [tower.post_layernorm(states[i]) if norm else states[i] for i in layers]
            if strategy == "default":
                chosen = [c[:, 1:] for c in chosen]
            return chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)

        return f

    right = path.layers
    out: list[tuple[str, Variant]] = []
    for shift in (-1, 1):
        moved = tuple(i + shift for i in right)
        if all(0 <= i <= n for i in moved):
            which = "one layer too early" if shift < 0 else "one layer too late (a layer the VLM drops kept)"
            out.append(
                (
                    f"the feature layer off by one: hidden_states[{', '.join(map(str, moved))}] instead of "
                    f"[{', '.join(map(str, right))}], {which} (e.g. a positive vision_feature_layer indexing the "
                    "layer outputs instead of hidden_states)",
                    pick(moved, norm=path.post_layernorm),
                )
            )
    if path.post_layernorm:
        out.append(("post_layernorm not applied (the family uses last_hidden_state)", pick(right)))
    else:
        out.append(
            ("post_layernorm applied to the selected hidden state (the family does not)", pick(right, norm=True))
        )
    if path.strategy == "full":
        out.append(
            (
                "a CLS token assumed: the first token dropped ('default' strategy; SigLIP has none)",
                pick(right, norm=path.post_layernorm, strategy="default"),
            )
        )
    else:
        out.append(
            ("the first token kept ('full' strategy where the config says 'default')", pick(right, strategy="full"))
        )
    if tower.head is not None:
        last = tower.post_layernorm(states[n])
        out.append(
            ("the MAP head run where hidden states are used (one pooled token)", lambda: tower.head(last)[:, None])
        )
    return out


@torch.inference_mode()
def projector_variants(projector: nn.Module, path: FeaturePath, x: torch.Tensor) -> list[tuple[str, Variant]]:
    """The projector done one wrong way at a time, on its reference input ``x``."""
    run = lambda: projector(x)  # noqa: E731
    out: list[tuple[str, Variant]] = []
    text = path.text_hidden_size
    vision = x.shape[-1]
    for name, dim in (("the language model's hidden_size", text), ("the vision hidden_size", vision)):
        if dim:
            out.append(
                (
                    f"image features scaled by {name}**-0.5 (÷{math.sqrt(dim):.3g}; a stale PaliGemma scale)",
                    lambda d=dim: run() / math.sqrt(d),
                )
            )
            out.append(
                (f"image features scaled by {name}**0.5 (×{math.sqrt(dim):.3g})", lambda d=dim: run() * math.sqrt(d))
            )
    for pname, p in projector.named_parameters():
        if p.dim() == 2 and p.shape[0] == p.shape[1]:
            out.append((f"projector weight {pname} transposed", _with(projector, pname, p.detach().t(), x)))
    if path.family == "llava":
        other = "gelu_pytorch_tanh" if projector.act_name == "gelu" else "gelu"

        def act() -> torch.Tensor:
            h = F.gelu(projector.linear_1(x), approximate="tanh" if other != "gelu" else "none")
            return projector.linear_2(h)

        out.append((f"the projector's other GELU ({other} instead of {projector.act_name})", act))
    if isinstance(projector, Gemma3Projector):
        w = projector.mm_soft_emb_norm.weight
        out.append(
            (
                "Gemma 3's RMSNorm scaled by w instead of 1 + w",
                _with(projector, "mm_soft_emb_norm.weight", w.detach() - 1, x),
            )
        )
    if path.family == "idefics3":
        s = projector.scale_factor
        proj = projector.modality_projection

        def plain() -> torch.Tensor:
            B, N, D = x.shape
            return proj(x.reshape(B, N // (s * s), D * s * s))

        def transposed() -> torch.Tensor:
            B, N, D = x.shape
            side = math.isqrt(N)
            t = x.view(B, side, side, D).transpose(1, 2).reshape(B, N, D)
            return proj(pixel_shuffle(t, s))

        out.append(("pixel shuffle as a plain reshape (consecutive tokens grouped, not s×s blocks)", plain))
        out.append(("pixel shuffle on the transposed patch grid (blocks gathered column-major)", transposed))
    return out


def _with(module: nn.Module, name: str, value: torch.Tensor, x: torch.Tensor) -> Variant:
    """``module(x)`` on a copy with parameter ``name`` replaced (a projector is small; the shared one is untouched)."""

    def f() -> torch.Tensor:
        clone = copy.deepcopy(module)
        owner_name, _, leaf = name.rpartition(".")
        owner = clone.get_submodule(owner_name) if owner_name else clone
        setattr(owner, leaf, nn.Parameter(value.clone(), requires_grad=False))
        return clone(x)

    return f


def diagnose_features(
    site: str,
    ours: SiglipImageFeatures,
    pixel_values: torch.Tensor,
    x: torch.Tensor | None,
    candidate_out: torch.Tensor,
    reference_out: torch.Tensor,
    limit: float | None,
    noise: float = 0.0,
) -> Diagnosis:
    """Rank the VLM-integration variants at ``site`` (``x``: the reference's input to a projector site)."""
    if site == VISION_FEATURE:
        library = feature_variants(ours, pixel_values)
        one_more = candidate_out.dim() == 3 and candidate_out.shape[1] == reference_out.shape[1] + 1
        if one_more and ours.path.strategy == "full":  # ("default" drops a token: keeping it is the closer cause)
            # One token more: whatever its value, the others must be the reference's, in front of it or after it.
            extra, right = candidate_out.detach(), reference_out.to(candidate_out.dtype)
            library += [
                (
                    "a token added in front (a CLS token SigLIP does not have)",
                    lambda: torch.cat([extra[:, :1], right], 1),
                ),
                ("a token added at the end", lambda: torch.cat([right, extra[:, -1:]], 1)),
            ]
    elif site == PROJECTOR:
        assert x is not None
        library = projector_variants(ours.multi_modal_projector, ours.path, x)
    else:  # Gemma 3's soft-embedding norm
        assert x is not None
        norm = ours.get_submodule(site)
        library = [
            ("Gemma 3's RMSNorm scaled by w instead of 1 + w", _with(norm, "weight", norm.weight.detach() - 1, x))
        ]
    return ranked_diagnosis(site, library, candidate_out, reference_out, limit, noise)
