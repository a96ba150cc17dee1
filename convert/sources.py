"""Detecting a source and planning the conversion: which output tensor comes from which input bytes.

`plan_conversion` returns a `Plan` that is fully checked before anything is written: every source
key is used (or explicitly dropped as another tower), every target key is produced, every shape
matches the config. Tensor data is only read later, one tensor at a time, by the writer.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siglip_scratch.checkpoint import (
    INDEX_NAME,
    check_state_shapes,
    folder_safetensors,
)
from siglip_scratch.config import (
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
from siglip_scratch.vlm import FAMILIES, feature_path, hub_layout, vlm_key

from .formats import detect
from .stores import NpzStore, SafetensorsStore, Store, TorchPickleStore
from .tables import Planned, loader

__all__ = ["InputFile", "Plan", "Planned", "plan_conversion"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


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
    # For --verify: the source's family (a `formats.Format.family`), the prefix of its vision tower
    # in the source's own key names, and the open store to read it by those names.
    family: str = "hf"
    root: str = ""
    store: Store | None = None
    # --with-projector: the VLM's own config.json, written instead of the tower's.
    vlm_config: dict[str, Any] | None = None
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
    with_projector: bool = False,
) -> Plan:
    """Detect ``source`` (hub id, HF folder, .safetensors/.bin/.pt/.npz file) and plan the output.

    ``hidden_act`` overrides the activation the config says (or the tanh GELU assumed for a timm or
    open_clip state dict, which carries none). A hub source's safetensors shards are read by HTTP range
    requests, only the vision tensors' bytes (see `fetch_vision_ranges`), unless ``full_download`` or
    offline, or the shard is cached whole already.

    ``with_projector`` (a VLM source): the projector too, and every key in the VLM's hub layout under its own
    config.json, so that transformers' VLM class and ``siglip-parity --image-features`` read the folder."""
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
        folder, commit, scratch = _hub_source(source, revision, full_download, inputs, with_projector)
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
        also = _vlm_extra if with_projector else None
        plan = _plan(source, folder, weights, kind, detected, override, config_file, no_head, hidden_act, inputs, also)
        if with_projector:
            _add_projector(plan, folder)
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
    repo_id: str, revision: str | None, full_download: bool, inputs: list[InputFile], with_projector: bool = False
) -> tuple[Path, str | None, Path | None]:
    """(the folder to read, the commit, the scratch folder of a ranged read or None)."""
    from huggingface_hub import constants

    from siglip_scratch.hub import download_vision_checkpoint, fetch_vision_ranges

    also = _vlm_extra if with_projector else None
    if not (full_download or constants.HF_HUB_OFFLINE):
        scratch = Path(tempfile.mkdtemp(prefix="siglip-convert-ranged-"))
        try:
            folder, commit, reads = fetch_vision_ranges(repo_id, revision=revision, scratch=scratch, also=also)
        except LookupError:  # pickle weights only: no ranges, downloaded whole below
            shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        else:
            inputs += [InputFile(folder / name, r.sha256, r) for name, r in reads.items()]
            return folder, commit, scratch
    folder = download_vision_checkpoint(repo_id, revision=revision, allow_pickle=True, also=also)
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
    also: Callable[[str], bool] | None = None,
) -> Plan:
    store = _open_store(weights, also)
    known = {f.path for f in inputs}
    inputs += [InputFile(f, _hub_blob_sha256(f)) for f in store.files if f not in known]
    keys = store.keys()
    fmt = detect(store, keys)
    found = fmt.layout(
        store,
        keys,
        folder=folder,
        where=str(weights),
        use_head=not no_head,
        hidden_act=hidden_act,
        infer=override is None,
    )
    layout, planned, used, drops, notes, inferred = (
        found.name,
        found.planned,
        found.used,
        found.drops,
        found.notes,
        found.inferred,
    )

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
        family=fmt.family,
        root=found.root,
        store=store,
    )


def _add_projector(plan: Plan, folder: Path) -> None:
    """--with-projector: the VLM's projector tensors (copied as they are), every key moved to the VLM's hub layout
    (`vlm.hub_layout`), and its own config.json kept as the output's (``Plan.vlm_config``)."""
    config_file = folder / "config.json"
    data = read_json(config_file, what="config.json", error=ConfigError) if config_file.is_file() else {}
    if not isinstance(data, dict) or data.get("model_type") not in FAMILIES:
        raise InputError(
            f"--with-projector needs a VLM checkpoint ({', '.join(sorted(FAMILIES))}); this source's config.json says "
            f"model_type {data.get('model_type') if isinstance(data, dict) else None!r}",
            str(config_file),
            "leave --with-projector out to convert the vision tower alone",
        )
    path = feature_path(data, plan.config, source=str(config_file))
    assert plan.store is not None
    projector = sorted(k for k in plan.store.keys() if vlm_key(k) is not None)
    if not projector:
        raise CheckpointError(
            "no projector tensors (multi_modal_projector.… or connector.…) in this VLM checkpoint",
            str(plan.store.files[0]),
            "leave --with-projector out to convert the vision tower alone",
        )
    store = plan.store
    for p in plan.tensors:
        p.key = hub_layout(path, p.key)
    plan.tensors += [
        Planned(
            hub_layout(path, vlm_key(k) or k),
            store.shape(k),
            store.dtype(k),
            loader(store, k),
            store.raw(k),
            store.where(k),
            (k,),
        )
        for k in projector
    ]
    plan.dropped -= len(projector)
    plan.vlm_config = data
    plan.notes.append(
        f"with the projector ({len(projector)} tensors) in the {data['model_type']} hub layout, under the VLM's own "
        "config.json (no language-model weights: transformers' VLM class initialises those)"
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


def _vlm_extra(key: str) -> bool:
    return vlm_key(key) is not None


def _open_store(weights: Path, also: Callable[[str], bool] | None = None) -> Store:
    name = weights.name
    if name.endswith(".npz"):
        return NpzStore(weights)
    if name.endswith(PICKLE_SUFFIXES) or name == BIN_INDEX:
        return TorchPickleStore(weights)
    return SafetensorsStore(weights, also=also)


def _hub_blob_sha256(path: Path) -> str | None:
    """A hub-cache snapshot file links to ``blobs/<sha256>`` for LFS files: reuse the hub's hash."""
    try:
        target = path.resolve()
    except OSError:
        return None
    if target.parent.name == "blobs" and is_sha256(target.name):
        return target.name
    return None


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
