"""HF layouts (hub folders, transformers saves of SigLIP and of VLMs, any version): the prefix rules of
`siglip_scratch.checkpoint`, no key table. ``--verify`` compares them tensor by tensor."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from siglip_scratch.checkpoint import PREFIX_RULES_LONGEST_FIRST, map_vision_keys
from siglip_scratch.errors import InputError
from siglip_scratch.files import read_json

from ..stores import Store
from ..tables import Planned, loader
from .base import Format, Layout

__all__ = ["HF", "MODEL_NAMES", "SMOLVLM_NOTE", "hf_layout", "model_name"]

_RULE_NAMES = {
    "vision_model.": "hub layout (vision_model.…)",
    "embeddings.": "SiglipVisionModel (flat, transformers >= 5.6)",
    "vision_tower.vision_model.": "VLM tower, hub / transformers 4.x layout (vision_tower.vision_model.)",
    "vision_tower.": "VLM tower, transformers 5.x on-disk layout (vision_tower., flat)",
    "model.vision_tower.vision_model.": "VLM tower, transformers 5.x in-memory layout (model.vision_tower.vision_model.)",
    "model.vision_tower.": "VLM tower, transformers 5.x in-memory layout (model.vision_tower., flat)",
    "model.vision_model.": "SmolVLM/Idefics3 tower (model.vision_model.)",
}
SMOLVLM_NOTE = (
    "SmolVLM/Idefics3 tower: under transformers >= 5, for a full-size image its position ids are 0…N−1 and it "
    "computes exactly what SiglipVisionModel without a head computes (tested against transformers' own); "
    "transformers 4.57 buckets i/n·(1 − 1e-6), which repeats position 0 and drops the last on each axis even "
    "for full-size images; padded images and sub-images use bucketed position ids and a patch attention mask, "
    "which this folder does not reproduce"
)
# config.json model_type -> the name a detection line prints
MODEL_NAMES = {
    "siglip": "SigLIP",
    "siglip_vision_model": "SigLIP vision model",
    "siglip2": "SigLIP 2 NaFlex",
    "siglip2_vision_model": "SigLIP 2 NaFlex vision model",
    "paligemma": "PaliGemma",
    "gemma3": "Gemma 3",
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
}


def hf_layout(store: Store) -> tuple[str, list[Planned], set[str], list[str], list[str]]:
    """(layout name, planned tensors, source keys used, dropped keys, notes) by the prefix rules."""
    keys = store.keys()
    mapping, dropped, _unmatched = map_vision_keys(keys)
    rules = PREFIX_RULES_LONGEST_FIRST
    kinds: Counter[str] = Counter()
    for src in mapping.values():
        prefix = next(p for p, _ in rules if src.startswith(p))
        kinds[_RULE_NAMES.get(prefix, "SiglipVisionModel (flat, transformers >= 5.6)")] += 1
    layout = " + ".join(k for k, _ in kinds.most_common()) or "unknown"
    towers = sorted({d.split(".")[0] if not d.startswith("model.") else ".".join(d.split(".")[:2]) for d in dropped})
    notes = [f"dropped {len(dropped)} tensor(s) outside the vision tower ({', '.join(towers)})"] if dropped else []
    planned = [
        Planned(dst, store.shape(src), store.dtype(src), loader(store, src), store.raw(src), store.where(src), (src,))
        for dst, src in mapping.items()
    ]
    return layout, planned, set(mapping.values()), dropped, notes


def model_name(folder: Path) -> str | None:
    """The model a config.json beside the weights names (``model_type``), for the detection line."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    data = read_json(file, what="config", error=InputError, fix="fix or replace config.json")
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str):
        return None
    text = data.get("text_config")
    if model_type == "paligemma" and isinstance(text, dict) and text.get("model_type") == "gemma2":
        return "PaliGemma 2"  # one class and model_type for both; the language model tells them apart
    return MODEL_NAMES.get(model_type, model_type)


class HfFormat(Format):
    family = "hf"

    def detects(self, store: Store, keys: Sequence[str]) -> bool:
        return True  # asked last: whatever no table family claims is read by the prefix rules

    def layout(self, store, keys, *, folder: Path, where, use_head, hidden_act, infer) -> Layout:
        name, planned, used, drops, notes = hf_layout(store)
        model = model_name(folder)
        if model:
            name = f"{model}: {name}"
        if "model.vision_model." in {p.sources[0][: len("model.vision_model.")] for p in planned}:
            notes.append(SMOLVLM_NOTE)
        return Layout(name, planned, used, drops, notes)


HF = HfFormat()
