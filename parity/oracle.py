"""The float64 oracle: transformers' own model, run in float64 on the same weights and inputs.

Every site is judged by its error against this oracle *relative to the reference's own error*
(the idea of ``torch._dynamo``'s ``same()``, applied per site). The oracle is the reference model
itself with one *unit* (embeddings, one encoder layer, post_layernorm, head) cast to float64 at a
time: a forward pre-hook swaps the unit's parameters for float64 copies and the forward hook puts the
originals back, so at most one layer's float64 weights exist at once and the shared tensors are never
written.

- propagated truth: the oracle runs end to end on the pixels (upcast).
- isolated truth: every site except the embeddings gets the reference's recorded input to that site
  (upcast), exactly as the candidate is teacher-forced, so the truth at a site is "this site, in exact
  arithmetic, on what the reference fed it".

The truth is reduced as soon as it is produced: per site we keep ``ref − truth`` in bfloat16 (three
significant digits of an error is all a ratio of errors needs; bfloat16 has float32's range) and a few
scalars, never a float64 copy of the activations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .inputs import ModelInputs, call, select
from .sites import SiteProgress, first_tensor, hooks, teacher_forced

__all__ = ["SiteTruth", "float64_units", "run_oracle", "unit_names"]

UNIT_SUFFIXES = ("embeddings", "post_layernorm", "head", "multi_modal_projector")


@dataclass
class SiteTruth:
    """What the oracle says about the reference at one site."""

    d_ref: torch.Tensor  # reference − truth, bfloat16, on the reference's device
    scale_rms: float  # RMS of the truth
    scale_max: float  # max |truth|
    err_ref: float  # RMS(reference − truth) / scale_rms
    err_ref_max: float  # max |reference − truth| / scale_max
    finite: bool = True  # the truth itself is finite


def unit_names(site_list: Sequence[str]) -> list[str]:
    """The coarse sites: the units cast to float64 one at a time (together they hold every parameter)."""
    return [s for s in site_list if s.rsplit(".", 1)[-1] in UNIT_SUFFIXES or _is_layer(s)]


def _is_layer(name: str) -> bool:
    head, _, tail = name.rpartition(".")
    return head.endswith("encoder.layers") and tail.isdigit()


@contextmanager
def float64_units(units: Mapping[str, nn.Module]) -> Iterator[None]:
    """While active, each unit runs with float64 copies of its floating-point parameters and buffers,
    made when its forward starts and dropped when it ends. The original tensors are never touched."""

    def to64(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        saved = []
        for sub in mod.modules():
            for store in (sub._parameters, sub._buffers):
                for name, t in store.items():
                    if t is not None and t.is_floating_point():
                        saved.append((store, name, t))
                        store[name] = t.detach().to(torch.float64)
        mod._siglip_saved = saved  # type: ignore[attr-defined]
        # Its inputs too: a caller may have cast them to the model's dtype (Idefics3 casts the pixels), and an
        # input is exact in float64 (it was rounded before, identically for the reference).
        return tuple(_up(a) for a in args), {k: _up(v) for k, v in kwargs.items()}

    def restore(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        for store, name, t in mod._siglip_saved:  # type: ignore[attr-defined]
            store[name] = t
        del mod._siglip_saved  # type: ignore[attr-defined]

    handles = []
    try:
        for unit in units.values():
            handles.append(unit.register_forward_pre_hook(to64, with_kwargs=True))
            handles.append(unit.register_forward_hook(restore))
        yield
    finally:
        for h in handles:
            h.remove()
        for unit in units.values():  # a forward that raised never reached `restore`
            if hasattr(unit, "_siglip_saved"):
                restore(unit, (), None)


def _up(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float64)
    return value


def run_oracle(
    model: nn.Module,
    sites: Mapping[str, nn.Module],
    pixel_values: ModelInputs,
    ref_out: Mapping[str, torch.Tensor],
    ref_in: Mapping[str, torch.Tensor] | None,
    progress: SiteProgress | None = None,
    unjudged: Mapping[str, nn.Module] | None = None,
) -> dict[str, SiteTruth]:
    """Run ``model`` (the reference, sdpa attention) in float64 and reduce every site against ``ref_out``.

    Args:
        sites: canonical name -> module of ``model`` for every site to judge (coarse sites included,
            they are the float64 units).
        ref_out: the reference's site outputs, as measured (NaFlex: real rows only, see `inputs.select`).
        ref_in: the reference's recorded inputs for isolated truth (teacher forcing), or None for
            propagated truth.
        progress: told as each site's truth is reduced (per-group progress lines).
        unjudged: more float64 units that no site judges (a VLM's tower layers past the one its features use,
            its unused head): they still run, so they run in float64 too.
    """
    units = {**{n: sites[n] for n in unit_names(list(sites))}, **(unjudged or {})}
    owned = {id(p) for u in units.values() for p in u.parameters()}
    stray = [n for n, p in model.named_parameters() if id(p) not in owned]
    assert not stray, f"parameters outside every oracle unit: {stray[:3]}"
    truths: dict[str, SiteTruth] = {}

    def force(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return teacher_forced(site, args, kwargs, ref_in, torch.float64)

    def reduce(site: str, output: Any) -> None:
        truth = first_tensor(output)
        assert truth is not None and truth.dtype == torch.float64, f"oracle site {site} is not float64"
        truths[site] = reduce_truth(ref_out[site], select(pixel_values, truth))
        if progress is not None:
            progress.done(site)

    with torch.inference_mode(), float64_units(units), hooks(sites, on_input=force, on_output=reduce):
        call(model, pixel_values.to(dtype=torch.float64))
    return truths


def reduce_truth(ref: torch.Tensor, truth: torch.Tensor) -> SiteTruth:
    truth = truth.detach()
    finite = bool(torch.isfinite(truth).all())
    if not finite:
        return SiteTruth(torch.empty(0), float("nan"), float("nan"), float("nan"), float("nan"), finite=False)
    d = ref.detach().to(torch.float64) - truth
    scale_rms = rms(truth)
    scale_max = truth.abs().max().item() if truth.numel() else 0.0
    return SiteTruth(
        d_ref=d.to(torch.bfloat16),
        scale_rms=scale_rms,
        scale_max=scale_max,
        err_ref=_ratio(rms(d), scale_rms),
        err_ref_max=_ratio(d.abs().max().item() if d.numel() else 0.0, scale_max),
    )


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item() if x.numel() else 0.0


def _ratio(err: float, scale: float) -> float:
    if scale > 0:
        return err / scale
    return 0.0 if err == 0 else float("inf")
