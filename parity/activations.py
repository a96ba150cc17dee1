"""Judge a port in any framework from files: the activation-file protocol.

1. ``siglip-parity export-inputs DIR`` writes what a port needs to run the comparison's exact inputs:
   ``inputs.safetensors`` (``pixel_values`` — NaFlex adds ``pixel_attention_mask`` and ``spatial_shapes`` —
   and, for isolated mode, ``input.<site>``: the reference's input to every site), ``manifest.json``
   (format, shapes and dtype, seed, weights source and fingerprint, the versions that made it, the site
   contract) and, for synthetic weights, ``weights.safetensors`` (the canonical tensors, so a non-torch
   port can load them).
2. The port writes its outputs per site into one ``.safetensors`` or ``.npz`` file: ``propagated/<site>``
   (its end-to-end run on ``pixel_values``, each site's output as it goes) and ``isolated/<site>`` (the
   site run alone on ``input.<site>``); an unprefixed ``<site>`` serves whichever single mode is judged.
   Optional metadata (safetensors metadata, or an npz entry ``__meta__`` holding a JSON string):
   ``framework``, ``runtime``.
3. ``siglip-parity --candidate-activations FILE`` judges them exactly as a PyTorch candidate is judged:
   the same reference (rebuilt from the manifest and checked against its fingerprint), the same inputs
   (read back from the export), the float64 oracle, the pass rule, the diagnosis, the reports. The
   activations are replayed through `ActivationCandidate`, a module tree with the canonical site names
   whose modules emit the stored tensors, so nothing of the harness is written twice.

Layouts are declared, never guessed: ``--rename`` maps the file's names to canonical ones, and
``--layout REGEX=TRANSFORM`` applies one of `TRANSFORMS` to the sites it matches (a missing batch
dimension, a token grid in NHWC or NCHW, a transposed [B, D, N]).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from siglip_scratch.errors import InputError, OutputError, SourceError

from .inputs import ModelInputs, NaflexInputs
from .sites import RenameRules, apply_rename

__all__ = [
    "FORMAT",
    "TRANSFORMS",
    "ActivationCandidate",
    "export_inputs",
    "judge_activations",
    "load_activations",
    "read_export",
]

FORMAT = "siglip-parity-activations/1"
MODES = ("isolated", "propagated")


def _add_batch(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


def _tokens_from_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _tokens_from_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


def _bdn_to_bnd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2)


# The declared per-site layout transforms (``--layout REGEX=NAME``): the file's layout -> the site contract.
TRANSFORMS = {
    "add_batch": _add_batch,  # [N, D] -> [1, N, D] (and [D] -> [1, D] for the head): a port run on one image
    "nhwc_tokens": _tokens_from_nhwc,  # [B, h, w, D] -> [B, h·w, D]: a token grid kept as an image
    "nchw_tokens": _tokens_from_nchw,  # [B, D, h, w] -> [B, h·w, D]: a conv stem's output, not flattened
    "bdn_to_bnd": _bdn_to_bnd,  # [B, D, N] -> [B, N, D]: channels-first tokens
}


# -- export ----------------------------------------------------------------------------------------------
def fingerprint_digest(state: Mapping[str, torch.Tensor]) -> str:
    """One hex digest of every tensor's crc32 (the weights an export was made with)."""
    from .compare import weight_fingerprint

    crcs = weight_fingerprint(state)
    return f"{zlib.crc32(json.dumps(sorted(crcs.items())).encode()):08x}"


def export_inputs(
    out_dir: str | os.PathLike[str],
    *,
    weights: str | None = None,
    model: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    batch: int = 2,
    images: Sequence[str] | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    with_weights: bool | None = None,
) -> Path:
    """Write ``inputs.safetensors``, ``manifest.json`` (and ``weights.safetensors`` for synthetic weights, or
    when ``with_weights``) into ``out_dir``. Returns the folder."""
    from safetensors.torch import save_file

    from siglip_scratch.config import Siglip2VisionConfig

    from .compare import _record_reference, make_pixels, resolve_weights
    from .inspection import SITE_CONTRACT
    from .preprocess import processor_for_source
    from .reference import build_reference, transformers_version
    from .sites import site_names

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError("exists and is not an empty folder", str(out), "give a new or empty folder")
    if preset is None and model is None and weights is None:
        preset = "google/siglip-base-patch16-224"
    w = resolve_weights(weights=weights, model=model, preset=preset, seed=seed, dtype=dtype, revision=revision)
    config = w.config
    processor = processor_for_source(weights, model, preset, revision, config=config) if images else None
    inputs = make_pixels(config, images=images, batch=batch, seed=seed, processor=processor)
    from .compare import DTYPES

    inputs = inputs.to(dtype=DTYPES[dtype]) if isinstance(inputs, NaflexInputs) else inputs.to(DTYPES[dtype])
    names = site_names(config, "fine")
    ref_in, ref_out = _record_reference(build_reference(config, w.state_dict), names, inputs)
    tensors: dict[str, torch.Tensor] = (
        {k: v.clone(memory_format=torch.contiguous_format) for k, v in inputs.kwargs().items()}
        if isinstance(inputs, NaflexInputs)
        else {"pixel_values": inputs.clone(memory_format=torch.contiguous_format)}
    )
    for site in names:
        if site != "vision_model.embeddings":
            tensors[f"input.{site}"] = (
                ref_in[site].detach().clone(memory_format=torch.contiguous_format)
            )  # a layer and its first norm share one
    write_weights = w.synthetic if with_weights is None else with_weights
    manifest = {
        "format": FORMAT,
        "weights": {
            "source": w.source,
            "synthetic": w.synthetic,
            "preset": preset,
            "model": model,
            "weights": str(Path(weights).resolve()) if weights else None,
            "revision": revision,
            "seed": seed,
            "fingerprint": fingerprint_digest(w.state_dict),
            "file": "weights.safetensors" if write_weights else None,
        },
        "config": config.to_dict(),
        "naflex": isinstance(config, Siglip2VisionConfig),
        "dtype": dtype,
        "seed": seed,
        "batch": int(inputs.shape[0]),
        "images": [str(p) for p in images] if images else [],
        "inputs": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()
        },
        "sites": [
            {
                "name": site,
                "input": "pixel_values" if site == "vision_model.embeddings" else f"input.{site}",
                "output_shape": list(ref_out[site].shape),
            }
            for site in names
        ],
        "output_keys": "propagated/<site> and isolated/<site> (or <site> alone for one mode), in a .safetensors or .npz",
        "site_contract": SITE_CONTRACT,
        "made_with": {"transformers": transformers_version(), "torch": torch.__version__},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "inputs.safetensors"), metadata={"format": FORMAT})
    if write_weights:
        save_file({k: v.detach().contiguous() for k, v in w.state_dict.items()}, str(out / "weights.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out


def read_export(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, the export's input tensors), checked."""
    from safetensors.torch import load_file

    from siglip_scratch.errors import ConfigError
    from siglip_scratch.files import read_json

    folder = Path(folder)
    manifest = read_json(
        folder / "manifest.json",
        what="activation export manifest",
        error=ConfigError,
        missing_fix="pass the folder export-inputs wrote",
    )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(
            f"not a siglip-parity export (format {manifest.get('format') if isinstance(manifest, dict) else None!r})",
            str(folder / "manifest.json"),
            f"write one with siglip-parity export-inputs (format {FORMAT})",
        )
    file = folder / "inputs.safetensors"
    if not file.is_file():
        raise SourceError("inputs.safetensors is missing", str(folder), "export again with siglip-parity export-inputs")
    return manifest, load_file(str(file))


def export_model_inputs(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ModelInputs:
    if manifest.get("naflex"):
        return NaflexInputs(tensors["pixel_values"], tensors["pixel_attention_mask"], tensors["spatial_shapes"])
    return tensors["pixel_values"]


# -- the candidate's file --------------------------------------------------------------------------------
def load_activations(
    path: str | os.PathLike[str],
    sites: Sequence[str],
    *,
    rename: RenameRules = (),
    layouts: Sequence[tuple[re.Pattern[str], str]] = (),
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """({"isolated": {site: tensor}, "propagated": {…}, "any": {…}}, metadata) from a .safetensors/.npz file.

    Names go through ``rename`` (to canonical site names), then ``layouts`` transforms; a name that is no
    site after renaming is an error (never silently ignored)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError("activations file not found", str(path), "pass the file your port wrote")
    raw, meta = _read_arrays(path)
    out: dict[str, dict[str, torch.Tensor]] = {"isolated": {}, "propagated": {}, "any": {}}
    unknown = []
    for name, value in raw.items():
        mode, _, rest = name.partition("/")
        if mode not in MODES:
            mode, rest = "any", name
        site = apply_rename(rest, rename) if rename else rest
        if site not in sites:
            unknown.append(name)
            continue
        tensor = value
        for pattern, transform in layouts:
            if pattern.fullmatch(site):
                try:
                    tensor = TRANSFORMS[transform](tensor)
                except (RuntimeError, IndexError) as exc:
                    raise InputError(
                        f"--layout {transform} does not apply to {name} of shape {list(value.shape)} ({exc})",
                        str(path),
                        "check which sites the pattern matches",
                    ) from None
        out[mode][site] = tensor
    if unknown:
        raise InputError(
            f"{len(unknown)} name(s) are no canonical site: {', '.join(sorted(unknown)[:4])}",
            str(path),
            "name outputs isolated/<site> or propagated/<site> (see manifest.json), or map them with --rename",
        )
    if not any(out.values()):
        raise InputError("the file holds no arrays", str(path), "write one output per site")
    return out, meta


def _read_arrays(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta_raw = arrays.pop("__meta__", None)
            meta = json.loads(str(meta_raw)) if meta_raw is not None else {}
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            raise InputError(
                f"unsupported activations file type {path.suffix!r}", str(path), "write .safetensors or .npz"
            )
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(
            f"cannot read activations ({type(exc).__name__}: {exc})", str(path), "write it again"
        ) from None
    bad = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise InputError(f"activations must be floating point; {bad[0]} is {tensors[bad[0]].dtype}", str(path), None)
    return tensors, {k: str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


class _Emit(nn.Module):
    """One site: ignores its input and returns what the file holds for it in the current mode."""

    def __init__(self, owner: ActivationCandidate, site: str):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)
        self.site = site

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._owner[0].value(self.site)


class ActivationCandidate(nn.Module):
    """A candidate made of stored activations: a module tree with the canonical site names, whose
    forward calls each site that has a value in the current mode (so the harness's hooks see them)."""

    external_candidate = True  # no weights to load: the harness takes it as it is (see compare._prepare_candidate)

    def __init__(
        self, activations: Mapping[str, Mapping[str, torch.Tensor]], sites: Sequence[str], info: dict[str, Any]
    ):
        super().__init__()
        self.activations = activations
        self.sites = list(sites)
        self.info = info
        self.run_mode = "propagated"
        for site in self.sites:
            _install(self, site, _Emit(self, site))

    def set_run_mode(self, mode: str) -> None:
        """Called by the harness before each run (and before the diagnosis, which is isolated)."""
        self.run_mode = mode

    def value(self, site: str) -> torch.Tensor:
        return self.activations[self.run_mode].get(site, self.activations["any"].get(site))

    def has(self, site: str) -> bool:
        return site in self.activations[self.run_mode] or site in self.activations["any"]

    def forward(self, *args: Any, **kwargs: Any) -> None:
        for site in self.sites:
            if self.has(site):
                self.get_submodule(site)()
        return None


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, creating plain containers on the way; a site that is
    also a container (``…layers.3`` holds ``…layers.3.mlp``) keeps both roles."""
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    existing = parent._modules.get(parts[-1])
    if existing is not None:  # a container made earlier: adopt its children
        for name, sub in existing._modules.items():
            module.add_module(name, sub)
    parent.add_module(parts[-1], module)


# -- judging ---------------------------------------------------------------------------------------------
def judge_activations(
    path: str | os.PathLike[str],
    *,
    inputs_dir: str | os.PathLike[str] | None = None,
    mode: str = "both",
    depth: str = "fine",
    rename: RenameRules = (),
    layouts: Sequence[tuple[re.Pattern[str], str]] = (),
    weights: str | None = None,
    model: str | None = None,
    preset: str | None = None,
    revision: str | None = None,
    skip_sites: Sequence[str] = (),
    atol: float | None = None,
    rtol: float | None = None,
    progress: Any = None,
):
    """Judge a port's stored activations against transformers, as `compare` judges a module (see module doc).

    The weights come from the export's manifest unless a source is given; either way they must have the
    fingerprint the export recorded, and the export's torch/transformers versions must be the ones
    installed (the reference's site inputs would otherwise not be the ones the port ran on)."""
    from .compare import Weights, compare, resolve_weights
    from .reference import transformers_version
    from .sites import site_names

    path = Path(path)
    folder = Path(inputs_dir) if inputs_dir is not None else path.parent
    manifest, tensors = read_export(folder)
    made = manifest.get("made_with", {})
    here = {"transformers": transformers_version(), "torch": torch.__version__}
    if made != here:
        raise InputError(
            f"the export was made with {made}, this run has {here}: the reference's inputs to each site may differ",
            str(folder / "manifest.json"),
            "export the inputs again here (siglip-parity export-inputs) and rerun the port on them",
        )
    wm = manifest["weights"]
    dtype = manifest["dtype"]
    if not (weights or model or preset):
        weights, model, preset = wm.get("weights"), wm.get("model"), wm.get("preset")
        revision = revision or wm.get("revision")
    w = resolve_weights(
        weights=weights, model=model, preset=preset, seed=int(wm.get("seed", 0)), dtype=dtype, revision=revision
    )
    if fingerprint_digest(w.state_dict) != wm["fingerprint"]:
        raise InputError(
            f"these weights ({w.source}) are not the ones the inputs were exported with ({wm['source']})",
            "--weights/--model/--preset",
            "judge with the export's weights (leave the source out to use the manifest's)",
        )
    names = site_names(w.config, depth)  # type: ignore[arg-type]
    acts, meta = load_activations(path, site_names(w.config, "fine"), rename=rename, layouts=layouts)  # type: ignore[arg-type]
    info = {
        "impl": f"activations {path}",
        "framework": meta.get("framework", "unknown (no 'framework' metadata in the file)"),
        "runtime": meta.get("runtime", "unknown"),
        "version": meta.get("runtime", ""),
        "attn": "n/a",
        "inputs": str(folder),
    }
    candidate = ActivationCandidate(acts, names, info)
    weights_obj = Weights(w.config, w.state_dict, w.source, w.synthetic)
    return compare(
        weights=weights_obj,
        candidate=candidate,
        rename=[],
        pixel_values=export_model_inputs(manifest, tensors),
        mode=mode,
        depth=depth,  # type: ignore[arg-type]
        dtype=dtype,
        skip_sites=skip_sites,
        atol=atol,
        rtol=rtol,
        progress=progress,
    )
