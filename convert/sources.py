"""Detecting a source and planning the conversion: which output tensor comes from which input bytes.

`plan_conversion` returns a `Plan` that is fully checked before anything is written: every source
key is used (or explicitly dropped as another tower), every target key is produced, every shape
matches the config. Tensor data is only read later, one tensor at a time, by the writer.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.checkpoint import (
    INDEX_NAME,
    PREFIX_RULES_LONGEST_FIRST,
    TensorInfo,
    check_state_shapes,
    folder_safetensors,
)
from siglip_scratch.config import (
    PRESETS,
    SUPPORTED_ACTIVATIONS,
    AnyVisionConfig,
    Siglip2VisionConfig,
    SiglipVisionConfig,
    load_config,
    siglip_generation,
)
from siglip_scratch.errors import CheckpointError, ConfigError, InputError, SourceError
from siglip_scratch.files import is_sha256, read_json
from siglip_scratch.hub import RangedRead
from siglip_scratch.modeling import expected_shapes
from siglip_scratch.processor import BICUBIC, BILINEAR, Siglip2ImageProcessor, SiglipImageProcessor

from .stores import NpzStore, SafetensorsStore, Store, TorchPickleStore
from .tables import BIG_VISION_NAFLEX_TABLE, BIG_VISION_TABLE, TIMM_TABLE, Row

__all__ = ["InputFile", "Plan", "Planned", "plan_conversion"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Hidden size -> heads for known SigLIP towers; timm state dicts do not record the head count.
KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}


@dataclass
class Planned:
    """One output tensor: its key, shape and source dtype; a raw byte range when it can be copied."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    raw: TensorInfo | None
    where: str
    sources: tuple[str, ...] = ()  # the source keys it is made from (for --verify)


@dataclass
class InputFile:
    path: Path
    sha256: str | None = None  # known already (hub blob name), else computed while converting
    ranged: RangedRead | None = None  # read in part by HTTP ranges: sha256 is the hub's, not checked


@dataclass
class Plan:
    kind: str
    detected: str
    layout: str
    config: AnyVisionConfig
    tensors: list[Planned]
    inputs: list[InputFile]
    preprocessor: dict[str, Any]
    preprocessor_from: str
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dropped: int = 0
    # For --verify: the source's family ("big_vision", "timm" or "hf"), the prefix of its vision tower
    # in the source's own key names, and the open store to read it by those names.
    family: str = "hf"
    root: str = ""
    store: Store | None = None
    # Ranged hub reads land in a scratch folder that lives as long as the plan (``close`` removes it).
    scratch: Path | None = None

    def close(self) -> None:
        """Remove the scratch folder of a ranged hub read (also done when the plan is collected)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def plan_conversion(
    source: str,
    *,
    revision: str | None = None,
    config_file: str | None = None,
    no_head: bool = False,
    hidden_act: str | None = None,
    full_download: bool = False,
) -> Plan:
    """Detect ``source`` (hub id, HF folder, .safetensors/.bin/.pt/.npz file) and plan the output.

    ``hidden_act`` overrides the activation the config says (or the tanh GELU assumed for a timm or
    open_clip state dict, which carries none). A hub source's safetensors shards are read by HTTP range
    requests, only the vision tensors' bytes (see `fetch_vision_ranges`), unless ``full_download`` or
    offline, or the shard is cached whole already."""
    if hidden_act is not None and hidden_act not in SUPPORTED_ACTIVATIONS:
        raise InputError(
            f"unsupported hidden_act {hidden_act!r}", "--hidden-act", f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    path = Path(source)
    override = _read_config(Path(config_file)) if config_file else None
    provenance: dict[str, Any] = {"source": source}
    inputs: list[InputFile] = []
    scratch: Path | None = None
    if path.is_dir():
        kind, detected = "hf-folder", f"local folder in HF layout: {path}"
        folder, weights = path, _folder_weights(path)
    elif path.is_file():
        folder, weights = path.parent, path
        kind, detected = _file_kind(path)
    elif path.suffix in (".safetensors", ".npz", *PICKLE_SUFFIXES) or source.startswith((".", "/", "~")):
        raise SourceError("no such file or folder", source, "check the path")
    elif HUB_ID.match(source):
        folder, commit, scratch = _hub_source(source, revision, full_download, inputs)
        weights = _folder_weights(folder)
        provenance.update({"repo_id": source, "revision": revision or "main", "commit": commit})
        kind = "hub"
        detected = f"hub repo {source} (revision {revision or 'main'}, commit {commit or 'unknown'})"
    else:
        raise SourceError(
            "not a file, a folder or a hub repo id",
            source,
            "pass a path that exists, or a hub id like google/siglip-base-patch16-224",
        )
    try:
        plan = _plan(source, folder, weights, kind, detected, override, config_file, no_head, hidden_act, inputs)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    plan.provenance = provenance
    if scratch is not None:
        plan.scratch = scratch
        weakref.finalize(plan, shutil.rmtree, scratch, True)
    return plan


def _hub_source(
    repo_id: str, revision: str | None, full_download: bool, inputs: list[InputFile]
) -> tuple[Path, str | None, Path | None]:
    """(the folder to read, the commit, the scratch folder of a ranged read or None)."""
    from huggingface_hub import constants

    from siglip_scratch.hub import download_vision_checkpoint, fetch_vision_ranges

    if not (full_download or constants.HF_HUB_OFFLINE):
        scratch = Path(tempfile.mkdtemp(prefix="siglip-convert-ranged-"))
        try:
            folder, commit, reads = fetch_vision_ranges(repo_id, revision=revision, scratch=scratch)
        except LookupError:  # pickle weights only: no ranges, downloaded whole below
            shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        else:
            inputs += [InputFile(folder / name, r.sha256, r) for name, r in reads.items()]
            return folder, commit, scratch
    folder = download_vision_checkpoint(repo_id, revision=revision, allow_pickle=True)
    return folder, (folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None), None


def _plan(
    source: str,
    folder: Path,
    weights: Path,
    kind: str,
    detected: str,
    override: AnyVisionConfig | None,
    config_file: str | None,
    no_head: bool,
    hidden_act: str | None,
    inputs: list[InputFile],
) -> Plan:
    store = _open_store(weights)
    known = {f.path for f in inputs}
    inputs += [InputFile(f, _hub_blob_sha256(f)) for f in store.files if f not in known]
    keys = store.keys()
    family, root = "hf", ""
    if isinstance(store, NpzStore):
        family = "big_vision"
        layout, rows, root, drops, notes = _npz_layout(keys, str(weights))
        if len(store.shape(root + "embedding/kernel")) == 2:  # a Dense over flattened patches: NaFlex
            family, rows, layout = (
                "big_vision_naflex",
                BIG_VISION_NAFLEX_TABLE,
                layout.replace("SigLIP", "SigLIP 2 NaFlex"),
            )
            extra = sorted(k for k in keys if k.startswith((root + "patchln_pre/", root + "patchln_post/")))
            if extra:
                raise CheckpointError(
                    f"this NaFlex ViT normalises its patches ({extra[0]}), which transformers' Siglip2VisionModel "
                    "has no layer for",
                    str(weights),
                    "only SigLIP 2 NaFlex checkpoints (no patchln_pre/patchln_post) convert",
                )
        planned, used = _apply_table(rows, store, root, keys, use_head=not no_head)
        if override is None:
            infer = _infer_naflex_config if family == "big_vision_naflex" else _infer_config
            inferred = infer(store, root, "npz", None, notes)
        else:
            inferred = None
    elif _looks_timm(keys):
        family = "timm"
        timm_config = _timm_config(folder)
        act_layer = _timm_act_layer(timm_config, str(folder / "config.json"))
        layout, root, drops, notes = _timm_layout(keys, act_layer, hidden_act)
        planned, used = _apply_table(TIMM_TABLE, store, root, keys, use_head=not no_head)
        inferred = None
        if override is None:
            inferred = _infer_config(store, root, "timm", _timm_image_size(timm_config), notes)
    else:
        layout, planned, used, drops, notes = _hf_layout(store)
        inferred = None
        model = _model_name(folder)
        if model:
            layout = f"{model}: {layout}"
        if "model.vision_model." in {p.sources[0][: len("model.vision_model.")] for p in planned}:
            notes.append(SMOLVLM_NOTE)

    notes = [*getattr(store, "notes", []), *notes]
    leftovers = sorted(set(keys) - used - set(drops))
    if leftovers:
        raise CheckpointError(
            f"{len(leftovers)} tensor(s) match no known layout: {', '.join(leftovers[:8])}"
            + (" …" if len(leftovers) > 8 else ""),
            str(weights),
            "this does not look like a SigLIP checkpoint; pass one, or file an issue with its key names",
        )
    if not planned:
        raise CheckpointError(
            "no SigLIP vision tower in this checkpoint", str(weights), "pass a checkpoint that holds the vision tower"
        )

    config = override or _folder_config(folder, kind, inferred, inputs)
    if hidden_act is not None and hidden_act != config.hidden_act:
        notes.append(f"hidden_act {hidden_act} from --hidden-act (the config says {config.hidden_act})")
        config = config.replace(hidden_act=hidden_act)
    if no_head:
        config = config.replace(vision_use_head=False)
        planned = [p for p in planned if not p.key.startswith("vision_model.head.")]
    check_state_shapes(expected_shapes(config), {p.key: p.shape for p in planned}, str(weights))
    order = {key: i for i, key in enumerate(expected_shapes(config))}
    planned.sort(key=lambda p: order[p.key])

    preprocessor, pre_from = _preprocessor(folder, kind, config, inputs)
    if override is not None:
        notes.append(f"config from --config {config_file}")
    elif inferred is not None:
        notes.append("config inferred from tensor shapes (pass --config to set it)")
    return Plan(
        kind=kind,
        detected=detected,
        layout=layout,
        config=config,
        tensors=planned,
        inputs=inputs,
        preprocessor=preprocessor,
        preprocessor_from=pre_from,
        notes=notes,
        dropped=len(drops),
        family=family,
        root=root,
        store=store,
    )


# -- detection -----------------------------------------------------------------------------------
def _file_kind(path: Path) -> tuple[str, str]:
    name = path.name
    if name.endswith(".safetensors") or name == INDEX_NAME:
        return "safetensors", f"safetensors file: {path}"
    if name.endswith(PICKLE_SUFFIXES) or name == BIN_INDEX:
        return "torch", f"PyTorch pickle (read with weights_only=True): {path}"
    if name.endswith(".npz"):
        return "npz", f"big_vision .npz: {path}"
    raise SourceError(
        f"unknown weights format {path.suffix or name!r}", str(path), "pass .safetensors, .bin, .pt or .npz"
    )


def _folder_weights(folder: Path) -> Path:
    found = folder_safetensors(folder)  # the loader's rule: model.safetensors, its index, a single file
    if found is not None:
        return found
    for name in (BIN_INDEX, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    singles = sorted(folder.glob("*.npz"))
    if len(singles) == 1:
        return singles[0]
    raise SourceError(
        "no weights found (model.safetensors, its index, or pytorch_model.bin)",
        str(folder),
        "pass the weights file itself",
    )


def _open_store(weights: Path) -> Store:
    name = weights.name
    if name.endswith(".npz"):
        return NpzStore(weights)
    if name.endswith(PICKLE_SUFFIXES) or name == BIN_INDEX:
        return TorchPickleStore(weights)
    return SafetensorsStore(weights)


def _hub_blob_sha256(path: Path) -> str | None:
    """A hub-cache snapshot file links to ``blobs/<sha256>`` for LFS files: reuse the hub's hash."""
    try:
        target = path.resolve()
    except OSError:
        return None
    if target.parent.name == "blobs" and is_sha256(target.name):
        return target.name
    return None


# -- HF layouts ----------------------------------------------------------------------------------
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


def _hf_layout(store: Store) -> tuple[str, list[Planned], set[str], list[str], list[str]]:
    from siglip_scratch.checkpoint import map_vision_keys

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
        Planned(dst, store.shape(src), store.dtype(src), _loader(store, src), store.raw(src), store.where(src), (src,))
        for dst, src in mapping.items()
    ]
    return layout, planned, set(mapping.values()), dropped, notes


def _loader(store: Store, key: str) -> Callable[[], torch.Tensor]:
    return lambda: store.load(key)


# -- tables (timm, big_vision) -------------------------------------------------------------------
def _looks_timm(keys: Sequence[str]) -> bool:
    return any(k.endswith("patch_embed.proj.weight") for k in keys)


# timm's act_layer names (a save_for_hf config.json's model_args) -> transformers' hidden_act
TIMM_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _timm_config(folder: Path) -> dict[str, Any] | None:
    """A timm ``save_for_hf`` config.json beside the weights (it names an ``architecture``), else None."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    data = read_json(file, what="config", error=InputError, fix="fix or replace config.json")
    return data if isinstance(data, dict) and isinstance(data.get("architecture"), str) else None


def _timm_act_layer(timm_config: dict[str, Any] | None, where: str) -> str | None:
    """The activation a timm config builds the model with: ``model_args.act_layer``, else timm's
    default for its SigLIP ViTs ("gelu", exact). None without a config (a bare state dict says
    nothing about its activation)."""
    if timm_config is None:
        return None
    args = timm_config.get("model_args") if isinstance(timm_config.get("model_args"), dict) else {}
    act = args.get("act_layer", "gelu")
    if act not in TIMM_ACTIVATIONS:
        raise ConfigError(
            f"timm act_layer {act!r} has no SigLIP equivalent",
            f"{where}: model_args.act_layer",
            "use gelu or gelu_tanh",
        )
    return act


def _timm_image_size(timm_config: dict[str, Any] | None) -> int | None:
    """The square input size a timm config states (``model_args.img_size``, else
    ``pretrained_cfg.input_size``), or None."""
    if timm_config is None:
        return None
    args = timm_config.get("model_args") if isinstance(timm_config.get("model_args"), dict) else {}
    cfg = timm_config.get("pretrained_cfg") if isinstance(timm_config.get("pretrained_cfg"), dict) else {}
    size = args.get("img_size")
    if size is None and isinstance(cfg.get("input_size"), list) and len(cfg["input_size"]) == 3:
        size = cfg["input_size"][1:]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _timm_layout(
    keys: Sequence[str], act_layer: str | None, hidden_act: str | None
) -> tuple[str, str, list[str], list[str]]:
    anchor = next(k for k in keys if k.endswith("patch_embed.proj.weight"))
    root = anchor[: -len("patch_embed.proj.weight")]
    if root not in ("", "trunk.", "visual.trunk.", "module."):
        raise CheckpointError(f"unexpected timm prefix {root!r}", anchor, "strip it before converting")
    layout = {"visual.trunk.": "open_clip SigLIP (visual.trunk.)"}.get(root, "timm SigLIP ViT")
    # Outside the trunk (open_clip's text tower, logit_scale/bias) or not part of a SigLIP tower
    # (timm's classifier `head` and `fc_norm`): dropped and reported.
    drops = [k for k in keys if not k.startswith(root) or k[len(root) :].startswith(("head.", "fc_norm."))]
    notes = []
    if hidden_act is None and act_layer != "gelu_tanh":
        runs = "this timm config builds it with" if act_layer else "timm and open_clip build SigLIP ViTs with"
        notes.append(
            f"{runs} exact GELU, but the checkpoints were trained with the tanh approximation: the output "
            "config keeps hidden_act gelu_pytorch_tanh (as transformers' google/siglip-* configs); pass "
            "--hidden-act gelu to reproduce timm's own forward instead"
        )
    if drops:
        notes.append(f"dropped {len(set(drops))} tensor(s) outside the vision trunk")
    return layout, root, sorted(set(drops)), notes


def _npz_layout(keys: Sequence[str], where: str) -> tuple[str, list[Row], str, list[str], list[str]]:
    roots = [r for r in ("params/img/", "img/") if any(k.startswith(r) for k in keys)]
    if not roots:
        raise CheckpointError(
            "no image tower (img/…) in this .npz", where, "pass a big_vision SigLIP or PaliGemma checkpoint"
        )
    root = roots[0]
    paligemma = any(k.startswith(("params/llm/", "llm/")) for k in keys)
    drops = [k for k in keys if not k.startswith(root) or k.startswith(root + "head/")]
    layout = "big_vision " + ("PaliGemma" if paligemma else "two-tower SigLIP") + f" ({root}…)"
    if any("/encoderblock/" in k for k in keys):
        layout += ", scanned blocks"
    notes = []
    if any(k.startswith(root + "head/") for k in keys):
        notes.append(f"dropped {root}head/ (a projection outside the vision tower)")
    other = {k.split("/")[0] if not k.startswith("params/") else "/".join(k.split("/")[:2]) for k in drops}
    other.discard(root.rstrip("/"))
    if other:
        notes.append(f"dropped other towers: {', '.join(sorted(other))}")
    return layout, BIG_VISION_TABLE, root, drops, notes


def _apply_table(
    rows: Sequence[Row], store: Store, root: str, keys: Sequence[str], *, use_head: bool
) -> tuple[list[Planned], set[str]]:
    layers = _layer_count(keys, root)
    has_head = any(root + s in set(keys) for r in rows if r.head for s in r.sources)
    key_set = set(keys)
    planned: list[Planned] = []
    used: set[str] = set()
    missing: list[str] = []
    for row in rows:
        if row.head and not has_head:
            continue
        for i in range(layers) if row.layered else [None]:
            target = row.target.format(i) if i is not None else row.target
            sources = [root + (s.format(i) if i is not None else s) for s in row.sources]
            absent = [s for s in sources if s not in key_set]
            if absent:
                missing += absent
                continue
            used.update(sources)
            if row.head and not use_head:
                continue
            planned.append(_planned_row(store, target, sources, row))
    if missing:
        raise CheckpointError(
            f"{len(missing)} expected tensor(s) missing: {', '.join(sorted(set(missing))[:8])}",
            str(store.files[0]),
            "the checkpoint is incomplete or not a SigLIP vision tower",
        )
    return planned, used


def _planned_row(store: Store, target: str, sources: list[str], row: Row) -> Planned:
    if row.transform is None:
        (src,) = sources
        return Planned(
            target, store.shape(src), store.dtype(src), _loader(store, src), store.raw(src), store.where(src), (src,)
        )
    transform = row.transform
    metas = [torch.empty(store.shape(s), dtype=store.dtype(s), device="meta") for s in sources]
    try:
        out = transform(metas)
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:  # torch's shape errors on meta tensors
        raise CheckpointError(
            f"tensor shapes do not fit the layout ({exc})".splitlines()[0],
            " + ".join(store.where(s) for s in sources),
            "the checkpoint is not the layout it looks like",
        ) from None
    return Planned(
        target,
        tuple(out.shape),
        out.dtype,
        lambda: transform([store.load(s) for s in sources]),
        None,
        " + ".join(store.where(s) for s in sources),
        tuple(sources),
    )


def _layer_count(keys: Sequence[str], root: str) -> int:
    pattern = re.compile(re.escape(root) + r"(?:blocks\.|Transformer/encoderblock_)(\d+)[./]")
    idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not idx:
        raise CheckpointError("no transformer blocks found", root or "checkpoint", "is this a vision tower?")
    if idx != set(range(max(idx) + 1)):
        gaps = sorted(set(range(max(idx) + 1)) - idx)
        raise CheckpointError(f"transformer blocks {gaps} are missing", root or "checkpoint", "the file is incomplete")
    return max(idx) + 1


def _shape(store: Store, key: str, rank: int) -> tuple[int, ...]:
    shape = store.shape(key)
    if len(shape) != rank:
        raise CheckpointError(f"expected a rank-{rank} tensor, got shape {list(shape)}", store.where(key), None)
    return shape


def _infer_naflex_config(
    store: Store, root: str, kind: str, stated_size: int | None, notes: list[str]
) -> Siglip2VisionConfig:
    """A big_vision NaFlex tower's config from its shapes: the Dense stem's input is p·p·3 (RGB), the
    position grid is n x n."""
    keys = set(store.keys())
    patch_dim, d = _shape(store, root + "embedding/kernel", 2)
    n, n2, _ = _shape(store, root + "pos_embedding", 3)
    p = math.isqrt(patch_dim // 3)
    if p * p * 3 != patch_dim or n != n2:
        raise ConfigError(
            f"NaFlex stem input {patch_dim} is not p·p·3, or the position grid {n}x{n2} is not square",
            store.where(root + "embedding/kernel"),
            "pass --config with a Siglip2VisionConfig JSON",
        )
    notes.append(f"SigLIP 2 NaFlex: patch {p} (a {patch_dim}-wide Dense stem), a {n}x{n} position grid")
    return Siglip2VisionConfig(
        hidden_size=d,
        intermediate_size=_shape(store, root + "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", 2)[1],
        num_hidden_layers=_layer_count(list(keys), root),
        num_attention_heads=_shape(
            store, root + "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 3
        )[1],
        patch_size=p,
        num_patches=n * n,
        vision_use_head=root + "MAPHead_0/probe" in keys,
    )


def _infer_config(store: Store, root: str, kind: str, stated_size: int | None, notes: list[str]) -> SiglipVisionConfig:
    """The config from tensor shapes. The grid fixes ``image_size`` only up to the patch (so400m/14's
    27x27 grid is 378 to 391 px): a size the source states wins, then the one hub preset of these
    exact shapes (384 for so400m/14), then grid x patch; ``notes`` says which."""
    keys = set(store.keys())
    layers = _layer_count(list(keys), root)
    if kind == "npz":
        p, _, c, d = _shape(store, root + "embedding/kernel", 4)
        n = _shape(store, root + "pos_embedding", 3)[1]
        heads = _shape(store, root + "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 3)[1]
        inter = _shape(store, root + "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", 2)[1]
        head = root + "MAPHead_0/probe" in keys
    else:
        d, c, p, _ = _shape(store, root + "patch_embed.proj.weight", 4)
        n = _shape(store, root + "pos_embed", 3)[1]
        inter = _shape(store, root + "blocks.0.mlp.fc1.weight", 2)[0]
        head = root + "attn_pool.latent" in keys
        if d not in KNOWN_HEADS:
            raise ConfigError(
                f"cannot infer the head count of a timm model with width {d}",
                "num_attention_heads",
                "pass --config with a SiglipVisionConfig JSON",
            )
        heads = KNOWN_HEADS[d]
    grid = math.isqrt(n)
    if grid * grid != n or n == 0:
        raise ConfigError(f"position table of {n} entries is not a square grid", "pos_embedding", "pass --config")
    config = SiglipVisionConfig(
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=c,
        image_size=grid * p,
        patch_size=p,
        vision_use_head=head,
    )
    if stated_size is not None:
        if stated_size // p != grid:
            raise ConfigError(
                f"the timm config's image size {stated_size} does not fit the {grid}x{grid} position grid of patch {p}",
                "config.json: model_args.img_size",
                "pass --config with the right image_size",
            )
        notes.append(f"image_size {stated_size} from the timm config")
        return config.replace(image_size=stated_size)
    sizes = {
        (hub_id, preset.image_size)
        for hub_id, preset in PRESETS.items()
        if preset.replace(image_size=config.image_size, vision_use_head=head) == config
        and preset.image_size // p == grid
        and preset.image_size != config.image_size
    }
    if len({size for _, size in sizes}) == 1:
        hub_id, size = min(sizes)
        notes.append(
            f"image_size {size} as {hub_id} (a {grid}x{grid} grid of {p}-px patches fits {grid * p}–{grid * p + p - 1} px)"
        )
        return config.replace(image_size=size)
    return config


def _model_name(folder: Path) -> str | None:
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


def _folder_config(
    folder: Path, kind: str, inferred: SiglipVisionConfig | None, inputs: list[InputFile]
) -> AnyVisionConfig:
    if inferred is not None:
        return inferred
    file = folder / "config.json"
    if not file.is_file():
        raise InputError("no config.json beside the weights", str(folder), "pass --config with the model's config.json")
    inputs.append(InputFile(file, _hub_blob_sha256(file)))
    return _read_config(file)


def _read_config(file: Path) -> AnyVisionConfig:
    """A config.json of either tower: SigLIP 2 NaFlex (``Siglip2VisionConfig``) or fixed resolution."""
    data = read_json(
        file, what="config.json", error=ConfigError, missing_fix="pass a model folder or a config JSON file"
    )
    return load_config(data, source=str(file))


def _preprocessor(
    folder: Path, kind: str, config: AnyVisionConfig, inputs: list[InputFile]
) -> tuple[dict[str, Any], str]:
    file = folder / "preprocessor_config.json"
    naflex = isinstance(config, Siglip2VisionConfig)
    if kind in ("hf-folder", "hub") and file.is_file():
        data = read_json(file, what="preprocessor_config.json", error=ConfigError, fix="fix or delete it")
        (Siglip2ImageProcessor if naflex else SiglipImageProcessor).from_dict(data, source=str(file))  # validate
        inputs.append(InputFile(file, _hub_blob_sha256(file)))
        return data, f"copied from {file}"
    if naflex:
        proc = Siglip2ImageProcessor(patch_size=config.patch_size)
        return (
            proc.to_dict(),
            f"generated (SigLIP 2 NaFlex: bilinear, {proc.max_num_patches} patches of {config.patch_size} px)",
        )
    resample, why = _resample_from_config(folder)
    proc = SiglipImageProcessor.for_config(config, resample=resample)
    return proc.to_dict(), f"generated ({why})"


def _resample_from_config(folder: Path) -> tuple[int, str]:
    """The resize filter the checkpoint was trained with, read from the config beside it (never from a
    path): a timm config's ``pretrained_cfg.interpolation``, an open_clip config's
    ``preprocess_cfg.interpolation``, or an HF config.json (SigLIP 2 by its text vocabulary or hub id:
    bilinear; SigLIP: bicubic). Without one, SigLIP's bicubic, and the reason says so."""
    for name, section in (("config.json", "pretrained_cfg"), ("open_clip_config.json", "preprocess_cfg")):
        file = folder / name
        if not file.is_file():
            continue
        data = read_json(file, what=name, error=InputError, fix=f"fix or replace {name}")
        if not isinstance(data, dict):
            continue
        stated = data.get(section).get("interpolation") if isinstance(data.get(section), dict) else None
        if stated in ("bilinear", "bicubic"):
            return (BILINEAR if stated == "bilinear" else BICUBIC), f"{stated}, from {name}: {section}.interpolation"
        generation = siglip_generation(data)
        if generation == "siglip2":
            return BILINEAR, "bilinear: SigLIP 2 by its config.json"
        if generation == "siglip":
            return BICUBIC, "bicubic: SigLIP by its config.json"
    return (
        BICUBIC,
        "bicubic, SigLIP's: the config does not say which generation this is (set resample to 2 for SigLIP 2)",
    )
