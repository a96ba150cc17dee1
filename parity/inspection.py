"""``siglip-parity inspect``: how a candidate's names meet the canonical ones, and the map that joins them.

Prints, for one candidate at one config: each canonical site and the candidate module that carries it
(by name, through the given map, or inferred by value, with how close it came), the parameter keys that
load and those that do not, the site contract, and the suggested rename map (``--write-rename`` saves it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.errors import OutputError

from .candidates import RenameLike, as_rename_rules, open_candidate
from .infer import format_rename_map, infer_site_rules
from .inputs import make_pixels, select
from .reference import record_reference
from .sites import PROJECTOR, SITE_CONTRACT, VISION_FEATURE, apply_rename, site_names
from .truth import any_reference
from .vlm import with_image_features
from .weights import resolve_weights

__all__ = ["SITE_CONTRACT", "Inspection", "inspect_candidate"]


@dataclass
class Inspection:
    sites: list[tuple[str, str, str]] = field(default_factory=list)  # (site, candidate module, how)
    loaded: int = 0
    unloaded: list[str] = field(default_factory=list)
    untaken: list[str] = field(default_factory=list)
    parameter_account: str = ""
    rules: list[tuple[str, str]] = field(default_factory=list)  # the map to use (given or inferred)
    inferred: bool = False
    candidate_params: list[tuple[str, list[int]]] = field(default_factory=list)

    def text(self) -> str:
        width = max(len(s) for s, _, _ in self.sites)
        lines = ["canonical site".ljust(width) + "  candidate module (how)"]
        lines += [f"{s.ljust(width)}  {m} ({how})" for s, m, how in self.sites]
        lines.append("")
        lines.append(
            f"parameters: {self.loaded} loaded; {len(self.unloaded)} candidate tensor(s) not loaded"
            + (f": {', '.join(self.unloaded[:8])}{' …' if len(self.unloaded) > 8 else ''}" if self.unloaded else "")
            + f"; {len(self.untaken)} checkpoint tensor(s) not taken"
            + (f": {', '.join(self.untaken[:8])}{' …' if len(self.untaken) > 8 else ''}" if self.untaken else "")
        )
        if self.parameter_account:
            lines.append(f"parameter inference: {self.parameter_account}")
        lines.append("")
        lines.append("suggested rename map (inferred):" if self.inferred else "rename map in use:")
        lines.append(format_rename_map(self.rules))
        lines.append("")
        lines.append(SITE_CONTRACT)
        return "\n".join(lines)

    def write_rename(self, path: str | Path) -> None:
        try:
            Path(path).write_text(format_rename_map(self.rules) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write ({exc.strerror})", str(path), "check the path") from None


def inspect_candidate(
    candidate: Any,
    *,
    weights: Any = None,
    model: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    rename: RenameLike = None,
    revision: str | None = None,
    synthetic: str = "trained",
    image_features: bool = False,
) -> Inspection:
    """Load the weights into the candidate as `compare` does, and say what meets what (see module doc)."""
    given = as_rename_rules(rename)
    if weights is None and model is None and preset is None:
        preset = "google/siglip-base-patch16-224"
    w = resolve_weights(
        weights=weights, model=model, preset=preset, seed=seed, dtype="float32", revision=revision, synthetic=synthetic
    )
    w = with_image_features(w, preset=preset, seed=seed) if image_features else w
    config, path = w.config, w.features.path if w.features is not None else None
    names = site_names(config, "fine", path)
    pixels = make_pixels(config, batch=1, seed=seed)
    ref_in, ref_out = record_reference(any_reference(config, w.state_dict, "sdpa", w.features), names, pixels)
    ref_out = {k: select(pixels, v) for k, v in ref_out.items()}  # as measured (NaFlex: real rows only)
    opened = open_candidate(candidate)
    infer = rename is None and not opened.canonical_names
    features = {"features": w.features} if w.features is not None else {}
    load = opened.load(config, w.state_dict, given, names=names, attn="sdpa", allowed=[], infer=infer, **features)
    cand = opened.module
    assert cand is not None
    cand.eval()
    param_rules = [tuple(r) for r in load.inferred_parameters] if infer else []
    site_rules, closeness = (
        infer_site_rules(cand, names, ref_out, pixels, ref_in, param_rules, list(w.state_dict)) if infer else ([], {})
    )
    rules = param_rules + site_rules if infer else [(p.pattern, r) for p, r in given]
    compiled = as_rename_rules(rules, "rename map")
    modules = {apply_rename(n, compiled): n for n, _ in cand.named_modules() if n}
    rows = []
    for site in names:
        module = modules.get(site)
        if site == VISION_FEATURE:
            fed = modules.get(PROJECTOR)
            rows.append((site, f"input of {fed}" if fed else "MISSING", "the hidden state the projector is fed"))
            continue
        if site == PROJECTOR:
            rows.append(
                (site, "the candidate's output", f"its projector: {module or 'none found (no isolated forcing)'}")
            )
            continue
        if module is None and site == "vision_model.embeddings" and "vision_model.encoder.layers.0" in modules:
            rows.append((site, f"input of {modules['vision_model.encoder.layers.0']}", "no embeddings module"))
        elif module is None:
            how = "from the model's output" if site in ("vision_model.post_layernorm", "vision_model.head") else ""
            rows.append((site, "MISSING", how or "no module; add a rule, or it is reported MISSING"))
        elif module == site:
            rows.append((site, module, "by name"))
        elif site in closeness:
            rows.append((site, module, f"inferred by value, rel. error {closeness[site]:.1e}"))
        else:
            rows.append((site, module, "by the rename map"))
    own = [(k, list(t.shape)) for k, t in cand.state_dict().items() if torch.is_tensor(t) and t.is_floating_point()]
    return Inspection(
        sites=rows,
        loaded=len(own) - len(load.unloaded),
        unloaded=load.unloaded,
        untaken=load.unexpected_keys,
        parameter_account=load.account,
        rules=rules,
        inferred=infer,
        candidate_params=own,
    )
