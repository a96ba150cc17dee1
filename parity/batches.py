"""Inputs that can see state and batch bugs: the candidate run again, on other batches, must give each image the
output it gave it before.

Every judged run feeds the candidate one input object. A candidate that memoises by the input's identity, keeps
state between calls, or mixes the images of a batch (attention over the batch axis, a norm over the batch) can
pass them all. After the judged runs, for fixed-resolution inputs of B images x0…x(B−1):

1. **state**: the same tensor object the candidate saw first is refilled with the images in another order (a new
   image in front when B = 1) and run again; each image must get its earlier output. A cache keyed by the
   object, or any state carried between calls, returns the stale result.
2. **batch mixing**: a fresh batch ``[x0, new image, x0 again]`` (B + 1 images); x0 must get its earlier output
   in both places, whatever its neighbours.

"The right output" is judged against the reference run on the same batch, at the final output
(``last_hidden_state`` or the first tensor the candidate returns), by the pass rule's own constants: the
candidate's relative RMS difference from the reference on a new batch must stay within ``k · e + floor · u``, where
``e`` is the larger of the candidate's difference on the judged batch and the reference's own change between the
batches for the same image (a batch of another size may round differently; that is not a bug). A stale or mixed
result is off by the signal itself. Activation files and ONNX graphs are not re-run (a file cannot be; a graph
holds no Python state): the report says what was not checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .candidates import Candidate
from .inputs import ModelInputs, NaflexInputs
from .judge import ORACLE_RULES, UNIT_ROUNDOFF, Rule
from .oracle import rms
from .sites import SiteProgress, first_tensor, image_features

__all__ = ["BatchCheck", "check_batches"]

SEED = 20_251_130  # the new image's seed: fixed, so every run sees the same inputs


@dataclass
class BatchCheck:
    checked: bool
    passed: bool = True
    cause: str | None = None  # "state" or "batch mixing" when it fails
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "passed": self.passed, "cause": self.cause, "detail": self.detail}


def _final(model: Any, x: torch.Tensor, like: torch.Size | None = None) -> torch.Tensor:
    """The final output: a tensor, a VLM candidate's image features (read in the reference's shape ``like``), else
    the first tensor of what it returns."""
    with torch.inference_mode():
        out = model(x)
    t = image_features(out, like)
    t = first_tensor(out) if t is None else t
    if t is None:
        raise AssertionError("no output")  # judged runs already proved the candidate returns one
    return t.detach().double().clone()


def check_batches(
    cand: Candidate,
    reference: Any,
    inputs: ModelInputs,
    rule: Rule,
    *,
    rerunnable: bool,
    progress: Callable[[str], None] | None = None,
) -> BatchCheck:
    """See the module doc. ``reference`` is transformers' model on the shared weights; ``progress`` hears of each
    of the six forwards (three of the candidate, three of the reference)."""
    last = [time.perf_counter()]

    def say(line: str) -> None:  # like SiteProgress: a line once a step has taken its `every` seconds
        now = time.perf_counter()
        if progress is not None and now - last[0] >= SiteProgress.every:
            progress(line)
            last[0] = now

    if not rerunnable:
        return BatchCheck(
            False, detail="not re-run (activation files or an ONNX graph): state and batch mixing not checked"
        )
    if isinstance(inputs, NaflexInputs):
        return BatchCheck(False, detail="NaFlex inputs: state and batch mixing not checked yet")
    x = inputs
    B = x.shape[0]
    g = torch.Generator().manual_seed(SEED)
    new = (torch.rand(1, *x.shape[1:], generator=g) * 2 - 1).to(device=x.device, dtype=x.dtype)
    refill = torch.cat([new, x[:-1]]) if B == 1 else x.flip(0)
    fresh = torch.cat([x[:1].clone(), new, x[:1].clone()])
    cand.set_mode("propagated")
    probe = x.clone()
    refs = []
    for k, t in enumerate((x, refill, fresh), 1):
        refs.append(_final(reference, t))
        say(f"state and batch check: reference {k}/3 done")
    ref_base, ref_again, ref_mixed = refs
    try:
        base = _final(cand.forward, probe, ref_base.shape)
        say("state and batch check: candidate 1/3 (the judged images again) done")
        probe.copy_(refill)  # the same tensor object the candidate saw, other images in it
        again = _final(cand.forward, probe, ref_again.shape)
        say("state and batch check: candidate 2/3 (the same input tensor, other images) done")
        mixed = _final(cand.forward, fresh, ref_mixed.shape)
        say("state and batch check: candidate 3/3 (a fresh batch: image 0, a new image, image 0) done")
    except Exception as exc:  # user code on a batch of another size: say so, never crash or pass silently
        return BatchCheck(
            True, False, "batch", f"the candidate failed on a batch of other images: {exc}".splitlines()[0]
        )
    if base.shape != ref_base.shape:
        return BatchCheck(
            False, detail="final output's shape differs from the reference's: state and batch not checked"
        )

    def off(a: torch.Tensor, b: torch.Tensor) -> float:
        return rms(a - b) / (rms(b) or 1.0)

    k, _, floor, _ = ORACLE_RULES[rule.dtype]
    own = max(off(base[i], ref_base[i]) for i in range(B))
    drift = max(off(ref_mixed[j], ref_base[0]) for j in (0, 2))  # the reference's own change between batches
    bound = k * max(own, drift) + floor * UNIT_ROUNDOFF[rule.dtype]
    for j in range(B):
        d = off(again[j], ref_again[j])
        if d > bound:
            return BatchCheck(
                True,
                False,
                "state",
                f"run again on the same input tensor holding other images, image {j} got a wrong output ({d:.3g} of "
                f"its RMS from the reference's, bound {bound:.2g}): a cache keyed by the input, or state between calls",
            )
    for j in (0, 2):
        d = off(mixed[j], ref_mixed[j])
        if d > bound:
            return BatchCheck(
                True,
                False,
                "batch mixing",
                f"image 0 in a new batch (beside another image and itself) got a wrong output ({d:.3g} of its RMS "
                f"from the reference's, bound {bound:.2g}): the images of a batch are mixed",
            )
    return BatchCheck(True, detail=f"3 re-runs, every image within {bound:.2g} of the reference's output (RMS)")
