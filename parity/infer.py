"""Inferring a rename map: which of a candidate's parameters and modules are which canonical ones.

Two steps, each a rule that can be checked, never a guess from substrings:

1. **Parameters module by module.** The candidate's layers are the numbered children of the one
   container with as many entries as the checkpoint has layers. Within a layer, and outside the
   layers, each module holding parameters meets the canonical module whose parameters have the same
   shapes (weight and bias roles); where several share shapes (q/k/v/out, the two norms, post-norm vs
   the head's norm) an alias table of the names ports use decides, then the order ports write them in.
   Shapes that do not pair up (a fused qkv, a ``[1, N, D]`` position table) infer nothing: such a
   candidate needs ``load_hf_state_dict`` (or a map) for its weights, and what stays unloaded fails.
2. **Sites by value.** With the weights in, the candidate runs once on the run's pixels with every
   module hooked; each canonical site takes the candidate module whose output, of the same shape, is
   closest to the reference's output there (ties: a module with parameters, then the first). A module
   name that carries the layer index is then generalised to one rule per sub-site
   (``^blocks\\.(\\d+)\\.norm1$``) when that rule reproduces every layer's choice; a layer whose own
   best match disagrees (a bug there) follows the rule the other layers agree on, so a wrong layer
   is still compared at the right module and reported, not mapped away.

Every inferred rule is reported (``Report.candidate["inferred_rename"]``) and can be saved as a map.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .inputs import forward_candidate, select
from .sites import EMBEDDINGS, FIRST_LAYER, INPUT_SITES, PROJECTOR, VISION_FEATURE, first_tensor, input_tensor

__all__ = ["format_rename_map", "infer_parameter_rules", "infer_site_rules", "rules_to_json"]

Rule = tuple[str, str]  # (regex, replacement), as a rename map file holds them
# A module whose output is off by half the reference's scale or more is not that site, however buggy:
# different quantities of one layer (a norm's output, an attention output, the residual stream) differ
# by about their own scale. Such a site stays MISSING, never mapped to the wrong module.
MAX_SITE_ERROR = 0.5


# Names ports give the canonical modules (a candidate path component in the set scores for that module).
ALIASES: dict[str, set[str]] = {
    "patch_embedding": {
        "patch_embedding",
        "patch_embed",
        "patch_embeddings",
        "proj",
        "conv",
        "conv1",
        "conv_proj",
        "patchify",
        "stem",
    },
    "position_embedding": {
        "position_embedding",
        "pos_embed",
        "pos_embedding",
        "positional_embedding",
        "pos",
        "pos_emb",
    },
    "layer_norm1": {
        "layer_norm1",
        "norm1",
        "ln1",
        "ln_1",
        "norm_1",
        "input_layernorm",
        "pre_norm",
        "attn_norm",
        "attention_norm",
    },
    "layer_norm2": {
        "layer_norm2",
        "norm2",
        "ln2",
        "ln_2",
        "norm_2",
        "post_attention_layernorm",
        "mlp_norm",
        "ffn_norm",
    },
    "self_attn": {"self_attn", "attn", "attention", "self_attention", "sa", "mha"},
    "q_proj": {"q_proj", "q", "query", "wq", "to_q", "q_lin", "queries"},
    "k_proj": {"k_proj", "k", "key", "wk", "to_k", "k_lin", "keys"},
    "v_proj": {"v_proj", "v", "value", "wv", "to_v", "v_lin", "values"},
    "out_proj": {"out_proj", "o", "out", "proj", "o_proj", "wo", "to_out", "dense", "output", "out_lin", "c_proj"},
    "mlp": {"mlp", "ffn", "feed_forward", "ff", "feedforward"},
    "fc1": {"fc1", "up", "w1", "lin1", "dense1", "c_fc", "up_proj", "fc_1", "linear1"},
    "fc2": {"fc2", "down", "w2", "lin2", "dense2", "down_proj", "fc_2", "linear2", "out"},
    "post_layernorm": {
        "post_layernorm",
        "norm",
        "ln_f",
        "final_norm",
        "ln_post",
        "norm_f",
        "post_norm",
        "encoder_norm",
        "ln_final",
    },
    "head": {"head", "pool", "attn_pool", "map", "pooler", "map_head", "attention_pool", "pooling"},
    "probe": {"probe", "latent", "query", "cls", "pool_query"},
    "attention": {"attention", "attn", "mha", "multihead_attn"},
    "layernorm": {"layernorm", "norm", "ln", "layer_norm"},
}
# Among equally named candidates, the order ports write them in (q, k, v, out), not the hub's (k, v, q, out).
CONVENTIONAL = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "out_proj": 3}
LAYERS = "vision_model.encoder.layers."


def infer_parameter_rules(
    candidate: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    partial: bool = False,
    optional: Callable[[str], bool] | None = None,
) -> tuple[list[Rule], str]:
    """See `match_parameters`. ``optional``: canonical keys a candidate may lack (with --image-features, what no
    image feature depends on: the head, the tower layers past the deepest one used, an unused post_layernorm);
    tried without them when the full set does not match."""
    rules, account = match_parameters(candidate, state, partial=partial)
    if rules or optional is None or "canonical already" in account:
        return rules, account
    # Optional parts go by module (the head, post_layernorm, the unused layers): a port may lack any of them.
    groups: dict[str, set[str]] = {}
    for key in filter(optional, state):
        layer = re.match(r"vision_model\.encoder\.layers\.\d+\.", key)
        groups.setdefault("layers" if layer else key.split(".")[1], set()).add(key)
    for size in range(1, len(groups) + 1):
        for dropped in itertools.combinations(sorted(groups), size):
            gone = set().union(*(groups[g] for g in dropped))
            rules, narrower = match_parameters(
                candidate, {k: t for k, t in state.items() if k not in gone}, partial=partial
            )
            if rules:
                return rules, f"{narrower} (without the parts the image features do not use: {', '.join(dropped)})"
    return [], account


def match_parameters(
    candidate: nn.Module, state: Mapping[str, torch.Tensor], *, partial: bool = False
) -> tuple[list[Rule], str]:
    """(rules mapping every candidate weight key to a canonical key, a one-line account of the result).

    Module by module: the candidate's layers are the numbered children of one container with exactly
    as many entries as the checkpoint has layers; within a layer and outside them, each module holding
    parameters meets the canonical module with the same parameter shapes (weight and bias roles); where
    several have the same shapes (q/k/v/out, the two norms), names decide (`ALIASES`), then order.
    Returns no rules when the keys are canonical already or when the shapes cannot be matched (a fused
    qkv, a ``[1, N, D]`` position table: such a candidate needs ``load_hf_state_dict``); the account
    says which.

    ``partial`` (a candidate with its own ``load_hf_state_dict``): match what can be matched and leave the
    rest to the loader. A shape class whose counts differ (a fused qkv beside an output projection) pairs
    only modules whose names say which they are (``proj`` → ``out_proj``); a module holding several weights
    of one role is skipped. The loader runs after the rules, so its tensors win where both write."""
    own = {k: tuple(t.shape) for k, t in candidate.state_dict().items() if t.is_floating_point()}
    canonical = {k: tuple(t.shape) for k, t in state.items() if t.is_floating_point()}
    if set(own) <= set(canonical):
        return [], "parameter keys are canonical already"
    n_layers = len({k[len(LAYERS) :].split(".")[0] for k in canonical if k.startswith(LAYERS)})
    container = _layer_container(own, n_layers)
    if container is None:
        return [], f"no module list of {n_layers} numbered layers among the candidate's parameters"
    cand_top = {k: s for k, s in own.items() if not k.startswith(container)}
    canon_top = {k: s for k, s in canonical.items() if not k.startswith(LAYERS)}
    cand_layers = [
        {k[len(f"{container}{i}.") :]: s for k, s in own.items() if k.startswith(f"{container}{i}.")}
        for i in range(n_layers)
    ]
    canon_layer0 = {k[len(f"{LAYERS}0.") :]: s for k, s in canonical.items() if k.startswith(f"{LAYERS}0.")}
    if any(layer != cand_layers[0] for layer in cand_layers[1:]):
        return [], f"the candidate's layers under {container!r} differ in their parameters"
    pairs: list[tuple[str, str]] = []
    for cand, canon, prefix in ((cand_top, canon_top, None), (cand_layers[0], canon_layer0, "layer")):
        matched, why = _match_modules(cand, canon, partial=partial)
        if matched is None:
            return [], why
        if prefix is None:
            pairs += matched
        else:
            pairs += [(f"{container}{i}.{c}", f"{LAYERS}{i}.{k}") for i in range(n_layers) for c, k in matched]
    pairs = [(c, k) for c, k in pairs if c != k]
    if partial:
        named = {c for c, _ in pairs} | (set(own) & set(canonical))
        left = len(own) - len(named & set(own))
        return _generalise(pairs), (
            f"{len(own) - left} of {len(own)} weight tensors matched module by module (shapes, then names); "
            f"{left} left to its load_hf_state_dict"
        )
    return _generalise(pairs), f"{len(own)} weight tensors matched module by module (shapes, then names, then order)"


def _layer_container(own: Mapping[str, Any], n_layers: int) -> str | None:
    """The prefix ``P.`` such that the candidate's keys ``P.<i>.…`` run over exactly 0…n_layers−1."""
    seen: dict[str, set[int]] = {}
    for key in own:
        parts = key.split(".")
        for j, part in enumerate(parts[:-1]):
            if part.isdigit():
                seen.setdefault(".".join(parts[:j]) + ".", set()).add(int(part))
                break
    hits = [p for p, idx in seen.items() if idx == set(range(n_layers))]
    return hits[0] if len(hits) == 1 else None


def _owners(params: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in params.items():
        owner, _, name = key.rpartition(".")
        out.setdefault(owner, {})[name] = shape
    return out


def _role(name: str) -> str:
    return "bias" if name.endswith("bias") else "weight"


def _signature(params: Mapping[str, tuple[int, ...]]) -> tuple | None:
    roles = [(_role(n), s) for n, s in params.items()]
    return tuple(sorted(roles)) if len({r for r, _ in roles}) == len(roles) else None


def _score(cand_owner: str, canon_owner: str) -> int:
    words = [w for w in cand_owner.lower().split(".") if w and not w.isdigit()]
    parts = [p for p in canon_owner.split(".") if p in ALIASES]
    score = 0
    for j, part in enumerate(reversed(parts)):
        if any(w in ALIASES[part] for w in (words[-1:] if j == 0 else words)):
            score += 3 if j == 0 else 1
    return score


def _match_modules(
    cand: Mapping[str, tuple[int, ...]], canon: Mapping[str, tuple[int, ...]], *, partial: bool = False
) -> tuple[list[tuple[str, str]] | None, str]:
    cand_owners, canon_owners = _owners(cand), _owners(canon)
    classes: dict[tuple, tuple[list[str], list[str]]] = {}
    for owners, side in ((cand_owners, 0), (canon_owners, 1)):
        for owner, params in owners.items():
            sig = _signature(params)
            if sig is None:
                if partial:
                    continue
                return None, f"{owner or '(root)'} holds several weights of one role: cannot match it by shape"
            classes.setdefault(sig, ([], []))[side].append(owner)
    pairs: list[tuple[str, str]] = []
    for sig, (cands, canons) in classes.items():
        if len(cands) != len(canons) and partial:
            # Only names can pair an uneven class: each candidate module with its best-named canonical one.
            taken: set[str] = set()
            for c in cands:
                scored = sorted((-_score(c, k), canons.index(k), k) for k in canons if k not in taken)
                if scored and scored[0][0] < 0:
                    k = scored[0][2]
                    taken.add(k)
                    for name in cand_owners[c]:
                        target = next(n for n in canon_owners[k] if _role(n) == _role(name))
                        pairs.append((f"{c}.{name}" if c else name, f"{k}.{target}" if k else target))
            continue
        if len(cands) != len(canons):
            shapes = ", ".join(f"{r} {list(s)}" for r, s in sig)
            return None, (
                f"{len(cands)} candidate module(s) ({', '.join(cands) or 'none'}) but {len(canons)} canonical "
                f"({', '.join(canons) or 'none'}) hold {shapes}: a layout renaming cannot express (use load_hf_state_dict)"
            )
        rank = {c: (CONVENTIONAL.get(c.rpartition(".")[2], 9), i) for i, c in enumerate(canons)}
        options = sorted(
            ((-_score(c, k), cands.index(c), rank[k], c, k) for c in cands for k in canons), key=lambda t: t[:3]
        )
        taken_c: set[str] = set()
        taken_k: set[str] = set()
        for _, _, _, c, k in options:
            if c in taken_c or k in taken_k:
                continue
            taken_c.add(c)
            taken_k.add(k)
            for name in cand_owners[c]:
                target = next(n for n in canon_owners[k] if _role(n) == _role(name))
                pairs.append((f"{c}.{name}" if c else name, f"{k}.{target}" if k else target))
    return pairs, ""


def infer_site_rules(
    candidate: nn.Module,
    sites: Sequence[str],
    ref_out: Mapping[str, torch.Tensor],
    pixel_values: Any,
    ref_in: Mapping[str, torch.Tensor] | None = None,
    param_rules: Sequence[Rule] = (),
    state_keys: Sequence[str] = (),
) -> tuple[list[Rule], dict[str, float]]:
    """Rules naming the candidate module of each canonical site (those it lacks by name), found by value.

    A module is a site only if it computes that site: its output is close to the reference's output there
    and, where the reference recorded the site's input (``ref_in``), its *input* is close to that input
    too: an attention written inline ends in an ``out_proj`` whose output is the attention's, but whose input
    is not the LayerNorm output, so it is not ``self_attn``. The embeddings' input is the model input, which
    a port may take in any form; their module must instead output exactly what the candidate's layer 0
    then receives (a ``Linear`` patch embedding followed by ``x += pos`` is not the embeddings).
    Every tensor is copied as it is recorded, so a later in-place op cannot change it.

    Before any value is looked at, a site whose parameters the parameter rules (``param_rules``) already placed is
    taken by structure: the candidate module whose parameters map to exactly that site's parameters is the site
    (``blocks.3.attn`` when its q/k/v/out map to ``layers.3.self_attn``). Structure survives a bug upstream (patches
    read in the wrong order permute every later value, so values alone would find nothing).

    Returns (rules, the relative error of each chosen module against the reference: how sure; 0 for a site taken
    by structure)."""
    names = dict(candidate.named_modules())
    lacking = [s for s in sites if s not in names and s in ref_out and s not in INPUT_SITES]
    if not lacking:
        return [], {}
    structural = _sites_by_parameters(candidate, lacking, param_rules, state_keys)
    projector_side = _projector_modules(candidate, param_rules) if PROJECTOR in lacking else set()
    lacking = [s for s in lacking if s not in structural]
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in names.items():
        if not name:
            continue

        def pre(mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            t = input_tensor(args, kwargs)
            if t is not None and name not in inputs:
                inputs[name] = t.detach().clone()

        def hook(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
            t = first_tensor(output)
            if t is not None and name not in outputs:
                outputs[name] = t.detach().clone()

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            forward_candidate(candidate, pixel_values)
    finally:
        for h in handles:
            h.remove()
    order = {n: i for i, n in enumerate(names)}
    started = {n: i for i, n in enumerate(inputs)}  # the order modules began running in
    has_params = {n: any(True for _ in m.parameters(recurse=False)) or len(m._modules) > 0 for n, m in names.items()}
    chosen: dict[str, str] = {}
    error: dict[str, float] = {}
    for site in lacking:
        want = ref_out[site].double()
        want_in = ref_in.get(site) if ref_in is not None and site != EMBEDDINGS else None
        # The image features are what the candidate returns: its projector is the module fed the vision feature
        # (the first, outermost one), needed only to read that input and teacher-force it.
        found = outputs if site != PROJECTOR else {n: t for n, t in inputs.items() if n in projector_side}
        if site == PROJECTOR:
            want, want_in = ref_out[VISION_FEATURE].double(), None
        best: tuple[float, int, int, str] | None = None
        for name, got in found.items():
            err = _relative(select(pixel_values, got), want) if site != PROJECTOR else _relative_tokens(got, want)
            if err is None:
                continue
            if want_in is not None:
                got_in = inputs.get(name)
                err_in = (
                    None if got_in is None else _relative(select(pixel_values, got_in), select(pixel_values, want_in))
                )
                if err_in is None or err_in >= MAX_SITE_ERROR:
                    continue  # not fed what this site is fed: another computation with a similar output
            key = (err, 0 if has_params[name] else 1, order[name], name)
            if site == PROJECTOR:  # of modules fed the same tensor (a tower block, then the projector), the last run
                key = (err, 0, -started[name], name)
            if best is None or key < best:
                best = key
        if best is not None and best[0] < MAX_SITE_ERROR:
            chosen[site], error[site] = best[3], best[0]
    chosen.update(structural)
    error.update(dict.fromkeys(structural, 0.0))
    first = chosen.get(FIRST_LAYER, FIRST_LAYER if FIRST_LAYER in names else None)
    if EMBEDDINGS in chosen and first in inputs:
        emb = outputs[chosen[EMBEDDINGS]]
        if emb.shape != inputs[first].shape or not torch.equal(emb, inputs[first]):
            del chosen[EMBEDDINGS], error[EMBEDDINGS]  # judged as layer 0's input instead
    pairs = sorted(((chosen[s], s) for s in chosen), key=lambda p: order[p[0]])
    return _generalise(pairs, by_majority=True), error


def _sites_by_parameters(
    candidate: nn.Module, sites: Sequence[str], rules: Sequence[Rule], state_keys: Sequence[str]
) -> dict[str, str]:
    """site -> candidate module, for sites whose parameters the rules place: the module whose parameters map, one to
    one, onto every canonical parameter of the site (a fused qkv its loader fills is not placed, so an attention
    holding one is left to the search by value, never matched by its output projection alone)."""
    if not rules or not state_keys:
        return {}
    compiled = [(re.compile(p), r) for p, r in rules]

    def canonical(key: str) -> str:
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        return key

    keys = [k for k, t in candidate.state_dict().items() if t.is_floating_point()]
    mapped = {k: canonical(k) for k in keys}
    out: dict[str, str] = {}
    for site in sites:
        under = {k for k, c in mapped.items() if c.startswith(site + ".")}
        wanted = {k for k in state_keys if k.startswith(site + ".")}
        if not under or {mapped[k] for k in under} != wanted:
            continue
        best = None
        for name, module in candidate.named_modules():
            own = {f"{name}.{k}" if name else k for k, t in module.state_dict().items() if t.is_floating_point()}
            if own == under and (best is None or len(name) > len(best)):
                best = name  # the deepest module holding exactly those parameters
        if best:
            out[site] = best
    return out


def _projector_modules(candidate: nn.Module, rules: Sequence[Rule]) -> set[str]:
    """Modules that may be the projector: none of their parameters maps into the tower (a tower block fed the same
    hidden state is not the projector), and, when rules place parameters, some map into the projector."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def canonical(key: str) -> str:
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        return key

    out = set()
    for name, module in candidate.named_modules():
        keys = [canonical(f"{name}.{k}" if name else k) for k in module.state_dict()]
        if any(k.startswith("vision_model.") for k in keys):
            continue
        if not compiled or any(k.startswith(PROJECTOR + ".") for k in keys):
            out.add(name)
    return out


def _relative_tokens(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """`_relative`, or with one token more or less (a CLS token assumed, or one dropped), the best alignment: the
    module fed the vision feature is found even when its token count is the bug."""
    if got.dim() != 3 or want.dim() != 3 or (got.shape[0], got.shape[2]) != (want.shape[0], want.shape[2]):
        return None
    extra = got.shape[1] - want.shape[1]
    if extra == 0:
        return _relative(got, want)
    if abs(extra) != 1:
        return None
    longer, shorter = (got, want) if extra > 0 else (want, got)
    return min(_relative(longer[:, 1:], shorter) or 0.0, _relative(longer[:, :-1], shorter) or 0.0)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """max |got − want| / max |want|, or None when the shapes differ."""
    if tuple(got.shape) != tuple(want.shape):
        return None
    want = want.double()
    return (got.double() - want).abs().max().item() / (want.abs().max().item() or 1.0)


_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")


def _generalise(pairs: Sequence[tuple[str, str]], *, by_majority: bool = False) -> list[Rule]:
    """Exact ``(candidate, canonical)`` name pairs as regex rules, one per layer-indexed template.

    A pair whose canonical name is ``vision_model.encoder.layers.{i}.…`` and whose candidate name
    holds ``{i}`` as one dotted component becomes a template; a template is kept when it reproduces
    the pairs of every layer it covers, or, ``by_majority``, of most of them (the others are then
    assumed to deviate because of a bug, not a different layout). The rest stay exact rules."""
    templates: dict[tuple[str, str], list[tuple[str, str]]] = {}
    exact: list[Rule] = []
    for cand, canon in pairs:
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)((?:\..+)?)", canon)
        idx = m.group(1) if m else None
        positions = [mm for mm in _INDEX.finditer(cand) if mm.group(1) == idx] if idx is not None else []
        if len(positions) != 1:
            exact.append((f"^{re.escape(cand)}$", canon))
            continue
        p = positions[0]
        key = (re.escape(cand[: p.start()]) + r"(\d+)" + re.escape(cand[p.end() :]), m.group(2))
        templates.setdefault(key, []).append((cand, canon))
    rules: list[Rule] = []
    by_suffix: dict[str, Counter] = {}
    for (pattern, suffix), members in templates.items():
        by_suffix.setdefault(suffix, Counter())[pattern] = len(members)
    for suffix, counts in by_suffix.items():
        ranked = counts.most_common()
        top, n_top = ranked[0]
        rest = sum(n for _, n in ranked[1:])
        if rest == 0 or (by_majority and n_top > rest):
            rules.append((f"^{top}$", r"vision_model.encoder.layers.\1" + suffix.replace("\\", "\\\\")))
        else:
            for pattern, _ in ranked:
                rules += [(f"^{re.escape(c)}$", k) for c, k in templates[(pattern, suffix)]]
    return rules + exact


def rules_to_json(rules: Sequence[Rule]) -> dict[str, list[list[str]]]:
    """The rename map file's format: ``{"rename": [["regex", "replacement"], ...]}``."""
    return {"rename": [[p, r] for p, r in rules]}


def format_rename_map(rules: Sequence[Rule]) -> str:
    """The map as a file holds it, one rule a line."""
    import json

    body = ",\n".join(f"    {json.dumps([p, r])}" for p, r in rules)
    return '{\n  "rename": [\n' + body + ("\n" if body else "") + "  ]\n}"
