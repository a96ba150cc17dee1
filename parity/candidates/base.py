"""The one interface every candidate kind implements, and what a pinned candidate fixes about its run.

A candidate is opened (`open.open_candidate`: cheap checks only, before any weights are read), then
loaded with the run's weights, then run once per mode under the harness's hooks::

    cand = open_candidate("my_port.py:build")      # imports the file; nothing is built yet
    cand.check_run("float32")                       # refuses runs it cannot take part in
    load = cand.load(config, state, rules, names=names, attn="sdpa", allowed=[], infer=True)
    cand.set_mode("isolated")
    output = cand.forward(inputs)                   # the harness hooks cand.module's sites

Kinds (one module each): `module.OursCandidate` (our encoder), `module.ModuleCandidate` (a user's module or
factory), `onnx.OnnxCandidate` (a graph run by onnxruntime), `activations.ActivationCandidate` (a port's
outputs stored in a file). The last two replay their values through `replay.ReplayTree`.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from siglip_scratch.config import AnyVisionConfig

from ..inputs import ModelInputs, forward_candidate
from ..sites import SUBLAYER_SITES, RenameRules
from .loading import LoadResult

__all__ = ["Candidate", "Pinned"]


@dataclass
class Pinned:
    """What a candidate that was run elsewhere fixes about the comparison: the weights it ran with (a source
    and their fingerprint), the dtype and the exact inputs (an activation export)."""

    weights: dict[str, Any]  # weights / model / preset / revision / seed, as resolve_weights takes them
    fingerprint: str
    dtype: str
    inputs: ModelInputs
    where: str  # for messages: the export folder


class Candidate(abc.ABC):
    """See the module doc. ``module`` is what the harness hooks; ``site_rules`` map its module names to
    canonical site names; ``info`` describes it in the report."""

    kind: ClassVar[str]
    # True when `module` carries the canonical site names already (ours; the replay tree of an ONNX graph or
    # activation file): no rename map is inferred for it.
    canonical_names: ClassVar[bool] = True
    # Judged up to a VLM's image features (--image-features): `load` then takes ``features`` (a `vlm.VlmSpec`).
    image_features: ClassVar[bool] = False
    # False when the candidate cannot be run on new inputs (activation files) or holds no Python state (an
    # ONNX graph): the state and batch check (batches.py) is then skipped, and the report says so.
    rerunnable: ClassVar[bool] = True

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        # A torch.compile'd candidate: the compiled wrapper (``module`` is then the eager module it wraps, which the
        # harness hooks); its own forward is judged end to end (`runs.compiled_run`).
        self.compiled: nn.Module | None = None
        self.site_rules: RenameRules = []
        self.info: dict[str, Any] = {}

    def check_run(self, dtype: str) -> None:  # noqa: B027 (a hook: most kinds take any run)
        """Raise `InputError` for a run this candidate cannot take part in (called before any model is built)."""

    def narrow(
        self, mode: str | None, depth: str | None, rules: RenameRules
    ) -> tuple[str | None, str | None, list[str]]:
        """The mode and depth to judge at when the run leaves them open (None): what this candidate carries (an
        activations file judged at the sites it holds), with a note for each narrowing. Others keep them."""
        return mode, depth, []

    def not_exposed(self, site: str, judged: Collection[str]) -> str | None:
        """Why ``site``, which this run did not produce, is not exposed by the candidate (a note), or None when
        its absence is a failure. A sub-layer computed inline in its layer (no module of its own) is not
        exposed when the layer's output is judged; a layer output never is."""
        layer, _, sub = site.rpartition(".")
        if sub in SUBLAYER_SITES and layer in judged:
            return f"no module computes it alone; judged through {layer}"
        return None

    def pinned(self) -> Pinned | None:
        """The weights, dtype and inputs this candidate was computed on, when they are fixed (else None)."""
        return None

    @abc.abstractmethod
    def load(
        self,
        config: AnyVisionConfig,
        state: dict[str, torch.Tensor],
        rules: RenameRules,
        *,
        names: Sequence[str],
        attn: str,
        allowed: Sequence[re.Pattern[str]],
        infer: bool,
        features: Any = None,
    ) -> LoadResult:
        """Build ``module`` for ``config`` and put the shared weights ``state`` into it (``rules`` rename the
        candidate's keys and module paths; ``infer``: no rules were given, infer the parameters' map)."""

    def to(self, device: str, dtype: torch.dtype) -> None:
        """Move the module to the run's device and dtype (the shared tensors are there already)."""
        assert self.module is not None
        self.module.to(device=device, dtype=dtype)
        self.module.eval()

    def set_mode(self, mode: str) -> None:  # noqa: B027 (a hook: a live module needs no mode)
        """Called before each run ("isolated" or "propagated") and before the diagnosis (isolated)."""

    def forward(self, inputs: ModelInputs) -> Any:
        """One forward on the comparison's inputs; anything user code raises is a one-line `InputError`."""
        assert self.module is not None
        return forward_candidate(self.module, inputs)
