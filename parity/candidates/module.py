"""PyTorch candidates: our encoder, or a user's ``nn.Module`` / factory / ``module.path:factory`` string."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

import siglip_scratch
from siglip_scratch.config import AnyVisionConfig, Siglip2VisionConfig
from siglip_scratch.modeling import model_class_for
from siglip_scratch.vlm import SiglipImageFeatures

from ..infer import infer_parameter_rules
from ..reference import naflex_arithmetic
from ..sites import RenameRules
from .base import Candidate
from .loading import LoadResult, as_rename_rules, build_candidate, load_candidate_factory, load_weights_into

__all__ = ["ModuleCandidate", "OursCandidate", "build_ours"]


def build_ours(
    config: AnyVisionConfig, state: Mapping[str, torch.Tensor], attn: str, features: Any = None
) -> nn.Module:
    """Our encoder for ``config`` on the shared tensors (NaFlex with the installed transformers' arithmetic); with
    ``features`` (a `vlm.VlmSpec`), our tower plus the VLM's feature selection and projector."""
    if features is not None:
        ours = SiglipImageFeatures.from_state_dict(config, features.path, state, attn_implementation=attn)  # type: ignore[arg-type]
        return ours.set_arithmetic(naflex_arithmetic())  # the installed transformers' (Idefics3's positions)
    model = model_class_for(config).from_state_dict(config, state, attn_implementation=attn)  # type: ignore[arg-type]
    if isinstance(config, Siglip2VisionConfig):
        model.set_arithmetic(naflex_arithmetic())
    return model


class OursCandidate(Candidate):
    """siglip_scratch's own encoder, built on the shared tensors (strict: every key, every shape)."""

    kind = "ours"
    image_features = True

    def load(self, config, state, rules, *, names, attn, allowed, infer, features=None) -> LoadResult:
        self.module = build_ours(config, state, attn, features)
        self.info = {
            "impl": f"siglip_scratch.{type(self.module).__name__}",
            "version": siglip_scratch.__version__,
            "attn": attn,
        }
        return LoadResult(via="siglip_scratch.from_state_dict (strict)")


class ModuleCandidate(Candidate):
    """A user's ``nn.Module`` (taken as it is, with its own attention setting) or a factory called with the
    config as a dict (or with nothing). ``spec`` names it in the report."""

    kind = "module"
    image_features = True
    canonical_names = False  # a user's names: without --rename a map is inferred (parameters, then sites)

    def __init__(self, *, module: nn.Module | None = None, factory: Callable[..., Any] | None = None, spec: str):
        super().__init__()
        assert (module is None) != (factory is None)
        self.module, self.factory, self.spec = module, factory, spec

    @classmethod
    def from_spec(cls, spec: str) -> ModuleCandidate:
        """``module.path:factory`` or ``file.py:factory``: the file is imported now (a typo fails at once), the
        factory is called only at `load`."""
        return cls(factory=load_candidate_factory(spec), spec=spec)

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
        if self.factory is not None:
            # A VLM candidate's factory gets the VLM's config.json (its tower's is its vision_config).
            given = features.config if features is not None else config.to_dict()
            self.module = build_candidate(self.factory, given, self.spec)
            setter = getattr(self.module, "set_attn_implementation", None)
            cand_attn = "n/a"
            if callable(setter):
                setter(attn)
                cand_attn = attn
        else:
            cand_attn = getattr(self.module, "attn_implementation", "n/a")
        assert self.module is not None
        if isinstance(self.module, OptimizedModule):  # torch.compile(model): hook the eager module it wraps
            self.compiled, self.module = self.module, self.module._orig_mod
        inferred: list[tuple[str, str]] = []
        account = ""
        if infer:
            # With its own loader, the rules fill what they can and the loader the rest (it runs last and wins).
            loader = callable(getattr(self.module, "load_hf_state_dict", None))
            optional = (lambda key: not features.path.uses(key)) if features is not None else None
            inferred, account = infer_parameter_rules(self.module, state, partial=loader, optional=optional)
            rules = as_rename_rules(inferred, "inferred rename map")
        load = load_weights_into(self.module, state, rules, self.spec, allow_unloaded=allowed)
        load.inferred_parameters, load.account = inferred, account
        self.site_rules = list(rules)
        self.info = {"impl": self.spec, "version": "", "attn": str(cand_attn)}
        if self.compiled is not None:
            self.info["compiled"] = "torch.compile: sites judged on the eager module it wraps, its forward end to end"
        return load
