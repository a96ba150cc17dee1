"""Judge a port in any framework from files: the activation-file protocol.

1. ``siglip-parity export-inputs DIR`` writes what a port needs to run the comparison's exact inputs:
   ``inputs.safetensors`` (``pixel_values`` — NaFlex adds ``pixel_attention_mask`` and ``spatial_shapes`` —
   and, for isolated mode, ``input.<site>``: the reference's input to every site), ``manifest.json``
   (format, shapes and dtype, seed, weights source and fingerprint, the versions that made it, the site
   contract) and, for synthetic weights, ``weights.safetensors`` (the canonical tensors, so a non-torch
   port can load them).
2. The port writes its outputs per site into one ``.safetensors`` or ``.npz`` file: ``propagated/<site>``
   (its end-to-end run on ``pixel_values``, each site's output as it goes) and ``isolated/<site>`` (the
   site run alone on ``input.<site>``); an unprefixed ``<site>`` is a propagated output unless the file's
   metadata says ``"mode": "isolated"``. Optional metadata (safetensors metadata, or an npz entry ``__meta__``
   holding a JSON string): ``framework``, ``runtime``, ``mode``.
3. ``siglip-parity --candidate-activations FILE`` judges them exactly as a PyTorch candidate is judged:
   the same reference (rebuilt from the manifest and checked against its fingerprint), the same inputs
   (read back from the export), the float64 oracle, the pass rule, the diagnosis, the reports. The
   activations are replayed through `candidates.ActivationCandidate` (candidates/activations.py: the file
   format, its reading and the declared layouts), so nothing of the harness is written twice.

This module is the export side (`export_inputs`) and `judge_activations`, `compare` with an activations
file as the candidate.

"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.checkpoint import save_safetensors
from siglip_scratch.config import Siglip2VisionConfig
from siglip_scratch.errors import OutputError

from .candidates import ActivationCandidate, RenameLike
from .candidates.activations import FORMAT
from .compare import compare
from .inputs import NaflexInputs, make_pixels
from .preprocess import processor_for_source
from .reference import build_reference, record_reference, transformers_version
from .report import Report
from .sites import SITE_CONTRACT, site_names, teacher_input
from .weights import DTYPES, fingerprint_digest, resolve_weights

__all__ = ["export_inputs", "judge_activations"]


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
    synthetic: str = "trained",
) -> Path:
    """Write ``inputs.safetensors``, ``manifest.json`` (and ``weights.safetensors`` for synthetic weights, or
    when ``with_weights``) into ``out_dir``. Returns the folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError("exists and is not an empty folder", str(out), "give a new or empty folder")
    if preset is None and model is None and weights is None:
        preset = "google/siglip-base-patch16-224"
    w = resolve_weights(
        weights=weights, model=model, preset=preset, seed=seed, dtype=dtype, revision=revision, synthetic=synthetic
    )
    config = w.config
    processor = processor_for_source(weights, model, preset, revision, config=config) if images else None
    inputs = make_pixels(config, images=images, batch=batch, seed=seed, processor=processor)
    inputs = inputs.to(dtype=DTYPES[dtype]) if isinstance(inputs, NaflexInputs) else inputs.to(DTYPES[dtype])
    names = site_names(config, "fine")
    ref_in, ref_out = record_reference(build_reference(config, w.state_dict), names, inputs)
    tensors: dict[str, torch.Tensor] = (
        {k: v.clone(memory_format=torch.contiguous_format) for k, v in inputs.kwargs().items()}
        if isinstance(inputs, NaflexInputs)
        else {"pixel_values": inputs.clone(memory_format=torch.contiguous_format)}
    )
    for site in names:
        if teacher_input(site, ref_in) is not None:
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
            "regime": w.regime,
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
                "input": f"input.{site}" if teacher_input(site, ref_in) is not None else "pixel_values",
                "output_shape": list(ref_out[site].shape),
            }
            for site in names
        ],
        "output_keys": "propagated/<site> and isolated/<site> (or <site> alone for one mode), in a .safetensors or .npz",
        "site_contract": SITE_CONTRACT,
        "made_with": {"transformers": transformers_version(), "torch": torch.__version__},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out / "inputs.safetensors", {"format": FORMAT})
    if write_weights:
        save_safetensors({k: v.detach().contiguous() for k, v in w.state_dict.items()}, out / "weights.safetensors")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out


def judge_activations(
    path: str | os.PathLike[str],
    *,
    inputs_dir: str | os.PathLike[str] | None = None,
    layouts: Sequence[tuple[re.Pattern[str], str]] = (),
    rename: RenameLike = (),
    progress: Callable[[str], None] | None = None,
    **fields: Any,
) -> Report:
    """Judge a port's stored activations against transformers: `compare` with the file as the candidate.

    The weights come from the export's manifest unless a source is given (``weights``/``model``/``preset``);
    either way they must have the fingerprint the export recorded, and the export's torch/transformers
    versions must be the ones installed. Other keywords are `RunOptions` fields (``mode``, ``depth``,
    ``skip_sites``, ``atol``, ``rtol``)."""
    candidate = ActivationCandidate(path, inputs_dir=inputs_dir, layouts=layouts)
    return compare(candidate=candidate, rename=rename or [], progress=progress, **fields)
