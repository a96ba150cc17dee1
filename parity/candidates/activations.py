"""Activation files as a candidate: a port's outputs per site, computed on the inputs ``export-inputs`` wrote.

The file (``.safetensors`` or ``.npz``) names each output ``propagated/<site>`` (the port's end-to-end run on
``pixel_values``) or ``isolated/<site>`` (the site run alone on ``input.<site>``); an unprefixed ``<site>``
is a propagated output (what an end-to-end dump holds) unless the metadata says ``"mode": "isolated"``. The file
is judged at the sites and modes it carries (`ActivationCandidate.narrow`, `ActivationCandidate.not_exposed`).
Optional metadata (safetensors metadata, or an npz entry ``__meta__`` holding a JSON string): ``framework``,
``runtime``, ``mode``. `ActivationCandidate` replays them through a
`replay.ReplayTree`, so they are judged exactly as a PyTorch module is.

Layouts are declared, never guessed: ``--rename`` maps the file's names to canonical ones, and
``--layout REGEX=TRANSFORM`` applies one of `TRANSFORMS` to the sites it matches (a missing batch
dimension, a token grid in NHWC or NCHW, a transposed [B, D, N]).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siglip_scratch.errors import ConfigError, InputError, SourceError
from siglip_scratch.files import read_json

from ..inputs import ModelInputs, NaflexInputs
from ..reference import transformers_version
from ..sites import SUBLAYER_SITES, RenameRules, apply_rename, site_names
from .base import Candidate, Pinned
from .loading import LoadResult
from .replay import ReplayTree

__all__ = [
    "FORMAT",
    "TRANSFORMS",
    "ActivationCandidate",
    "export_model_inputs",
    "load_activations",
    "read_export",
]

FORMAT = "siglip-parity-activations/1"
LAYER = re.compile(r"vision_model\.encoder\.layers\.\d+")
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


def read_export(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, the export's input tensors), checked."""
    from safetensors.torch import load_file

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


def load_activations(
    path: str | os.PathLike[str],
    sites: Sequence[str],
    *,
    rename: RenameRules = (),
    layouts: Sequence[tuple[re.Pattern[str], str]] = (),
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """({"isolated": {site: tensor}, "propagated": {…}}, metadata) from a .safetensors/.npz file.

    Names go through ``rename`` (to canonical site names), then ``layouts`` transforms; a name that is no
    site after renaming is an error (never silently ignored). A name without a mode prefix is a propagated
    output (what an end-to-end run dumps), unless the file's metadata says ``"mode": "isolated"``."""
    path = Path(path)
    if not path.is_file():
        raise SourceError("activations file not found", str(path), "pass the file your port wrote")
    raw, meta = _read_arrays(path)
    out: dict[str, dict[str, torch.Tensor]] = {"isolated": {}, "propagated": {}}
    unknown = []
    for name, value in raw.items():
        mode, rest = _split(name, meta)
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


def _split(name: str, meta: Mapping[str, str]) -> tuple[str, str]:
    """(mode, site name as written) of one array name: ``isolated/<site>``, ``propagated/<site>``, or ``<site>``
    (propagated, or the mode the file's metadata declares)."""
    mode, _, rest = name.partition("/")
    if mode in MODES:
        return mode, rest
    return meta.get("mode", "propagated"), name


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


class ActivationCandidate(Candidate):
    """A port's stored activations (see module doc). Opening reads the export's manifest and inputs and checks
    they were made by the torch and transformers installed here; `load` reads the file against the site names."""

    kind = "activations"
    rerunnable = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        inputs_dir: str | os.PathLike[str] | None = None,
        layouts: Sequence[tuple[re.Pattern[str], str]] = (),
    ):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError("activations file not found", str(self.path), "pass the file your port wrote")
        self.folder = Path(inputs_dir) if inputs_dir is not None else self.path.parent
        self.layouts = list(layouts)
        self.manifest, self.tensors = read_export(self.folder)
        made = self.manifest.get("made_with", {})
        here = {"transformers": transformers_version(), "torch": torch.__version__}
        if made != here:
            raise InputError(
                f"the export was made with {made}, this run has {here}: the reference's inputs to each site may differ",
                str(self.folder / "manifest.json"),
                "export the inputs again here (siglip-parity export-inputs) and rerun the port on them",
            )
        self.run_mode = "propagated"
        self.activations: dict[str, dict[str, torch.Tensor]] = {}
        self.sites: list[str] = []
        raw, self.meta = _read_arrays(self.path)  # read now: a damaged file fails before any model is built
        self.raw_names = list(raw)
        declared = self.meta.get("mode")
        if declared is not None and declared not in MODES:
            raise InputError(
                f"metadata mode {declared!r} is not one of {', '.join(MODES)}",
                str(self.path),
                'declare "isolated" or "propagated" (it applies to names without a prefix)',
            )

    def narrow(self, mode, depth, rules):
        carried = [_split(n, self.meta) for n in self.raw_names]
        modes = sorted({m for m, _ in carried})
        sites = {apply_rename(s, rules) if rules else s for _, s in carried}
        notes = []
        if mode is None and len(modes) == 1:
            mode = modes[0]
            notes.append(
                f"the file holds {mode} outputs only (names without a prefix are propagated outputs unless its "
                f'metadata says "mode": "isolated"): judged in {mode} mode'
            )
        if depth is None and not any(s.rpartition(".")[2] in SUBLAYER_SITES for s in sites):
            depth = "coarse"
            notes.append(
                "the file carries no sub-layer site (layer_norm1, self_attn, layer_norm2, mlp): judged at coarse "
                "depth (embeddings, each layer, post_layernorm, head)"
            )
        return mode, depth, notes

    def pinned(self) -> Pinned:
        wm = self.manifest["weights"]
        return Pinned(
            weights={
                "weights": wm.get("weights"),
                "model": wm.get("model"),
                "preset": wm.get("preset"),
                "revision": wm.get("revision"),
                "seed": int(wm.get("seed", 0)),
                "synthetic": wm.get("regime") or "iid",  # exports before the regime was recorded were i.i.d.
                "source": wm.get("source"),
            },
            fingerprint=wm["fingerprint"],
            dtype=self.manifest["dtype"],
            inputs=export_model_inputs(self.manifest, self.tensors),
            where=str(self.folder),
        )

    def load(self, config, state, rules, *, names, attn, allowed, infer) -> LoadResult:
        self.activations, meta = load_activations(
            self.path, site_names(config, "fine"), rename=rules, layouts=self.layouts
        )
        self.sites = list(names)
        self.info = {
            "impl": f"activations {self.path}",
            "framework": meta.get("framework", "unknown (no 'framework' metadata in the file)"),
            "runtime": meta.get("runtime", "unknown"),
            "version": meta.get("runtime", ""),
            "attn": "n/a",
            "inputs": str(self.folder),
        }
        self.module = ReplayTree(self, self.sites)
        return LoadResult(via="activations file (the port loaded its own weights)")

    def not_exposed(self, site, judged):
        if LAYER.fullmatch(site) or any(site in values for values in self.activations.values()):
            return None  # every layer output must be there; a site the file has but not for this mode fails
        return "the file does not carry it (judged at the sites it carries)"

    def to(self, device: str, dtype: torch.dtype) -> None:
        pass  # stored values are compared as they are (measure moves them to the reference's device)

    def set_mode(self, mode: str) -> None:
        self.run_mode = mode

    def _value(self, site: str) -> torch.Tensor | None:
        return self.activations[self.run_mode].get(site)

    def emit(self, site: str, x: torch.Tensor | None) -> torch.Tensor:
        value = self._value(site)
        assert value is not None, f"replayed a site the file does not hold: {site}"
        return value

    def replay(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, None]]:
        for site in self.sites:
            if self._value(site) is not None:
                yield site, None
